"""Where events come from, besides the Python API and the MI: adapters in front of
the one raise path (Engine), which never touch rings, routing or counters.
Empty for now: datagram ingest, upstream subscription and AMQP come next."""
