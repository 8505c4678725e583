"""Everything that runs inside a worker process: drain a ring, send, count."""
