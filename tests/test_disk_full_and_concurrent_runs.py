"""A full disk, two runs in one output_dir, and a review server killed mid-click.

1. A checkpoint save that hits a full disk (torch.save's "unexpected pos 64 vs 0", safetensors' SafetensorError, a
   bare OSError) is one OSError naming the checkpoint, the cause, that the previous checkpoint is intact and how to
   resume; no `.tmp` folder is left on the full disk (PPO and the reward trainer alike).
2. `append_jsonl` writes the whole line or raises naming the file, the file cut back to what it held (a short write
   on a full disk was silent, and the record lost).
3. A second run started in an output_dir a live run uses is refused at start (a lock the OS drops with its holder).
4. preferences.jsonl read for training agrees with decisions.jsonl (a server killed between the two writes left it
   stale), and the temporary files of killed writers are swept.

The full disk is emulated (no root needed): writes that raise OSError(ENOSPC) or stop short, a disk that reports
no free space."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
from datasets import Dataset

from rlhf_ext import integrity
from rlhf_ext.integrity import verify_manifest
from rlhf_ext.monitor import queue as Q
from rlhf_ext.monitor.queue import ReviewQueue, append_jsonl, read_jsonl

from .conftest import preference_rows
from .test_ppo import make

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
_Usage = namedtuple("usage", "total used free")


def _disk_full(monkeypatch):
    """The disk under output_dir reports no free space (what a library's cryptic write error is then put down to)."""
    monkeypatch.setattr(integrity.shutil, "disk_usage", lambda path: _Usage(1 << 20, 1 << 20, 0))


def _no_tmp(folder: Path) -> list[str]:
    return [p.name for p in Path(folder).rglob("*.tmp")]


# -- 1. a full disk during a save ---------------------------------------------------------------------------------
def test_atomic_folder_names_the_folder_and_the_full_disk(tmp_path):
    final = tmp_path / "artifact"
    with pytest.raises(OSError) as caught:
        with integrity.atomic_folder(final) as tmp:
            (tmp / "a.bin").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "b.bin"))
    msg = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert str(final) in msg and "No space left on device" in msg and "free space" in msg.lower()
    assert not final.exists() and not _no_tmp(tmp_path) and list(tmp_path.iterdir()) == []


def test_atomic_folder_leaves_a_bug_as_it_is(tmp_path):
    """Only a failed write is translated: a bug in the code that writes is raised as it is (the folder removed)."""
    with pytest.raises(KeyError):
        with integrity.atomic_folder(tmp_path / "x"):
            raise KeyError("a bug")
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_removes_its_temporary_file_when_the_write_fails(tmp_path, monkeypatch):
    (tmp_path / "f.json").write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(integrity.os, "fsync", full)
    with pytest.raises(OSError):
        integrity.write_text_atomic(tmp_path / "f.json", "new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"] and (tmp_path / "f.json").read_text() == "old"


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory, tok):
    """A PPO trainer after one iteration, checkpoint-1 saved."""
    out = tmp_path_factory.mktemp("one")
    tr = make(out, tok, max_steps=1, per_device_train_batch_size=8, save_strategy="steps", save_steps=1)
    tr.train()
    return tr, out / "ppo"


def _torch_save_full(obj, f, *a, **k):
    Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 60)  # what it got onto the disk
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")


def _save_tensors_full(tensors, path):
    from safetensors import SafetensorError

    Path(path).write_bytes(b"\0" * 8)
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')


@pytest.mark.parametrize("where", ["torch.save", "save_tensors", "peft"])
def test_ppo_checkpoint_on_a_full_disk_is_one_oserror_and_leaves_no_tmp(one_iteration, monkeypatch, where):
    import rlhf_ext.ppo.checkpoint as C

    tr, out = one_iteration
    _disk_full(monkeypatch)
    if where == "torch.save":
        monkeypatch.setattr(C.torch, "save", _torch_save_full)
    elif where == "save_tensors":
        monkeypatch.setattr(C, "save_tensors", _save_tensors_full)
    else:
        def peft_full(*a, **k):
            raise ENOSPC

        monkeypatch.setattr(tr.policy.peft, "save_pretrained", peft_full)
    with pytest.raises(OSError) as caught:
        tr.save_checkpoint(str(out / "checkpoint-2"))
    msg = str(caught.value)
    assert caught.value.errno == errno.ENOSPC, msg
    assert str(out / "checkpoint-2") in msg and "No space left on device" in msg, msg
    assert "checkpoint-1" in msg and "intact" in msg and "resume_from_checkpoint=True" in msg, msg
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert not _no_tmp(out)
    assert verify_manifest(out / "checkpoint-1", "")


