"""Where events come from, besides the Python API and the MI: adapters in front of
the one raise path (Engine.raise_encoded), which never touch rings, routing or
counters themselves.

ingest.py    datagram sockets that take JSON-RPC notifications (event_datagram's)
relay.py     the step they share: validate, raise byte for byte, count every outcome
amqp.py      a RabbitMQ queue per engine on the exchange OpenSIPS publishes to
amqp_frames.py  its fast path: deliveries read from each socket read, oversize ones skipped
upstream.py  subscribing those sockets at an OpenSIPS MI, and keeping them there
guard.py     what keeps a source's thread alive (caught, counted, back-off) and its log short
"""
