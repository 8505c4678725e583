"""The stress run behind `make bench` (`event-datagram bench`): main.py (options,
exit codes), run.py (orders the rounds, the latency and idle phases, clean-up),
rounds/ (one skeleton and the contenders: api, ingest, broker, sender), live.py
(the round record, the engine's drain and metrics scrapes), baseline.py (the
sender process: the naive baseline, the sendmmsg ceiling, the ingest emitter),
receivers.py (checking receivers) with receiver_sockets.py (their sockets and
the kernel's drops at them), summary.py (the JSON document), table.py (what it
prints), machine.py (the machine and its limits), plot.py, common.py; amqp.py
and stream.py (the broker feed, its fills and summaries; the private RabbitMQ is
engine.testing.broker). probes/ holds the standalone measurements run by hand
(metrics_overhead, http_auth, amqp_sizes, fanout_scale, routing)."""
