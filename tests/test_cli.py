"""The console script as a user runs it: every subcommand ends with the right exit status (0 on success), `--help`
works everywhere, and a missing configuration is named instead of crashing."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import rlhf_ext
from rlhf_ext import cli

SCRIPT = Path(sys.executable).with_name("rlhf-ext")


def run(*args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, status, says", [
    ((), 2, "commands:"),
    (("--help",), 0, "commands:"),
    (("plugins",), 0, "kl_controller"),
    (("plan", "--model", "gpt2", "--batch", "8"), 0, "GiB"),
    (("convert", "--help"), 0, "usage: rlhf-ext convert"),
    (("demo", "--help"), 0, "default: outputs/demo"),  # every default shown (the README's paths follow it)
    (("ppo", "--help"), 0, "--config FILE"),  # read outside argparse: the epilog says what it takes
    (("report", "--help"), 0, "output_dir"),
    (("review", "--help"), 0, "usage"),
    (("ppo",), 2, "--config"),
    (("reward",), 2, "--config"),
    # a path that is not there: one line naming it and what to pass (each a traceback before)
    (("report", "no/such/run"), 2, "no/such/run/monitor/metrics.jsonl does not exist"),
    (("convert", "no/such/model.gguf"), 2, "GGUF file no/such/model.gguf does not exist"),
    (("demo", "--data-dir", "no/such/data"), 2, "--data-dir no/such/data lacks prompts_train.jsonl"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_console_script_exit_status(args, status, says):
    r = run(*args)
    assert r.returncode == status, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert says in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_a_command_that_returns_a_summary_exits_0(monkeypatch):
    """`demo` returns its summary dict; passed to sys.exit it printed the dict and exited 1 (`make demo` failed after
    succeeding). main() maps any non-int result of a successful command to 0."""
    monkeypatch.setitem(cli.HANDLERS, "demo", lambda rest: {"gold_after": 0.1})
    assert cli.main(["demo"]) == 0


def test_version_is_single_sourced():
    assert version("rlhf_ext") == rlhf_ext.__version__


def test_report_without_matplotlib_names_the_install(monkeypatch, tmp_path):
    import builtins

    from rlhf_ext.monitor import report

    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.make_plots({"metrics": [], "alarms": [], "run": {}}, tmp_path)


def test_push_offline_says_nothing_was_lost(monkeypatch, tmp_path):
    from rlhf_ext.hub import push_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OSError, match="Could not upload .* Nothing local was changed or lost.*token"):
        push_folder(tmp_path, "someone/repo", token="hf_fake")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_a_reader_that_stops_early_is_not_a_failure():
    """`rlhf-ext plan … | head -1`: the pipe closes before the plan is printed; exit 0, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ext.cli", "plan", "--model", "gpt2", "--batch", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the plan is printed (the import alone takes longer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
