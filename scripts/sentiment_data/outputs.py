"""Writing the build's files: atomic writes, JSONL rows, `meta.json` and the open-ended prompt files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sentiment_data.prompts import OPEN_TEMPLATES, build_open_prompts

# Prompt files the open-ended prompts must not repeat: the transfer set is evaluation-only, and the templated
# splits are what the proxy reward models were trained and tested on.
HELD_PROMPT_FILES = ("prompts_transfer.jsonl", "prompts_train.jsonl", "prompts_test.jsonl")


def write_atomic(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def prompt_jsonl(prompts) -> str:
    """Prompt-only rows in TRL's conversational format."""
    return jsonl({"prompt": [{"role": "user", "content": p}]} for p in prompts)


def read_meta(out: Path) -> dict:
    return json.loads((out / "meta.json").read_text(encoding="utf-8"))


def write_meta(out: Path, meta: dict):
    write_atomic(out / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def _held_prompts(out: Path) -> set:
    held = set()
    for name in HELD_PROMPT_FILES:
        if (out / name).is_file():
            held |= {json.loads(ln)["prompt"][0]["content"] for ln in (out / name).read_text().splitlines() if ln}
    return held


def write_open_prompts(out: Path, args) -> dict:
    """Write `prompts_{train,test}_open.jsonl`; refuse any overlap with the templated or the transfer prompts."""
    train, test, train_subj, test_subj = build_open_prompts(
        args.seed, args.n_open_train_prompts, args.n_open_test_prompts, args.test_subject_frac)
    clash = _held_prompts(out) & (set(train) | set(test))
    if clash:
        raise ValueError(f"Open-ended prompts repeat existing prompts (e.g. {sorted(clash)[0]!r}); "
                         f"edit OPEN_TEMPLATES / OPEN_SUBJECTS.")
    for name, prompts in (("train_open", train), ("test_open", test)):
        write_atomic(out / f"prompts_{name}.jsonl", prompt_jsonl(prompts))
    return {"templates": OPEN_TEMPLATES, "subjects": {"train": train_subj, "test": test_subj},
            "counts": {"templates": len(OPEN_TEMPLATES), "subjects_train": len(train_subj),
                       "subjects_test": len(test_subj), "prompts_train_open": len(train),
                       "prompts_test_open": len(test)}}
