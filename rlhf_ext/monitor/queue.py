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

Every append writes a whole line followed by fsync — or, when a write fails (a full disk), cuts the file back to
what it held and raises naming it: a killed trainer or server loses at most the line it was writing. Readers skip
that torn line — unterminated at the end of the file, or ended later by the next append with the `TORN` mark — and
refuse every other line they cannot read, naming the file and the line: preferences.jsonl is rewritten from what
they read, so a line skipped silently would silently drop a person's decision.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..integrity import CorruptFileError, sweep_temp_files, temp_file_for, write_text_atomic

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
    """How much the reward prefers the flagged response: score(flagged) − score(reference); NaN when a score is
    unknown (null: the writer's NaN, a reward that diverged for that sample)."""
    flagged, reference = record["flagged"]["score"], record["reference"]["score"]
    return math.nan if flagged is None or reference is None else flagged - reference


def _margin_rank(margin: float) -> tuple:
    """Sort key, widest margin first; an unknown (non-finite) margin last. NaN compares false with everything, so
    sorting by it directly is no order at all: pairs around it would land anywhere."""
    return (0, -margin) if math.isfinite(margin) else (1, 0.0)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# A UTF-16 surrogate on its own: half a character (a JSON "\\ud83d" escape, text cut inside an emoji). Python strings
# can hold one; UTF-8 cannot, so writing it fails (UnicodeEncodeError) and a browser shows it as garbage.
SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how one (or half of a valid pair) looks inside a JSON line


def plain_json(value, where: str = "", found: list | None = None):
    """`value` as standard JSON and UTF-8 can hold it: NaN and ±Infinity (not JSON: a browser refuses the whole
    reply that holds one) become null, each lone surrogate becomes U+FFFD. `found` collects (where, what) of each
    change, `where` a dotted path such as "flagged.audit.gold"."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append((where, repr(value)))
        return None
    if isinstance(value, str):
        if SURROGATE.search(value):
            if found is not None:
                found.append((where, "a lone UTF-16 surrogate"))
            return SURROGATE.sub("\ufffd", value)
        return value
    if isinstance(value, dict):
        return {plain_json(k): plain_json(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


def lone_surrogate(value, where: str = "") -> str | None:
    """Where `value` holds a lone UTF-16 surrogate (a dotted path, "" for the value itself), or None."""
    if isinstance(value, str):
        return where if SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        hit = lone_surrogate(v, (f"{where}.{k}" if where else str(k)) if isinstance(value, dict) else f"{where}[{k}]")
        if hit is not None:
            return hit
    return None


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a lone surrogate would make encode() raise and lose the whole record (or stop a training run): U+FFFD instead
    line = (SURROGATE.sub("\ufffd", json.dumps(record, ensure_ascii=False)) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # a writer was killed mid-line: end that torn line, or this record would be glued onto it and lost too.
            # A complete record whose newline is missing (saved by an editor) is kept as it is.
            tail = os.pread(fd, size, 0).rsplit(b"\n", 1)[-1]
            line = (b"\n" if _parse(tail) is not None else TORN + b"\n") + line
        _write_line(fd, line, path, size)
    finally:
        os.close(fd)


def _write_line(fd: int, line: bytes, path: Path, size: int) -> None:
    """All of `line`, then fsync. On a full disk the kernel takes part of a write without an error (a short write)
    and refuses the rest: the record would be cut and lost with no error at all. A failure cuts the file back to
    its `size` before the append (no torn line of ours) and raises an OSError naming the file."""
    done = 0
    try:
        while done < len(line):
            n = os.write(fd, line[done:])
            if n <= 0:  # nothing taken and no error: no progress to wait for
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n
        os.fsync(fd)
    except OSError as e:
        state = (f"The file was cut back to the {size} bytes it held before (the record is not in it)"
                 if _cut_back(fd, size, done) else "Another writer appended after the part written (readers skip it as "
                                                   "a torn line)")
        raise OSError(e.errno, f"Could not append a record to {path}: {e.strerror or e}. {state}; free space on that "
                               f"disk (or fix what the error names), then run again.") from e


def _cut_back(fd: int, size: int, written: int) -> bool:
    """Undo a partial append, unless another writer has appended after it (cutting would take theirs too; its
    append ended our part with the `TORN` mark). Returns whether the file is back to `size`."""
    try:
        if os.fstat(fd).st_size == size + written:
            os.ftruncate(fd, size)
            return True
    except OSError:
        pass
    return False


def _parse(raw: bytes):
    """The JSON value of one line, or None when it is not UTF-8 JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError:  # not UTF-8, not JSON, or an integer of more than 4300 digits (a plain ValueError)
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
        record = _line_record(path, n, raw, n == len(lines), check, fix)
        if record is not None:
            out.append((n, record))
    return out