def test_reward_checkpoint_on_a_full_disk_is_one_oserror_and_leaves_no_tmp(tmp_path, tiny_path, tok, monkeypatch):
    from transformers import Trainer

    from .test_reward_resume import _trainer

    out, real = tmp_path / "run", Trainer._save_rng_state

    def full(self, folder):
        if self.state.global_step == 2:
            Path(folder, "rng_state.pth").write_bytes(b"\0" * 64)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(self, folder)

    monkeypatch.setattr(Trainer, "_save_rng_state", full)
    tr = _trainer(out, tiny_path, tok, max_steps=3)
    _disk_full(monkeypatch)
    with pytest.raises(OSError) as caught:
        tr.train()
    msg = str(caught.value)
    assert caught.value.errno == errno.ENOSPC, msg
    assert str(out / "checkpoint-2") in msg and "No space left on device" in msg and "unexpected pos" in msg, msg
    assert "checkpoint-1" in msg and "intact" in msg and "resume_from_checkpoint=True" in msg, msg
    assert not _no_tmp(out) and not (out / "checkpoint-2").exists() and (out / "checkpoint-1").is_dir()


# -- 2. append_jsonl on a full disk -------------------------------------------------------------------------------
def _fake_write(monkeypatch, behave):
    """os.write as seen by append_jsonl: `behave(fd, data, real)` for the lines of this test (marked "rec") and what
    follows on that file descriptor."""
    real, ours = os.write, set()

    def write(fd, data):
        if b'"rec"' in bytes(data):
            ours.add(fd)
        return behave(fd, data, real) if fd in ours else real(fd, data)

    monkeypatch.setattr(Q.os, "write", write)


def test_append_jsonl_writes_the_rest_of_a_short_write(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"iteration": 1})
    _fake_write(monkeypatch, lambda fd, data, real: real(fd, bytes(data)[:7]))  # the kernel takes 7 bytes a call
    append_jsonl(log, {"iteration": 2, "rec": "y" * 100})
    monkeypatch.undo()
    assert [r["iteration"] for r in read_jsonl(log)] == [1, 2] and log.read_bytes().endswith(b"\n")


def test_append_jsonl_on_a_full_disk_raises_and_leaves_no_torn_line(tmp_path, monkeypatch):
    """Part of the line fits (a short write, no error), the rest does not (ENOSPC): before, the call returned
    normally with half a line in the file; now it raises naming the file, which is cut back to what it held."""
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"iteration": 1})
    before = log.read_bytes()
    calls = []

    def full(fd, data, real):
        calls.append(1)
        if len(calls) == 1:
            return real(fd, bytes(data)[:20])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    _fake_write(monkeypatch, full)
    with pytest.raises(OSError) as caught:
        append_jsonl(log, {"iteration": 2, "rec": "y" * 100})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and str(log) in str(caught.value)
    assert "No space left on device" in str(caught.value)
    assert log.read_bytes() == before
    append_jsonl(log, {"iteration": 3})  # space back: the next record lands on a line of its own
    assert [r["iteration"] for r in read_jsonl(log)] == [1, 3]


def test_append_jsonl_write_that_takes_nothing_is_an_error_not_a_loop(tmp_path, monkeypatch):
    log = tmp_path / "alarms.jsonl"
    _fake_write(monkeypatch, lambda fd, data, real: 0)
    with pytest.raises(OSError, match="alarms.jsonl"):
        append_jsonl(log, {"rec": 1})
    monkeypatch.undo()
    assert log.read_bytes() == b""


