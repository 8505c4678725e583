"""The engine's own sockets, so that no subscription feeds the engine its own events.

A subscription whose destination reaches one of the engine's listeners (an
ingest socket, the MI datagram socket, the HTTP or metrics listener, the MI
FIFO) would loop: every event raised is sent to the engine, which raises it
again. The destination is compared as the kernel would deliver it, not as it
was spelled:

* a UDP destination by its resolved address (``localhost`` and names are
  resolved at subscribe time, see engine/address.py), an IPv4-mapped IPv6
  address as the IPv4 one, ``0.0.0.0`` as ``127.0.0.1`` and ``::`` as ``::1``
  (Linux delivers a datagram sent to the unspecified address locally);
* a listener bound to a wildcard (``0.0.0.0``, ``::``) matches every local
  address at its port: loopback and the host's interface addresses (read when
  needed, so an address added later counts); ``::`` also takes IPv4 (dual
  stack, assumed, as Linux's default);
* a UNIX destination by its real path (symbolic links resolved) and, when both
  exist, by device and inode (a hard link to the socket).

`Guards` also holds the control plane's refusal counters the metrics expose
(refused self-subscriptions, UDP MI datagrams dropped, error replies
suppressed). Thread-safe; imports nothing of the servers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import psutil

from engine.address import Destination
from engine.errors import SelfSubscription

__all__ = ["MI_DATAGRAM_DROP_REASONS", "SELF_REFUSED_ORIGINS", "Guards", "OwnSockets"]

log = logging.getLogger("event_datagram.guards")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Where a self-subscription was refused: at subscribe time (MI, API, a static
# [[subscription]]), dropped from the state file at load, or dropped because a
# listener opened later now has its address.
SELF_REFUSED_ORIGINS: Final = ("subscribe", "state", "listener")
MI_DATAGRAM_DROP_REASONS: Final = ("source_not_allowed", "empty", "response", "rate_limited")

_LOOP4: Final = ipaddress.IPv4Address("127.0.0.1")
_LOOP6: Final = ipaddress.IPv6Address("::1")


def normalise_ip(ip: IPAddress) -> IPAddress:
    """The address a datagram sent to `ip` reaches: mapped IPv6 as IPv4, the
    unspecified address as loopback."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return _LOOP4 if ip.version == 4 else _LOOP6
    return ip


def host_addresses() -> set[IPAddress]:
    """Every address of this host's interfaces (psutil), zone ids stripped."""
    out: set[IPAddress] = set()
    try:
        interfaces = psutil.net_if_addrs()
    except OSError as exc:  # never seen; loopback still counts
        log.warning("cannot list the host's addresses: %s", exc)
        return out
    for addrs in interfaces.values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.add(normalise_ip(ipaddress.ip_address(addr.address.split("%", 1)[0])))
                except ValueError:
                    continue
    return out


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One of the engine's own sockets: `what` it is and its printed `name`."""

    what: str  # "ingest socket", "MI datagram", "HTTP MI", "metrics", "MI FIFO"
    name: str
    ip: IPAddress | None = None  # None for a path
    port: int = 0
    path: str = ""  # the real path (symbolic links resolved)