def _line_record(path: Path, n: int, raw: bytes, last: bool, check=None, fix: str = REPAIR) -> dict | None:
    """The record of line `n` (`raw`, without its newline; `last`: no newline follows it) as `read_jsonl_lines` reads
    it: None for a line readers skip (blank, torn), CorruptFileError for any other line that is not a JSON object or
    that `check` finds fault with."""
    if not raw.strip() or raw.rstrip().endswith(TORN):
        return None
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, or an integer Python refuses to read
        if last:  # no newline after it: torn, or still being written
            return None
        what = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError)
                else f"not valid JSON at column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError)
                else f"not readable JSON ({e})")
        raise CorruptFileError(path, f"line {n} is {what}", fix) from None
    if not isinstance(record, dict):
        problem = f"is {json.dumps(record, ensure_ascii=False)[:40]}, not a JSON object"
    else:
        problem = _surrogate_problem(raw, record) or (check(record) if check else None)
    if problem:
        raise CorruptFileError(path, f"line {n} {problem}", fix)
    return record


def keep_jsonl_records(path: Path, keep, fix: str = REPAIR) -> int:
    """Leave in a JSON Lines file only the records `keep(record)` accepts, reading one line at a time: a long run's
    monitor logs hold hundreds of MB, which read whole into Python objects took several times their size. Kept lines
    are copied byte for byte; the lines readers skip (blank, torn) go too. A file with nothing to remove is left as
    it is; otherwise it is replaced atomically (a temporary file in its folder, which `sweep_temp_files` removes if
    the writer is killed; fsync; rename). A damaged line raises CorruptFileError as `read_jsonl_lines` does, the file
    untouched. Returns the number of records removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    tmp = temp_file_for(path)
    out, start, removed = None, 0, 0
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                ended = line.endswith(b"\n")
                raw = line[:-1] if ended else line
                record = _line_record(path, n, raw, not ended, fix=fix)
                kept = record is not None and keep(record)
                if out is None and not (kept and ended):  # the first change: what precedes it is copied as it is
                    out = open(tmp, "wb")
                    with open(path, "rb") as src:
                        while start > 0:
                            block = src.read(min(start, 1 << 16))
                            out.write(block)
                            start -= len(block)
                if out is None:
                    start += len(line)
                elif kept:
                    out.write(raw + b"\n")
                removed += record is not None and not kept
        if out is None:
            return 0
        out.flush()
        os.fsync(out.fileno())
        out.close()
        os.replace(tmp, path)
        return removed
    finally:
        if out is not None and not out.closed:
            out.close()
        tmp.unlink(missing_ok=True)


def _surrogate_problem(raw: bytes, record: dict) -> str | None:
    """A lone surrogate escaped in a line (another tool's ensure_ascii writer) reads fine, but every page, reply or
    file that holds it fails to encode later: refused here, naming the field. The escape test keeps this off the
    lines that have none (nearly all)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return None
    where = lone_surrogate(record)
    if where is None:  # only valid pairs (an emoji written as two escapes)
        return None
    return (f'has a lone UTF-16 surrogate in "{where}": half of a character, which UTF-8 cannot hold (text cut '
            f'inside an emoji?). Replace that escape (\\ud800-\\udfff) with the whole character or with \\ufffd')


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


def _content(record: dict) -> dict:
    """A queued pair without what differs between two writes of the same pair (when it was written, its id)."""
    return {k: v for k, v in record.items() if k not in ("created", "id")}


class ReviewQueue:
    """`OUTPUT_DIR/review/`: add flagged pairs (trainer), decide and undo (review page), export preferences."""

    def __init__(self, output_dir):
        self.dir = Path(output_dir) / "review"
        self.queue_path = self.dir / "queue.jsonl"
        self.decisions_path = self.dir / "decisions.jsonl"
        self.preferences_path = self.dir / "preferences.jsonl"
        self._known = None  # (the queue file's size and mtime, its ids) as this queue's last add left them

    @contextmanager
    def locked(self):
        """Hold `review/.lock` (flock) while a decision is checked, appended and exported: two review servers on one
        folder (two reviewers, each with their --reviewer name) otherwise both record a pair each saw pending, the
        later silently replacing the earlier. Without flock (Windows): no lock."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:
            yield
            return
        with open(self.dir / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _stamp(self):
        try:
            st = self.queue_path.stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    # -- trainer side
    def add(self, record: dict) -> None:
        """Append a pair. NaN and ±Infinity (an audit that could not grade a sample, a diverged reward) are written
        as null — the page shows "–" — and a lone surrogate as U+FFFD, with a warning: neither is standard JSON in
        UTF-8, and one would blank the review page or stop the training run that queues it."""
        found = []
        record = plain_json(record, found=found)
        broken = [where for where, what in found if "surrogate" in what]
        if broken:
            warnings.warn(f"Review pair {record.get('id')!r}: {', '.join(broken)} held a lone UTF-16 surrogate (half "
                          f"of a character, which UTF-8 cannot hold); it is queued with U+FFFD in its place.")
        problem = check_pair(record)
        if problem:
            raise ValueError(f"A review record {problem}.")
        # the ids are read once and kept while the file stays as this queue's own adds left it: a new id is then
        # appended without reading the whole queue (a read per add took a second per pair at 8000 pairs)
        if self._known is not None and self._known[0] == self._stamp() and record["id"] not in self._known[1]:
            ids, pid = self._known[1], record["id"]
        else:
            try:
                taken = {r["id"]: r for r in self.records()}
                ids = set(taken)
            except CorruptFileError as e:  # hours of training must not stop over a line only the review page reads
                warnings.warn(f"{e} (This pair is queued after it all the same; the review page refuses the queue "
                              f"until that line is repaired.)")
                taken, ids = {}, None  # read again at the next add: the ids of a damaged file are not all known
            # a resumed run repeats the iterations after its checkpoint, and its monitor queues the same ids again:
            # the same pair (an exact resume samples it again) is queued once — twice, a reviewer would judge it
            # twice and preferences.jsonl count it double; a different pair under a taken id gets a new one
            # an id decisions.jsonl names but the queue no longer holds (its line deleted by hand, the queue cleared
            # for a new round) is taken too: a new pair under it would inherit that decision, made on other text
            try:
                gone = {ev["id"] for ev in read_jsonl(self.decisions_path, check_decision)} - set(taken)
            except CorruptFileError:
                gone = set()  # the review page refuses that log until it is repaired
            pid, k = record["id"], 1
            while pid in taken or pid in gone:
                if pid in taken and _content(taken[pid]) == _content(record):
                    return
                k += 1
                pid = f"{record['id']}~{k}"
            if ids is not None:
                ids |= gone
        append_jsonl(self.queue_path, {"created": now(), **record, "id": pid})
        if ids is not None:
            ids.add(pid)
        self._known = None if ids is None else (self._stamp(), ids)

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

    def last_decision(self, reviewer: str | None = None) -> dict | None:
        """The most recent decision still in effect (what "undo" without an id takes back) — `reviewer`'s own when
        named (two reviewers on one folder: one's undo must not take back the other's click) — or None."""
        return next((ev for ev in reversed(self.decisions().values())
                     if reviewer is None or ev.get("reviewer") == reviewer), None)

    def progress(self) -> dict:
        """Counts for the review page: pairs in the queue, decided (skip included), pending, preference rows."""
        ids = {r["id"] for r in self.records()}
        decided = {pid: ev for pid, ev in self.decisions().items() if pid in ids}
        picked = sum(ev["decision"] in ("flagged", "reference") for ev in decided.values())
        return {"total": len(ids), "decided": len(decided), "pending": len(ids) - len(decided), "preferences": picked}

    def pending_count(self) -> int:
        """Pairs awaiting a decision; 0 where the monitor queued nothing (no queue file)."""
        return self.progress()["pending"] if self.queue_path.is_file() else 0

    def pending(self, order: str = "queue") -> list[dict]:
        """The undecided pairs, in review order (`ORDERS`); ties keep the queue's order."""
        check_order(order)
        decided = self.decisions()
        rows = [(n, r) for n, r in self._pairs() if r["id"] not in decided]
        if order == "proxy_margin":
            for n, r in rows:
                for side in ("flagged", "reference"):
                    if r[side].get("score", 0) is None:  # unknown (written for NaN): the pair sorts last
                        continue
                    problem = check_fields(r[side], {"score": (int, float)})
                    if problem:
                        raise CorruptFileError(self.queue_path, f'line {n}: its "{side}" {problem} (the proxy_margin '
                                               f'order sorts by it)', "Repair that line, or review in queue order.")
            rows.sort(key=lambda row: _margin_rank(proxy_margin(row[1])))  # stable: ties keep the queue's order
        return [r for _, r in rows]

    def decide(self, pair_id: str, decision: str, reviewer: str | None = None) -> None:
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}.")
        if pair_id not in {r["id"] for r in self.records()}:
            raise KeyError(f"No pair {pair_id!r} in {self.queue_path}.")
        self.decisions()  # a damaged decision log is refused before this click is added to it
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": decision, "time": now(), "reviewer": reviewer})
        self.export_preferences()

    def undo(self, pair_id: str, reviewer: str | None = None) -> None:
        self.records()  # damaged files are refused before the log grows
        self.decisions()
        append_jsonl(self.decisions_path, {"id": pair_id, "decision": "undo", "time": now(), "reviewer": reviewer})
        self.export_preferences()

    def export_preferences(self, rows: list[dict] | None = None) -> Path:
        """Rewrite preferences.jsonl from the queue and the effective decisions (atomic), or from their `rows`
        already read (`preference_rows`). Both are read whole or not at all (CorruptFileError): a row dropped from a
        partial read would be a decision lost."""
        rows = self.preference_rows() if rows is None else rows
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.preferences_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return self.preferences_path

    def sweep(self) -> list[Path]:
        """Remove the temporary files of writers killed inside `write_text_atomic` (a server killed mid-export)."""
        return sweep_temp_files(self.dir) if self.dir.is_dir() else []

    def preference_rows(self) -> list[dict]:
        """The rows of preferences.jsonl as the queue and the effective decisions make them."""
        by_id = {r["id"]: r for r in self.records()}
        rows = []
        for pid, ev in self.decisions().items():
            rec = by_id.get(pid)
            if rec is None or ev["decision"] not in ("flagged", "reference"):
                continue
            win, lose = ("flagged", "reference") if ev["decision"] == "flagged" else ("reference", "flagged")
            rows.append({"prompt": rec["prompt"], "chosen": _in_prompt_form(rec["prompt"], rec[win]["completion"]),
                         "rejected": _in_prompt_form(rec["prompt"], rec[lose]["completion"]),
                         "source": {"queue_id": pid, "iteration": rec.get("iteration"), "decision": ev["decision"],
                                    "detectors": rec.get("detectors", []), "time": ev.get("time"),
                                    "reviewer": ev.get("reviewer")}})
        return rows


