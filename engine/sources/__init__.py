"""Where events come from, besides the Python API and the MI: adapters in front of
the one raise path (Engine.raise_encoded), which never touch rings, routing or
counters themselves.

ingest.py    datagram sockets that take JSON-RPC notifications (event_datagram's)
relay.py     the step they share: validate, raise byte for byte, count every outcome
amqp.py      a RabbitMQ queue per engine on the exchange OpenSIPS publishes to
amqp_config.py  its [[amqp]] section (the URL read once, never logged whole)
amqp_frames.py  its fast path: deliveries read from each socket read, oversize ones skipped
stream.py    a RabbitMQ stream read by every engine, each resuming at its stored offset
stream_config.py  its [[stream]] section
stream_client.py  what it asks of rstream (chunks, lag) and pika (declare)
stream_offsets.py  the engine's copy of its stored offset (retention may drop the broker's)
amqp10.py    its bodies: the data section of an AMQP 1.0 message, not decoded
upstream.py  subscribing those sockets at an OpenSIPS MI, and keeping them there
secret_url.py  a broker URL (its password) from the config, a file or the environment
guard.py     what keeps a source's thread alive (caught, counted, back-off) and its log short
"""
