"""The shipped sentiment prompts: the open-ended family widens training without touching what is held out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "sentiment"


def _builder():
    spec = importlib.util.spec_from_file_location("build_sentiment_data", ROOT / "scripts" / "build_sentiment_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prompts(name):
    return [json.loads(ln)["prompt"][0]["content"] for ln in (DATA / f"prompts_{name}.jsonl").read_text().splitlines()]


def test_open_prompts_are_reproducible_and_disjoint_from_everything_held_out():
    b = _builder()
    meta = json.loads((DATA / "meta.json").read_text())
    train, test, train_subj, test_subj = b.build_open_prompts(meta["params"]["seed"], 512, 128,
                                                              meta["params"]["test_subject_frac"])
    assert _prompts("train_open") == train and _prompts("test_open") == test  # the shipped files are the builder's
    assert meta["open"]["subjects"] == {"train": train_subj, "test": test_subj}
    assert not set(train_subj) & set(test_subj)
    # no open subject is a templated one, no open prompt repeats a templated or a transfer prompt
    assert not set(b.OPEN_SUBJECTS) & set(b.SUBJECTS_NEGATIVE + b.SUBJECTS_NEUTRAL)
    held = set(_prompts("transfer")) | set(_prompts("train")) | set(_prompts("test"))
    assert len(held) == 40 + 768 + 192 and not held & (set(train) | set(test))
    # test prompts use only test subjects: nothing of the open held-out set was trained on
    assert all(any(s in p for s in test_subj) and not any(s in p for s in train_subj) for p in test)


def test_open_prompts_only_refuses_a_missing_build_and_clashing_text(tmp_path, monkeypatch, capsys):
    b = _builder()
    for option in ("--open-prompts-only", "--card-only"):  # no meta.json: the full build must come first
        with pytest.raises(SystemExit) as e:  # (--card-only ended in a FileNotFoundError traceback)
            b.main(["--out", str(tmp_path), option])
        assert e.value.code == 2 and f"{tmp_path / 'meta.json'} is missing" in capsys.readouterr().err
    (tmp_path / "meta.json").write_text("{}")
    clash = b.build_open_prompts(0, 512, 128, 0.2)[0][5]
    (tmp_path / "prompts_transfer.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": clash}]}))
    with pytest.raises(ValueError, match="repeat existing prompts"):
        b.main(["--out", str(tmp_path), "--open-prompts-only", "--no-card"])
    assert not (tmp_path / "prompts_train_open.jsonl").exists()
