"""The review queue: flagged samples waiting for a person, the person's decisions, and the preference pairs they
become. Three files in `OUTPUT_DIR/review/`, all JSON Lines:

queue.jsonl (appended by the trainer's monitor; one record per pair)::

    {"id": "it12-3", "iteration": 12, "created": "2026-11-27T08:00:00Z", "detectors": ["length_drift"],
     "prompt": <the dataset's prompt: text, or a list of chat messages>,
     "flagged":   {"completion": <text, or [{"role": "assistant", "content": ...}]>, "text": "...",
                   "length": 48, "eos": false, "kl": 3.2, "score": 1.7, "rewards": {"member_0": 0.41, ...},
                   "audit": {"gold": -0.8}},
     "reference": {... the same fields for a sample of the reference policy on the same prompt; kl 0 ...}}

decisions.jsonl (appended by the review page; the log of every click, undo included)::

    {"id": "it12-3", "decision": "flagged" | "reference" | "both_bad" | "skip" | "undo", "time": "...",
     "reviewer": null}

preferences.jsonl (rewritten atomically after every decision): TRL's preference format, one row per pair where a
response was picked — `{"prompt", "chosen", "rejected", "source": {...provenance...}}` — ready for
`rlhf-ext reward --extra_preferences OUTPUT_DIR/review/preferences.jsonl`.

Every append is one `write` of a whole line followed by fsync: a killed trainer or server loses at most the line it
was writing, and readers skip a torn last line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..integrity import write_text_atomic

DECISIONS = ("flagged", "reference", "both_bad", "skip")
# The order pending pairs are shown in. "queue": as the monitor queued them (each alarm's most suspicious samples
# first). "proxy_margin": the pairs where the reward prefers the flagged response to the reference's by the widest
# margin first — where the proxy is most confidently wrong if the person finds it wrong. On the reward-hacking
# benchmark it did no better than the queue's order over three seeds (README, "The queue's order").
ORDERS = ("queue", "proxy_margin")


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"review order must be one of {', '.join(ORDERS)}; got {order!r}.")
    return order


def proxy_margin(record: dict) -> float:
    """How much the reward prefers the flagged response: score(flagged) − score(reference)."""
    return record["flagged"]["score"] - record["reference"]["score"]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # a writer was killed mid-line: end that torn line, or this record would be glued onto it and lost too
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete, parseable line (a torn last line from a killed writer is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class ReviewQueue:
    """`OUTPUT_DIR/review/`: add flagged pairs (trainer), decide and undo (review page), export preferences."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir) / "review"
        self.queue_path = self.dir / "queue.jsonl"
        self.decisions_path = self.dir / "decisions.jsonl"
        self.preferences_path = self.dir / "preferences.jsonl"

    # -- trainer side
    def add(self, record: dict) -> None:
        for key in ("id", "prompt", "flagged", "reference"):
            if key not in record:
                raise ValueError(f"A review record needs {key!r}.")
        append_jsonl(self.queue_path, {"created": now(), **record})

    # -- review side
    def records(self) -> list[dict]:
        return read_jsonl(self.queue_path)

    def decisions(self) -> dict[str, dict]:
        """The effective decision per id (the last event; an "undo" makes the pair pending again), oldest first:
        a re-decided pair moves to the end, so the last entry is the one a plain "undo" takes back."""
        state = {}
        for ev in read_jsonl(self.decisions_path):
            state.pop(ev["id"], None)
            if ev.get("decision") != "undo":
                state[ev["id"]] = ev
        return state

    def last_decision(self) -> dict | None:
        """The most recent decision still in effect (what "undo" without an id takes back), or None."""
        return next(reversed(self.decisions().values()), None)

    def progress(self) -> dict:
        """Counts for the review page: pairs in the queue, decided (skip included), pending, preference rows."""
        ids = {r["id"] for r in self.records()}
        decided = {pid: ev for pid, ev in self.decisions().items() if pid in ids}
        picked = sum(ev["decision"] in ("flagged", "reference") for ev in decided.values())
        return {"total": len(ids), "decided": len(decided), "pending": len(ids) - len(decided), "preferences": picked}

    def pending(self, order: str = "queue") -> list[dict]:
        """The undecided pairs, in review order (`ORDERS`); ties keep the queue's order."""
        check_order(order)
        decided = self.decisions()
        out = [r for r in self.records() if r["id"] not in decided]
        if order == "proxy_margin":
            out.sort(key=proxy_margin, reverse=True)
        return out

    def decide(self, pair_id: str, decision: str, reviewer: str | None = None) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}.")
        if pair_id not in {r["id"] for r in self.records()}:
            raise KeyError(f"No pair {pair_id!r} in {self.queue_path}.")
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": decision, "time": now(), "reviewer": reviewer})
        self.export_preferences()

    def undo(self, pair_id: str) -> None:
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": "undo", "time": now(), "reviewer": None})
        self.export_preferences()

    def export_preferences(self) -> Path:
        """Rewrite preferences.jsonl from the queue and the effective decisions (atomic)."""
        by_id = {r["id"]: r for r in self.records()}
        rows = []
        for pid, ev in self.decisions().items():
            rec = by_id.get(pid)
            if rec is None or ev["decision"] not in ("flagged", "reference"):
                continue
            win, lose = ("flagged", "reference") if ev["decision"] == "flagged" else ("reference", "flagged")
            rows.append({"prompt": rec["prompt"], "chosen": rec[win]["completion"], "rejected": rec[lose]["completion"],
                         "source": {"queue_id": pid, "iteration": rec.get("iteration"), "decision": ev["decision"],
                                    "detectors": rec.get("detectors", []), "time": ev["time"],
                                    "reviewer": ev.get("reviewer")}})
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.preferences_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return self.preferences_path
