"""Groups and filters end to end: real workers, sockets, shared memory (docs/routing.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from engine.mi.commands import run
from engine.producer import Engine
from tests.helpers.support import (
    Receiver,
    eventually,
    running_engine,
    settle,
    udp_receiver,
    unix_receiver,
)

FAILOVER_S = 0.5  # engine.failover_timeout_s in these tests
UNIX_WAIT_MS = 1000.0  # a busy machine: a receiver thread may lag; full means stuck


def seqs(rx: Receiver) -> list[int]:
    return [json.loads(d)["params"]["seq"] for d in rx.datagrams]


def raise_all(engine: Engine, params: list[dict[str, object]], event: str = "E_TEST") -> None:
    """Raise every event, draining every 500 so no ring ever fills (nothing drops)."""
    for k, p in enumerate(params, 1):
        assert engine.raise_event(event, p).queued
        if k % 500 == 0:
            settle(engine)
    settle(engine)


def members(*rx: Receiver) -> str:
    return " ".join(r.socket_text for r in rx)


def test_round_robin_10000_events_over_4_members_2500_each() -> None:
    rx = [udp_receiver() for _ in range(4)]
    try:
        with running_engine(["E_TEST"], workers=2) as engine:
            engine.subscribe("E_TEST", f"virtual:ROUND-ROBIN {members(*rx)}")
            raise_all(engine, [{"seq": i} for i in range(10_000)])
            for r in rx:
                r.quiet(2500)
            assert [len(r.datagrams) for r in rx] == [2500] * 4
            assert sorted(s for r in rx for s in seqs(r)) == list(range(10_000))
            assert seqs(rx[1])[:3] == [1, 5, 9]  # each event to the next member, in turn
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_sent == 10_000 and stats.failovers == 0
    finally:
        for r in rx:
            r.close()


def test_parallel_sends_to_every_member() -> None:
    rx = [udp_receiver() for _ in range(3)]
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", f"virtual:PARALLEL {members(*rx)}")
            result = engine.raise_event("E_TEST", {"seq": 0})
            assert result.pairs == 3  # the fan-out counts each member's datagram
            raise_all(engine, [{"seq": i} for i in range(1, 100)])
            for r in rx:
                r.quiet(100)
                assert seqs(r) == list(range(100))
            engine.statistics().check_identity()
    finally:
        for r in rx:
            r.close()


def _failover_round(
    engine: Engine, first: Receiver, second: Receiver, start: int, count: int
) -> list[int]:
    raise_all(engine, [{"seq": start + i} for i in range(count)])
    first.quiet()
    second.quiet()
    return list(range(start, start + count))


def test_failover_unix_first_member_gone_then_back(tmp_path: Path) -> None:
    first, second = unix_receiver(tmp_path, "a.sock"), unix_receiver(tmp_path, "b.sock")
    path = first.sock.getsockname()
    try:
        with running_engine(
            ["E_TEST"], failover_timeout_s=FAILOVER_S, unix_wait_ms=UNIX_WAIT_MS
        ) as engine:
            engine.subscribe("E_TEST", f"virtual:FAILOVER {members(first, second)}")
            sent = _failover_round(engine, first, second, 0, 200)
            assert seqs(first) == sent and seqs(second) == []
            first.close()  # mid-stream: the receiver is gone (path unlinked)
            sent = _failover_round(engine, first, second, 200, 300)
            assert seqs(second) == sent  # not one lost: the kernel tells at once
            assert engine.statistics().failovers >= 1
            first = Receiver(socket.AF_UNIX, path)  # back, at the same path
            # After failover_timeout the first member is tried again and takes over.
            seq = 500

            def first_is_back() -> bool:
                nonlocal seq
                raise_all(engine, [{"seq": seq}])
                seq += 1
                first.quiet(settle=0.02)
                return bool(first.datagrams)

            eventually(first_is_back, timeout=20, what="the first member to take over again")
            before = len(second.quiet(settle=0.05))
            sent = _failover_round(engine, first, second, seq, 100)
            assert seqs(first)[-100:] == sent and len(second.datagrams) == before
            # Nothing lost anywhere since the first member went (the new receiver and
            # the second hold everything from 200 on).
            assert sorted(seqs(first) + seqs(second)) == list(range(200, seq + 100))
            stats = engine.statistics()
            stats.check_identity()
            assert stats.pairs_failed == 0
    finally:
        first.close()
        second.close()


def test_failover_udp_after_the_first_icmp_nothing_more_is_lost() -> None:
    first, second = udp_receiver(), udp_receiver()
    port = first.sock.getsockname()[1]
    try:
        with running_engine(
            ["E_TEST"], failover_timeout_s=FAILOVER_S, unix_wait_ms=UNIX_WAIT_MS
        ) as engine:
            engine.subscribe("E_TEST", f"virtual:FAILOVER {members(first, second)}")
            sent = _failover_round(engine, first, second, 0, 200)
            assert seqs(first) == sent and seqs(second) == []
            first.close()  # its port now answers with ICMP port unreachable
            sent = _failover_round(engine, first, second, 200, 300)
            got = seqs(second)
            # What UDP cannot tell: the datagrams sent before the ICMP came back are
            # lost (on loopback: the first one). From then on every one arrives.
            lost = sorted(set(sent) - set(got))
            assert len(lost) <= 1 and lost in ([], [200])
            assert got == [s for s in sent if s not in lost]
            stats = engine.statistics()
            assert stats.failovers >= 1
            first = Receiver(socket.AF_INET, ("127.0.0.1", port))  # back on the same port
            seq = 500

            def first_is_back() -> bool:
                nonlocal seq
                raise_all(engine, [{"seq": seq}])
                seq += 1
                first.quiet(settle=0.02)
                return bool(first.datagrams)

            eventually(first_is_back, timeout=20, what="the first member to take over again")
            before = len(second.quiet(settle=0.05))
            sent = _failover_round(engine, first, second, seq, 100)
            assert seqs(first)[-100:] == sent and len(second.datagrams) == before
            engine.statistics().check_identity()
    finally:
        first.close()
        second.close()


def test_all_members_down_counts_failed_not_lost_silently(tmp_path: Path) -> None:
    with running_engine(
        ["E_TEST"], failover_timeout_s=FAILOVER_S, unix_wait_ms=UNIX_WAIT_MS
    ) as engine:
        gone = f"unix:{tmp_path}/none1.sock unix:{tmp_path}/none2.sock"
        engine.subscribe("E_TEST", f"virtual:FAILOVER {gone}")
        raise_all(engine, [{"seq": i} for i in range(50)])
        stats = engine.statistics()
        stats.check_identity()
        assert stats.pairs_failed == 50 and stats.pairs_sent == 0


def _hash_owner(rx: list[Receiver]) -> dict[str, int]:
    owner: dict[str, int] = {}
    for k, r in enumerate(rx):
        for d in r.datagrams:
            callid = json.loads(d)["params"]["callid"]
            assert owner.setdefault(callid, k) == k, f"{callid} reached two members"
        r.datagrams.clear()
    return owner


def test_hash_is_sticky_and_only_a_failed_members_keys_move(tmp_path: Path) -> None:
    rx = [unix_receiver(tmp_path, f"h{k}.sock") for k in range(4)]
    paths = [r.sock.getsockname() for r in rx]
    calls = [f"call-{n}@host" for n in range(200)]
    events = [{"callid": c, "seq": i} for i in range(3) for c in calls]
    try:
        with running_engine(
            ["E_TEST"], failover_timeout_s=FAILOVER_S, unix_wait_ms=UNIX_WAIT_MS
        ) as engine:
            engine.subscribe("E_TEST", f"virtual:HASH(callid) {members(*rx)}")
            raise_all(engine, events)
            for r in rx:
                r.quiet()
            before = _hash_owner(rx)
            assert sorted(before) == sorted(calls)
            assert all(20 < list(before.values()).count(k) < 90 for k in range(4))
            rx[2].close()  # member 2 fails
            raise_all(engine, events)
            for k in (0, 1, 3):
                rx[k].quiet()
            during = _hash_owner([rx[0], rx[1], Receiver(socket.AF_UNIX, paths[2] + "x"), rx[3]])
            assert sorted(during) == sorted(calls)  # every key still delivered
            for c in calls:
                if before[c] != 2:
                    assert during[c] == before[c]  # only member 2's keys moved
                else:
                    assert during[c] != 2
            rx[2] = Receiver(socket.AF_UNIX, paths[2])
            time.sleep(FAILOVER_S * 2)  # not a timing assertion: lets the member be retried
            raise_all(engine, events)
            for r in rx:
                r.quiet()
            assert _hash_owner(rx) == before  # every key back where it was
            engine.statistics().check_identity()
    finally:
        for r in rx:
            r.close()


def test_hash_without_the_param_goes_to_one_member() -> None:
    rx = [udp_receiver() for _ in range(3)]
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", f"virtual:HASH(callid) {members(*rx)}")
            raise_all(engine, [{"seq": i} for i in range(60)])
            counts = sorted(len(r.quiet(settle=0.1)) for r in rx)
            assert counts == [0, 0, 60]
    finally:
        for r in rx:
            r.close()


def test_filters_wildcards_numbers_absent_keys_and_several_conditions() -> None:
    names = ["ip10", "num", "both", "plain", "none"]
    rx = {n: udp_receiver() for n in names}
    try:
        with running_engine(["E_TEST"], workers=2) as engine:
            engine.subscribe("E_TEST", rx["ip10"].socket_text, filter="ip=10.*")
            engine.subscribe("E_TEST", rx["num"].socket_text, filter="code=4[0-9][0-9]")
            engine.subscribe("E_TEST", rx["both"].socket_text, filter=["ip=10.?.*", "code=404"])
            engine.subscribe("E_TEST", rx["plain"].socket_text)
            engine.subscribe("E_TEST", rx["none"].socket_text, filter="ip=nothing*")
            events = [
                {"seq": 0, "ip": "10.1.2.3", "code": 404},
                {"seq": 1, "ip": "10.11.2.3", "code": 404},
                {"seq": 2, "ip": "192.168.0.1", "code": 486},
                {"seq": 3, "code": 200},  # no ip: an absent key never matches
                {"seq": 4, "ip": "10.0.0.1", "code": "404"},  # a string "404" matches too
                {"seq": 5, "ip": ["10.0.0.1"], "code": 4040},  # a list never matches
            ]
            raise_all(engine, events)
            assert engine.raise_event("E_TEST", ["10.1.1.1"]).queued  # positional: no names
            settle(engine)
            got = {n: seqs(r) if n != "plain" else [] for n, r in rx.items()}
            rx["plain"].quiet(7)
            for n in names:
                if n != "plain":
                    rx[n].quiet(settle=0.2)
                    got[n] = seqs(rx[n])
            assert got["ip10"] == [0, 1, 4]
            assert got["num"] == [0, 1, 2, 4]
            assert got["both"] == [0, 4]
            assert got["none"] == []
            assert len(rx["plain"].datagrams) == 7
            stats = engine.statistics()
            stats.check_identity()
            # 7 events x 4 filtered subscriptions = 28 pairs; 9 of them sent.
            assert stats.pairs_filtered == 28 - 9
            assert stats.filtered_by_event() == {"E_TEST": 19}
            # The subscribers still get the raised bytes unchanged.
            assert rx["ip10"].datagrams[0] == rx["plain"].datagrams[0]
    finally:
        for r in rx.values():
            r.close()


def test_listing_and_mi_named_filter() -> None:
    a, b = udp_receiver(), udp_receiver()
    group = f"virtual:FAILOVER {a.socket_text} {b.socket_text}"
    try:
        with running_engine(["E_TEST"]) as engine:
            assert run(engine, "event_subscribe", ["E_TEST", f"virtual:FAILOVER\t{members(a, b)}"])
            req = {"event": "E_TEST", "socket": a.socket_text, "expire": 60, "filter": "ip=1*"}
            assert run(engine, "event_subscribe", req) == "OK"
            listed = run(engine, "subscribers_list", ["E_TEST"])
            subs = listed["Event"]["Subscribers"]  # type: ignore[index]
            assert [(s["socket"], s.get("filter")) for s in subs] == [
                (a.socket_text, "ip=1*"),
                (group, None),
            ]
            assert set(subs[1]) == {"socket", "expire", "ttl"}  # as OpenSIPS lists it
            one = run(engine, "subscribers_list", ["E_TEST", group])
            assert one["Event"]["Subscriber"]["socket"] == group  # type: ignore[index]
            named = {"event": "E_TEST", "socket": a.socket_text, "filter": "ip=1*"}
            assert run(engine, "subscribers_list", named)["Event"]["Subscriber"]["expire"] == 60  # type: ignore[index]
            # Unsubscribed as a whole.
            assert run(engine, "event_subscribe", ["E_TEST", group, 0]) == "OK"
            assert len(run(engine, "subscribers_list", ["E_TEST"])["Event"]["Subscribers"]) == 1  # type: ignore[index]
    finally:
        a.close()
        b.close()


def test_groups_and_filters_survive_a_restart(tmp_path: Path) -> None:
    a, b = udp_receiver(), udp_receiver()
    state = str(tmp_path / "state.json")
    group = f"virtual:ROUND-ROBIN {a.socket_text} {b.socket_text}"
    try:
        with running_engine(["E_TEST"], state_file=state) as engine:
            engine.subscribe("E_TEST", group, 600)
            engine.subscribe("E_TEST", a.socket_text, 600, filter="ip=10.*")
            first = [(s.dest.key, s.filter_text) for s in engine.registry.subscribers("E_TEST")]
        with running_engine(["E_TEST"], state_file=state) as engine:
            again = [(s.dest.key, s.filter_text) for s in engine.registry.subscribers("E_TEST")]
            assert again == first == [(a.socket_text, "ip=10.*"), (group, "")]
            raise_all(engine, [{"seq": i, "ip": "10.0.0.1"} for i in range(4)])
            a.quiet(4)
            b.quiet(2)
            assert sorted(seqs(a)) == [0, 0, 1, 2, 2, 3]  # filtered: all; the group: 0, 2
            assert seqs(b) == [1, 3]
            engine.statistics().check_identity()
    finally:
        a.close()
        b.close()


def test_a_restarted_worker_keeps_groups_and_filters() -> None:
    a, b, f = udp_receiver(), udp_receiver(), udp_receiver()
    try:
        with running_engine(["E_TEST"]) as engine:
            engine.subscribe("E_TEST", f"virtual:ROUND-ROBIN {members(a, b)}")
            engine.subscribe("E_TEST", f.socket_text, filter="seq=1*")
            raise_all(engine, [{"seq": i} for i in range(10)])
            pid = engine.statistics().workers[0].pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            eventually(
                lambda: (
                    engine.statistics().workers[0].restarts == 1
                    and engine.statistics().workers[0].alive
                ),
                what="the worker to be restarted",
            )
            raise_all(engine, [{"seq": i} for i in range(10, 110)])
            a.quiet(55)
            b.quiet(55)
            f.quiet(12)
            # Its table came back from the snapshot: the group and the filter hold.
            assert len(a.datagrams) == len(b.datagrams) == 55
            assert seqs(f) == [1, *range(10, 20), *range(100, 110)]
            engine.statistics().check_identity()
    finally:
        for r in (a, b, f):
            r.close()


def test_failover_unix_queue_still_full_after_the_wait(tmp_path: Path) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, never read
    stuck.bind(str(tmp_path / "stuck.sock"))
    second = unix_receiver(tmp_path, "b.sock")
    try:
        with running_engine(["E_TEST"], failover_timeout_s=60, unix_wait_ms=300) as engine:
            group = f"virtual:FAILOVER unix:{tmp_path}/stuck.sock {second.socket_text}"
            engine.subscribe("E_TEST", group)
            raise_all(engine, [{"seq": i} for i in range(300)])
            second.quiet(280)
            stuck.setblocking(False)
            queued = []
            while True:  # bounded: the kernel queue holds net.unix.max_dgram_qlen at most
                try:
                    queued.append(json.loads(stuck.recv(70000))["params"]["seq"])
                except BlockingIOError:
                    break
            # The first member took what its queue held; the rest failed over at once.
            assert 0 < len(queued) < 300
            assert queued == list(range(len(queued)))
            assert seqs(second) == list(range(len(queued), 300))
            stats = engine.statistics()
            stats.check_identity()
            assert stats.failovers >= 1 and stats.pairs_failed == 0
            (group_stats,) = engine.group_statistics()
            assert group_stats.members_down == 1
            assert [n for _, n in group_stats.sent_by_member] == [len(queued), 300 - len(queued)]
    finally:
        stuck.close()
        second.close()
