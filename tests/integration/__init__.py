"""Real worker processes, shared memory and sockets, driven from this process (slow)."""