def _real(path: str) -> str:
    return os.path.realpath(path)


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class OwnSockets:
    """The engine's listeners, and the check that a destination is not one of them."""

    def __init__(self, local_addresses: Callable[[], set[IPAddress]] = host_addresses) -> None:
        self._lock = threading.Lock()
        self._endpoints: list[Endpoint] = []
        self._local = local_addresses

    def add(self, what: str, address: tuple[str, int] | str) -> Endpoint | None:
        """Register a listener: (IP, port) as bound, or a path. Port 0 (not bound
        yet) is skipped: it is registered again once bound. Returns the endpoint."""
        if isinstance(address, str):
            endpoint = Endpoint(what, f"unix:{address}", path=_real(address))
        else:
            host, port = address[0], int(address[1])
            if port == 0:
                return None
            ip = ipaddress.ip_address(host.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            shown = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
            endpoint = Endpoint(what, shown, ip=ip, port=port)
        with self._lock:
            if endpoint not in self._endpoints:
                self._endpoints.append(endpoint)
        return endpoint

    def remove(self, endpoint: Endpoint) -> None:
        with self._lock:
            if endpoint in self._endpoints:
                self._endpoints.remove(endpoint)

    @property
    def endpoints(self) -> list[Endpoint]:
        with self._lock:
            return list(self._endpoints)

    def match_ip(
        self, ip: IPAddress, port: int, among: list[Endpoint] | None = None
    ) -> Endpoint | None:
        """The own listener (of `among`, default all) a datagram to (ip, port)
        reaches, or None."""
        ip = normalise_ip(ip)
        local: set[IPAddress] | None = None
        for ep in self.endpoints if among is None else among:
            if ep.ip is None or ep.port != port:
                continue
            if not ep.ip.is_unspecified:
                if ep.ip == ip:
                    return ep
                continue
            if ep.ip.version == 4 and ip.version != 4:
                continue  # an IPv4 wildcard takes no IPv6
            if ip.is_loopback:
                return ep
            if local is None:
                local = self._local()
            if ip in local:
                return ep
        return None

    def match_path(self, path: str, among: list[Endpoint] | None = None) -> Endpoint | None:
        real = _real(path)
        for ep in self.endpoints if among is None else among:
            if ep.ip is None and (ep.path == real or _same_file(ep.path, real)):
                return ep
        return None

    def match(self, dest: Destination, among: list[Endpoint] | None = None) -> Endpoint | None:
        """The own listener (of `among`, default all) `dest` (as parsed and resolved)
        reaches, or None."""
        if dest.transport == "unix":
            target = dest.sockaddr if isinstance(dest.sockaddr, str) else dest.path
            return self.match_path(target, among)
        try:
            ip = ipaddress.ip_address(str(dest.sockaddr[0]).split("%", 1)[0])
        except ValueError:  # not resolved (parse_destination(resolve=False)): by name
            return None
        return self.match_ip(ip, dest.port, among)

    def check(self, dest: Destination) -> None:
        """Raise SelfSubscription naming the listener `dest` reaches."""
        ep = self.match(dest)
        if ep is not None:
            raise SelfSubscription(dest.key, reason(dest, ep))


def reason(dest: Destination, ep: Endpoint) -> str:
    """Why `dest` is refused, for the MI's `data` text and the logs."""
    shown = dest.sockaddr if dest.transport == "unix" else dest.sockaddr[0]
    spelled = "" if str(shown) in (dest.host, dest.path) else f" (= {shown})"
    return (
        f"destination {dest.key}{spelled} is this engine's own {ep.what} {ep.name}: "
        "a subscription there would feed the engine its own events"
    )


class Guards:
    """The own sockets and the control plane's refusal counters (for the metrics)."""

    def __init__(self, own: OwnSockets | None = None) -> None:
        self.own = own or OwnSockets()
        self._lock = threading.Lock()
        self.self_refused = dict.fromkeys(SELF_REFUSED_ORIGINS, 0)
        self.mi_datagram_dropped = dict.fromkeys(MI_DATAGRAM_DROP_REASONS, 0)

    def count_self_refused(self, origin: str, n: int = 1) -> None:
        with self._lock:
            self.self_refused[origin] = self.self_refused.get(origin, 0) + n

    def count_mi_datagram_dropped(self, reason: str) -> None:
        with self._lock:
            self.mi_datagram_dropped[reason] = self.mi_datagram_dropped.get(reason, 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(self-subscriptions refused by origin, MI datagrams dropped by reason,
        error replies suppressed: the `rate_limited` drops)."""
        with self._lock:
            dropped = dict(self.mi_datagram_dropped)
            return dict(self.self_refused), dropped, dropped.get("rate_limited", 0)
