"""benchmarks/ppo_floor.py counts the matmul FLOPs of a PPO pass; checked against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode

from rlhf_ext.testing import tiny_causal_lm

from .conftest import benchmark_module


@pytest.mark.parametrize("B,T,R", [(2, 10, 3), (3, 17, 8), (1, 40, 1)])
def test_decoder_and_head_flops_match_torchs_counter(B, T, R):
    # eager attention: its QKᵀ and AV are bmm calls the counter sees (it does not count CPU SDPA kernels)
    model = tiny_causal_lm(hidden_size=64, num_layers=3, attn_implementation="eager")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        peft(input_ids=ids, logits_to_keep=R + 1)
    cfg = model.config
    ours = benchmark_module("ppo_floor").decoder_flops(peft, B * T, T) + 2 * cfg.hidden_size * cfg.vocab_size * B * (R + 1)
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-3)
