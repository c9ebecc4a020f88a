"""What a user reads on the console besides the logs: the recipes' closing lines (where the artifact is, what runs
next), the review command on a run that queued nothing, and third-party noise kept off stderr only where nobody can
act on it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from rlhf_ext.monitor.queue import ReviewQueue
from rlhf_ext.monitor.review import main as review_main
from rlhf_ext.recipes import announce_saved

from .test_review import make_pair

ROOT = Path(__file__).resolve().parents[1]


def _trainer(out, main=True, monitor=None, push=False):
    return SimpleNamespace(is_world_process_zero=lambda: main, monitor=monitor, iteration=3, hub_model_id="you/rm",
                           state=SimpleNamespace(max_steps=16),
                           args=SimpleNamespace(output_dir=str(out), push_to_hub=push))


def _queue_one_pair(out) -> ReviewQueue:
    q = ReviewQueue(out)
    q.add(make_pair("it1-length_drift-0", "a long, long answer", "short"))
    return q


def test_recipes_say_where_the_artifact_is_and_what_runs_next(tmp_path, capsys):
    """TRL's scripts end with "Model saved to …"; ours said nothing, and a queued pair waited unannounced."""
    announce_saved(_trainer(tmp_path / "rm"), "reward")
    out = capsys.readouterr().out
    assert f"Reward model saved to {tmp_path / 'rm'}" in out and f"--reward_model_path {tmp_path / 'rm'}" in out

    ppo = tmp_path / "ppo"
    monitor = SimpleNamespace(halted_by=None, queue=ReviewQueue(ppo))
    announce_saved(_trainer(ppo, monitor=monitor), "ppo")
    out = capsys.readouterr().out
    assert f"Policy saved to {ppo}" in out and f"rlhf-ext report {ppo}" in out and "await review" not in out

    monitor.queue = _queue_one_pair(ppo)
    monitor.halted_by = "length_drift"
    announce_saved(_trainer(ppo, monitor=monitor), "ppo")
    out = capsys.readouterr().out
    assert f"1 flagged pair(s) await review: rlhf-ext review {ppo}" in out
    assert "length_drift detector halted training at iteration 3 of 16" in out

    announce_saved(_trainer(ppo, main=False, monitor=monitor), "ppo")  # the other processes of a DDP run: silent
    assert capsys.readouterr().out == ""


def test_review_of_a_run_that_queued_nothing_says_so(tmp_path, capsys):
    """The monitor was on and raised no queue alarm (the demo's usual outcome): "the queue is filled by a PPO run
    with the monitor on" read as if the run had not had one."""
    run = tmp_path / "ppo"
    (run / "monitor").mkdir(parents=True)
    (run / "monitor" / "run.json").write_text("{}")
    (run / "monitor" / "alarms.jsonl").write_text(json.dumps({"iteration": 2, "detector": "eos_collapse",
                                                              "action": "log"}) + "\n")
    assert review_main([str(run), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "Nothing to review" in err and "flagged no sample" in err and "eos_collapse (log)" in err
    assert review_main([str(tmp_path / "elsewhere"), "--no-browser"]) == 2  # no run there: the old message
    assert "The queue is filled by a PPO run with the monitor on" in capsys.readouterr().err


def test_the_offline_trust_note_on_bitsandbytes_unused_kernel_is_dropped_and_no_other(tmp_path):
    """`kernels` logs at bitsandbytes' import, under HF_HUB_OFFLINE=1, that it skips the trust check of the optional
    CPU kernel rlhf_ext never uses; the same note for any other kernel repository still shows."""
    import rlhf_ext  # noqa: F401  (installs the filter)

    log = logging.getLogger("kernels._internals.hf_hub")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        for repo in ("kernels-community/quantization-bitsandbytes", "kernels-community/flash-attn"):
            log.warning(f"Skipping publisher trust check for '{repo}' because Hugging Face Hub is in offline mode.")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "Skipping publisher trust check for 'kernels-community/flash-attn' because Hugging Face Hub is in offline mode."]


def test_importing_rlhf_ext_offline_says_nothing_of_bitsandbytes_unused_kernel(tmp_path):
    """`import rlhf_ext` then bitsandbytes (as every recipe does), offline, on an AVX512-BF16 CPU: nothing about the
    optional kernel (elsewhere bitsandbytes does not look for it: nothing to say either)."""
    code = "import rlhf_ext, bitsandbytes"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                            "HOME": str(tmp_path)})
    assert r.returncode == 0 and "kernels-community" not in r.stderr, r.stderr


def test_the_printed_next_commands_run_as_copied_for_a_folder_with_a_space(tmp_path, capsys):
    """A run folder with a space or é: the printed `rlhf-ext report …` / `--reward_model_path …` split into two
    arguments when pasted into a shell."""
    import shlex

    rm, ppo = tmp_path / "my runs" / "rm é", tmp_path / "my runs" / "ppo"
    announce_saved(_trainer(rm), "reward")
    line = next(x for x in capsys.readouterr().out.splitlines() if "--reward_model_path" in x)
    assert shlex.split(line.split(": ", 1)[1])[-1] == str(rm)
    announce_saved(_trainer(ppo, monitor=SimpleNamespace(halted_by=None, queue=_queue_one_pair(ppo))), "ppo")
    out = capsys.readouterr().out.splitlines()
    assert shlex.split(next(x for x in out if "rlhf-ext report" in x).split(": ", 1)[1]) == ["rlhf-ext", "report", str(ppo)]
    assert shlex.split(next(x for x in out if "rlhf-ext review" in x).split(": ", 1)[1]) == ["rlhf-ext", "review", str(ppo)]
