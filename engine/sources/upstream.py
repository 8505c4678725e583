"""Upstream subscription: the engine subscribes its own ingest socket at an
OpenSIPS MI, so that OpenSIPS has one subscriber (SPEC section 8, point 4).

One thread per upstream talks to its MI with short timeouts (CALL_TIMEOUT) and
never holds up start-up, stop or the raise path:

- (re)subscribing: with events ["*"], read the upstream's `events_list`; register
  each event locally (so the ingest accepts it), then `event_subscribe EVENT
  SOCKET EXPIRE` for each;
- every CHECK_INTERVAL, `subscribers_list EVENT SOCKET` for each subscribed
  event: a 404 ("Subscriber does not exist", "Event not published") means the
  subscription is gone (an OpenSIPS restart forgets every subscription), and
  it is made again at once;
- every expire/3, subscribe again (refresh; "*" re-reads `events_list`);
- an MI that does not answer is retried every RETRY_INTERVAL;
- on stop, `event_subscribe EVENT SOCKET 0` for each, within STOP_BUDGET.

The datagrams themselves arrive at the ingest socket and are counted there, so
this source's received/raised stay 0; its statistics() carry its state: up
(1 while every event is subscribed), the events subscribed, and failed MI
calls by reason (ERROR_REASONS). A line is logged on each change of state
(subscribed, down, gone, resubscribed, an event refused), never per retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from engine.errors import MIClientError, MIReplyError, SubscriptionError, WireError
from engine.mi import client
from engine.statistics import SourceStatistics

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.upstream")

ALL: Final = "*"  # events = ["*"]: every event the upstream's events_list shows
CALL_TIMEOUT: Final = 1.0  # seconds per MI call
CHECK_INTERVAL: Final = 2.0  # seconds between checks that the subscriptions are listed
RETRY_INTERVAL: Final = 1.0  # seconds between attempts while the MI does not answer
STOP_BUDGET: Final = 1.0  # seconds stop() gives the unsubscribing (plus one short call)
LAST_CALL: Final = 0.2  # the least timeout of the one unsubscribe stop always tries
ERROR_REASONS: Final = ("unreachable", "mi_error", "bad_reply")
GONE: Final = ("Subscriber does not exist", "Event not published")

MICall = Callable[..., Any]


class _Failed(Exception):
    """An MI call that failed, with its reason (one of ERROR_REASONS)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _Gone(Exception):
    """`subscribers_list` says our subscription is not there."""


