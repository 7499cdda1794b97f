"""The debug views' running numbers: 5-minute hit ratio, rates, throughput bins, per-peer traffic,
transfers; and that the debug snapshot carries them."""

from __future__ import annotations

from agent.observability.debug import DebugState, MirrorResult
from agent.observability.live_stats import LiveStats, Transfer
from registry.events import TransferProgress


def test_hit_ratio_covers_the_last_five_minutes_only() -> None:
    stats = LiveStats()
    stats.mirrored(0.0, "miss", "", 0)
    stats.mirrored(100.0, "hit", "10.0.0.2:5000", 1000)
    stats.mirrored(200.0, "hit", "10.0.0.2:5000", 1000)
    stats.mirrored(250.0, "error", "10.0.0.3:5000", 0)
    assert stats.summary(260.0)["hit_ratio_5m"] == 0.5  # 2 of 4
    late = stats.summary(350.0)  # the miss at t=0 has left the window
    assert (late["hits_5m"], late["requests_5m"], late["hit_ratio_5m"]) == (2, 3, 0.6667)
    assert stats.summary(10_000.0)["hit_ratio_5m"] is None
    stats.served_to(300.0, "10.0.0.2", 500)
    stats.served_to(300.0, "fd00::9", 7)
    stats.mirrored(300.0, "hit", "[fd00::9]:5000", 3)
    peers = {p["peer"]: p for p in stats.peer_traffic()}
    assert peers["10.0.0.2"]["bytes_in"] == 2000 and peers["10.0.0.3"]["errors"] == 1
    assert peers["10.0.0.2"]["bytes_out"] == 500 and stats.bytes_out_total == 0  # per peer only
    assert (peers["fd00::9"]["bytes_out"], peers["fd00::9"]["bytes_in"]) == (7, 3)


def test_rates_and_throughput_bins() -> None:
    stats = LiveStats()
    for second in range(100, 110):
        stats.mirrored(second + 0.5, "hit", "p:5000", 1000)
        stats.served(second + 0.5, 500)
    assert stats.rates(110.0) == (1000.0, 500.0)
    assert stats.rates(200.0) == (0.0, 0.0)
    series = stats.throughput(110.0, seconds=20, step=5)
    assert [b["t"] for b in series] == [95, 100, 105, 110]  # the last bin is the current one
    assert series[1] == {"t": 100, "in": 1000.0, "out": 500.0}
    assert series[3] == {"t": 110, "in": 0.0, "out": 0.0}
    stats.mirrored(111.5, "hit", "p:5000", 3000)
    assert stats.throughput(112.0, seconds=20, step=5)[3]["in"] == 1500.0  # 3000 B over 2 s
    assert stats.summary(112.0)["bytes_in_total"] == 13_000
    # memory stays bounded
    small = LiveStats(history=10)
    for second in range(1000):
        small.served(float(second), 1)
    assert len(small._buckets) <= 12


def test_transfers_live_until_they_end() -> None:
    stats = LiveStats(max_transfers=2)
    t = Transfer("1", "sha256:aa", "p:5000", "in", 0, 100, 1.0)
    stats.transfer(t)
    assert stats.progress("1", 40) is not None
    assert stats.transfers()[0]["bytes"] == 40
    stats.transfer(Transfer("2", "k2", "p", "out", 0, None, 2.0))
    stats.transfer(Transfer("3", "k3", "p", "out", 0, None, 3.0))
    assert [x["id"] for x in stats.transfers()] == ["2", "3"]
    stats.transfer(Transfer("2", "k2", "p", "out", 10, None, 2.0, state="done"))
    assert [x["id"] for x in stats.transfers()] == ["3"] and stats.finished()[-1]["id"] == "2"
    assert stats.progress("404", 1) is None


def test_snapshot_carries_summary_transfers_and_throughput() -> None:
    now = [1000.0]
    state = DebugState(node_id="ab", clock=lambda: now[0])
    events = state.subscribe()
    state.record_mirror(MirrorResult(at=999.0, key="sha256:aa", outcome="hit", peer="p:5000",
                                     bytes=4096))  # fmt: skip
    state.record_transfer(Transfer("x", "sha256:bb", "p:5000", "in", 10, 100, 999.5))
    snap = state.snapshot()
    assert snap["summary"]["hit_ratio_5m"] == 1.0 and snap["summary"]["bytes_in_total"] == 4096
    assert snap["transfers"][0]["id"] == "x" and snap["peer_traffic"][0]["peer"] == "p"
    assert len(snap["throughput"]) == 60
    assert events.receive_nowait()["type"] == "mirror"
    assert events.receive_nowait()["transfer"]["bytes"] == 10


def test_peers_are_bounded_least_recently_seen_first() -> None:
    stats = LiveStats(max_peers=2)
    stats.mirrored(1.0, "hit", "10.0.0.1:5000", 10)
    stats.mirrored(2.0, "hit", "10.0.0.2:5000", 10)
    stats.mirrored(3.0, "hit", "10.0.0.1:5000", 10)  # .1 seen again: .2 is now the oldest
    stats.mirrored(4.0, "hit", "10.0.0.3:5000", 10)
    assert sorted(p["peer"] for p in stats.peer_traffic()) == ["10.0.0.1", "10.0.0.3"]


def test_start_times_of_transfers_that_never_end_are_bounded() -> None:
    state = DebugState(live=LiveStats(max_transfers=2))
    bound = 4 * 2
    state.on_mirror_event(TransferProgress(1.0, "kept", "k", "p:5000", 0, None, "running"))
    for i in range(3 * bound):  # transfers whose end never comes
        state.on_mirror_event(TransferProgress(2.0, f"lost{i}", "k", "p:5000", 0, None, "running"))
        # the one still reporting keeps the time it started
        state.on_mirror_event(TransferProgress(3.0, "kept", "k", "p:5000", i, None, "running"))
        assert len(state._transfer_started) <= bound
    kept = [t for t in state.live.transfers() if t["id"] == "kept"]
    assert kept and kept[0]["started"] == 1.0
