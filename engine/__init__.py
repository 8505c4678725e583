"""event-datagram: the OpenSIPS event_datagram transport as a fan-out engine.

How this package is laid out (everything here runs in the main process):
  wire.py           encode one event as a JSON-RPC 2.0 notification, once
  address.py        subscriber socket syntax: parse, print, resolve
  subscriptions.py  events, subscribers, expiry, allow-list (state.py: the file)
  shm.py            named shared-memory segments (create, attach, reclaim)
  ring.py           the single-producer/single-consumer ring (layout docstring)
  counters.py       the per-worker counter block (layout docstring)
  options.py        the engine's settings ([engine] in the config)
  producer.py       the Engine: the public raise path and its accounting
  routing.py        which worker holds whom; control records and restart snapshots
  supervisor.py     start, pin, watch, restart, drain and stop workers
  statistics.py     frozen snapshots of every counter, the accounting identity
  metrics.py        Prometheus collector and exposition() for GET /metrics
  mi.py             JSON-RPC dispatch of the OpenSIPS MI (mi_commands.py: the commands)
  server.py         HTTP (/mi, /metrics) and MI datagram listeners (mi_fifo.py: FIFO)
  config.py         the TOML config as msgspec structs (default.toml)
  runner.py         what `run` runs: engine + listeners, signals
  cli.py            the `event-datagram` command (mi_client.py, listen.py)
  bench*.py         the stress run behind `make bench`
The worker side lives in the sibling package `workers`.
"""