class Upstream:
    """One `[[upstream]]`: an OpenSIPS MI at which `socket` is kept subscribed."""

    def __init__(
        self,
        engine: Engine,
        mi: str,
        events: list[str],
        socket: str,
        expire: int = 120,
        *,
        call: MICall = client.call,
    ) -> None:
        self.engine = engine
        self.name = mi
        self.mi = mi
        self.events = list(events)
        self.all = ALL in self.events
        self.socket = socket
        self.expire = expire
        self._call_mi = call
        self._lock = threading.Lock()  # guards the counters statistics() reads
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._up = False
        self._wanted: list[str] = [] if self.all else list(self.events)
        self._subscribed: set[str] = set()
        self._refused: dict[str, str] = {}  # event -> why the upstream refused it (logged once)
        self._local_refused: set[str] = set()  # events that cannot be registered here
        self._reachable: bool | None = None  # did the MI answer the last call? (None: not asked)
        self._ever_up = False
        self._reported: tuple[int, int] | None = None  # (subscribed, wanted) last logged
        self._refresh_at = 0.0
        self._check_at = 0.0
        self._stop = threading.Event()
        self._stop_at = 0.0
        self._thread = threading.Thread(target=self._run, name=f"edg-upstream {mi}", daemon=True)

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Register the named events and start the thread; never waits for the MI."""
        if not self.all:
            self._wanted = self._register(self.events)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to unsubscribe and end (see join)."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (it unsubscribes first); True when it has ended."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        self.request_stop()
        self.join(STOP_BUDGET + CALL_TIMEOUT)

    @property
    def up(self) -> bool:
        return self._up

    def statistics(self) -> list[SourceStatistics]:
        with self._lock:
            return [
                SourceStatistics(
                    kind="upstream",
                    name=self.name,
                    up=1 if self._up else 0,
                    events=len(self._subscribed),
                    errors=dict(self._errors),
                )
            ]

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                delay = self._step()
                self._stop.wait(max(0.0, delay))
        except Exception:  # never seen; the engine keeps running without this upstream
            log.exception("upstream %s: stopped by an unexpected error", self.mi)
            with self._lock:
                self._up = False
        finally:
            self._unsubscribe()

    def _step(self) -> float:
        """Do what is due; return the seconds until the next thing to do."""
        now = time.monotonic()
        try:
            if not self._reachable or now >= self._refresh_at:
                self._subscribe(refresh=True)
            elif now >= self._check_at:
                self._check()
        except _Failed as exc:  # the MI did not answer (or not in JSON-RPC)
            self._set_down(exc.message)
            return RETRY_INTERVAL
        return min(self._refresh_at, self._check_at) - time.monotonic()

    def _subscribe(self, *, refresh: bool) -> None:
        """Subscribe every wanted event (refresh) or the missing ones; raises _Failed
        when the MI does not answer."""
        if self.all:
            self._wanted = self._register(self._events_list())
        targets = (
            self._wanted if refresh else [e for e in self._wanted if e not in self._subscribed]
        )
        for event in targets:
            if self._stop.is_set():
                return
            try:
                self._call("event_subscribe", [event, self.socket, self.expire])
            except _Failed as exc:
                if exc.reason == "unreachable":
                    raise
                with self._lock:
                    self._subscribed.discard(event)
                if self._refused.get(event) != exc.message:
                    log.warning(
                        "upstream %s: cannot subscribe %s to %s: %s (retrying every %g s)",
                        self.mi,
                        self.socket,
                        event,
                        exc.message,
                        CHECK_INTERVAL,
                    )
                self._refused[event] = exc.message
                continue
            with self._lock:
                self._subscribed.add(event)
            self._refused.pop(event, None)
        with self._lock:  # an event gone from the upstream's events_list is no longer ours
            self._subscribed &= set(self._wanted)
        now = time.monotonic()
        self._check_at = now + CHECK_INTERVAL
        if refresh:
            self._refresh_at = now + self.expire / 3
        self._reachable = True
        self._set_up(all(e in self._subscribed for e in self._wanted))

    def _check(self) -> None:
        """Is each subscription still listed? Subscribe again at once when one is not."""
        for event in sorted(self._subscribed):
            if self._stop.is_set():
                return
            try:
                result = self._call("subscribers_list", [event, self.socket], gone_ok=True)
            except _Gone:
                log.warning(
                    "upstream %s: %s is no longer subscribed to %s (did it restart?): "
                    "subscribing again",
                    self.mi,
                    self.socket,
                    event,
                )
                with self._lock:
                    self._subscribed.clear()
                    self._up = False
                self._reported = None
                self._subscribe(refresh=True)
                return
            except _Failed as exc:
                if exc.reason == "unreachable":
                    raise
                continue  # counted; the next check asks again
            if not isinstance(result, dict) or not isinstance(result.get("Event"), dict):
                self._count("bad_reply")
        missing = [e for e in self._wanted if e not in self._subscribed]
        if missing:
            self._subscribe(refresh=False)  # events the upstream refused so far
        else:
            self._check_at = time.monotonic() + CHECK_INTERVAL

    def _unsubscribe(self) -> None:
        """expire 0 for each subscribed event, within STOP_BUDGET of the stop request
        (one call is always tried); a dead MI ends it at its first failure."""
        events = sorted(self._subscribed)
        if not events:
            return
        deadline = (self._stop_at or time.monotonic()) + STOP_BUDGET
        done = 0
        for i, event in enumerate(events):
            left = deadline - time.monotonic()
            if left <= 0 and i:
                break
            try:
                self._call(
                    "event_subscribe",
                    [event, self.socket, 0],
                    timeout=min(CALL_TIMEOUT, max(LAST_CALL, left)),
                    gone_ok=True,
                )
            except _Gone:
                pass
            except _Failed as exc:
                if exc.reason == "unreachable":
                    log.warning(
                        "upstream %s: could not unsubscribe %s: %s", self.mi, self.socket, exc
                    )
                    break
                continue
            done += 1
            with self._lock:
                self._subscribed.discard(event)
        with self._lock:
            self._subscribed.clear()
            self._up = False
        if done:
            log.info("upstream %s: unsubscribed %s from %d event(s)", self.mi, self.socket, done)
        if done < len(events):
            log.warning(
                "upstream %s: %d subscription(s) of %s left to expire there (in %d s at most)",
                self.mi,
                len(events) - done,
                self.socket,
                self.expire,
            )

    # -- helpers -----------------------------------------------------------------------------

    def _events_list(self) -> list[str]:
        result = self._call("events_list", [])
        rows = result.get("Events") if isinstance(result, dict) else None
        if not isinstance(rows, list):
            self._count("bad_reply")
            raise _Failed("bad_reply", f"events_list answered {str(result)[:200]}")
        names = [r.get("name") for r in rows if isinstance(r, dict)]
        return [n for n in names if isinstance(n, str)]

    def _register(self, events: list[str]) -> list[str]:
        """Register `events` here (known ones are kept); return those that could be."""
        registered = []
        for event in events:
            try:
                self.engine.register_event(event)
            except (SubscriptionError, WireError) as exc:
                if event not in self._local_refused:
                    self._local_refused.add(event)
                    log.warning(
                        "upstream %s: event %s not taken: cannot register it here: %s",
                        self.mi,
                        event,
                        exc,
                    )
                continue
            registered.append(event)
        return registered

    def _call(
        self,
        method: str,
        params: list[Any],
        *,
        timeout: float = CALL_TIMEOUT,
        gone_ok: bool = False,
    ) -> Any:
        """One MI call; failures are counted and raised as _Failed (or _Gone, for a
        404 that says the subscription or the event is not there, when gone_ok)."""
        try:
            return self._call_mi(self.mi, method, params, timeout=timeout)
        except MIReplyError as exc:
            if gone_ok and exc.code == 404 and exc.message in GONE:
                raise _Gone() from None
            self._count("mi_error")
            raise _Failed("mi_error", str(exc)) from None
        except MIClientError as exc:
            # The client says "cannot reach"/"no answer" for a dead MI, "answered ..."
            # for one that answered something that is not a JSON-RPC reply.
            reason = "bad_reply" if "answered" in str(exc) else "unreachable"
            self._count(reason)
            raise _Failed(reason, str(exc)) from None
        except OSError as exc:  # e.g. a FIFO client that cannot create its reply FIFO
            self._count("unreachable")
            raise _Failed("unreachable", f"{self.mi}: {exc}") from None

    def _count(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] += 1

    def _set_up(self, up: bool) -> None:
        """After a round the MI answered: up when every event is subscribed; logged
        when what is subscribed changed (not at each refresh)."""
        n, total = len(self._subscribed), len(self._wanted)
        if (n, total) != self._reported and (n or not total):
            log.info(
                "upstream %s: %s %s to %s event(s) (expire %d s)",
                self.mi,
                "resubscribed" if self._ever_up else "subscribed",
                self.socket,
                n if n == total else f"{n} of {total}",
                self.expire,
            )
            self._ever_up = True
            self._reported = (n, total)
        with self._lock:
            self._up = up

    def _set_down(self, message: str) -> None:
        """The MI did not answer: logged when it did before (or at the first try)."""
        if self._reachable is not False:
            log.warning(
                "upstream %s: down: %s (subscribing again when it answers)", self.mi, message
            )
        self._reachable = False
        self._reported = None
        with self._lock:
            self._up = False


def stop_all(upstreams: list[Upstream]) -> None:
    """Stop upstreams together: each unsubscribes in its own thread, so N dead MIs
    delay the caller by about STOP_BUDGET, not N times it."""
    for upstream in upstreams:
        upstream.request_stop()
    deadline = time.monotonic() + STOP_BUDGET + CALL_TIMEOUT
    for upstream in upstreams:
        if not upstream.join(max(0.0, deadline - time.monotonic())):
            log.warning("upstream %s: still unsubscribing; not waited for", upstream.mi)
