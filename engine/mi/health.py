"""What ``GET /ready`` answers: the reasons an engine is not ready, read-only.

Ready means: the engine runs, every worker is up and has finished booting (a
restarted worker is not ready until it can send), and every configured source
that connects somewhere (an upstream MI, a broker) is connected. The numbers come
from ``Engine.statistics()`` and the supervisor's own view, the same ones the
metrics show (``event_datagram_workers_alive``, ``_upstream_up``, ``_amqp_up``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.producer import Engine

_SOURCE_DOWN = {
    "upstream": "upstream {} is not subscribed",
    "amqp": "broker source {} is not connected",
    "stream": "stream source {} is not reading",
}


def not_ready(engine: Engine | None) -> list[str]:
    """Why `engine` is not ready, one line per reason; [] when it is."""
    if engine is None or not engine.supervisor.running:
        return ["the engine is not running"]
    if engine.failure:
        return [f"the engine failed: {engine.failure}"]
    supervisor = engine.supervisor
    stats = engine.statistics()
    reasons = []
    for w in stats.workers:
        if not w.alive:
            reasons.append(f"worker {w.index} is down")
        elif not supervisor.ready(w.index):
            reasons.append(f"worker {w.index} is starting")
    for source in stats.sources:
        if source.up == 0:
            text = _SOURCE_DOWN.get(source.kind, source.kind + " {} is down")
            reasons.append(text.format(source.name))
    return reasons
