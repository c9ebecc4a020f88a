"""One precision for every PPO pass (rlhf_ext/precision.py), in one process and under DDP; what the start-up check
accepts in each precision; fp16's loss scaling; pad tokens outside the vocabulary (TRL's PPO examples add `[PAD]` without resizing)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from torch import nn

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.models import load_model
from rlhf_ext.ppo.policy import PolicyAndValue
from rlhf_ext.testing import save_tiny_model, tiny_tokenizer

from .conftest import FOUR_BIT_HIDDEN

SUBJECTS = "movie book song film food place day night".split()


def prompts(n=8, ragged=True):
    # ragged: prompts of different token lengths, so left padding reaches the model
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a {'very ' * (i % 3 if ragged else 0)}"
                                                                      f"short review of the {SUBJECTS[i % 8]} ."}]
                                         for i in range(n)]})


def length_reward(prompts, completions, completion_ids, **kw):
    return [float(len(c)) for c in completion_ids]


def trainer(tmp_path, tok, model, **cfg):
    args = dict(per_device_train_batch_size=8, max_steps=2, max_completion_length=6, use_cpu=True,
                save_strategy="no", disable_tqdm=True, logging_steps=10**6, monitor=False, seed=0)
    args.update(cfg)
    return PPOTrainer(model, reward_funcs=length_reward, args=PPOConfig(str(tmp_path / "ppo"), **args),
                      train_dataset=prompts(), processing_class=tok,
                      peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


class DtypeSpy:
    """Records the dtype every nn.Linear of the base computes in (its output), per labelled phase."""

    def __init__(self, model):
        self.phase, self.seen = None, {}
        self.hooks = [m.register_forward_hook(self._hook) for m in model.modules()
                      if isinstance(m, nn.Linear) and "lora" not in type(m).__module__]

    def _hook(self, module, args, out):
        if self.phase is not None and isinstance(out, torch.Tensor):
            self.seen.setdefault(self.phase, set()).add(out.dtype)


@pytest.mark.parametrize("flag, dtype", [(None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_every_pass_runs_in_one_precision(tmp_path, tok, tiny_path, flag, dtype):
    """`bf16=True` means bf16 in one process too: sampling, reference, θ_old, training and KL passes all compute in
    bf16 (and all in fp32 without it; all in fp16 with `fp16=True`). Before, the flag did nothing in one process."""
    tr = trainer(tmp_path, tok, load_model(tiny_path), bf16=flag == "bf16", fp16=flag == "fp16")
    spy = DtypeSpy(tr.policy.peft)
    want = {dtype}
    passes = {
        "generate": lambda: tr.policy.generate(tr.prompts[:2], tok, 4),
        "training": lambda: tr.train_policy(*_batch(tr), 3),
        "theta_old": lambda: tr.policy(*_batch(tr), 3),
        "reference": lambda: tr.policy.logits(*_batch(tr), 3, reference=True),
        "kl_measure": lambda: tr.policy.logits(*_batch(tr), 3),
    }
    for name, run in passes.items():
        spy.phase = name
        run()
    assert {k: v for k, v in spy.seen.items()} == {k: want for k in passes}
    logits, values, logp = tr.policy(*_batch(tr), 3)
    assert logits.dtype == values.dtype == logp.dtype == torch.float32  # log-softmax and the value head stay fp32
    assert tr.startup["compute_dtype"] == str(dtype).replace("torch.", "")
    assert (tr.grad_scaler is not None) == (flag == "fp16")  # only fp16's range needs the loss scaled


def test_the_lm_head_gets_a_contiguous_input(tmp_path, tok, tiny_path):
    """`logits_to_keep` slices the final hidden states; on a strided 3-D input torch's matmul expands the LM head's
    weight per row ([B, V, H]: 432 MiB per forward at 135M in CPU bf16, the largest block of our bf16 peak), so every
    pass hands the head a contiguous input (generate()'s prefill slices too) — and the logits are the plain slice's."""
    tr = trainer(tmp_path, tok, load_model(tiny_path), bf16=True)
    head = tr.policy.peft.get_base_model().get_output_embeddings()
    seen = []
    spy = head.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], args[0].is_contiguous())))
    ids, mask = _batch(tr)
    R = 3
    got = {"training": tr.train_policy(ids, mask, R)[0], "theta_old": tr.policy(ids, mask, R)[0],
           "reference": tr.policy.logits(ids, mask, R, reference=True), "kl_measure": tr.policy.logits(ids, mask, R)}
    assert len(seen) == len(got) and all(n == R + 1 < ids.shape[1] and contiguous for n, contiguous in seen)
    tr.policy.generate(tr.prompts[:2], tok, 4)
    spy.remove()
    assert len(seen) > len(got) and all(contiguous for _, contiguous in seen)
    with torch.no_grad(), tr.policy.precision():  # independent: the model's whole-sequence logits, sliced here
        full = tr.policy.peft(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    want = full[:, -R - 1 : -1].float() / tr.args.temperature
    torch.testing.assert_close(got["kl_measure"], want, rtol=0, atol=2e-2)


def test_lora_inputs_skip_peft_s_fp32_round_trip_under_autocast(tmp_path, tok, tiny_path, monkeypatch):
    """bf16 weights + fp32 adapters under autocast: PEFT casts each LoRA layer's bf16 input to fp32 and autocast casts
    it back to bf16 for lora_A's matmul, whose backward then keeps that second copy. The policy skips the round trip
    (`PolicyAndValue.precision`): the training forward's logits, values and every adapter gradient are bit-identical
    to the round trip's, and autograd keeps less."""
    from contextlib import contextmanager

    from rlhf_ext.grouped_kv import grouped_kv_attention
    from rlhf_ext.ppo.cpu_attention import cheaper_attention_backward
    from rlhf_ext.precision import precision_context

    tr = trainer(tmp_path, tok, load_model(tiny_path, dtype="bfloat16"), bf16=True)
    ids, mask = _batch(tr)
    trained = [p for p in tr.policy.parameters() if p.requires_grad]

    def run():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, values, _ = tr.train_policy(ids, mask, 3)
        (logits.logsumexp(-1).sum() + values.sum()).backward()
        grads = [p.grad.clone() for p in trained]
        tr.policy.zero_grad(set_to_none=True)
        return logits.detach(), values.detach(), grads, sum(saved.values())

    skipped = run()

    @contextmanager
    def with_round_trip():  # the policy's context without the skip (the attention as the policy's)
        with precision_context(tr.policy.device, torch.bfloat16), \
                cheaper_attention_backward(tr.policy.device, tr.policy.compute_dtype, tr.policy.peft), \
                grouped_kv_attention(tr.policy.device, tr.policy.peft):
            yield

    monkeypatch.setattr(tr.policy, "precision", with_round_trip)
    round_trip = run()
    assert torch.equal(skipped[0], round_trip[0]) and torch.equal(skipped[1], round_trip[1])
    assert len(skipped[2]) > 0 and all(torch.equal(a, b) for a, b in zip(skipped[2], round_trip[2]))
    assert skipped[3] < round_trip[3], (skipped[3], round_trip[3])


def _batch(tr):
    from rlhf_ext.data import pad_ids

    return pad_ids([ids for _, ids in tr.prompts[:2]], tr.policy.pad_id, side="left")


SETTINGS = {  # name: (load kwargs, config kwargs, hidden)
    "fp32": ({}, {}, 32),
    "bf16 autocast": ({}, {"bf16": True}, 32),
    "bf16 weights": ({"dtype": "bfloat16"}, {}, 32),
    "4-bit, bf16 compute + autocast + checkpointing (ppo_7b_qlora.yaml)": (
        {"load_in_4bit": True, "dtype": "bfloat16"}, {"bf16": True, "gradient_checkpointing": True}, FOUR_BIT_HIDDEN),
    "fp16 autocast": ({}, {"fp16": True}, 32),
    "fp16 weights": ({"dtype": "float16"}, {}, 32),
    # the QLoRA recipe on a GPU before Ampere (T4, V100): fp16 in place of bf16
    "4-bit, fp16 compute + autocast + checkpointing": (
        {"load_in_4bit": True, "dtype": "float16"}, {"fp16": True, "gradient_checkpointing": True}, FOUR_BIT_HIDDEN),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_kl_is_zero_while_the_policy_has_not_moved(tmp_path, tok, name):
    """At θ = θ₀ every KL the trainer computes is zero in every precision: the start-up check's training pass against
    the reference, the guard's measurement before the update, and the penalty's estimator (θ_old against the
    reference) over two iterations with a learning rate of 0. The sampling gap is within the dtype's tolerance."""
    load_kw, cfg, hidden = SETTINGS[name]
    model = load_model(save_tiny_model(tmp_path / "m", tok, hidden_size=hidden), **load_kw)
    tr = trainer(tmp_path, tok, model, learning_rate=0.0, kl_controller="hard", kl_target=0.1, **cfg)
    s = tr.startup
    assert s["training_vs_reference"] <= 1e-9 and s["init_vs_reference"] == 0.0 and s["train_vs_eval"] == 0.0
    assert 0 <= s["sampling_vs_training"] <= s["sampling_vs_training_tolerance"]
    hist = tr.train()
    for h in hist:
        assert h["objective/kl"] == 0.0
        assert 0.0 <= h["kl/before_update"] <= 1e-9  # exact and never negative (float64-normalised)
        assert 0.0 <= h["kl/after_update"] <= 1e-9


@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
def test_start_up_still_refuses_logits_processing(tmp_path, tok, monkeypatch, autocast):
    """The 16-bit tolerances are rounding-sized: on a model with peaked logits (init 0.3, like a trained LM; a random
    tiny model is near-uniform and hides any processor) plain sampling is accepted and a repetition penalty inside
    generate() is refused, in fp32, bf16 and fp16, the message saying what it measured against what."""
    path = save_tiny_model(tmp_path / "peaked", tok, initializer_range=0.3)
    flags = {"bf16": autocast == "bf16", "fp16": autocast == "fp16"}
    ok = trainer(tmp_path, tok, load_model(path), **flags)
    assert ok.startup["sampling_vs_training"] <= ok.startup["sampling_vs_training_tolerance"]
    plain = PolicyAndValue.generation_kwargs
    monkeypatch.setattr(PolicyAndValue, "generation_kwargs",
                        lambda self, *a, **k: {**plain(self, *a, **k), "repetition_penalty": 3.0})
    with pytest.raises(ValueError, match=r"generate\(\) samples from a different distribution.*KL\(sampling‖training\)"):
        trainer(tmp_path, tok, load_model(path), **flags)


def _adapter_grads(tr, loss_of, scaler="keep"):
    """The gradients `_step` hands the optimizer for the loss `loss_of(logp, values)` (optimizer.step captured and
    not taken), with the trainer's loss scaler or, `scaler=None`, without one."""
    tr.create_optimizer()
    if scaler != "keep":
        tr.grad_scaler = scaler
    seen = {}
    tr.optimizer.step = lambda *a, **k: seen.update(
        {n: p.grad.clone() for n, p in tr.policy.named_parameters() if p.grad is not None})
    _, values, logp = tr.train_policy(*_batch(tr), 3)
    tr._step(loss_of(logp, values), Counter())
    return seen


def _relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys() and got
    diff = sum(float((got[k] - want[k]).double().norm() ** 2) for k in want) ** 0.5
    return diff / sum(float(want[k].double().norm() ** 2) for k in want) ** 0.5


def test_fp16_scales_the_loss_so_that_small_gradients_survive(tmp_path, tok, tiny_path):
    """fp16's smallest normal number is 6e-5; the adapters' gradients reach them through fp16 activations' gradients,
    which for a small loss (here 1e-8 × (Σ log π + Σ V)) fall below it and flush to zero. The step scales the loss for the
    backward and unscales before clipping: the gradients equal those of the same loss computed in fp32 — no
    autocast, no scaler: the independent computation — to fp16's rounding, where the same backward without the
    scaler loses them."""
    small = lambda logp, values: 1e-8 * (logp.sum() + values.sum())  # noqa: E731
    want = _adapter_grads(trainer(tmp_path / "fp32", tok, load_model(tiny_path)), small)
    tr = trainer(tmp_path / "fp16", tok, load_model(tiny_path), fp16=True)
    scaled = _adapter_grads(tr, small)
    unscaled = _adapter_grads(trainer(tmp_path / "plain", tok, load_model(tiny_path), fp16=True), small, scaler=None)
    assert any("lora_B" in k for k in want) and any("value_head" in k for k in want)
    assert _relative_error(scaled, want) < 0.02, _relative_error(scaled, want)
    assert _relative_error(unscaled, want) > 0.5, _relative_error(unscaled, want)


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, tok, tiny_path):
    """A scale whose scaled gradients overflow fp16: the step is skipped (counted, the adapters, value head and
    optimizer state untouched) and the scale halved, as torch's GradScaler does; a non-finite loss is skipped as in
    fp32, without lowering the scale; at a scale fp16 holds the step is taken."""
    tr = trainer(tmp_path, tok, load_model(tiny_path), fp16=True)
    tr.create_optimizer()
    tr.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    trained = {n: p for n, p in tr.policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    stats = Counter()

    def step(scale_loss=1.0):
        _, values, logp = tr.train_policy(*_batch(tr), 3)
        return tr._step((logp.mean() + values.mean()) * scale_loss, stats)

    assert step() is None
    assert stats == {"optim/fp16_overflow_steps": 1} and tr.grad_scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(p, before[n]) for n, p in trained.items()) and not tr.optimizer.state and tr.version == 0
    assert all(p.grad is None for p in trained.values())
    assert not math.isfinite(step(float("inf")))
    assert stats["optim/skipped_nonfinite_steps"] == 1 and tr.grad_scaler.get_scale() == 2.0 ** 59
    tr.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert math.isfinite(step()) and tr.version == 1 and tr.grad_scaler.get_scale() == 1024.0
    moved = [n for n, p in trained.items() if not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and any("value_head" in n for n in moved)


def test_fp16_parameters_in_training_are_refused_with_the_fix(tmp_path, tok, tiny_path):
    """A PeftModel made with fp16 adapters (autocast_adapter_dtype=False on fp16 weights): a loss scaler cannot unscale
    fp16 gradients, and Adam's small updates vanish in fp16 weights — refused at start-up, saying how."""
    from peft import get_peft_model

    peft = get_peft_model(load_model(tiny_path, dtype="float16"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                          autocast_adapter_dtype=False)
    with pytest.raises(ValueError, match=r"fp16.*8 of them are fp16 \(base_model.*lora_A.*autocast_adapter_dtype=True.*float32"):
        PPOTrainer(peft, reward_funcs=length_reward, train_dataset=prompts(), processing_class=tok,
                   args=PPOConfig(str(tmp_path / "o"), per_device_train_batch_size=8, use_cpu=True, monitor=False,
                                  fp16=True))


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tmp_path, tok):
    """The loss scale is part of the run's state: the first steps overflow at the initial scale, so a resume that
    started again from it would skip other steps than the run it continues. The checkpoint holds the scale; the
    resumed run equals the straight one bit for bit."""
    from .test_ppo import _params, make

    big = lambda completion_ids, **kw: [100.0 * len(c) for c in completion_ids]  # noqa: E731 — a large value loss
    straight = make(tmp_path / "a", tok, big, max_steps=4, fp16=True, save_strategy="steps", save_steps=2)
    hist = straight.train()
    assert hist[0]["optim/fp16_overflow_steps"] >= 1 and hist[1]["optim/loss_scale"] < 2.0 ** 16
    resumed = make(tmp_path / "b", tok, big, max_steps=4, fp16=True)
    torch.manual_seed(123)  # another process state: the checkpoint restores what sampling depends on
    rest = resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "ppo" / "checkpoint-2"))
    for key in ("optim/loss_scale", "optim/fp16_overflow_steps", "loss/policy"):
        assert [h[key] for h in rest[-2:]] == [h[key] for h in hist[-2:]], key
    want, got = _params(straight), _params(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_is_not_chosen_for_a_gpu_that_only_emulates_it(monkeypatch):
    """`bf16=None` turns bf16 on where the GPU computes in it. torch's `is_bf16_supported()` also answers True on a
    T4 or V100 (compute capability 7.x), which emulates bf16 slowly: there both configs stay in fp32 (fp16=True is the
    16-bit choice). On an Ampere GPU bf16 is chosen."""
    import rlhf_ext.precision as precision
    from rlhf_ext import RewardEnsembleConfig

    props = {"major": 7}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), props)())
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True, raising=False)
    assert torch.cuda.is_bf16_supported()  # what the configs asked before
    assert precision.is_bf16_gpu() is False
    props["major"] = 8
    assert precision.is_bf16_gpu() is True
    monkeypatch.undo()  # the configs themselves on this CPU, answering as each GPU would
    for gpu_computes_bf16 in (False, True):
        monkeypatch.setattr(precision, "is_bf16_gpu", lambda: gpu_computes_bf16)
        assert PPOConfig("o", use_cpu=True).bf16 is gpu_computes_bf16
        assert RewardEnsembleConfig("o", use_cpu=True).bf16 is gpu_computes_bf16
        assert PPOConfig("o", use_cpu=True, fp16=True).bf16 is False


