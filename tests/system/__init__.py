"""The `event-datagram` command as a process: CLI, MI transports, Prometheus, bench,
the installed wheel (slow)."""
