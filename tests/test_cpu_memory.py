"""cpu_memory.py: with glibc's thresholds raised, a workload that allocates the same tensors again (as every PPO pass
does) stops page-faulting them in; an explicit malloc setting in the environment is left alone; PPOTrainer and
RewardEnsembleTrainer apply it on CPU unless told not to."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.cpu_memory import USER_SETTINGS, keep_freed_memory, user_malloc_settings

from .conftest import preference_rows
from .test_precision import trainer

# A pass-like workload: tensors from 1 to 48 MiB (the dynamic mmap threshold stops at 32 MiB), each followed by a
# product (an activation and its successor), all freed; four passes to warm up, page faults counted over the next three.
WORKLOAD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from rlhf_ext.cpu_memory import keep_freed_memory

    status = keep_freed_memory() if sys.argv[1] == "on" else "off"
    sizes = [mib << 18 for mib in (1, 3, 8, 20, 48, 2, 5)]  # fp32 elements

    def work():
        xs = [torch.ones(n) for n in sizes]
        ys = [x * 2 for x in xs]
        del xs, ys

    for _ in range(4):
        work()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        work()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"status": status, "faults": faults, "pages": 3 * 2 * sum(sizes) * 4 // 4096}))
""")

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc's malloc only")


def _run(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",) and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_tensors_are_reused_without_page_faults():
    off, on = _run("off"), _run("on")
    assert on["status"] == "set"
    # glibc's defaults fault many of those pages in again on every pass (35 %, 56 % or 100 % of them in 17 runs on three
    # hosts: with transparent huge pages one fault maps 2 MiB, so the share depends on the kernel's setting); kept,
    # at most 9 % (0 in most runs: which block lands where varies from run to run)
    assert on["faults"] < 0.25 * on["pages"], on
    assert on["faults"] < 0.5 * off["faults"], (off, on)


@glibc
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_an_explicit_malloc_setting_wins(env):
    """A memory measurement (benchmarks/memory_plan_check.py) sets the threshold low so that RSS follows the live
    tensors; the library must not undo it."""
    res = _run("on", **env)
    assert res["status"] == "user"
    assert res["faults"] > 0.9 * res["pages"], res  # every block from a fresh mmap, as asked


def _off() -> str:
    """What a trainer with cpu_keep_freed_memory=False reports: 'off', or 'set earlier' where a trainer before it in
    this process (the [True] case, any earlier test) raised glibc's thresholds, which nothing can undo."""
    from rlhf_ext import cpu_memory

    return "set earlier" if cpu_memory._set_in_process else "off"


@pytest.fixture
def no_malloc_env(monkeypatch):
    """No malloc setting in the environment (the trainers' own setting decides)."""
    for name in (*USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


def test_user_settings_are_named(monkeypatch, no_malloc_env):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=512")  # not a malloc setting
    assert "GLIBC_TUNABLES" not in user_malloc_settings()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert user_malloc_settings() == ["MALLOC_TRIM_THRESHOLD_"]
    assert keep_freed_memory() == "user"


@glibc
@pytest.mark.parametrize("keep", [True, False])
def test_ppo_trainer_on_cpu_keeps_freed_memory_unless_told_not_to(tmp_path, tok, tiny_path, keep, no_malloc_env):
    tr = trainer(tmp_path, tok, tiny_path, max_steps=1, cpu_keep_freed_memory=keep)
    assert tr.cpu_memory == ("set" if keep else _off())


@glibc
@pytest.mark.parametrize("keep", [True, False])
def test_reward_trainer_on_cpu_keeps_freed_memory_unless_told_not_to(tmp_path, tok, tiny_path, keep, no_malloc_env):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=4, report_to="none",
                                save_strategy="no", use_cpu=True, disable_tqdm=True, cpu_keep_freed_memory=keep)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert tr.cpu_memory == ("set" if keep else _off())