def _in_prompt_form(prompt, completion):
    """`completion` with its messages' content in the form the prompt's have: the policy writes the response as text
    content, and a dataset whose prompts hold lists of parts ([{"type": "text", "text": ...}]) trains on rows whose
    messages all use parts (TRL joins prompt and response into one column, which cannot hold both forms)."""
    parts = isinstance(prompt, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in prompt)
    if not parts or not isinstance(completion, list):
        return completion
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m, dict)
            and isinstance(m.get("content"), str) else m for m in completion]


def _pairs_of(rows: list[dict]) -> list[str]:
    """What a reward model trains on from preference rows (their provenance aside)."""
    return [json.dumps([r.get("prompt"), r.get("chosen"), r.get("rejected")], sort_keys=True) for r in rows]


def preferences_as_decided(path) -> bool:
    """Call before training on `path` (`extra_preferences`). A `review/preferences.jsonl` (decisions.jsonl beside
    it) must hold the pairs decisions.jsonl makes: a review server killed between recording a click and rewriting
    preferences.jsonl left it stale — an undone pair still in it, a decided one missing — and only a restart of the
    server repaired it. Stale (not written after the last decision), it is rewritten from the decisions with a
    warning; written after them yet different (edited by hand), it is kept, with a warning. Any other file is read
    as it is. Returns whether it was rewritten."""
    path = Path(path)
    review = path.parent
    if path.name != "preferences.jsonl" or review.name != "review" or not (review / "decisions.jsonl").is_file():
        return False
    q = ReviewQueue(review.parent)
    try:
        rows = q.preference_rows()
        held = read_jsonl(path) if path.is_file() else None
    except CorruptFileError as e:
        warnings.warn(f"{path} could not be checked against {q.decisions_path} ({e}); it is read as it is.")
        return False
    if _pairs_of(held or []) == _pairs_of(rows):  # (no file and no pair picked yet: the loader says so)
        return False
    if held is not None and path.stat().st_mtime_ns > q.decisions_path.stat().st_mtime_ns:
        warnings.warn(f"{path} holds other pairs than {q.decisions_path} makes ({len(held)} rows, the decisions "
                      f"{len(rows)}) and is newer than it (edited by hand?): it is read as it is. Delete it to have it "
                      f"rebuilt from the decisions.")
        return False
    q.export_preferences(rows)  # `path` is the queue's preferences_path (checked above)
    was = "missing" if held is None else f"older than the last decision in {q.decisions_path}"
    warnings.warn(f"{path} was {was} (a review server stopped between recording a decision and rewriting it): "
                  f"rewritten from the decisions ({len(held or [])} → {len(rows)} pairs) before training on it.")
    return True
