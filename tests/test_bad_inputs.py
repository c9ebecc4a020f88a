"""Bad input is loud, names what was wrong and how to fix it, and loses nothing."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model, models
from rlhf_ext.integrity import CorruptFileError

from .conftest import preference_rows
from .test_ppo import make

ROOT_DIR = Path(__file__).resolve().parents[1]


# -- models -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["./no/such/model", "/definitely/not/here", "no such model!"])
def test_model_path_that_does_not_exist(name):
    with pytest.raises(FileNotFoundError, match="No model at .*not an existing folder.*Hub id.*embedded default"):
        models.load_model(name)


def test_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model"):
        models.load_model(str(tmp_path))


def test_hub_id_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not a local folder or the embedded default.*Hub id failed"):
        models.load_model("someone/not-downloaded")


def test_a_dtype_that_is_not_one_names_the_choices(tiny_path):
    with pytest.raises(ValueError, match=r"dtype='bf16' is not a torch dtype: use 'bfloat16', 'float16', 'float32'"):
        models.load_model(tiny_path, dtype="bf16")


def test_torch_dtype_is_read_as_dtype_not_ignored(tiny_path):
    """transformers 4's `torch_dtype` (TRL scripts and YAMLs still carry it) was passed beside the default
    dtype=float32, which won: a bf16 load silently ran in fp32. It is read as dtype, with a FutureWarning."""
    with pytest.warns(FutureWarning, match="`torch_dtype` is transformers 4's name: read as dtype='bfloat16'"):
        model = models.load_model(tiny_path, torch_dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="Both dtype='float32' and torch_dtype='bfloat16' are set.*keep `dtype`"):
        models.load_model(tiny_path, dtype="float32", torch_dtype="bfloat16")


# -- reward functions --------------------------------------------------------------------------------------------
def _short(prompts, completions, completion_ids, **kw):
    return [1.0] * (len(completions) - 1)


def _scalar(prompts, completions, completion_ids, **kw):
    return 1.0


def _words(prompts, completions, completion_ids, **kw):
    return ["good"] * len(completions)


def _numeric_text(prompts, completions, completion_ids, **kw):
    return ["0.5"] * len(completions)  # a judge's raw answer: float() would read it, TRL's torch.tensor would not


def _objects(prompts, completions, completion_ids, **kw):
    return [{"score": 1.0}] * len(completions)


def _mapping(prompts, completions, completion_ids, **kw):
    return {i: 1.0 for i in range(len(completions))}  # read as a list, its keys 0, 1, 2, … were the rewards


@pytest.mark.parametrize("fn,match", [(_short, "'_short' returned 15 scores for 16 completions"),
                                      (_mapping, "'_mapping' returned a dict; it must return a list of 16 floats"),
                                      (_scalar, "'_scalar' returned float .*list of 16 floats"),
                                      (_words, "'_words' returned text among its scores \\('good'\\).*float\\(\\)"),
                                      (_numeric_text, "'_numeric_text' returned text among its scores \\('0.5'\\)"),
                                      (_objects, "'_objects' returned a non-number")])
def test_reward_function_returning_the_wrong_thing(tmp_path, tok, fn, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(tmp_path, tok, reward=fn, max_steps=1).train()


def test_a_numpy_column_of_scores_reads_as_a_tensor_column_and_a_huge_int_is_named():
    """A model's predict() gives a [B, 1] array: a [B, 1] tensor was read, the same array refused as "a non-number
    (only 0-dimensional arrays …)"; an int past float's range raised a bare OverflowError naming no function."""
    import numpy as np

    from rlhf_ext.reward.pipeline import CallableMember

    col = CallableMember(lambda completions, **kw: np.arange(len(completions), dtype=np.float32)[:, None], name="col")
    assert col(None, ["a", "b", "c"], [[1]] * 3).flatten().tolist() == [0.0, 1.0, 2.0]
    huge = CallableMember(lambda completions, **kw: [10 ** 400] * len(completions), name="huge")
    with pytest.raises(TypeError, match="'huge' returned a non-number among its scores"):
        huge(None, ["a"], [[1]])


def test_nonfinite_rewards_warn_once_with_counts_and_stop_when_nothing_is_left(tmp_path, tok):
    def some_none(prompts, completions, completion_ids, **kw):
        return [None if i % 4 == 0 else 1.0 for i in range(len(completions))]

    with pytest.warns(UserWarning, match="non-finite rewards for 4 of 16 samples.*shown once") as rec:
        hist = make(tmp_path, tok, reward=some_none, max_steps=2).train()
    assert sum("non-finite rewards" in str(w.message) for w in rec) == 1
    assert all(h["rewards/dropped_nonfinite"] == 4 and math.isfinite(h["loss/policy"]) for h in hist)

    def all_nan(prompts, completions, completion_ids, **kw):
        return [math.nan] * len(completions)

    with pytest.raises(ValueError, match="Every sample of the batch .* non-finite"):
        make(tmp_path / "all_nan", tok, reward=all_nan, max_steps=1).train()


def test_a_small_batch_dropped_whole_trains_on_nothing_and_only_a_run_of_drops_stops(tmp_path, tok):
    """One prompt per iteration (or a few) and a judge that sometimes returns None: sooner or later a whole batch is
    None. That used to stop the run ("Every sample of the batch (1) got a non-finite reward … it returns NaN/inf/None
    for everything"); TRL's GRPO leaves such a completion out and goes on. The batch now trains on nothing (no KL
    controller update either) and the run stops only after 16 samples in a row are dropped."""
    from .test_ppo import prompts

    calls = {"n": 0}

    def sometimes_none(completions, **kw):
        calls["n"] += 1
        return [None if calls["n"] in (2, 3) else 1.0 + calls["n"] for _ in completions]

    tr = make(tmp_path, tok, reward=sometimes_none, max_steps=4, per_device_train_batch_size=1, data=prompts(4),
              kl_controller="lagrangian", kl_target=0.1)
    seen = []
    step = tr._iteration

    def iteration():  # the trainable parameters as each iteration starts (and after the last)
        seen.append({n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad})
        return step()

    tr._iteration = iteration
    with pytest.warns(UserWarning, match=r"Every sample of this batch \(1\) was dropped .* trains on nothing"):
        hist = tr.train()
    seen.append({n: p.detach().clone() for n, p in tr.policy.named_parameters() if p.requires_grad})
    moved = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(seen, seen[1:])]
    assert moved == [True, False, False, True]  # no optimizer step: Adam's momentum alone moved them before
    assert [h["rewards/dropped_nonfinite"] for h in hist] == [0, 1, 1, 0]
    assert math.isnan(hist[1]["grad_norm"]) and math.isnan(hist[1]["loss/policy"]) and math.isnan(hist[1]["objective/kl"])
    losses = [h["loss/policy"] + tr.args.vf_coef * h["loss/value"] for h in (hist[0], hist[3])]
    assert hist.training_loss == pytest.approx(sum(losses) / 2)  # Trainer's logging_nan_inf_filter: not NaN
    assert hist[0]["objective/beta"] != hist[1]["objective/beta"]  # the controller moves β after a batch it sees
    assert hist[1]["objective/beta"] == hist[2]["objective/beta"] == hist[3]["objective/beta"]  # not fed a KL of 0

    def all_nan(prompts, completions, completion_ids, **kw):
        return [math.nan] * len(completions)

    tr = make(tmp_path / "nan", tok, reward=all_nan, max_steps=40, per_device_train_batch_size=4, data=prompts(8))
    with pytest.raises(ValueError, match=r"Every sample of the batch \(4\) and the 12 before it got a non-finite"):
        tr.train()
    assert tr.iteration == 3


