"""A simulated reviewer for the human-in-the-loop benchmark: it stands in for the person at the review page and
takes the path their clicks take — the review server's HTTP API (`POST /api/decide`), whose decisions become the
same `preferences.jsonl` a person's would.

It decides each pair by the gold score the monitor recorded on both sides (the audit), flipping a stated share of
its decisions (`error`; a tie goes to the reference policy's answer: when the gold cannot tell them apart, the labels
should not move the policy), and labels at most `budget` pairs a round. Which pending
pairs it labels first is the queue's lever (`order`): `queue` (the order the monitor queued them: its detectors'
most suspicious samples first) or `proxy_margin` (the pairs where the proxy prefers the flagged response to the
reference's by the widest margin: where the proxy is most confidently wrong, if it is wrong).

The ranking is the review server's own (`rlhf-ext review --order`): the simulated reviewer labels the pair the page
would show first, then asks for the next.

Which decisions are flipped (`flips`): "random" draws each one with probability `error` from a seeded generator —
over the 16–64 decisions of a run the realised share varies widely (at error 0.1: 0/32, 6/32 and 5/64 for seeds 0, 1
and 2; at 0.25, seed 0 flips none of its first 16); "exact" flips every (1/error)-th decision from a seeded offset,
so after n decisions exactly ⌊n·error⌋ or ⌈n·error⌉ are flipped — what an axis over the error rate needs.
"""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

from rlhf_ext.monitor.queue import check_order

FLIPS = ("random", "exact")


class SimulatedReviewer:
    def __init__(self, output_dir: str | Path, error: float = 0.1, seed: int = 0, order: str = "queue",
                 audit: str = "gold", flips: str = "random", decided: int = 0):
        if not 0 <= error <= 1:
            raise ValueError(f"error (share of flipped decisions) must lie in [0, 1], got {error}.")
        check_order(order)
        if flips not in FLIPS:
            raise ValueError(f"flips must be one of {FLIPS}, got {flips!r}.")
        self.output_dir, self.error, self.order, self.audit, self.flips = Path(output_dir), error, order, audit, flips
        self.rng = random.Random(seed)
        self.offset = self.rng.random() if flips == "exact" else 0.0
        self.decided = 0
        self.replay(decided)  # a resumed run continues the pattern an uninterrupted one would have drawn
        self.flipped = 0  # decisions flipped by this object's `review` calls (the loop's record keeps the labels)

    def replay(self, n: int) -> int:
        """Draw the flips of `n` decisions already made (an earlier process made them); → how many were flipped."""
        return sum(self._flip() for _ in range(n))

    def _flip(self) -> bool:
        k, self.decided = self.decided, self.decided + 1
        if self.flips == "exact":  # the k-th decision is flipped when ⌊k·e + u⌋ steps up
            return int((k + 1) * self.error + self.offset) > int(k * self.error + self.offset)
        return self.rng.random() < self.error

    def _decision(self, rec: dict) -> str:
        flagged, reference = rec["flagged"]["audit"][self.audit], rec["reference"]["audit"][self.audit]
        right = "flagged" if flagged > reference else "reference"  # a tie keeps the reference policy's answer
        if self._flip():
            self.flipped += 1
            return "reference" if right == "flagged" else "flagged"
        return right

    def review(self, budget: int) -> int:
        """Label up to `budget` pending pairs through the review server, each time the pair its page would show
        first (the server's `order`); returns how many were labelled."""
        from rlhf_ext.monitor.review import serve

        server, url = serve(self.output_dir, reviewer=f"simulated (error {self.error:g}, {self.order})", order=self.order)
        done = 0
        try:
            state = _call(url + "api/state", token=server.token)
            while done < budget and state["pending"]:
                rec = state["pending"][0]
                state = _call(url + "api/decide", {"id": rec["id"], "decision": self._decision(rec)},
                              token=server.token)  # → next state
                done += 1
        finally:
            server.shutdown()
            server.server_close()
        return done


def _call(url: str, body: dict | None = None, token: str = "") -> dict:
    """GET (body None) or POST JSON with the server's token, as the review page does; → the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"X-Review-Token": token, **({} if body is None else {"Content-Type": "application/json"})}
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())
