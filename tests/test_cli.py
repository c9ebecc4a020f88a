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
HERE = Path(__file__).resolve()  # an existing file that is neither a model config nor a GGUF


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
    # accepted before (exit 0, or a traceback after minutes of training): refused at once, naming the flag
    (("plugins", "--help"), 0, "usage: rlhf-ext plugins"),
    (("plugins", "--nonsense", "extra"), 2, "unrecognized arguments: --nonsense extra"),
    (("plan", "--model", "gpt2", "--ensemble", "-3"), 2, "--ensemble must be ≥ 0"),
    (("plan", "--model", "gpt2", "--kl-controller", "hardd"), 2, "Unknown kl_controller 'hardd'"),
    (("plan", "--model", str(HERE)), 2, "is a .py file, not a model config: pass the model's folder"),
    (("demo", "--kl-target", "-1"), 2, "--kl-target must be a finite number > 0"),
    (("demo", "--ensemble-size", "0"), 2, "--ensemble-size must be ≥ 1"),
    (("convert", str(HERE)), 2, "is not a .gguf file or an embedded model"),
    (("convert", str(HERE.parent)), 2, "is not a .gguf file or an embedded model"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_console_script_exit_status(args, status, says):
    r = run(*args)
    assert r.returncode == status, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert says in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_convert_refuses_a_file_that_is_not_gguf_in_one_line(tmp_path, monkeypatch):
    """A .gguf name on another file raised transformers' ValueError (a traceback, exit 1); cut short, struct.error."""
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fake.gguf").write_text("hi\n")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    for name in ("fake.gguf", "short.gguf"):
        r = run("convert", str(tmp_path / name))
        assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and f"{name} could not be read as a GGUF model" in r.stderr
    assert not (tmp_path / "cache" / "models" / "fake").exists()  # nothing half-converted left behind


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


def test_the_recipes_name_the_command_the_user_typed(tmp_path, monkeypatch, capsys):
    """`rlhf-ext ppo --bogus 1` said `ppo.py: error: …` and its usage `usage: ppo.py …`: a file the user never
    named. Through the console script they say `rlhf-ext ppo`; the script run itself (`accelerate launch
    recipes/ppo.py`) still says `ppo.py`, as argparse names a script."""
    from rlhf_ext import recipes

    from .conftest import rlhf_ext_in_this_process

    for command in ("ppo", "reward"):
        status, err = rlhf_ext_in_this_process([command, "--bogus", "1"], tmp_path, monkeypatch, capsys)
        assert status == 2 and err.startswith(f"rlhf-ext {command}: error: ") and "has no such field" in err, err
        assert recipes.PROGRAM is None  # put back: a recipe run later in this process names itself again
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: rlhf-ext {command} [-h]")
    monkeypatch.setattr(sys, "argv", [str(Path(recipes.__file__).with_name("ppo.py")), "--bogus", "1"])
    with pytest.raises(SystemExit) as stop:
        recipes.parse_arguments(rlhf_ext.PPOConfig)
    assert stop.value.code == 2 and capsys.readouterr().err.startswith("ppo.py: error: ")