# -- 3. two runs in one output_dir --------------------------------------------------------------------------------
HOLDER = """
import sys, time
from rlhf_ext.integrity import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def other_run(tmp_path):
    """Another process holding the lock of tmp_path/ppo (a run in progress there); yields its Popen."""
    out = tmp_path / "ppo"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_second_ppo_run_in_a_busy_output_dir_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, tok,
                                                                                              other_run):
    tr = make(tmp_path, tok, max_steps=1, per_device_train_batch_size=8)
    with pytest.raises(RuntimeError) as caught:
        tr.train()
    msg = str(caught.value)
    assert str(tmp_path / "ppo") in msg and f"pid {other_run.pid}" in msg and "another output_dir" in msg, msg
    assert tr.iteration == 0 and not (tmp_path / "ppo" / "monitor" / "metrics.jsonl").exists()
    other_run.kill()  # kill -9: the OS drops its lock, nothing stale is left to refuse the next run
    other_run.wait()
    tr.train()
    assert tr.iteration == 1


def test_the_lock_is_released_when_train_ends_or_raises_and_resume_works_in_the_same_process(tmp_path, tok):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("crash")

    out = tmp_path / "ppo"
    tr = make(tmp_path, tok, max_steps=3, per_device_train_batch_size=8, save_strategy="steps", save_steps=1,
              callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="crash"):
        tr.train()
    _assert_unlocked(out)
    tr2 = make(tmp_path, tok, max_steps=3, per_device_train_batch_size=8, save_strategy="steps", save_steps=1)
    tr2.train(resume_from_checkpoint=True)
    assert tr2.iteration == 3
    _assert_unlocked(out)


def _assert_unlocked(out: Path) -> None:
    """No run holds out's lock (its file removed, or there and free)."""
    path = out / integrity.RUN_LOCK
    if not path.exists():
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_second_reward_run_in_a_busy_output_dir_is_refused(tmp_path, tiny_path, tok, other_run):
    from .test_reward_resume import _trainer

    tr = _trainer(tmp_path / "ppo", tiny_path, tok, max_steps=1)
    with pytest.raises(RuntimeError, match=f"pid {other_run.pid}.*another output_dir"):
        tr.train()
    assert tr.state.global_step == 0 and not list((tmp_path / "ppo").glob("checkpoint-*"))


class _Rank:
    def __init__(self, main: bool):
        self.num_processes, self.is_main_process = 2, main


def test_under_ddp_only_the_main_process_locks_and_every_rank_takes_its_decision(tmp_path, monkeypatch):
    import accelerate.utils

    sent = []

    def broadcast(objs):  # the main process's message reaches this rank
        sent.append(objs)
        return ["output_dir /x is in use by another training run (pid 1)"]

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    with pytest.raises(RuntimeError, match="pid 1"):
        with integrity.output_dir_lock(tmp_path / "out", _Rank(main=False)):
            pass
    assert sent == [[None]] and not (tmp_path / "out").exists()  # a non-main rank neither reads nor locks

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objs: objs)
    with integrity.output_dir_lock(tmp_path / "out", _Rank(main=True)):
        assert (tmp_path / "out" / integrity.RUN_LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):  # a second trainer, even in this process
            with integrity.output_dir_lock(tmp_path / "out"):
                pass
    _assert_unlocked(tmp_path / "out")


def test_atomic_folders_of_two_processes_never_share_a_temporary_folder(tmp_path):
    final = tmp_path / "checkpoint-3"
    mine = integrity.atomic_tmp(final, private=True)
    assert mine.name == f"checkpoint-3.{os.getpid()}.tmp" and integrity.atomic_tmp(final).name == "checkpoint-3.tmp"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f"checkpoint-3.{int(dead.stdout)}.tmp"  # a writer killed mid-save
    live = tmp_path / f"checkpoint-3.{os.getppid()}.tmp"  # a writer still at work
    left.mkdir()
    live.mkdir()
    with integrity.atomic_folder(final) as tmp:
        assert tmp == mine
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", live.name]


# -- 4. preferences.jsonl consistent with decisions.jsonl --------------------------------------------------------
def _side(t):
    return {"completion": t, "text": t, "length": 1, "eos": True, "kl": 0.0, "score": 0.0, "rewards": {}, "audit": {}}


def _reviewed(out: Path) -> ReviewQueue:
    """Three queued pairs; p0 and p1 decided; then an undo of p0 recorded by a server killed before it rewrote
    preferences.jsonl (which still holds p0)."""
    q = ReviewQueue(out)
    for i in range(3):
        q.add({"id": f"p{i}", "iteration": i, "detectors": ["length_drift"], "prompt": f"prompt {i} ",
               "flagged": _side(f"long answer {i}"), "reference": _side(f"short {i}")})
    q.decide("p0", "flagged")
    q.decide("p1", "reference")
    append_jsonl(q.decisions_path, {"id": "p0", "decision": "undo", "time": Q.now(), "reviewer": None})
    old = q.preferences_path.stat().st_mtime_ns
    os.utime(q.preferences_path, ns=(old - 10**9, old - 10**9))  # written a second before the undo
    return q