# -- data and sizes --------------------------------------------------------------------------------------------
def test_identical_chosen_and_rejected_pairs_are_dropped_and_counted(tmp_path, tiny_path, tok):
    rows = preference_rows(16, 0)
    for r in rows[:3]:
        r["rejected"] = r["chosen"]
    args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, report_to="none", save_strategy="no",
                                use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4)
    with pytest.warns(UserWarning, match="dropped 3 pair\\(s\\) whose chosen and rejected responses are identical"):
        tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(tr.train_dataset) == 13
    same = [dict(r, rejected=r["chosen"]) for r in rows]
    with pytest.raises(ValueError, match="no preference to learn"):
        RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(same), processing_class=tok)


def test_prompt_plus_completion_past_the_model_positions(tmp_path, tok):
    from rlhf_ext.testing import tiny_causal_lm

    model = tiny_causal_lm(tok, max_position_embeddings=24)
    with pytest.warns(UserWarning, match="exceeds the model's 24 positions: max_completion_length clipped"):
        tr = make(tmp_path, tok, model=model, max_completion_length=32, max_steps=1)
    longest = max(len(ids) for _, ids in tr.prompts)
    assert tr.args.max_completion_length == 24 - longest
    tr.train()
    # the clip is written into the PPOConfig the user holds (trainer.args is args, as in transformers): a config
    # reused for a model with room to spare (a notebook, a sweep) sampled the clipped length silently; it says so
    from .test_ppo import LORA, good_counter, prompts

    args = PPOConfig(str(tmp_path / "reused"), max_completion_length=32, max_steps=1, use_cpu=True, disable_tqdm=True)
    with pytest.warns(UserWarning, match="clipped to .* \\(in this PPOConfig\\)"):
        clipped = PPOTrainer(tiny_causal_lm(tok, max_position_embeddings=24), reward_funcs=good_counter(tok),
                             args=args, train_dataset=prompts(), processing_class=tok, peft_config=LoraConfig(**LORA))
    assert clipped.args is args and args.max_completion_length == 24 - longest
    with pytest.warns(UserWarning, match=f"max_completion_length={24 - longest} is an earlier PPOTrainer's clip of 32 "
                                         f"to its model's positions; this model has room for 32"):
        PPOTrainer(tiny_causal_lm(tok), reward_funcs=good_counter(tok), args=args, train_dataset=prompts(),
                   processing_class=tok, peft_config=LoraConfig(**LORA))
    long = Dataset.from_dict({"prompt": ["the " * 30] * 20})
    with pytest.raises(ValueError, match="only 24 positions.*max_prompt_length"):
        make(tmp_path, tok, model=tiny_causal_lm(tok, max_position_embeddings=24), data=long, max_prompt_length=64,
             per_device_train_batch_size=4)



def test_first_prompts_that_leave_fewer_than_eight_positions_start_up(tmp_path, tok):
    """The start-up check sampled a fixed 8 tokens after the first two prompts: a prompt of 60 tokens with
    max_completion_length=4 fits GPT-2's 64 positions, yet PPOTrainer() died in that check with an IndexError."""
    from rlhf_ext.testing import tiny_model_for

    data = Dataset.from_dict({"prompt": [" ".join(["the", "movie", "was"] * 20)] * 8})
    tr = make(tmp_path, tok, model=tiny_model_for("gpt2", tok, n_positions=64), data=data, max_steps=1,
              max_completion_length=4, per_device_train_batch_size=4, stop_on_eos=False, monitor=False)
    assert {len(ids) for _, ids in tr.prompts} == {60} and tr.args.max_completion_length == 4
    assert tr.train()[0]["response/length_mean"] == 4


def _gpt2_pairs(n_words):
    return [{"prompt": [{"role": "user", "content": "write a review of the movie ."}],
             "chosen": [{"role": "assistant", "content": " ".join(["great", "fun"] * n_words)}],
             "rejected": [{"role": "assistant", "content": "bad ."}]} for _ in range(8)]


@pytest.mark.parametrize("max_length", [None, 1024])
def test_reward_pairs_past_the_model_positions_are_refused_with_the_fix(tmp_path, tok, max_length):
    """max_length=None (or TRL's default 1024) on a model with fewer positions let the pairs through to the first
    training step, where GPT-2's position table was indexed past its end (IndexError; a device assert on CUDA)."""
    from rlhf_ext.testing import save_tiny_model_for

    path = save_tiny_model_for(tmp_path / "gpt2", "gpt2", tok, n_positions=64)
    data = Dataset.from_list(_gpt2_pairs(4) + _gpt2_pairs(40))
    with pytest.raises(ValueError, match=f"8 of the 16 pairs of train_dataset are longer than the model's 64 positions "
                                         f".*max_length={max_length} keeps them.*Set max_length=64"):
        RewardEnsembleTrainer(path, args=_rm_args(tmp_path, max_length=max_length), train_dataset=data,
                              processing_class=tok)
    tr = RewardEnsembleTrainer(path, args=_rm_args(tmp_path, max_length=64), train_dataset=data, processing_class=tok)
    assert len(tr.train_dataset) == 8
    tr.train()


