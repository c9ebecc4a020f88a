"""Several trainers in one process (a sweep, a notebook, an Optuna objective): a run computes what it computes in a
fresh process, whatever ran before it, and what the user set for the process (torch's default dtype, its thread
count, signal handlers, warnings filters) is honoured and left as it was."""

import json
import signal
import types
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, cpu_linear, cpu_memory, load_reward_model
from rlhf_ext.ppo import cpu_matmul

from .conftest import preference_rows
from .test_cpu_memory import glibc, no_malloc_env  # noqa: F401  (a fixture)
from .test_precision import trainer


@pytest.fixture
def threads():
    was = torch.get_num_threads()
    yield
    torch.set_num_threads(was)


def test_the_cpu_calibrations_follow_a_change_of_thread_count_within_a_process(tmp_path, monkeypatch, threads):
    """Kept per machine *and thread count* (`machine_key`), but each was a `functools.cache` without arguments: a
    process that ran at 1 thread and then at 2 kept the 1-thread answers, routing (or not) its frozen linears and
    decoding otherwise than the same run in a new process at 2 threads."""
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path))
    keys = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        keys[n] = cpu_linear.machine_key()
    (tmp_path / "cpu_matmul.json").write_text(json.dumps({
        keys[1] + " | onednn linear": False, keys[2] + " | onednn linear": True, keys[1]: [2, 9], keys[2]: [2, 33]}))
    cpu_linear.onednn_faster.cache_clear()
    cpu_matmul.rows_range.cache_clear()
    try:
        for n, faster, rows in ((1, False, range(2, 9)), (2, True, range(2, 33)), (1, False, range(2, 9))):
            torch.set_num_threads(n)
            assert (cpu_linear.onednn_faster(), cpu_matmul.rows_range()) == (faster, rows), n
    finally:
        cpu_linear.onednn_faster.cache_clear()
        cpu_matmul.rows_range.cache_clear()


def _reward_trainer(tmp_path, tok, tiny_path, **kw):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=8, report_to="none",
                                save_strategy="no", use_cpu=True, disable_tqdm=True, normalization_samples=32,
                                ensemble_size=2, **kw)
    return RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                 processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_a_user_default_dtype_of_bfloat16_leaves_the_trainers_fp32_parts_fp32(tmp_path, tok, tiny_path):
    """`torch.set_default_dtype(torch.bfloat16)` earlier in the process (transformers loads the fp32 checkpoint in
    fp32 regardless): PPOTrainer failed at start-up (its value head was made bf16, fed fp32 features), the reward
    trainer trained bf16 heads on the fp32 trunk, a saved reward model loaded with bf16 heads (every score
    rounded), and the running normalisation of a reward function rounded its mean and std to bf16."""
    rm = _reward_trainer(tmp_path, tok, tiny_path)
    rm.train()
    rm.save_model(str(tmp_path / "artifact"))
    prompts = [[{"role": "user", "content": "write a short review ."}]] * 2
    completions = [[{"role": "assistant", "content": c}] for c in ("the movie was good .", "it was bad .")]
    scores = load_reward_model(str(tmp_path / "artifact")).score_texts(prompts, completions)

    torch.set_default_dtype(torch.bfloat16)
    try:
        loaded = load_reward_model(str(tmp_path / "artifact"))
        assert {p.dtype for p in loaded.heads.parameters()} == {torch.float32}
        assert torch.equal(loaded.score_texts(prompts, completions), scores)
        assert {p.dtype for p in _reward_trainer(tmp_path / "b", tok, tiny_path).model.heads.parameters()} == {
            torch.float32}
        tr = trainer(tmp_path, tok, tiny_path, max_steps=1, callable_normalization="running")
        assert tr.policy.value_head.weight.dtype == torch.float32
        hist = tr.train()
        assert all(v == v for v in hist[0].values() if isinstance(v, float))  # trained, finite
        (member,) = tr.rewards.members
        assert member.mean.dtype == member.std.dtype == torch.float32
        assert torch.get_default_dtype() == torch.bfloat16  # the user's setting, untouched
    finally:
        torch.set_default_dtype(torch.float32)


@glibc
def test_a_trainer_told_not_to_keep_freed_memory_says_an_earlier_one_did(no_malloc_env):  # noqa: F811
    """glibc's thresholds are the process's and cannot be put back: a later trainer with cpu_keep_freed_memory=False
    (a sweep) runs with them raised, and says so instead of 'off'."""
    off = types.SimpleNamespace(cpu_keep_freed_memory=False, device=torch.device("cpu"))
    assert cpu_memory.keep_freed_memory() == "set"
    assert cpu_memory.keep_freed_memory_for(off) == "set earlier"


def test_a_run_leaves_the_processs_settings_as_the_user_had_them(tmp_path, tok, tiny_path, threads):
    """bf16 on CPU runs its passes with transformers' attention function replaced and grouped-query attention
    unrepeated (cpu_attention.py, grouped_kv.py), and training catches Ctrl-C: all of it for the run only. The
    user's handlers, warnings filters, default dtype, thread count and transformers' attention functions are as
    they were."""
    from transformers.integrations import sdpa_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def handler(signum, frame):
        pass

    torch.set_num_threads(1)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the user's own filter")
            before = (list(warnings.filters), signal.getsignal(signal.SIGTERM), sdpa_attention.use_gqa_in_sdpa,
                      dict(ALL_ATTENTION_FUNCTIONS._local_mapping), ALL_ATTENTION_FUNCTIONS["sdpa"],
                      torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
            trainer(tmp_path, tok, tiny_path, max_steps=1, bf16=True).train()
            after = (list(warnings.filters), signal.getsignal(signal.SIGTERM), sdpa_attention.use_gqa_in_sdpa,
                     dict(ALL_ATTENTION_FUNCTIONS._local_mapping), ALL_ATTENTION_FUNCTIONS["sdpa"],
                     torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        assert signal.getsignal(signal.SIGINT) is handler
        assert after == before
    finally:
        signal.signal(signal.SIGINT, previous)
