"""event-datagram: the OpenSIPS event_datagram transport as a fan-out engine.

How this package is laid out (everything here runs in the main process):
  wire.py           encode one event as a JSON-RPC 2.0 notification, once
  address.py        subscriber socket syntax: parse, print, resolve
  subscriptions.py  events, subscribers, expiry, persistence, allow-list
  shm.py            named shared-memory segments (create, attach, reclaim)
  ring.py           the single-producer/single-consumer ring (layout docstring)
  counters.py       the per-worker counter block (layout docstring)
  producer.py       the Engine: the public raise path and its accounting
  supervisor.py     start, pin, watch, restart, drain and stop workers
The worker side lives in the sibling package `workers`.
"""
