"""Standalone measurements, each run by hand as `python -m engine.bench.probes.NAME`
(not part of `make bench`): metrics_overhead.py (what scraping /metrics costs),
http_auth.py (what TLS and basic auth cost the HTTP MI and /metrics),
amqp_sizes.py (broker throughput by message size), fanout_scale.py (tens of
thousands of subscribers on one engine), routing.py (groups and filters against
plain subscribers; also `event-datagram bench --routing`). Two are run by the bench
itself, in the idle phase beside the engine's figures: c_wake.py compiles and runs
wake.c (the kernel's own first-event-after-a-pause chain in C), and runs
py_wake.py (the same chain in Python: CPython's own floor)."""