def test_reward_pairs_that_max_length_drops_are_not_refused_for_the_positions(tmp_path, tok):
    """max_length=80 on 64 positions drops every pair the model cannot read (93 tokens): the positions check refused
    them anyway, saying max_length kept them."""
    from rlhf_ext.testing import save_tiny_model_for

    path = save_tiny_model_for(tmp_path / "gpt2", "gpt2", tok, n_positions=64)
    data = Dataset.from_list(_gpt2_pairs(4) + _gpt2_pairs(40))
    tr = RewardEnsembleTrainer(path, args=_rm_args(tmp_path, max_length=80), train_dataset=data, processing_class=tok)
    assert len(tr.train_dataset) == 8
    tr.train()


def test_streamed_reward_pairs_past_the_positions_after_the_first_rows_are_refused_with_the_fix(tmp_path, tok):
    """A stream is checked on its first 64 pairs at start-up; a longer pair after them reached the model, an
    IndexError from GPT-2's position table in the middle of training. It is refused where it is read, with the fix."""
    from rlhf_ext.testing import save_tiny_model_for

    path = save_tiny_model_for(tmp_path / "gpt2", "gpt2", tok, n_positions=64)
    stream = Dataset.from_list(_gpt2_pairs(4) * 8 + _gpt2_pairs(40)).to_iterable_dataset()
    tr = RewardEnsembleTrainer(path, args=_rm_args(tmp_path, max_length=None, max_steps=10), train_dataset=stream,
                               processing_class=tok)
    with pytest.raises(ValueError, match=r"A pair of train_dataset read after the first 64 .* is 93 tokens long.*"
                                         r"longer than the model's 64 positions, and max_length=None keeps it.*"
                                         r"Set max_length=64"):
        tr.train()


def test_reward_model_trained_without_max_length_scores_within_its_positions(tmp_path, tok):
    """A reward model trained with max_length=None on short pairs scored a longer text (PPO's prompt + response, a
    truncated prompt's whole text) past its base's position table: an IndexError in the middle of a PPO run."""
    from rlhf_ext.reward.artifact import load_reward_model
    from rlhf_ext.testing import save_tiny_model_for

    path = save_tiny_model_for(tmp_path / "gpt2", "gpt2", tok, n_positions=64)
    tr = RewardEnsembleTrainer(path, args=_rm_args(tmp_path, max_length=None), train_dataset=Dataset.from_list(
        _gpt2_pairs(2)), processing_class=tok)
    tr.train()
    tr.save_model()
    rm = load_reward_model(str(tmp_path / "rm"))
    prompt = [{"role": "user", "content": "write a short review of the movie . " * 10}]
    with pytest.warns(UserWarning, match="longer than the reward model's 64 positions .*max_length=None.*last 64"):
        r = rm.score_completions([prompt], [[{"role": "assistant", "content": "good ."}]])
    assert torch.isfinite(r).all()

# -- checkpoints ------------------------------------------------------------------------------------------------
def _two_checkpoints(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=2, save_strategy="steps", save_steps=1, kl_controller="hard", kl_target=1.0)
    tr.train()
    return tmp_path / "ppo"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    data[-5:] = bytes(255 - b for b in data[-5:])  # the header stays intact, the weights change
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["ppo_state.json", "adapters/policy/adapter_model.safetensors", "rng.safetensors",
                                  "value_head.safetensors", "optimizer.pt"])
@pytest.mark.parametrize("damage", [_truncate, _flip_bytes])
def test_damaged_checkpoint_file_is_named_and_resume_falls_back(tmp_path, tok, name, damage):
    out = _two_checkpoints(tmp_path, tok)
    damage(out / "checkpoint-2" / name)
    tr = make(tmp_path, tok, max_steps=3, kl_controller="hard", kl_target=1.0)
    with pytest.raises(CorruptFileError, match=f"checkpoint-2/{name}.*(truncated|differs from its checksum)"):
        tr.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    tr = make(tmp_path, tok, max_steps=3, kl_controller="hard", kl_target=1.0)
    with pytest.warns(UserWarning, match="Skipping damaged checkpoint .*checkpoint-2"):
        hist = tr.train(resume_from_checkpoint=True)
    assert len(hist) == 3 and tr.iteration == 3  # resumed from checkpoint-1: iterations 2 and 3 ran again


def test_killed_save_leaves_the_previous_checkpoint_usable(tmp_path, tok, monkeypatch):
    out = _two_checkpoints(tmp_path, tok)
    tr = make(tmp_path, tok, max_steps=3, kl_controller="hard", kl_target=1.0)
    tr.train(resume_from_checkpoint=True)
    import rlhf_ext.ppo.trainer as T

    def die(*a, **k):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(T.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint()
    assert not (out / "checkpoint-3").exists() and not (out / "checkpoint-3.tmp").exists()
    from rlhf_ext.ppo.checkpoint import newest_complete_checkpoint

    assert newest_complete_checkpoint(out).endswith("checkpoint-2")


# -- reward artifacts -------------------------------------------------------------------------------------------
@pytest.fixture
def artifact(tmp_path, tiny_path, tok):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=2, report_to="none", save_strategy="no",
                                use_cpu=True, disable_tqdm=True, per_device_train_batch_size=8,
                                normalization_samples=8)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    tr.train()
    tr.save_model(str(tmp_path / "rm"))
    return tmp_path / "rm"


def test_artifact_without_tokenizer(artifact):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (artifact / f).unlink()
    (artifact / "manifest.json").unlink()
    with pytest.raises(CorruptFileError, match="tokenizer.json: missing .*Rebuild the artifact.*or pass tokenizer="):
        load_reward_model(artifact)


def test_artifact_with_broken_json(artifact):
    (artifact / "rlhf_ext_reward.json").write_text("{ not json")
    with pytest.raises(CorruptFileError, match="rlhf_ext_reward.json: not valid JSON.*Rebuild the artifact"):
        load_reward_model(artifact)


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes])
def test_artifact_with_damaged_weights(artifact, damage):
    damage(artifact / "adapters" / "reward.safetensors")
    with pytest.raises(CorruptFileError, match="adapters/reward.safetensors: .*Rebuild the artifact"):
        load_reward_model(artifact)
    (artifact / "manifest.json").unlink()  # without a manifest, a truncated file is still named
    if damage is _truncate:
        with pytest.raises(CorruptFileError, match="adapters/reward.safetensors: not a readable safetensors"):
            load_reward_model(artifact)


