"""The `event-datagram` command: main.py (argument parsing and the client verbs),
run.py (`run`: the engine and its MI listeners), reload.py (what SIGHUP applies),
logs.py (log level and format), notify.py (systemd's notify protocol),
listen.py (`listen`), explain.py (MI errors a person can act on)."""
