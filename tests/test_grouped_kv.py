"""grouped_kv.py: on CPU, grouped-query models' attention gets its key/value heads unrepeated (enable_gqa) in the
passes of both trainers — what SDPA receives, that the results are the repeated path's, that decoding and gradient
checkpointing are left alone, and that transformers' own test is restored."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from rlhf_ext.grouped_kv import grouped_kv_attention
from rlhf_ext.models import load_model

from .test_precision import trainer


class _KeyHeads(torch.overrides.TorchFunctionMode):
    """Records (query positions, key heads, enable_gqa) of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].shape[2], args[1].shape[1], bool(kwargs.get("enable_gqa"))))
        return func(*args, **kwargs)


def test_grouped_query_models_pass_their_key_heads_unrepeated_on_cpu(tok):
    """In the context a PPO pass runs in, a padded multi-query pass hands SDPA the 2 key/value heads with
    enable_gqa instead of 4 repeated copies; logits and gradients are what the repeated copies give; decoding (one
    query) is left to transformers; leaving the context restores transformers' own test, nested or not."""
    from transformers.integrations import sdpa_attention

    from rlhf_ext.testing import tiny_model_for

    original = sdpa_attention.use_gqa_in_sdpa
    model = tiny_model_for("qwen2.5", tok)  # 4 query heads over 2 key/value heads
    ids = torch.randint(3, tok.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: a mask reaches the attention

    def run(grouped: bool):
        model.zero_grad()
        rec = _KeyHeads()
        ctx = grouped_kv_attention(torch.device("cpu"), model) if grouped else nullcontext()
        with ctx, rec:
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits[mask.bool()].square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()], rec.calls

    repeated, grad_r, calls_r = run(False)
    grouped, grad_g, calls_g = run(True)
    layers = model.config.num_hidden_layers
    assert calls_r == [(9, 4, False)] * layers and calls_g == [(9, 2, True)] * layers
    torch.testing.assert_close(grouped, repeated, rtol=0, atol=1e-6)
    for a, b in zip(grad_g, grad_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sdpa_attention.use_gqa_in_sdpa is original

    with grouped_kv_attention(torch.device("cpu"), model):
        with grouped_kv_attention(torch.device("cpu"), model):
            pass
        assert sdpa_attention.use_gqa_in_sdpa is not original  # the outer context still holds
        rec = _KeyHeads()
        with rec, torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert sdpa_attention.use_gqa_in_sdpa is original
    # the prefill grouped; decoding as transformers does it: query heads folded into rows ([B, 2, 2·1, d]), no copies
    assert rec.calls[:layers] == [(9, 2, True)] * layers and rec.calls[layers:] == [(2, 2, False)] * layers

    model.gradient_checkpointing_enable()  # the recomputation runs outside the context: nothing changes then
    assert isinstance(grouped_kv_attention(torch.device("cpu"), model), nullcontext)
    assert isinstance(grouped_kv_attention(torch.device("cuda"), None), nullcontext)


def test_ppo_passes_hand_sdpa_the_key_heads_and_stay_exact(tmp_path, tok):
    """A grouped-query policy (Qwen2.5's family, tiny): every pass of an iteration — sampling's prefill, reference,
    θ_old, training — gets the key/value heads unrepeated, and the start-up checks still find the training pass equal
    to the no-grad one and the reference at θ₀."""
    from rlhf_ext.testing import save_tiny_model_for

    model = load_model(save_tiny_model_for(tmp_path / "m", "qwen2.5", tok))
    tr = trainer(tmp_path, tok, model)
    assert tr.startup["train_vs_eval"] == 0.0 and tr.startup["training_vs_reference"] <= 1e-9
    rec = _KeyHeads()
    with rec:
        tr.create_optimizer_and_scheduler(num_training_steps=1)
        tr._iteration()
    assert all(heads == 2 for _, heads, _ in rec.calls)  # no repeated copies in any pass
    grouped = sum(gqa for _, _, gqa in rec.calls)  # sampling's prefill, reference, θ_old = epoch 1, epoch 2
    assert grouped >= 4 * model.config.num_hidden_layers


def test_reward_trainer_passes_hand_sdpa_the_key_heads_and_train_as_the_repeated_path(tmp_path, tok, monkeypatch):
    """K=2 adapters on a grouped-query trunk: every training and scoring pass of the reward trainer gets the 2
    key/value heads unrepeated; losses and trained parameters are the repeated path's to rounding."""
    from rlhf_ext.reward import ensemble
    from rlhf_ext.testing import save_tiny_model_for

    from .test_gradient_checkpointing import _reward_run

    path = save_tiny_model_for(tmp_path / "m", "qwen2.5", tok)
    rec = _KeyHeads()
    with rec:
        _, losses, before, after = _reward_run(tmp_path / "grouped", path, tok, "adapters", True, False)
    assert rec.calls and all(heads == 2 and gqa for _, heads, gqa in rec.calls)

    monkeypatch.setattr(ensemble, "grouped_kv_attention", lambda *a: nullcontext())
    rec = _KeyHeads()
    with rec:
        _, losses_r, _, after_r = _reward_run(tmp_path / "repeated", path, tok, "adapters", True, False)
    assert rec.calls and all(heads == 4 and not gqa for _, heads, gqa in rec.calls)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_r), rtol=0, atol=1e-6)
    assert losses[-1] != losses[0]
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    for n in after:
        torch.testing.assert_close(after[n], after_r[n], rtol=1e-4, atol=1e-6)


def test_a_transformers_whose_test_changed_is_left_alone(monkeypatch):
    """Wrapped only where transformers' `use_gqa_in_sdpa` has the signature grouped_kv.py was written against: a
    different one (a later transformers) means nothing is changed, not a wrong answer."""
    from transformers.integrations import sdpa_attention

    from rlhf_ext import grouped_kv

    assert grouped_kv._hf_gqa_test() is sdpa_attention.use_gqa_in_sdpa
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda attention_mask, key, value, query=None: False)
    assert grouped_kv._hf_gqa_test() is None
    monkeypatch.setattr(grouped_kv, "_HF_USE_GQA", None)
    assert isinstance(grouped_kv_attention(torch.device("cpu")), nullcontext)
