"""Pure in-process tests: no worker processes, no subprocesses. `make test-fast`."""