def test_artifact_loads_from_another_directory(artifact, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "rm"
    shutil.copytree(artifact, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = json.loads((moved / "rlhf_ext_reward.json").read_text())
    assert spec["base_model"].startswith("/") and spec["base_fingerprint"]
    rm = load_reward_model("rm")
    assert rm.score_texts(["a"], ["good movie"]).shape == (1, 1)
    assert torch.isfinite(rm.score_texts(["a"], ["good movie"], normalize=True)).all()


# -- PPOConfig: numbers that used to train silently wrong or crash deep inside ------------------------------------------
@pytest.mark.parametrize("kw, says", [
    ({"max_completion_length": 0}, "max_completion_length must be ≥ 1"),
    ({"max_completion_length": -5}, "max_completion_length must be ≥ 1"),
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"num_mini_batches": 0}, "num_mini_batches must be ≥ 1"),
    ({"num_ppo_epochs": 0}, "num_ppo_epochs must be ≥ 1"),
    ({"clip_range": -0.2}, "clip_range .* must be > 0"),
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"lam": -0.1}, r"lam must be in \[0, 1\]"),
    ({"vf_coef": -1.0}, "vf_coef must be a finite number ≥ 0"),
    ({"gradient_accumulation_steps": 4}, "does not accumulate.*num_mini_batches"),
    ({"bf16": False, "fp16": False, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"kl_target": float("inf")}, "kl_target .* must be a finite number > 0"),  # passed, then failed in the guard
], ids=lambda v: ",".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_ppo_config_refuses_numbers_that_cannot_train(tmp_path, kw, says):
    from rlhf_ext import PPOConfig

    with pytest.raises(ValueError, match=says):
        PPOConfig(str(tmp_path), use_cpu=True, **kw)


@pytest.mark.parametrize("prompt", [0, 3.5, {"text": "hi"}])
def test_prompt_that_is_not_text_says_so(tmp_path, tok, prompt):
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    data = Dataset.from_dict({"prompt": [prompt] * 8}) if not isinstance(prompt, dict) else Dataset.from_list(
        [{"prompt": prompt}] * 8)
    with pytest.raises(ValueError, match="Prompt 0 is a .*not text"):
        PPOTrainer(tiny_causal_lm(tok), reward_funcs=lambda completions, **k: [0.0] * len(completions),
                   args=PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=8), train_dataset=data,
                   processing_class=tok)


@pytest.mark.parametrize("overflow", ["error", "drop"])
def test_fewer_prompts_than_a_batch_says_what_to_change(tmp_path, tok, overflow):
    """The message said only "Only 4 usable prompts for a batch of 8"; it now says what to change, and how many of
    them max_prompt_length dropped."""
    from rlhf_ext import PPOConfig, PPOTrainer
    from rlhf_ext.testing import tiny_causal_lm

    prompts = ["hello there"] * 4 + (["the movie was " * 20] * 3 if overflow == "drop" else [])
    with pytest.raises(ValueError) as err:
        PPOTrainer(tiny_causal_lm(tok), reward_funcs=lambda completions, **k: [0.0] * len(completions),
                   args=PPOConfig(str(tmp_path), use_cpu=True, per_device_train_batch_size=8, max_prompt_length=32,
                                  prompt_overflow=overflow),
                   train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    message = str(err.value)
    assert "Only 4 usable prompts" in message and "lower per_device_train_batch_size" in message
    assert ("(3 dropped as longer than max_prompt_length)" in message
            and "raise max_prompt_length" in message) == (overflow == "drop")


def test_under_ddp_the_prompts_must_fill_one_global_batch(tok):
    """Each process draws its per_device_train_batch_size slice of one global batch: with 6 prompts, a batch of 4 and
    2 processes (accelerate launch, 2 CPU processes), rank 1 trained on 2 prompts per iteration while `episode` said
    8, and with 4 prompts it got none and failed in numpy at the first rollout. Refused when the trainer is built."""
    from types import SimpleNamespace

    from rlhf_ext.data import tokenize_prompts

    args = SimpleNamespace(per_device_train_batch_size=4, world_size=2, max_prompt_length=64, prompt_overflow="error",
                           chat_template_kwargs=None, disable_tqdm=True, process_index=0)
    data = Dataset.from_dict({"prompt": ["hello there"] * 6})
    with pytest.raises(ValueError, match=r"Only 6 usable prompts for a global batch of 8 \(per_device_train_batch_size"
                                         r"=4 × 2 processes\): add prompts .* or run fewer processes"):
        tokenize_prompts(data, tok, args)
    assert len(tokenize_prompts(Dataset.from_dict({"prompt": ["hello there"] * 8}), tok, args)) == 8
    assert len(tokenize_prompts(data, tok, args, min_rows=1)) == 6  # evaluation sets: one prompt is enough


@pytest.mark.parametrize("name", ["someone/not-downloaded", "data/no-such-folder"])
def test_a_dataset_that_is_neither_here_nor_reachable_says_what_to_pass(tmp_path, monkeypatch, name):
    """datasets' own error named only the Hub; the message now says where a relative path was looked for and the
    three ways out (the name, a download while online, a local folder in the recipes' layout)."""
    from rlhf_ext.data import load_split

    monkeypatch.chdir(tmp_path)
    with pytest.raises((ConnectionError, FileNotFoundError)) as err:  # offline (the suite's setting): unreachable
        load_split(name, "train", "preferences")
    message = str(err.value)
    assert f"Could not load the dataset '{name}'" in message and str(tmp_path) in message
    assert "preferences_train.jsonl" in message and "shipped:sentiment" in message


def test_uwo_with_one_member_is_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="aggregation='uwo' combines several reward members, but there is only 1"):
        make(tmp_path, tok, max_steps=1, aggregation="uwo")


def test_output_dir_that_is_a_file_or_read_only(tmp_path, tok):
    (tmp_path / "ppo").write_text("x")  # make() writes to tmp_path / "ppo"
    with pytest.raises(ValueError, match="is a file; it must be a folder"):
        make(tmp_path, tok, max_steps=1)
    assert (tmp_path / "ppo").read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not __import__("os").access(ro, __import__("os").W_OK):  # root ignores permissions
            with pytest.raises(ValueError, match="is not writable.*nothing has been trained yet"):
                make(ro / "sub", tok, max_steps=1)
    finally:
        ro.chmod(0o700)


