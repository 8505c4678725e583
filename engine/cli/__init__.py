"""The `event-datagram` command: main.py (argument parsing and the client verbs),
run.py (`run`: the engine and its MI listeners), listen.py (`listen`), explain.py
(MI errors a person can act on)."""
