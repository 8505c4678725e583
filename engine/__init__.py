"""event-datagram: the OpenSIPS event_datagram transport as a fan-out engine.

How this package is laid out. This file imports nothing: every worker process
runs it (workers import engine.shm and engine.errors only).

The core, flat (the main process, or an application embedding the engine):
  errors.py         one error hierarchy: EventDatagramError and its children
  wire.py           the JSON-RPC notification: encode once, the event-name rule, MAX_PAYLOAD
  address.py        socket syntax: subscriber sockets and listen addresses
  targets.py        virtual groups (virtual:POLICY sock ...) and filters (name=pattern)
  subscriptions.py  events, subscribers, expiry, allow-list (state.py: the file)
  guards.py         the engine's own sockets (no self-subscription), refusal counters
  options.py        the engine's settings ([engine] in the config)
  producer.py       the Engine: life cycle and the public API (raise, subscribe, statistics)
  fanout.py         the hot path it delegates to: admission (one rule), ring staging,
                    publish and wake, under the hot lock it owns; the producer's counters
  routing.py        which worker holds whom; control records, expiry, restart snapshots
  supervisor.py     start, pin, watch, restart, drain, stop workers (a SupervisorHost)
  statistics.py     frozen snapshots of every counter, the accounting identity
  metrics.py        the Prometheus collector and exposition() for GET /metrics
  config.py         the TOML config as msgspec structs (default.toml)
  signals.py        one way to catch the signals that stop (or reload) a process
  paths.py          default runtime and state directories (systemd, XDG, root)
  version.py        the package's version and build labels
The folders:
  shm/              what both sides of shared memory share, each layout defined once:
                    segment.py, ring.py (reader and writer), counters.py, spec.py,
                    doorbell.py (sleep and wake), mmsg.py (the sendmmsg/recvmmsg structs)
  sources/          where events come from besides the API: ingest.py (datagram
                    sockets), upstream.py (subscribing at an OpenSIPS MI), amqp.py and
                    stream.py (RabbitMQ), relay.py (validate, raise, count: the one rule)
  mi/               the OpenSIPS control interface: protocol.py, dispatch.py, commands.py, http.py
                    (parsing, pure), server.py (HTTP), datagram.py (UDP), fifo.py, client.py
  cli/              the `event-datagram` command: main.py (verbs), run.py, listen.py,
                    explain.py, reload.py (SIGHUP), logs.py, notify.py (systemd's sd_notify)
  bench/            the stress run behind `make bench`; its standalone probes in bench/probes/
  testing/          what tests and the bench start for real (broker.py: a private RabbitMQ)
The worker side lives in the sibling package `workers`. The import rules between
these are import-linter contracts in pyproject.toml, checked by `make lint`.
"""
