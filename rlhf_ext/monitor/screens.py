"""Which pair each review server on a folder has on screen, so that two reviewers on one folder (each running their
own `rlhf-ext review OUTPUT_DIR --reviewer NAME`) are shown different pairs. Before, both were shown the queue's first
pair and read it until the faster one decided it: the other's reading was lost, and their click answered 409.

Each server writes `review/screens/<server>.json` — {"id", "since", "seen", "server", "reviewer"} — when its page
asks for the next pair (every few seconds while the page is open) and reads the others'. A pending pair another live
server has been showing for longer goes after the pairs nobody is reading; a screen not refreshed for `STALE_S` (a
closed tab, a killed server) holds nothing. Advisory only: the decision lock (`ReviewQueue.locked`) is still what
keeps a pair from being decided twice.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from ..integrity import write_text_atomic

STALE_S = 30.0  # ten of the page's polls (review.js POLL_MS): a tab that stopped asking has been closed or hidden
REWRITE_S = 10.0  # the same pair still on screen: its file refreshed this often, not at every poll


class Screens:
    """One review server's screen beside the others' on the same `review/` folder."""

    def __init__(self, review_dir, reviewer: str | None = None):
        self.dir = Path(review_dir) / "screens"
        self.server = f"{os.getpid()}-{secrets.token_hex(4)}"  # two servers in one process are two screens
        self.reviewer = reviewer
        self.showing: tuple[str, float] | None = None  # (pair id, since when)
        self.written = 0.0

    def others(self, now: float | None = None) -> dict[str, tuple[float, str]]:
        """{pair id: (since, server)} for the pairs other live servers have on screen; where two show one pair, the
        one that showed it first."""
        now = time.time() if now is None else now
        held: dict[str, tuple[float, str]] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            if path.stem == self.server:
                continue
            try:
                s = json.loads(path.read_text(encoding="utf-8"))
                pair, since, seen = s["id"], float(s["since"]), float(s["seen"])
            except (OSError, ValueError, KeyError, TypeError):  # being replaced, or not ours: it holds nothing
                continue
            if isinstance(pair, str) and now - seen <= STALE_S:
                held[pair] = min(held.get(pair, (since, path.stem)), (since, path.stem))
        return held

    def arrange(self, pending: list[dict], prefer: str | None = None) -> list[dict]:
        """`pending` reordered for this screen — the pairs other screens hold last, then `prefer` (the pair this
        page shows, or has just undone) first, else the queue's order — and its first pair recorded as shown."""
        now = time.time()
        if self.showing is not None and now - self.written > STALE_S:
            # this page stopped asking (a hidden tab) for longer than others wait: its claim lapsed and another
            # reviewer may be reading the pair now; back, it is a new screen, not the first one to show it
            self.showing = None
        held = self.others(now)
        mine = (self.showing[1], self.server) if self.showing else None

        def taken(pair: str) -> bool:  # another screen showed it first (this one keeps a pair it showed first)
            other = held.get(pair)
            return other is not None and not (self.showing and self.showing[0] == pair and mine < other)

        ordered = sorted(pending, key=lambda r: (taken(r["id"]), r["id"] != prefer))
        self.show(ordered[0]["id"] if ordered else None, now)
        return ordered

    def show(self, pair: str | None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if pair is None:
            self.close()
            return
        same = self.showing is not None and self.showing[0] == pair
        if same and now - self.written < REWRITE_S:
            return
        self.showing = (pair, self.showing[1] if same else now)
        try:  # advisory: a full disk or a read-only folder must not stop the review (decisions report their own)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.dir / f"{self.server}.json", json.dumps({
                "id": pair, "since": self.showing[1], "seen": now, "server": self.server, "reviewer": self.reviewer}))
            self.written = now
        except OSError:
            pass

    def close(self) -> None:
        """Nothing on this screen any more (the queue is empty, or the server stops)."""
        self.showing, self.written = None, 0.0
        try:
            (self.dir / f"{self.server}.json").unlink(missing_ok=True)
        except OSError:
            pass
