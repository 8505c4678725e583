"""What the tests share, in one package (none of it is a test):

support.py    engines (running_engine), real receivers on loopback and UNIX
              sockets, the vectors loader (load_vector), a settable Clock, waiting
mi.py         the MI, server and CLI tests: captured sessions, replies, `run` processes
broker.py     a real private RabbitMQ (engine.testing.broker.LocalBroker), found or refused
tls.py        a private CA and certificates, and web config files that use them
dashboard.py  the Grafana dashboard, its provisioning and the alert rules, as shipped
captures.py   the datagrams a real OpenSIPS sent (tests/vectors), loaded once
hostile_mi.py a fake OpenSIPS MI that misbehaves on purpose (a process of its own)
hostile_soak.py  the hostile-upstream targets, measured (run by hand, a minute)
bench_wire_check.py  an A/B microbenchmark of the notification check (run by hand)
"""
