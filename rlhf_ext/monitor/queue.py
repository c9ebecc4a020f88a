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
was writing. Readers skip that torn line — unterminated at the end of the file, or ended later by the next append
with the `TORN` mark — and refuse every other line they cannot read, naming the file and the line: preferences.jsonl
is rewritten from what they read, so a line skipped silently would silently drop a person's decision.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from ..integrity import CorruptFileError, write_text_atomic

DECISIONS = ("flagged", "reference", "both_bad", "skip")
# Ends a line a killed writer left unterminated, when the next append has to start a new line after it: without the
# mark, readers could not tell that half record from a line damaged later, which they must refuse.
TORN = b"  <- torn: its writer was killed mid-line; readers skip this line"
REPAIR = "Repair or delete that line; the file was left as it is."
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
            # a writer was killed mid-line: end that torn line, or this record would be glued onto it and lost too.
            # A complete record whose newline is missing (saved by an editor) is kept as it is.
            tail = os.pread(fd, size, 0).rsplit(b"\n", 1)[-1]
            line = (b"\n" if _parse(tail) is not None else TORN + b"\n") + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(raw: bytes):
    """The JSON value of one line, or None when it is not UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def read_jsonl_lines(path: Path, check=None, fix: str = REPAIR) -> list[tuple[int, dict]]:
    """`(line number, record)` of every line of a JSON Lines file; [] when there is no file. Skips blank lines and a
    torn line (`TORN`, or an unreadable last line without its newline: a writer killed or still writing); raises
    CorruptFileError naming the file and line for any other line that is not a JSON object, or that `check(record)`
    finds fault with (it returns what is wrong, or None)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip() or raw.rstrip().endswith(TORN):
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):  # no newline after it: torn, or still being written
                continue
            what = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError)
                    else f"not valid JSON at column {e.colno}: {e.msg}")
            raise CorruptFileError(path, f"line {n} is {what}", fix) from None
        if not isinstance(record, dict):
            problem = f"is {json.dumps(record, ensure_ascii=False)[:40]}, not a JSON object"
        else:
            problem = check(record) if check else None
        if problem:
            raise CorruptFileError(path, f"line {n} {problem}", fix)
        out.append((n, record))
    return out


def read_jsonl(path: Path, check=None, fix: str = REPAIR) -> list[dict]:
    """The records of `read_jsonl_lines`, without their line numbers."""
    return [r for _, r in read_jsonl_lines(path, check, fix)]


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list"}


