"""π_ref is the base model: `adapters_disabled` against a copy of the model taken before any adapter was added.

Every adapter kind the trainers accept (LoRA on attention and embeddings, DoRA, a modules_to_save LM head, trainable
tokens, a second adapter such as the critic) switched off inside; on leaving, each layer's switch and every
requires_grad as they were (an adapter already off stays off), so a reference pass never changes what trains."""

import copy

import pytest
import torch
from peft import LoraConfig

from rlhf_ext.adapters import _tuner_modules, adapters_disabled, set_trainable, wrap_with_peft
from rlhf_ext.testing import tiny_causal_lm

IDS = torch.tensor([[1, 5, 9, 4, 7, 2], [3, 3, 8, 6, 1, 0]])

CONFIGS = {
    "lora attention": dict(target_modules=["q_proj", "v_proj"]),
    "lora embeddings": dict(target_modules=["embed_tokens", "q_proj"]),
    "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
    "modules_to_save head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "trainable tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]),
}


def _perturb(model):
    """Adapters that change the output (B = 0 at init would make any switch look right)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("kind", CONFIGS)
def test_inside_is_the_base_and_leaving_restores_every_switch(kind):
    torch.manual_seed(0)
    base = tiny_causal_lm(tie_word_embeddings=False).eval()
    reference = copy.deepcopy(base)
    model = wrap_with_peft(base, LoraConfig(r=4, lora_alpha=8, **CONFIGS[kind]), "default")
    model.add_adapter("critic", LoraConfig(r=4, target_modules=["v_proj"]))
    set_trainable(model, ["default", "critic"])
    _perturb(model)
    model.eval()
    want = reference(IDS).logits
    adapted = model(IDS).logits
    assert (adapted - want).abs().max() > 1e-3, "the adapters must change the output for this test to mean anything"

    set_trainable(model, ["default", "critic"])  # both train, as the policy's and the critic's in PPO
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model):
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=1e-6)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.active_adapter == "default" and not model._adapters_disabled


def test_a_layer_already_off_stays_off_and_nesting_restores_the_outer_state():
    torch.manual_seed(0)
    model = wrap_with_peft(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "default")
    _perturb(model)
    layers = [m for _, m in _tuner_modules(model)]
    layers[0]._disable_adapters = True  # e.g. a caller's own switch on one layer
    before = [m._disable_adapters for m in layers]
    with adapters_disabled(model):
        with adapters_disabled(model):
            assert all(m._disable_adapters for m in layers)
        assert all(m._disable_adapters for m in layers) and model._adapters_disabled
    assert [m._disable_adapters for m in layers] == before and not model._adapters_disabled


def test_an_exception_inside_still_restores():
    model = wrap_with_peft(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj"]), "default")
    with pytest.raises(RuntimeError, match="inside"):
        with adapters_disabled(model):
            raise RuntimeError("inside")
    assert not any(m._disable_adapters for _, m in _tuner_modules(model)) and not model._adapters_disabled