def test_reward_functions_are_called_outside_the_policys_autocast(tmp_path, tok, tiny_path):
    """A Python reward function is called as TRL's GRPOTrainer calls it, outside any autocast: a bf16 run gave an
    fp32 judge inside it bf16 results (2e-3 off the same call outside, where audit functions are called). Reward
    *models* still score in the policy's precision — a member on the shared base computes in its dtype — in the
    rollout and when the monitor scores the reference's samples alike."""
    from .test_reward_trainer import _seq_cls

    seen = []

    def judge(completion_ids, **kw):
        x = torch.ones(2, 2)
        seen.append((torch.is_autocast_enabled("cpu"), (x @ x).dtype))
        return [float(len(c)) for c in completion_ids]

    rm = _seq_cls(tok)
    spy = DtypeSpy(rm)
    spy.phase = "scoring"
    tr = PPOTrainer(load_model(tiny_path), reward_funcs=[judge, rm], train_dataset=prompts(),
                    processing_class=tok, reward_processing_classes=[None, tok],
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                    args=PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=8, max_steps=1,
                                   max_completion_length=4, use_cpu=True, save_strategy="no", disable_tqdm=True,
                                   logging_steps=10**6, monitor=False, bf16=True))
    tr.train()
    assert seen and set(seen) == {(False, torch.float32)}
    assert spy.seen == {"scoring": {torch.bfloat16}}


