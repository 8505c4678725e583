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
- an MI that does not answer (or answers something broken: cut short, not
  HTTP, not JSON-RPC, over `max_reply` bytes, not whole within CALL_TIMEOUT) is
  retried with back-off (guard.Backoff: 1 s growing to 10 s);
- on stop, `event_subscribe EVENT SOCKET 0` for each, within STOP_BUDGET.

The datagrams themselves arrive at the ingest socket and are counted there, so
this source's received/raised stay 0; its statistics() carry its state: up
(1 only while every event asked for is subscribed), the events subscribed, the
events refused (here: no slot left, a bad name; there: the MI said no), and
failures by reason (ERROR_REASONS; "internal" and "thread_died" are the
guard's). A line is logged on each change of state (subscribed, down, gone,
resubscribed, how many events are refused and why: one summary line, never one
per event), never per retry, and at most guard.LOG_PER_MINUTE lines a minute.
Nothing here remembers event names beyond the events subscribed, which the
engine's max_events bounds; events_list replies are bounded by max_reply.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from engine.errors import MIClientError, MIReplyError, SubscriptionError, WireError
from engine.mi import client
from engine.mi.http_client import ClientAuth
from engine.sources.guard import Backoff, Guard, LogBudget
from engine.statistics import SourceStatistics

if TYPE_CHECKING:
    from engine.producer import Engine

log = logging.getLogger("event_datagram.upstream")