def test_save_model_onto_a_file_names_it(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1)
    target = tmp_path / "policy.bin"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        tr.save_model(str(target))
    assert target.read_text() == "keep me"  # nothing lost


def test_reward_artifact_without_manifest_warns(artifact, tmp_path):
    copy = tmp_path / "no_manifest"
    shutil.copytree(artifact, copy)
    (copy / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="no manifest.json.*could not be checked"):
        load_reward_model(str(copy))


def test_hub_id_offline_tokenizer_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="(?s)tokenizer of .someone/not-downloaded.*Hub id failed.*local folder"):
        models.load_tokenizer("someone/not-downloaded")


# -- RewardEnsembleTrainer: bad input refused at start-up, naming what and how to fix it ---------------------------
def _rm_args(tmp_path, **kw):
    return RewardEnsembleConfig(str(tmp_path / "rm"), **{"max_steps": 1, "report_to": "none", "save_strategy": "no",
                                                          "use_cpu": True, "disable_tqdm": True, "normalization_samples": 8,
                                                          "per_device_train_batch_size": 8, **kw})


@pytest.mark.parametrize("col", ["chosen", "rejected", "prompt"])
@pytest.mark.parametrize("conversational", [True, False])
def test_reward_preference_value_that_is_not_text_says_so(tmp_path, tiny_path, tok, col, conversational):
    rows = preference_rows(8, 0, conversational)
    for r in rows:
        r[col] = 3
    with pytest.raises(ValueError, match=f"train_dataset row 0: '{col}' is a int \\(3\\), not text"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)


def _pair_tokens(tok, rows):
    return [max(len(tok.apply_chat_template(r["prompt"] + r[c])["input_ids"]) for c in ("chosen", "rejected"))
            for r in rows]


def test_reward_max_length_below_every_pair(tmp_path, tiny_path, tok):
    rows = preference_rows(16, 0)
    shortest = min(_pair_tokens(tok, rows))
    with pytest.raises(ValueError, match=f"max_length=8 drops all 16 pairs of train_dataset: the shortest pair is "
                                         f"{shortest} tokens.*at least {shortest}"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path, max_length=8), train_dataset=Dataset.from_list(rows),
                              processing_class=tok)
    long = [dict(r, chosen=[{"role": "assistant", "content": "good " * 40}]) for r in preference_rows(8, 5)]
    with pytest.raises(ValueError, match="drops all 8 pairs of eval_dataset"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path, max_length=max(_pair_tokens(tok, rows))),
                              train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(long),
                              processing_class=tok)


def test_reward_max_length_that_drops_most_pairs_warns_with_counts(tmp_path, tiny_path, tok):
    rows = preference_rows(32, 0)
    lengths = sorted(_pair_tokens(tok, rows))
    limit = lengths[5]
    kept = sum(n <= limit for n in lengths)
    with pytest.warns(UserWarning, match=f"max_length={limit} drops {32 - kept} of the 32 pairs of train_dataset .*"
                                         f"the longest is {lengths[-1]}\\); {kept} remain"):
        tr = RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path, max_length=limit),
                                   train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(tr.train_dataset) == kept < 16


def test_reward_output_dir_that_is_a_file_or_read_only(tmp_path, tiny_path, tok):
    import os

    data = Dataset.from_list(preference_rows(8, 0))
    (tmp_path / "rm").write_text("x")
    with pytest.raises(ValueError, match="output_dir=.*rm' is a file; it must be a folder"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=data, processing_class=tok)
    assert (tmp_path / "rm").read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            with pytest.raises(ValueError, match="is not writable.*nothing has been trained yet"):
                RewardEnsembleTrainer(tiny_path, args=_rm_args(ro / "sub"), train_dataset=data, processing_class=tok)
    finally:
        ro.chmod(0o700)


def test_reward_one_member_adapters_mode_warns(tmp_path):
    with pytest.warns(UserWarning, match="ensemble_mode='adapters' with ensemble_size=1 .*exactly as ensemble_mode='heads'"):
        RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_mode="adapters", ensemble_size=1, use_cpu=True)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_plan_refuses_gpu_memory_that_is_not_positive(value, capsys):
    from rlhf_ext.plan.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "gpt2", "--gpu-memory", value])
    assert e.value.code == 2 and "--gpu-memory must be > 0" in capsys.readouterr().err


def test_reward_config_refuses_nan_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        RewardEnsembleConfig(str(tmp_path), learning_rate=float("nan"))


def test_a_dataset_dict_or_plain_rows_name_the_fix(tmp_path, tok, tiny_path):
    """`load_dataset(name)` without `split=` gives every split: PPO said only that there was no 'prompt' column (the
    splits' names read as columns), the reward trainer that it was not a Dataset. Both now name the fix."""
    from datasets import DatasetDict

    from rlhf_ext import PPOConfig, PPOTrainer

    prompts = DatasetDict({"test": Dataset.from_dict({"prompt": ["a b"] * 4}),
                           "train": Dataset.from_dict({"prompt": ["b c"] * 4})})
    with pytest.raises(TypeError, match=r"`train_dataset` is a DatasetDict of splits \['test', 'train'\]: pass one "
                                        r"split, e.g. `train_dataset=dataset\['train'\]`"):
        PPOTrainer("no/such-model", reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                   train_dataset=prompts, args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True))
    pairs = DatasetDict({"train": Dataset.from_list(preference_rows(8, 0))})
    with pytest.raises(TypeError, match=r"`train_dataset` is a DatasetDict of splits \['train'\]: pass one split"):
        RewardEnsembleTrainer(tiny_path, train_dataset=pairs, processing_class=tok,
                              args=RewardEnsembleConfig(str(tmp_path / "rm"), use_cpu=True, report_to="none"))
    # plain rows: PPO raised AttributeError ('list' object has no attribute 'column_names')
    with pytest.raises(TypeError, match=r"`train_dataset` must be a `datasets.Dataset` or `IterableDataset`, got "
                                        r"`list`. Make one with `Dataset.from_list\(rows\)`"):
        PPOTrainer("no/such-model", reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                   train_dataset=[{"prompt": "a b"}] * 4, args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True))
    with pytest.raises(TypeError, match=r"`eval_dataset\['b'\]` must be a `datasets.Dataset`"):
        make(tmp_path, tok, eval_dataset={"a": prompts["test"], "b": ["a b"]})


