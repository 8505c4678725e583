"""The bench's rounds, one skeleton for all: skeleton.py (Round: set-up, warm-up,
the timed window with CPU measured by role, teardown, the record; EngineRound: a
fresh engine, its drain, counters and own loss), api.py (raise_event; the latency
and idle phases), ingest.py (a datagram ingest socket), broker.py (a RabbitMQ
queue or stream), sender.py (the baseline and the ceiling)."""