def test_pad_token_outside_the_vocabulary(tmp_path, tiny_path):
    """TRL 1.12's PPO examples add `[PAD]` with add_special_tokens and never resize: padded positions must never reach
    the embedding (before: IndexError at start-up). Ragged prompts make sure padding is used."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = load_model(tiny_path)
    rows = model.get_input_embeddings().weight.shape[0]
    assert tok.pad_token_id == rows  # one past the embedding
    tr = trainer(tmp_path, tok, model, kl_controller="hard", kl_target=0.5, learning_rate=0.05)
    assert tr.policy.pad_id < rows
    assert len({len(ids) for _, ids in tr.prompts}) > 1
    hist = tr.train()
    assert all(h["kl/after_update"] <= 0.5 for h in hist)
    assert any(float(p.abs().max()) > 0 for n, p in tr.policy.peft.named_parameters() if "lora_B" in n)


def test_prompt_token_outside_the_vocabulary_names_the_fix(tmp_path, tiny_path):
    tok = tiny_tokenizer()
    tok.add_tokens(["zebra"])
    data = Dataset.from_dict({"prompt": ["write about the zebra ."] * 8})
    with pytest.raises(ValueError, match=r"token id \d+.*resize_token_embeddings"):
        PPOTrainer(load_model(tiny_path), reward_funcs=length_reward,
                   args=PPOConfig(str(tmp_path / "o"), per_device_train_batch_size=8, use_cpu=True, monitor=False),
                   train_dataset=data, processing_class=tok)


def test_the_reward_trainer_says_fp16_on_cpu_trains_in_fp32(tmp_path, tok, tiny_path):
    """transformers' Trainer (so trl.RewardTrainer too) runs no fp16 autocast and no loss scaler on CPU: fp16=True
    trains in fp32 there without a word, while PPOTrainer's fp16 does run in fp16 on CPU. The reward trainer says so;
    with bf16 (which accelerate does autocast on CPU) it says nothing."""
    import warnings

    from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer

    from .conftest import preference_rows

    def build(**flags):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            RewardEnsembleTrainer(tiny_path, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                  processing_class=tok,
                                  args=RewardEnsembleConfig(str(tmp_path / "rm"), use_cpu=True, max_steps=1,
                                                            normalization_samples=8, report_to="none", **flags))
        return [str(w.message) for w in caught if "fp16=True on CPU" in str(w.message)]

    assert len(build(fp16=True, bf16=False)) == 1 and "trains in fp32" in build(fp16=True, bf16=False)[0]
    assert build(bf16=True) == []