ALL: Final = "*"  # events = ["*"]: every event the upstream's events_list shows
CALL_TIMEOUT: Final = 1.0  # seconds per MI call
CHECK_INTERVAL: Final = 2.0  # seconds between checks that the subscriptions are listed
RETRY_INTERVAL: Final = 1.0  # seconds before the first retry of an MI that failed
MAX_RETRY_INTERVAL: Final = 10.0  # ...growing 1.5x per failure up to this
MAX_REPLY: Final = 4 << 20  # bytes of one MI reply at most (upstream.max_reply_bytes)
STOP_BUDGET: Final = 1.0  # seconds stop() gives the unsubscribing (plus one short call)
LAST_CALL: Final = 0.2  # the least timeout of the one unsubscribe stop always tries
ERROR_REASONS: Final = (
    "unreachable",
    "timeout",
    "mi_error",
    "bad_reply",
    "too_large",
    "internal",
    "thread_died",
)
EXAMPLES: Final = 3  # event names a refusal summary shows
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
        max_reply: int = MAX_REPLY,
        call: MICall = client.call,
        auth: ClientAuth | None = None,
    ) -> None:
        self.engine = engine
        self.name = mi
        self.mi = mi
        self.events = list(events)
        self.all = ALL in self.events
        self.socket = socket
        self.expire = expire
        self.max_reply = max_reply
        # TLS and basic auth of an http(s):// MI, on every call (a test's call stays as is)
        self._call_mi = call if auth is None else functools.partial(call, auth=auth)
        self._lock = threading.Lock()  # guards the counters statistics() reads
        self._errors = dict.fromkeys(ERROR_REASONS, 0)
        self._up = False
        self._wanted: list[str] = [] if self.all else list(self.events)
        self._subscribed: set[str] = set()  # at most the engine's max_events
        self._refused_here = 0  # events asked for that cannot be registered here
        self._refused_there = 0  # wanted events the MI refused in the last round
        self._said_here: tuple[tuple[str, int], ...] = ()  # the refusal summaries last logged
        self._said_there: tuple[int, str] = (0, "")
        self._reachable: bool | None = None  # did the MI answer the last call? (None: not asked)
        self._ever_up = False
        self._reported: tuple[int, int] | None = None  # (subscribed, asked) last logged
        self._refresh_at = 0.0
        self._check_at = 0.0
        self._stop_at = 0.0
        self.rounds = 0  # subscribing rounds the MI answered (tests and the bench read it)
        self._backoff = Backoff(RETRY_INTERVAL, cap=MAX_RETRY_INTERVAL)
        self._log = LogBudget(log)
        self.guard = Guard(
            f"upstream {mi}",
            self._loop,
            logger=log,
            count=self._count,
            down=self._mark_down,
            final=self._unsubscribe,
            budget=self._log,
            backoff=self._backoff,
        )
        self._stop = self.guard.stop_event

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Register the named events and start the thread; never waits for the MI."""
        if not self.all:
            self._wanted = self._register(self.events)
        self.guard.start()

    def request_stop(self) -> None:
        """Ask the thread to unsubscribe and end (see join)."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
            self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (it unsubscribes first); True when it has ended."""
        return self.guard.join(timeout)

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
                    refused=self._refused_here + self._refused_there,
                )
            ]

    # -- the thread --------------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        """The guard's loop: one step at a time until stopped (what escapes a step is
        the guard's to count and retry)."""
        while not stop.is_set():
            delay = self._step()
            stop.wait(max(0.0, delay))

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
            return self._backoff.next()
        self.guard.ok()
        return min(self._refresh_at, self._check_at) - time.monotonic()

    def _subscribe(self, *, refresh: bool) -> None:
        """Subscribe every wanted event (refresh) or the missing ones; raises _Failed
        when the MI does not answer (a refusal of one event, mi_error, does not)."""
        if self.all:
            self._wanted = self._register(self._events_list())
        elif refresh and self._refused_here:  # named events with no slot here: try again
            self._wanted = self._register(self.events)
        targets = (
            self._wanted if refresh else [e for e in self._wanted if e not in self._subscribed]
        )
        refused: list[str] = []
        why = ""
        for event in targets:
            if self._stop.is_set():
                return
            try:
                self._call("event_subscribe", [event, self.socket, self.expire])
            except _Failed as exc:
                if exc.reason != "mi_error":
                    raise
                with self._lock:
                    self._subscribed.discard(event)
                why = why or exc.message
                if len(refused) < EXAMPLES:
                    refused.append(event)
                continue
            with self._lock:
                self._subscribed.add(event)
        wanted = set(self._wanted)
        with self._lock:  # an event gone from the upstream's events_list is no longer ours
            self._subscribed &= wanted
            self._refused_there = sum(1 for e in self._wanted if e not in self._subscribed)
        self._say_refused_there(refused, why)
        now = time.monotonic()
        self._check_at = now + CHECK_INTERVAL
        if refresh:
            self._refresh_at = now + self.expire / 3
        self._reachable = True
        self.rounds += 1
        self._set_up()

    def _check(self) -> None:
        """Is each subscription still listed? Subscribe again at once when one is not."""
        for event in sorted(self._subscribed):
            if self._stop.is_set():
                return
            try:
                result = self._call("subscribers_list", [event, self.socket], gone_ok=True)
            except _Gone:
                self._log.warning(
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
                if exc.reason != "mi_error":
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
                if exc.reason != "mi_error":
                    self._log.warning(
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
            self._log.info(
                "upstream %s: unsubscribed %s from %d event(s)", self.mi, self.socket, done
            )
        if done < len(events):
            self._log.warning(
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
        return list(dict.fromkeys(n for n in names if isinstance(n, str)))  # each once

    def _register(self, events: list[str]) -> list[str]:
        """Register `events` here (known ones are kept); return those that could be.
        The others are counted (refused) and summed up in one line when that changes."""
        registered = []
        why: dict[str, int] = {}
        examples: dict[str, list[str]] = {}
        for event in events:
            try:
                self.engine.register_event(event)
            except (SubscriptionError, WireError) as exc:
                reason = self._why_not_here(exc)
                why[reason] = why.get(reason, 0) + 1
                shown = examples.setdefault(reason, [])
                if len(shown) < EXAMPLES:
                    shown.append(event[:64])
                continue
            registered.append(event)
        with self._lock:
            self._refused_here = sum(why.values())
        said = tuple(sorted(why.items()))
        if said != self._said_here:
            self._said_here = said
            if why:
                self._log.warning(
                    "upstream %s: refused %s of %s event(s): %s; not taken (up stays 0)",
                    self.mi,
                    f"{sum(why.values()):,}",
                    f"{len(events):,}",
                    "; ".join(
                        (f"{n:,} " if len(why) > 1 else "")
                        + f"{reason} (e.g. {', '.join(examples[reason])})"
                        for reason, n in why.items()
                    ),
                )
            else:
                self._log.info("upstream %s: every event can be registered here again", self.mi)
        return registered

    def _why_not_here(self, exc: Exception) -> str:
        if isinstance(exc, WireError):
            return "not a valid event name"
        options = getattr(self.engine, "options", None)
        limit = getattr(options, "max_events", None)
        if isinstance(limit, int):
            return f"more than engine.max_events ({limit})"
        return "no event slot left here (engine.max_events)"

    def _say_refused_there(self, examples: list[str], why: str) -> None:
        """One line when the number of events the MI refuses (or its reason) changes."""
        n = self._refused_there
        said = (n, why if n else "")
        if said == self._said_there:
            return
        self._said_there = said
        if n:
            self._log.warning(
                "upstream %s: cannot subscribe %s to %s event(s) (e.g. %s): %s "
                "(retrying every %g s)",
                self.mi,
                self.socket,
                f"{n:,}",
                ", ".join(e[:64] for e in examples),
                why,
                CHECK_INTERVAL,
            )

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
            return self._call_mi(self.mi, method, params, timeout=timeout, max_reply=self.max_reply)
        except MIReplyError as exc:
            if gone_ok and exc.code == 404 and exc.message in GONE:
                raise _Gone() from None
            self._count("mi_error")
            raise _Failed("mi_error", str(exc)[:300]) from None
        except MIClientError as exc:
            reason = exc.reason if exc.reason in ERROR_REASONS else "bad_reply"
            self._count(reason)
            raise _Failed(reason, str(exc)[:300]) from None
        except OSError as exc:  # e.g. a FIFO client that cannot create its reply FIFO
            self._count("unreachable")
            raise _Failed("unreachable", f"{self.mi}: {exc}") from None

    def _count(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + 1

    def _set_up(self) -> None:
        """After a round the MI answered: up only when every event asked for is
        subscribed (none refused, here or there); logged when what is subscribed
        changed (not at each refresh)."""
        n, total = len(self._subscribed), len(self._wanted)
        asked = total + self._refused_here  # refused here are asked for too
        if (n, asked) != self._reported and (n or not total):
            self._log.info(
                "upstream %s: %s %s to %s event(s) (expire %d s)",
                self.mi,
                "resubscribed" if self._ever_up else "subscribed",
                self.socket,
                f"{n:,}" if n == asked else f"{n:,} of {asked:,}",
                self.expire,
            )
            self._ever_up = True
            self._reported = (n, asked)
        with self._lock:
            self._up = n == total and not self._refused_here

    def _set_down(self, message: str) -> None:
        """The MI did not answer: logged when it did before (or at the first try)."""
        if self._reachable is not False:
            self._log.warning(
                "upstream %s: down: %s (subscribing again when it answers)", self.mi, message
            )
        self._mark_down()

    def _mark_down(self) -> None:
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