def _generated(rows):
    from datasets import IterableDataset

    def gen():
        yield from rows

    return IterableDataset.from_generator(gen)  # no declared features: the columns are the first row's


def test_an_empty_or_all_tie_stream_says_so(tmp_path, tok, tiny_path):
    """A generator's stream that yields nothing (or, for pairs, nothing but ties, which are dropped) ended in a bare
    StopIteration from TRL's column lookup or the trainer's first-row peek (trl.RewardTrainer: the same bare
    StopIteration); PPO said the stream had no 'prompt' column ("it has []")."""
    with pytest.raises(ValueError, match=r"^train_dataset is empty \(the stream yields no rows\)"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=_generated([]), processing_class=tok)
    with pytest.raises(ValueError, match=r"^eval_dataset\['a'\] is empty"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=Dataset.from_list(preference_rows(8, 0)),
                              eval_dataset={"a": _generated([])}, processing_class=tok)
    ties = [{**r, "rejected": r["chosen"]} for r in preference_rows(8, 0)]
    with pytest.warns(UserWarning, match="dropping pairs"), \
            pytest.raises(ValueError, match="Every pair of train_dataset has chosen == rejected"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=_generated(ties), processing_class=tok)
    with pytest.raises(ValueError, match=r"train_dataset is empty \(the stream yields no rows\)"):
        make(tmp_path, tok, data=_generated([]), max_steps=1)
    with pytest.raises(ValueError, match=r"The evaluation set is empty"):
        make(tmp_path, tok, max_steps=1, eval_dataset=_generated([]))


def test_an_older_trl_tokenised_format_names_the_rename(tmp_path, tok, tiny_path):
    """input_ids_chosen / input_ids_rejected (an older TRL RewardTrainer's columns; trl 1.16: KeyError 'chosen')."""
    old = Dataset.from_list([{"input_ids_chosen": [1, 2], "attention_mask_chosen": [1, 1], "input_ids_rejected": [1, 3],
                              "attention_mask_rejected": [1, 1]}] * 8)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen', 'rejected'\].*older TRL version's "
                                         r"tokenised format: rename them"):
        RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=old, processing_class=tok)
    renamed = old.rename_columns({"input_ids_chosen": "chosen_ids", "input_ids_rejected": "rejected_ids"})
    RewardEnsembleTrainer(tiny_path, args=_rm_args(tmp_path), train_dataset=renamed, processing_class=tok).train()


def test_a_column_named_like_a_reward_argument_is_refused(tmp_path, tok):
    """Reward functions receive every other dataset column as a keyword: a column called `prompts` (or
    `trainer_state`, …) would collide with the call's own argument deep in the first rollout."""
    data = Dataset.from_dict({"prompt": ["a b c"] * 4, "prompts": ["x"] * 4})
    with pytest.raises(ValueError, match=r"column\(s\) \['prompts'\] would take the place of the reward functions' "
                                         r"own argument.*Rename"):
        make(tmp_path, tok, data=data, max_steps=1)


def test_resuming_from_nothing_says_what_to_do(tmp_path, tok):
    tr = make(tmp_path, tok, max_steps=1)
    with pytest.raises(ValueError, match=r"No complete checkpoint found in .* Train without resume_from_checkpoint"):
        tr.train(resume_from_checkpoint=True)
    with pytest.raises(FileNotFoundError, match=r"resume_from_checkpoint='.*no-such': no such folder"):
        tr.train(resume_from_checkpoint=str(tmp_path / "no-such"))


def test_a_new_run_in_an_earlier_runs_output_dir_is_refused_unless_overwritten(tmp_path, tok):
    """A second run into a used output_dir appended to the first one's monitor log and left its checkpoints, which
    a later `resume_from_checkpoint=True` then continued: refused, naming the three ways out; overwrite_output_dir
    replaces the earlier run (its checkpoints and monitor log); resuming is unchanged."""
    out = _two_checkpoints(tmp_path, tok)
    assert (out / "monitor" / "metrics.jsonl").is_file()
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-1, checkpoint-2, monitor/metrics.jsonl\)"
                                         r".*resume_from_checkpoint=True.*another output_dir.*overwrite_output_dir"):
        make(tmp_path, tok, max_steps=1, kl_controller="hard", kl_target=1.0).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # nothing touched
    resumed = make(tmp_path, tok, max_steps=3, kl_controller="hard", kl_target=1.0)
    assert len(resumed.train(resume_from_checkpoint=True)) == 3
    fresh = make(tmp_path, tok, max_steps=1, kl_controller="hard", kl_target=1.0, overwrite_output_dir=True,
                 save_strategy="steps", save_steps=1)
    fresh.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    logged = [json.loads(line)["iteration"] for line in (out / "monitor" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1]  # the new run's only, not appended to the earlier one's


def test_ppo_output_dir_that_holds_the_reward_model_is_refused(tmp_path, tok, artifact):
    """PPO with output_dir = the reward model's folder wrote the policy's files and manifest over it (after which a
    damaged reward model loaded silently)."""
    before = {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="holds a reward model .*Give PPO its own output_dir"):
        PPOTrainer(str(tmp_path / "no-model-needed"), reward_funcs=[str(artifact)],
                   args=PPOConfig(str(artifact), use_cpu=True), train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}))
    assert {p.name: p.read_bytes() for p in artifact.iterdir() if p.is_file()} == before


def test_a_causal_lm_given_as_the_reward_model_is_refused(tmp_path, tok, tiny_path):
    """A causal LM folder in reward_funcs loaded as a sequence classifier with a random score head, and PPO trained
    against it (only transformers' load report said `score.weight MISSING`)."""
    with pytest.raises(ValueError, match=r"saved as a LlamaForCausalLM, not a reward model.*score head would be "
                                         r"random.*rlhf-ext reward"):
        make(tmp_path, tok, reward=[tiny_path], max_steps=1)


def test_reward_normalization_samples_that_cannot_normalise(tmp_path):
    """0 trained the whole run, then failed with a message about max_length and saved nothing; 1 gave a std from two
    scores (normalised rewards of −24)."""
    with pytest.raises(ValueError, match="normalization_samples must be an integer ≥ 1, got 0"):
        RewardEnsembleConfig(str(tmp_path), use_cpu=True, normalization_samples=0)
    with pytest.warns(UserWarning, match="normalization_samples=1: .* from 2 scores"):
        RewardEnsembleConfig(str(tmp_path), use_cpu=True, normalization_samples=1)


