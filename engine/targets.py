"""What a subscription points at beyond one socket: virtual groups and filters (SPEC 13).

Groups, OpenSIPS event_virtual's syntax (its ``virtual_parse``)::

    virtual:POLICY member member ...      members separated by any spaces or tabs

POLICY is ``PARALLEL``, ``FAILOVER``, ``ROUND-ROBIN`` (upper case, as OpenSIPS
compares it) or, beyond OpenSIPS, ``HASH(param)``: each event to one member
chosen by rendezvous hashing of its top-level ``param``. Every member is a
plain subscriber socket (engine.address), parsed, allow-listed and guarded like
one. The printed form, which OpenSIPS's ``subscribers_list`` shows, is
``virtual:POLICY m1 m2`` with single spaces. Two groups are the same
subscription when policy and members match: in order, except for PARALLEL
(any order), as OpenSIPS's ``virtual_match``.

Filters, OpenSIPS event_routing's form: ``name=pattern`` conditions on the
event's top-level named params, the pattern a shell wildcard
(``fnmatch.fnmatchcase``: ``*``, ``?``, ``[...]``), several ANDed. A condition
holds no whitespace (``?`` matches a space). The canonical text (conditions
sorted, one space apart) is part of the subscription's identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from engine.address import Destination, parse_destination
from engine.errors import AddressError

__all__ = [
    "MAX_FILTER_BYTES",
    "MAX_FILTER_CONDITIONS",
    "MAX_MEMBERS",
    "POLICIES",
    "VIRTUAL",
    "Filter",
    "Group",
    "parse_filter",
    "parse_group",
    "parse_target",
    "subscription_key",
]

VIRTUAL: Final = "virtual:"
POLICIES: Final = ("PARALLEL", "FAILOVER", "ROUND-ROBIN", "HASH")
MAX_MEMBERS: Final = 64  # a group is a pool of consumers, not a fan-out list
MAX_FILTER_BYTES: Final = 1024
MAX_FILTER_CONDITIONS: Final = 16

_HASH: Final = re.compile(r"HASH\(([A-Za-z0-9_.:-]{1,64})\)")
_NAME: Final = re.compile(r"[^\s=]{1,64}")

Policy = Literal["PARALLEL", "FAILOVER", "ROUND-ROBIN", "HASH"]


@dataclass(frozen=True, slots=True)
class Group:
    """A parsed ``virtual:`` socket. ``key`` is the printed form, ``ident`` the identity."""

    policy: Policy
    members: tuple[Destination, ...]
    hash_param: str = ""  # HASH only

    transport = "virtual"

    @property
    def policy_text(self) -> str:
        return f"HASH({self.hash_param})" if self.policy == "HASH" else self.policy

    @property
    def key(self) -> str:
        return f"{VIRTUAL}{self.policy_text} " + " ".join(m.key for m in self.members)

    @property
    def ident(self) -> str:
        """The identity: PARALLEL members in any order are the same group."""
        if self.policy != "PARALLEL":
            return self.key
        return f"{VIRTUAL}PARALLEL " + " ".join(sorted(m.key for m in self.members))

    def __str__(self) -> str:
        return self.key


def _fail(text: str, msg: str) -> AddressError:
    shown = text if len(text) <= 200 else text[:200] + "..."
    return AddressError(f"{shown!r}: {msg}")


def parse_group(text: str, *, resolve: bool = True) -> Group:
    """Parse ``virtual:POLICY m1 m2 ...``; AddressError naming the bad part."""
    if not text.startswith(VIRTUAL):
        raise _fail(text, "not a virtual socket")
    tokens = text[len(VIRTUAL) :].replace("\t", " ").split(" ")
    tokens = [t for t in tokens if t]
    if not tokens:
        raise _fail(text, "no policy (expected virtual:PARALLEL|FAILOVER|ROUND-ROBIN|HASH(p) ...)")
    word, names = tokens[0], tokens[1:]
    hash_param = ""
    hashed = _HASH.fullmatch(word)
    if hashed is not None:
        policy: Policy = "HASH"
        hash_param = hashed.group(1)
    elif word in ("PARALLEL", "FAILOVER", "ROUND-ROBIN"):
        policy = word  # type: ignore[assignment]
    else:
        if word.upper().startswith("HASH"):
            hint = " (expected HASH(param), upper case)"
        else:
            hint = " (policies are upper case)" if word.upper() in POLICIES else ""
        raise _fail(text, f"invalid virtual socket type {word[:40]!r}{hint}")
    if not names:
        raise _fail(text, "a virtual socket needs at least one member")
    if len(names) > MAX_MEMBERS:
        raise _fail(text, f"{len(names)} members: at most {MAX_MEMBERS}")
    members: list[Destination] = []
    seen: set[str] = set()
    for name in names:
        if name.startswith(VIRTUAL):
            raise _fail(text, f"member {name[:60]!r}: a virtual socket cannot be a member")
        dest = parse_destination(name, resolve=resolve)
        if dest.key in seen:
            raise _fail(text, f"member {dest.key} is listed twice")
        seen.add(dest.key)
        members.append(dest)
    return Group(policy, tuple(members), hash_param)


def parse_target(text: str, *, resolve: bool = True) -> Destination | Group:
    """A subscriber socket or a virtual group."""
    if text.startswith(VIRTUAL):
        return parse_group(text, resolve=resolve)
    return parse_destination(text, resolve=resolve)


@dataclass(frozen=True, slots=True)
class Filter:
    """ANDed ``name=pattern`` conditions, sorted (the canonical order)."""

    conditions: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return " ".join(f"{n}={p}" for n, p in self.conditions)

    def __str__(self) -> str:
        return self.text


def parse_filter(spec: str | list[str] | tuple[str, ...] | None) -> Filter | None:
    """Parse conditions given as one string (whitespace-separated) or a list of them;
    None or empty -> no filter. AddressError (a ValueError) naming the bad part."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = [spec]
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        parts = list(spec)
    else:
        raise AddressError("filter: expected a string or a list of strings")
    size = sum(len(p.encode("utf-8", "surrogatepass")) for p in parts)
    if size > MAX_FILTER_BYTES:
        raise AddressError(f"filter: {size} bytes, at most {MAX_FILTER_BYTES}")
    words = [w for p in parts for w in p.split()]
    if not words:
        return None
    if len(words) > MAX_FILTER_CONDITIONS:
        raise AddressError(f"filter: {len(words)} conditions, at most {MAX_FILTER_CONDITIONS}")
    conditions: set[tuple[str, str]] = set()
    for word in words:
        name, sep, pattern = word.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise AddressError(f"filter condition {word[:80]!r}: expected name=pattern")
        if not word.isprintable():
            raise AddressError(f"filter condition {word[:80]!r}: control characters")
        conditions.add((name, pattern))
    return Filter(tuple(sorted(conditions)))


def subscription_key(target: Destination | Group, filt: Filter | None) -> str:
    """A subscription's identity within its event: (socket, filter). A plain
    subscriber's is its socket's key, as before filters existed."""
    ident = target.ident if isinstance(target, Group) else target.key
    return ident if filt is None else f"{ident} filter={filt.text}"
