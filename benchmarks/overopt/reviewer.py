"""A simulated reviewer for the human-in-the-loop benchmark: it stands in for the person at the review page and
takes the path their clicks take — the review server's HTTP API (`POST /api/decide`), whose decisions become the
same `preferences.jsonl` a person's would.

It decides each pair by the gold score the monitor recorded on both sides (the audit), flipping a stated share of
its decisions (`error`, drawn with a seeded generator; a tie goes to the reference policy's answer: when the gold
cannot tell them apart, the labels should not move the policy), and labels at most `budget` pairs a round. Which pending
pairs it labels first is the queue's lever (`order`): `queue` (the order the monitor queued them: its detectors'
most suspicious samples first) or `proxy_margin` (the pairs where the proxy prefers the flagged response to the
reference's by the widest margin: where the proxy is most confidently wrong, if it is wrong).
"""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

from rlhf_ext.monitor.queue import ReviewQueue

ORDERS = ("queue", "proxy_margin")


class SimulatedReviewer:
    def __init__(self, output_dir: str | Path, error: float = 0.1, seed: int = 0, order: str = "queue",
                 audit: str = "gold"):
        if not 0 <= error <= 1:
            raise ValueError(f"error (share of flipped decisions) must lie in [0, 1], got {error}.")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
        self.output_dir, self.error, self.order, self.audit = Path(output_dir), error, order, audit
        self.rng = random.Random(seed)
        self.flipped = 0  # decisions flipped so far (the loop's record keeps the labels)

    def _ranked(self, pending: list[dict]) -> list[dict]:
        if self.order == "queue":
            return pending
        return sorted(pending, key=lambda r: r["reference"]["score"] - r["flagged"]["score"])

    def _decision(self, rec: dict) -> str:
        flagged, reference = rec["flagged"]["audit"][self.audit], rec["reference"]["audit"][self.audit]
        right = "flagged" if flagged > reference else "reference"  # a tie keeps the reference policy's answer
        if self.rng.random() < self.error:
            self.flipped += 1
            return "reference" if right == "flagged" else "flagged"
        return right

    def review(self, budget: int) -> int:
        """Label up to `budget` pending pairs through the review server; returns how many were labelled."""
        from rlhf_ext.monitor.review import serve

        server, url = serve(self.output_dir, reviewer=f"simulated (error {self.error:g}, {self.order})")
        done = 0
        try:
            for rec in self._ranked(ReviewQueue(self.output_dir).pending()):
                if done >= budget:
                    break
                decision = self._decision(rec)
                req = urllib.request.Request(url + "api/decide", method="POST",
                                             data=json.dumps({"id": rec["id"], "decision": decision}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    json.loads(resp.read())
                done += 1
        finally:
            server.shutdown()
            server.server_close()
        return done
