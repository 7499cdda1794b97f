"""What `spegla watch` shows, computed from the debug feed's messages (no I/O, no terminal).

Why separate from the terminal driver: the screen is a pure function of the messages received so
far and of the clock, so it is tested with made-up feeds. Two renderings: `screen()` fills a
terminal of a given size (the TTY view, redrawn in place), and `lines_for()` turns one message into
zero or more plain lines (the view for pipes and logs: one line per mirror request and transfer
end, one summary line per snapshot at most every `summary_every` seconds).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_RESULTS = 200


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def short_key(key: str, width: int = 28) -> str:
    if key.startswith("sha256:") and len(key) > 19:
        key = "sha256:" + key[7:19]
    return key if len(key) <= width else key[: width - 1] + "~"


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "--:--:--"


def progress_bar(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return "[" + "?" * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


@dataclass(slots=True)
class WatchView:
    address: str = ""
    connected: bool = False
    status: str = "connecting"
    snapshot: dict[str, Any] = field(default_factory=dict)
    results: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RESULTS))
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary_every: float = 10.0
    _last_summary: float = 0.0
    _seen: set[tuple[Any, ...]] = field(default_factory=set)

    # --- feed ------------------------------------------------------------------------------------

    def apply(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "snapshot":
            self.snapshot = message
            self.transfers = {
                str(t.get("id")): t for t in message.get("transfers", []) if isinstance(t, dict)
            }
            for result in reversed(message.get("results", [])):
                self._add_result(result)
        elif kind == "mirror" and isinstance(message.get("result"), dict):
            self._add_result(message["result"])
        elif kind == "transfer" and isinstance(message.get("transfer"), dict):
            t = message["transfer"]
            if t.get("state", "running") == "running":
                self.transfers[str(t.get("id"))] = t
            else:
                self.transfers.pop(str(t.get("id")), None)

    def _add_result(self, result: dict[str, Any]) -> bool:
        ident = (result.get("at"), result.get("key"), result.get("peer"), result.get("outcome"))
        if ident in self._seen:
            return False
        self._seen.add(ident)
        if len(self._seen) > 4 * MAX_RESULTS:
            self._seen = {
                (r.get("at"), r.get("key"), r.get("peer"), r.get("outcome")) for r in self.results
            }
        self.results.appendleft(result)
        return True

    # --- plain lines -----------------------------------------------------------------------------

    def lines_for(self, message: dict[str, Any], now: float) -> list[str]:
        """Apply `message` and return the plain-text lines it is worth (possibly none)."""
        kind = message.get("type")
        if kind == "mirror" and isinstance(message.get("result"), dict):
            fresh = self._add_result(message["result"])
            return [self.result_line(message["result"])] if fresh else []
        if kind == "snapshot":
            before = {id(r) for r in self.results}
            self.apply(message)
            out = [self.result_line(r) for r in reversed(self.results) if id(r) not in before]
            if now - self._last_summary >= self.summary_every:
                self._last_summary = now
                out.append(self.summary_line())
            return out
        if kind == "transfer" and isinstance(message.get("transfer"), dict):
            self.apply(message)
            t = message["transfer"]
            if t.get("state") in ("done", "failed"):
                return [self.transfer_line(t)]
        return []

    def result_line(self, r: dict[str, Any]) -> str:
        ms = r.get("duration_ms")
        return (
            f"{_clock(r.get('at'))} mirror {r.get('outcome', '?')!s:<5} "
            f"{short_key(str(r.get('key', '')), 40):<40} "
            f"peer={r.get('peer') or '-'} bytes={human_bytes(r.get('bytes') or 0)} "
            f"ms={'-' if ms is None else f'{float(ms):.1f}'}"
        )

    def transfer_line(self, t: dict[str, Any]) -> str:
        return (
            f"{_clock(time.time())} transfer {t.get('state')} {t.get('direction', '')} "
            f"{short_key(str(t.get('key', '')), 40)} peer={t.get('peer') or '-'} "
            f"bytes={human_bytes(t.get('bytes'))}/{human_bytes(t.get('total'))}"
        )

    def summary_line(self) -> str:
        s = self.snapshot
        summary = s.get("summary") or {}
        ratio = summary.get("hit_ratio_5m")
        return (
            f"{_clock(s.get('now'))} summary {self.ready_text()} peers={len(s.get('peers', []))} "
            f"images={len(s.get('images', []))} "
            f"hit_ratio_5m={'-' if ratio is None else f'{100 * ratio:.0f}%'} "
            f"in={human_bytes(summary.get('in_bps'))}/s out={human_bytes(summary.get('out_bps'))}/s"
        )

    def ready_text(self) -> str:
        s = self.snapshot
        if not s:
            return "unknown"
        if s.get("ready"):
            return "ready"
        waiting = [name for name, ok in (s.get("readiness") or {}).items() if not ok]
        return "not ready (" + ", ".join(waiting or ["?"]) + ")"

    # --- the full screen -------------------------------------------------------------------------

    def screen(self, width: int, height: int) -> list[str]:
        s = self.snapshot
        summary = s.get("summary") or {}
        ratio = summary.get("hit_ratio_5m")
        head = [
            f"spegla watch {self.address}  [{self.status}]  node {str(s.get('node_id', ''))[:16]}",
            f"{self.ready_text()}   hit ratio (5 min) "
            f"{'-' if ratio is None else f'{100 * ratio:.0f}%'} of {summary.get('requests_5m', 0)}"
            f"   in {human_bytes(summary.get('in_bps'))}/s   out "
            f"{human_bytes(summary.get('out_bps'))}/s   received "
            f"{human_bytes(summary.get('bytes_in_total'))}   served "
            f"{human_bytes(summary.get('bytes_out_total'))}",
            "",
        ]
        peers = s.get("peers", [])
        traffic = {
            str(t.get("peer", "")).rsplit(":", 1)[0].strip("[]"): t
            for t in s.get("peer_traffic", [])
        }
        body = [f"PEERS ({len(peers)})"]
        for p in peers[:6]:
            host = f"{p.get('host', '')}:{p.get('port', '')}"
            t = traffic.get(str(p.get("host", "")), {})
            body.append(
                f"  {str(p.get('node_id', ''))[:12]}  {host:<24} "
                f"in {human_bytes(t.get('bytes_in', 0)):>9}  "
                f"out {human_bytes(t.get('bytes_out', 0)):>9}"
            )
        if len(peers) > 6:
            body.append(f"  ... {len(peers) - 6} more")
        images = s.get("images", [])
        body += ["", f"ADVERTISED IMAGES ({len(images)})"]
        for image in images[:4]:
            body.append(f"  {image.get('name', '')}")
        if len(images) > 4:
            body.append(f"  ... {len(images) - 4} more")
        body += ["", f"TRANSFERS ({len(self.transfers)})"]
        for t in list(self.transfers.values())[:5]:
            total = t.get("total")
            pct = f"{100 * int(t.get('bytes', 0)) / total:5.1f}%" if total else "    ?"
            body.append(
                f"  {t.get('direction', ''):<3} {short_key(str(t.get('key', '')))} "
                f"{progress_bar(int(t.get('bytes', 0)), total)} {pct} "
                f"{human_bytes(t.get('bytes'))}/{human_bytes(total)} {t.get('peer', '')}"
            )
        body += ["", "MIRROR REQUESTS (newest first)"]
        body.append(f"  {'TIME':<8} {'OUTCOME':<7} {'KEY':<30} {'PEER':<22} {'BYTES':>9} {'MS':>7}")
        room = max(0, height - len(head) - len(body) - 1)
        for r in list(self.results)[:room]:
            ms = r.get("duration_ms")
            body.append(
                f"  {_clock(r.get('at'))} {r.get('outcome', '')!s:<7} "
                f"{short_key(str(r.get('key', ''))):<30} {r.get('peer') or '-'!s:<22} "
                f"{human_bytes(r.get('bytes') or 0):>9} {'-' if ms is None else f'{ms:.1f}':>7}"
            )
        lines = (head + body)[: max(1, height - 1)]
        lines.append("Ctrl-C to quit")
        return [line[:width] for line in lines]