def test_reward_resume_skips_a_damaged_checkpoint_and_names_a_missing_folder(tmp_path, tiny_path, tok):
    """`resume_from_checkpoint=True` took the newest checkpoint even when damaged (CorruptFileError; PPO skips it);
    a folder that is not there was called "not an rlhf_ext reward-model artifact"."""
    def trainer(steps):
        args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=steps, report_to="none", save_strategy="steps",
                                    save_steps=1, use_cpu=True, disable_tqdm=True, per_device_train_batch_size=8,
                                    normalization_samples=8, logging_steps=1)
        return RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                                     processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj"]))

    trainer(2).train()
    _truncate(tmp_path / "rm" / "checkpoint-2" / "heads.safetensors")
    tr = trainer(3)
    loaded, load = [], tr._load_from_checkpoint
    tr._load_from_checkpoint = lambda path, *a, **k: (loaded.append(Path(path).name), load(path, *a, **k))[1]
    with pytest.warns(UserWarning, match="Skipping damaged checkpoint .*checkpoint-2"):
        tr.train(resume_from_checkpoint=True)
    assert loaded == ["checkpoint-1"] and tr.state.global_step == 3
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint='.*checkpoint-9': no such folder"):
        trainer(3).train(resume_from_checkpoint=str(tmp_path / "rm" / "checkpoint-9"))


def test_chat_messages_with_a_tokenizer_without_a_chat_template_name_the_fix(tmp_path, tok, tiny_path):
    """A base model's tokenizer has no chat template: both trainers said only transformers' "Cannot use chat template
    functions…" from deep in tokenisation; now the row, and what to set."""
    import copy

    from rlhf_ext import PPOConfig, PPOTrainer

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"Prompt 0 is a list of chat messages but the tokenizer has no chat template.*"
                                         r"Set tokenizer.chat_template"):
        PPOTrainer(tiny_path, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], processing_class=bare,
                   train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]] * 4}),
                   args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True, per_device_train_batch_size=2))
    with pytest.raises(ValueError, match=r"conversational .* but the tokenizer has no chat template.*chat_template_path"):
        RewardEnsembleTrainer(tiny_path, processing_class=bare, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                              args=RewardEnsembleConfig(str(tmp_path / "rm"), use_cpu=True, report_to="none"))


def test_a_reward_model_loaded_as_the_policy_is_named(tmp_path, tok):
    """A sequence-classification checkpoint (a reward model) passed as the policy loaded silently as a causal LM with
    a language-modelling head that checkpoint never trained."""
    from transformers import LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_config

    LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).save_pretrained(tmp_path / "rm")
    with pytest.warns(UserWarning, match=r"saved as a LlamaForSequenceClassification \(a reward model\?\).*pass it in "
                                         r"reward_funcs"):
        models.load_model(str(tmp_path / "rm"), "causal")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        models.load_model(str(tmp_path / "rm"), "seq_cls", num_labels=1)  # as a reward model: nothing to say


# -- the recipes' configuration (rlhf-ext ppo|reward --config …) ---------------------------------------------------
# TrlParser raised a traceback for each of these (FileNotFoundError, "Unknown arguments from config file", "Some
# specified arguments are not used by the HfArgumentParser", a TrainingArguments ValueError); the recipes now stop
# with argparse's status 2 and one line that names the mistake and the fix, before anything loads.
RECIPE_CONFIGS = ROOT_DIR / "recipes" / "configs"