def check_fields(record: dict, fields: dict) -> str | None:
    """What is wrong with `record` given `fields` ({key: type or tuple of types}), or None. Every key is required.
    true/false is never a number, though Python's bool is an int."""
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key not in record:
            return f'has no "{key}"'
        value = record[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return (f'has "{key}": {json.dumps(value, ensure_ascii=False)[:40]}, which should be '
                    f'{" or ".join(_KINDS.get(k, k.__name__) for k in kinds)}')
    return None


def check_pair(record: dict) -> str | None:
    """What the queue's readers need of a pair: an id, the prompt, and a completion on each side."""
    problem = check_fields(record, {"id": str, "prompt": (str, list), "flagged": dict, "reference": dict})
    if problem or not record["id"]:
        return problem or 'has an empty "id"'
    for side in ("flagged", "reference"):
        if "completion" not in record[side]:
            return f'has no "{side}.completion"'
    return None


def check_decision(record: dict) -> str | None:
    problem = check_fields(record, {"id": str, "decision": str})
    if not problem and record["decision"] not in (*DECISIONS, "undo"):
        problem = f'has "decision": {record["decision"]!r}, which should be one of {", ".join(DECISIONS)}, undo'
    return problem


class ReviewQueue:
    """`OUTPUT_DIR/review/`: add flagged pairs (trainer), decide and undo (review page), export preferences."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir) / "review"
        self.queue_path = self.dir / "queue.jsonl"
        self.decisions_path = self.dir / "decisions.jsonl"
        self.preferences_path = self.dir / "preferences.jsonl"

    # -- trainer side
    def add(self, record: dict) -> None:
        problem = check_pair(record)
        if problem:
            raise ValueError(f"A review record {problem}.")
        try:
            taken = {r["id"] for r in self.records()}
        except CorruptFileError as e:  # hours of training must not stop over a line only the review page reads
            warnings.warn(f"{e} (This pair is queued after it all the same; the review page refuses the queue "
                          f"until that line is repaired.)")
            taken = set()
        # a resumed run repeats the iterations after its checkpoint, and its monitor may queue the same ids again
        pid, k = record["id"], 1
        while pid in taken:
            k += 1
            pid = f"{record['id']}~{k}"
        append_jsonl(self.queue_path, {"created": now(), **record, "id": pid})

    # -- review side
    def records(self) -> list[dict]:
        return [r for _, r in self._pairs()]

    def _pairs(self) -> list[tuple[int, dict]]:
        """`(line number, record)` of every pair; a damaged line or an id used twice is refused, never skipped."""
        rows = read_jsonl_lines(self.queue_path, check_pair)
        first = {}
        for n, r in rows:
            if r["id"] in first:
                raise CorruptFileError(self.queue_path, f"lines {first[r['id']]} and {n} have the same id {r['id']!r}",
                                       "Delete the copy you do not want or give it a new id (decisions.jsonl names "
                                       "pairs by id); the file was left as it is.")
            first[r["id"]] = n
        return rows

    def decisions(self) -> dict[str, dict]:
        """The effective decision per id (the last event; an "undo" makes the pair pending again), oldest first:
        a re-decided pair moves to the end, so the last entry is the one a plain "undo" takes back."""
        state = {}
        for ev in read_jsonl(self.decisions_path, check_decision):
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
        rows = [(n, r) for n, r in self._pairs() if r["id"] not in decided]
        if order == "proxy_margin":
            for n, r in rows:
                for side in ("flagged", "reference"):
                    problem = check_fields(r[side], {"score": (int, float)})
                    if problem:
                        raise CorruptFileError(self.queue_path, f'line {n}: its "{side}" {problem} (the proxy_margin '
                                               f'order sorts by it)', "Repair that line, or review in queue order.")
            rows.sort(key=lambda row: proxy_margin(row[1]), reverse=True)
        return [r for _, r in rows]

    def decide(self, pair_id: str, decision: str, reviewer: str | None = None) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}.")
        if pair_id not in {r["id"] for r in self.records()}:
            raise KeyError(f"No pair {pair_id!r} in {self.queue_path}.")
        self.decisions()  # a damaged decision log is refused before this click is added to it
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": decision, "time": now(), "reviewer": reviewer})
        self.export_preferences()

    def undo(self, pair_id: str) -> None:
        self.records()  # damaged files are refused before the log grows
        self.decisions()
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": "undo", "time": now(), "reviewer": None})
        self.export_preferences()

    def export_preferences(self) -> Path:
        """Rewrite preferences.jsonl from the queue and the effective decisions (atomic). Both are read whole or
        not at all (CorruptFileError): a row dropped from a partial read would be a decision lost."""
        by_id = {r["id"]: r for r in self.records()}
        rows = []
        for pid, ev in self.decisions().items():
            rec = by_id.get(pid)
            if rec is None or ev["decision"] not in ("flagged", "reference"):
                continue
            win, lose = ("flagged", "reference") if ev["decision"] == "flagged" else ("reference", "flagged")
            rows.append({"prompt": rec["prompt"], "chosen": rec[win]["completion"], "rejected": rec[lose]["completion"],
                         "source": {"queue_id": pid, "iteration": rec.get("iteration"), "decision": ev["decision"],
                                    "detectors": rec.get("detectors", []), "time": ev.get("time"),
                                    "reviewer": ev.get("reviewer")}})
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.preferences_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return self.preferences_path
