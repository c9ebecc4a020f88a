"""One precision for every PPO pass (rlhf_ext/precision.py), in one process and under DDP; what the start-up check
accepts in each precision; pad tokens outside the vocabulary (TRL's PPO examples add `[PAD]` without resizing)."""

from __future__ import annotations

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


@pytest.mark.parametrize("bf16", [False, True])
def test_every_pass_runs_in_one_precision(tmp_path, tok, tiny_path, bf16):
    """`bf16=True` means bf16 in one process too: sampling, reference, θ_old, training and KL passes all compute in
    bf16 (and all in fp32 without it). Before, the flag did nothing in one process."""
    tr = trainer(tmp_path, tok, load_model(tiny_path), bf16=bf16)
    spy = DtypeSpy(tr.policy.peft)
    want = {torch.bfloat16 if bf16 else torch.float32}
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
    assert tr.startup["compute_dtype"] == ("bfloat16" if bf16 else "float32")


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


@pytest.mark.parametrize("autocast", [False, True])
def test_start_up_still_refuses_logits_processing(tmp_path, tok, monkeypatch, autocast):
    """The bf16 tolerance is rounding-sized: on a model with peaked logits (init 0.3, like a trained LM; a random
    tiny model is near-uniform and hides any processor) plain sampling is accepted and a repetition penalty inside
    generate() is refused, in fp32 and in bf16, the message saying what it measured against what."""
    path = save_tiny_model(tmp_path / "peaked", tok, initializer_range=0.3)
    ok = trainer(tmp_path, tok, load_model(path), bf16=autocast)
    assert ok.startup["sampling_vs_training"] <= ok.startup["sampling_vs_training_tolerance"]
    plain = PolicyAndValue.generation_kwargs
    monkeypatch.setattr(PolicyAndValue, "generation_kwargs",
                        lambda self, *a, **k: {**plain(self, *a, **k), "repetition_penalty": 3.0})
    with pytest.raises(ValueError, match=r"generate\(\) samples from a different distribution.*KL\(sampling‖training\)"):
        trainer(tmp_path, tok, load_model(path), bf16=autocast)


def test_fp16_is_refused_with_the_fix(tmp_path):
    from rlhf_ext.precision import autocast_dtype

    with pytest.raises(ValueError, match="fp16.*bf16=True"):
        autocast_dtype("fp16")


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