def test_extra_preferences_follow_decisions_jsonl_after_a_killed_server(tmp_path):
    from rlhf_ext.reward.preference_data import add_extra_preferences

    q = _reviewed(tmp_path)
    assert [r["source"]["queue_id"] for r in read_jsonl(q.preferences_path)] == ["p0", "p1"]  # stale
    base = Dataset.from_list(preference_rows(4, 0, conversational=False))
    with pytest.warns(UserWarning, match="decisions.jsonl"):
        combined = add_extra_preferences(base, [str(q.preferences_path)])
    extra = combined.select(range(len(base), len(combined))).to_list()
    assert [(r["chosen"], r["rejected"]) for r in extra] == [("short 1", "long answer 1")]
    assert [r["source"]["queue_id"] for r in read_jsonl(q.preferences_path)] == ["p1"]  # and the file repaired


def test_preferences_jsonl_never_written_is_built_from_the_decisions(tmp_path):
    """A server killed after the first click was recorded, before preferences.jsonl was first written."""
    from rlhf_ext.reward.preference_data import add_extra_preferences

    q = _reviewed(tmp_path)
    q.preferences_path.unlink()
    base = Dataset.from_list(preference_rows(4, 0, conversational=False))
    with pytest.warns(UserWarning, match="rewritten from the decisions"):
        assert len(add_extra_preferences(base, [str(q.preferences_path)])) == len(base) + 1


def test_a_script_calling_with_extra_preferences_itself_gets_the_decided_pairs(tmp_path):
    """README's retrain step as a script writes it (`rlhf_ext.data.with_extra_preferences(train, [file])`): it
    trained on the stale file — the undone pair p0 in, nothing said."""
    from rlhf_ext.data import with_extra_preferences

    q = _reviewed(tmp_path)
    base = Dataset.from_list(preference_rows(4, 0, conversational=False))
    with pytest.warns(UserWarning, match="rewritten from the decisions"):
        combined = with_extra_preferences(base, [str(q.preferences_path)])
    extra = combined.select(range(len(base), len(combined))).to_list()
    assert [(r["chosen"], r["rejected"]) for r in extra] == [("short 1", "long answer 1")]


def test_the_recipes_check_rebuilds_a_missing_preferences_file_before_refusing_it(tmp_path):
    """`rlhf-ext reward --extra_preferences OUTPUT_DIR/review/preferences.jsonl` refused the file as missing before
    the trainer could rebuild it from decisions.jsonl."""
    from recipes import check_extra_preferences

    q = _reviewed(tmp_path)
    q.preferences_path.unlink()
    with pytest.warns(UserWarning, match="rewritten from the decisions"):
        check_extra_preferences([str(q.preferences_path)])
    assert [r["source"]["queue_id"] for r in read_jsonl(q.preferences_path)] == ["p1"]


def test_a_hand_edited_preferences_file_newer_than_the_decisions_is_kept(tmp_path):
    from rlhf_ext.reward.preference_data import add_extra_preferences

    q = _reviewed(tmp_path)
    q.export_preferences()
    rows = read_jsonl(q.preferences_path)
    rows.append({**rows[0], "chosen": "hand written", "rejected": "worse"})
    q.preferences_path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # after the last decision
    old = q.decisions_path.stat().st_mtime_ns - 2 * 10**9
    os.utime(q.decisions_path, ns=(old, old))
    base = Dataset.from_list(preference_rows(4, 0, conversational=False))
    with pytest.warns(UserWarning, match="newer than"):
        combined = add_extra_preferences(base, [str(q.preferences_path)])
    assert len(combined) == len(base) + 2


def test_a_file_outside_a_review_folder_is_read_as_it_is(tmp_path):
    from rlhf_ext.reward.preference_data import add_extra_preferences

    f = tmp_path / "preferences.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(2, 1, conversational=False)))
    base = Dataset.from_list(preference_rows(4, 0, conversational=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(add_extra_preferences(base, [str(f)])) == 6


def test_the_review_server_sweeps_temporary_files_of_killed_writers(tmp_path):
    from rlhf_ext.monitor.review import ReviewServer

    q = _reviewed(tmp_path)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    left = q.dir / f"preferences.jsonl.{dead}.7f62e8a0d590.tmp"
    live = q.dir / f"preferences.jsonl.{os.getppid()}.7f62e8a0d591.tmp"
    left.write_text("half")
    live.write_text("being written")
    server = ReviewServer(tmp_path)
    try:
        assert not left.exists() and live.exists()
        assert [r["source"]["queue_id"] for r in read_jsonl(q.preferences_path)] == ["p1"]
    finally:
        server.server_close()