def _recipe_error(capsys, config_cls, argv) -> str:
    from rlhf_ext.recipes import parse_arguments

    with pytest.raises(SystemExit) as stop:
        parse_arguments(config_cls, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    return err


@pytest.mark.parametrize("recipe", ["ppo", "reward"])
def test_recipe_config_file_that_is_not_there_lists_the_shipped_ones(capsys, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    cls = PPOConfig if recipe == "ppo" else RewardEnsembleConfig
    err = _recipe_error(capsys, cls, ["--config", "configs/nope.yaml"])
    assert "--config configs/nope.yaml: no such file" in err
    assert all(p.stem in err for p in RECIPE_CONFIGS.glob("*.yaml"))  # what to pass instead
    assert "--config needs a YAML file" in _recipe_error(capsys, cls, ["--config"])


def test_a_shipped_config_runs_by_name_from_any_directory(tmp_path, monkeypatch):
    """The wheel's users have no recipes/configs/ folder beside them: the name alone finds the shipped file (whose
    paths are relative to itself), and the fields are the file's, overridden by the command line as in TRL."""
    import yaml

    from rlhf_ext.recipes import parse_arguments

    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((RECIPE_CONFIGS / "ppo_smollm2_sentiment.yaml").read_text())
    script, args, model_args, config_file = parse_arguments(
        PPOConfig, ["--config", "ppo_smollm2_sentiment", "--use_cpu", "true", "--num-ppo-epoch", "3"])
    assert config_file == str(RECIPE_CONFIGS / "ppo_smollm2_sentiment.yaml")
    assert (args.kl_target, args.kl_controller) == (shipped["kl_target"], shipped["kl_controller"])
    assert args.num_ppo_epochs == 3 != shipped["num_ppo_epochs"]  # a dashed, abbreviated option still works
    with pytest.raises(SystemExit):  # a path with a folder is a path: not looked up among the shipped names
        parse_arguments(PPOConfig, ["--config", "elsewhere/ppo_smollm2_sentiment.yaml"])


@pytest.mark.parametrize("path", sorted(RECIPE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_shipped_config_given_to_the_other_recipe_names_the_right_one(capsys, path):
    wrong, right = ((RewardEnsembleConfig, "rlhf-ext ppo") if path.stem.startswith("ppo")
                    else (PPOConfig, "rlhf-ext reward"))
    err = _recipe_error(capsys, wrong, ["--config", str(path), "--use_cpu", "true"])
    assert f"{path} is for the other recipe: run it with {right}" in err


@pytest.mark.parametrize("where", ["yaml", "option"])
def test_a_misspelled_field_names_the_nearest_one(capsys, tmp_path, where):
    config = tmp_path / "ppo.yaml"
    config.write_text("output_dir: out\nuse_cpu: true\n" + ("kl_targt: 3.0\n" if where == "yaml" else ""))
    argv = ["--config", str(config)] + (["--kl-targt", "3"] if where == "option" else [])
    err = _recipe_error(capsys, PPOConfig, argv)
    source = str(config) if where == "yaml" else "the command line"
    assert f"PPOConfig has no such field(s): `kl_targt` ({source}; did you mean `kl_target`?)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, says", [("- output_dir: out\n", "must be a YAML mapping of `field: value` lines"),
                                        ("output_dir: [out\n", "is not valid YAML")])
def test_a_config_that_is_not_a_mapping_says_so(capsys, tmp_path, text, says):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert says in _recipe_error(capsys, RewardEnsembleConfig, ["--config", str(config)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shipped 7B config's bf16 runs where CUDA does")
def test_the_7b_config_on_a_machine_without_a_gpu_says_what_to_set(capsys):
    """As shipped the 7B QLoRA config targets a GPU: here transformers' own refusal (bf16 without one) reaches the
    user as its message alone."""
    err = _recipe_error(capsys, RewardEnsembleConfig, ["--config", "reward_7b_qlora"])
    assert "use_cpu" in err


def test_the_reward_recipe_exits_2_through_the_console_script(tmp_path):
    """The console script's path (runpy) keeps the status and the one line."""
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("rlhf-ext")
    r = subprocess.run([str(cli), "reward", "--config", "ppo_smollm2_sentiment"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is for the other recipe: run it with rlhf-ext ppo" in r.stderr and "Traceback" not in r.stderr


# -- the recipes' inputs: a reward model or dataset that is not there ------------------------------------------------
# A first run of `rlhf-ext ppo --config ppo_smollm2_sentiment` before the reward recipe loaded the policy, waited on
# the Hub for `outputs/reward-smollm2-sentiment` (53 s offline) and ended in a traceback; a dataset path that does not
# exist ended in huggingface_hub's HFValidationError. Now: one line, status 2, before any model loads.
def _input_error(capsys, recipe: str, argv) -> str:
    import importlib

    from rlhf_ext.recipes import run

    module = importlib.import_module(f"recipes.{recipe}")
    cls = PPOConfig if recipe == "ppo" else RewardEnsembleConfig
    with pytest.raises(SystemExit) as stop:
        run(module.main, cls, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("path", sorted(RECIPE_CONFIGS.glob("ppo_*.yaml")), ids=lambda p: p.stem)
def test_a_ppo_config_run_before_its_reward_model_names_the_command_that_writes_it(capsys, tmp_path, monkeypatch,
                                                                                  path):
    import re

    import yaml

    monkeypatch.chdir(tmp_path)  # a fresh directory: the reward recipe has not run here
    err = _input_error(capsys, "ppo", ["--config", path.stem, "--use_cpu", "true", "--bf16", "false"])
    named = re.search(r"it is what `rlhf-ext reward --config (\w+)` writes", err)
    assert named, err
    reward_config = yaml.safe_load((RECIPE_CONFIGS / f"{named[1]}.yaml").read_text())
    assert reward_config["output_dir"] == yaml.safe_load(path.read_text())["reward_model_path"]


@pytest.mark.parametrize("reward, says", [
    ("./nothing/here", "no such folder (relative paths are read from"),
    ("a/b/c", "and not a Hub id"),
    (".", "is a folder but holds no reward model (no rlhf_ext_reward.json or config.json)"),
    ("", "Set reward_model_path to a reward-model artifact"),
])
def test_a_reward_model_path_that_cannot_load_is_refused_before_the_policy_loads(capsys, tmp_path, monkeypatch,
                                                                                  reward, says):
    import recipes.ppo as ppo_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ppo_recipe, "PPOTrainer", lambda *a, **k: pytest.fail("the policy loaded"))
    err = _input_error(capsys, "ppo", ["--config", "ppo_smollm2_sentiment", "--use_cpu", "true",
                                       "--reward_model_path", reward])
    assert says in err


@pytest.mark.parametrize("recipe", ["ppo", "reward_modeling"])
def test_a_dataset_path_that_is_not_there_is_one_line(capsys, tmp_path, monkeypatch, recipe):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")  # the reward check passes; the dataset is what fails
    monkeypatch.chdir(tmp_path)
    config = "ppo_smollm2_sentiment" if recipe == "ppo" else "reward_smollm2_sentiment"
    err = _input_error(capsys, recipe, ["--config", config, "--use_cpu", "true", "--dataset_name", "./nodata"]
                       + (["--reward_model_path", "rm"] if recipe == "ppo" else []))
    assert f"No dataset at './nodata': no such folder or .jsonl / .json / .parquet / .csv file (relative paths are read from {tmp_path})" in err


def test_the_first_ppo_run_without_a_reward_model_exits_2_through_the_console_script(tmp_path):
    import subprocess
    import sys

    cli = Path(sys.executable).with_name("rlhf-ext")
    r = subprocess.run([str(cli), "ppo", "--config", "ppo_smollm2_sentiment", "--max_steps", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Train the reward model first" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("recipe", ["ppo", "reward_modeling"])
@pytest.mark.parametrize("model, says", [("./no/model", "No model at './no/model': not an existing folder"),
                                         ("missing.gguf", "GGUF file missing.gguf does not exist")])
def test_a_model_path_that_is_not_there_is_one_line(capsys, tmp_path, monkeypatch, recipe, model, says):
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    config = "ppo_smollm2_sentiment" if recipe == "ppo" else "reward_smollm2_sentiment"
    err = _input_error(capsys, recipe, ["--config", config, "--use_cpu", "true", "--model_name_or_path", model]
                       + (["--reward_model_path", "rm"] if recipe == "ppo" else []))
    assert f"model_name_or_path: {says}" in err


def test_a_checkpoint_with_its_own_code_needs_trust_remote_code_in_the_recipes(capsys, tmp_path, monkeypatch):
    """transformers refuses it too, as a traceback from deep in the trainer; the recipe says it in one line first."""
    import json

    from rlhf_ext.recipes import RecipeInputError, check_model_name

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {
        "AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    monkeypatch.chdir(tmp_path)
    err = _input_error(capsys, "reward_modeling", ["--config", "reward_smollm2_sentiment", "--use_cpu", "true",
                                                   "--model_name_or_path", "custom"])
    assert "ships its own modelling code (auto_map in config.json: modeling_custom.CustomConfig, " in err
    assert "--trust_remote_code true" in err
    check_model_name("custom", trust_remote_code=True)  # trusted: nothing to say
    with pytest.raises(RecipeInputError):
        check_model_name("custom")
