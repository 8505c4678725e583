"""Everything that runs inside a worker process: drain a ring, send, count.

worker.py   the process: drain its ring in batches, send, count once per batch
table.py    its own subscriber table, kept by the control records in ring order
routes.py   groups and filtered subscribers: the decision and the failover
sender.py   batched, non-blocking sends: sendmmsg(2) through ctypes
logs.py     log lines shaped like the main process's
Imports engine.shm and engine.errors only (an import-linter contract).
"""
