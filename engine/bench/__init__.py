"""The stress run behind `make bench` (`event-datagram bench`): main.py (options,
exit codes), run.py (the rounds), live.py (the engine contender), baseline.py
(the naive sender and the sendmmsg ceiling), receivers.py (checking receivers,
their sockets' kernel drops), summary.py (the JSON document), table.py (what it
prints), plot.py, common.py; amqp.py and stream.py (the broker rounds: `--source
amqp`, `--source stream`; the private RabbitMQ is engine.testing.broker).
probes/ holds the standalone measurements run by hand (metrics_overhead,
http_auth, amqp_sizes, fanout_scale, routing)."""
