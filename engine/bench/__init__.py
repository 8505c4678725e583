"""The stress run behind `make bench` (`event-datagram bench`): main.py (options,
exit codes), run.py (the rounds), live.py (the engine contender), baseline.py
(the naive sender and the sendmmsg ceiling), receivers.py (checking receivers),
report.py, plot.py, common.py; amqp.py and stream.py (the broker rounds:
`--source amqp`, `--source stream`) with broker.py (a private RabbitMQ);
metrics_overhead.py measures scraping; http_auth.py (run by hand) what TLS and
basic auth cost the HTTP MI and /metrics; routing.py (run by hand) groups and
filters against plain subscribers."""
