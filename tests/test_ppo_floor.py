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


def test_floor_builds_the_benchmark_trainer_with_every_option_it_reads():
    """ppo_floor.py hands ppo_throughput.build_ours a namespace of its own options: every attribute build_ours reads
    must be there (a missing one broke the script once, when build_ours started reading `share_prefix`)."""
    import argparse
    import inspect
    import re

    floor, throughput = benchmark_module("ppo_floor"), benchmark_module("ppo_throughput")
    reads = set(re.findall(r"\bargs\.(\w+)", inspect.getsource(throughput.build_ours)))
    assert {"share_prefix", "precision", "lora_layers", "rm_dir"} <= reads
    ns = floor.benchmark_args(argparse.Namespace(model="m", prompts=4, completion_length=8, epochs=2, precision="bf16",
                                                 share_prefix="off"))
    assert not [name for name in reads if not hasattr(ns, name)]
    assert (ns.prompts, ns.completion_length, ns.epochs, ns.precision, ns.share_prefix, ns.lora_layers) == (
        4, 8, 2, "bf16", "off", "0")


@pytest.mark.parametrize("grad", [False, True])
def test_linear_calls_see_every_product_autograd_runs(grad):
    """`linear_calls` records each linear product of a pass (LoRA's included) with whether its input and weight need
    gradients; `product_seconds` times, per call, the forward product and — with the backward — dY·W and dYᵀ·X for
    those. The FLOPs of exactly those products equal torch's FLOP counter's matrix products (mm, addmm) for the same
    forward (and backward): nothing missed, nothing counted twice. SDPA attention, which the counter does not see on
    CPU, leaves every matrix product it counts to the linears (the LM head on the kept positions runs as a bmm)."""
    floor = benchmark_module("ppo_floor")
    model = tiny_causal_lm(hidden_size=64, num_layers=3, attn_implementation="sdpa")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))

    def run():
        out = peft(input_ids=ids, logits_to_keep=4).logits
        if grad:
            out.float().pow(2).mean().backward()

    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        calls, modules = floor.linear_calls(peft, run)
    counts = counter.get_flop_counts()["Global"]
    want = sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm))
    ours = sum(2 * rows * k * n * count * (1 + (grad and x_grad) + (grad and w_grad))
               for (rows, k, n, _, x_grad, w_grad), count in calls.items())
    assert ours == want
    assert any(w_grad for *_, w_grad in calls) == grad  # the adapters' weights are trained in the gradient pass
    assert sum(calls.values()) == 1 + 3 * (7 + 2 * 2)  # the LM head; per layer 7 linears + A and B on q and v
    assert all(isinstance(modules[key], torch.nn.Linear) and modules[key].out_features == key[2] for key in calls)
    assert floor.product_seconds(calls, modules, backward=grad) > 0  # each shape timed through its module


def test_op_times_sees_every_product_of_a_forward_and_backward():
    """pass_breakdown.py --ops times each ATen operation as it runs: a 2-layer MLP's forward + backward makes two forward
    products, two weight gradients and one input gradient (the first layer's input needs none): 5, whose FLOPs are
    torch's FLOP counter's."""
    breakdown = benchmark_module("pass_breakdown")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    x = torch.randn(5, 16)

    def step():
        mlp(x).sum().backward()

    timer = breakdown.op_times(step)
    products = {key: entry[0] for key, entry in timer.products.items()}
    assert sum(products.values()) == 5
    with FlopCounterMode(display=False) as counter:
        step()
    ours = sum(2 * m * k * n * calls for (m, k, n, _, _), calls in products.items())
    assert ours == counter.get_total_flops()
    assert breakdown.category("mm") == "products" and breakdown.category("view") == "views (no data moved)"
    assert breakdown.category("_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert timer.seconds["mm"] > 0 and all(s >= 0 for s in timer.seconds.values())


def test_op_times_sees_the_frozen_base_routed_through_onednn():
    """Where `cpu_linear` routes a frozen fp32 layer through oneDNN, its products are `_linear_pointwise` calls, not
    mm: `OpTimer` records them as x [m, k] · w [n, k]ᵀ — each layer's forward and its input gradient dY·W (rows 5 ≤ 32:
    no padding), and no weight gradient."""
    from rlhf_ext.cpu_linear import _onednn_op, route_frozen_linears

    if _onednn_op() is None:
        pytest.skip("this torch build has no oneDNN")
    breakdown = benchmark_module("pass_breakdown")
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).requires_grad_(False)
    assert route_frozen_linears(mlp, "onednn") == 2
    x = torch.randn(5, 16, requires_grad=True)

    timer = breakdown.op_times(lambda: mlp(x).sum().backward())
    products = {key: entry[0] for key, entry in timer.products.items()}
    assert products == {(5, 16, 32, torch.float32, True): 1, (5, 32, 8, torch.float32, True): 1,
                        (5, 8, 32, torch.float32, True): 1, (5, 32, 16, torch.float32, True): 1}
    assert breakdown.category("_linear_pointwise") == "products"
