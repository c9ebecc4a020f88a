"""What fused element-wise kernels would save in a training pass: the model's own RMS norm, rotary embedding and
SwiGLU activation, forward + backward at the pass's shapes, eager against `torch.compile` (inductor's fused C++).

    python benchmarks/elementwise_fusion.py                      # fp32, ppo_throughput's model, 424 token rows
    python benchmarks/elementwise_fusion.py --precision bf16 --rows 424

The element-wise work of a pass (the rest beside its products and attention, `pass_breakdown.py --ops`) is spread
over many small operations, each one read and write of an activation. Fusing them is what kernels compiled for the
pass would do; before writing such a pass, this measures the most the three largest kinds can give: each computed
as transformers computes it (the model's `RMSNorm` module, its `apply_rotary_pos_emb`, `act_fn(gate) · up`), run
forward + backward on random inputs of the pass's shapes, eager and compiled (dynamic shapes, as PPO's row counts
change), and scaled by how often one training forward + backward runs each (2 norms a layer + the final one, one
rotation and one activation a layer). Compilation time is printed too; compiled functions round differently from
eager ones, so a pass using them would have to use them in every pass PPO compares (θ_old, training, reference).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import _common  # noqa: F401  (offline env, flush denormals)
from ppo_floor import timed


def model_parts(model_name: str, dtype: torch.dtype):
    """(config, layers, norm module, rotary module, apply_rotary_pos_emb, activation) of `model_name`'s architecture,
    built from its config (one layer on the meta device: no weights needed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_ext.models import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path(model_name))
    layers, cfg.num_hidden_layers = cfg.num_hidden_layers, 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    modeling = sys.modules[type(model).__module__]
    layer = model.model.layers[0]
    norm = type(layer.input_layernorm)(cfg.hidden_size, eps=cfg.rms_norm_eps).to(dtype)
    rotary = type(model.model.rotary_emb)(cfg)
    return cfg, layers, norm, rotary, modeling.apply_rotary_pos_emb, layer.mlp.act_fn


def forward_backward(fn, inputs):
    """fn(*inputs) forward and backward (ones as the output gradient), gradients cleared."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.grad is not None:
            x.grad = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the embedded default, a folder or a Hub id")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--rows", type=int, default=424, help="token rows of a pass (the benchmark's packed pass: 424)")
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--epochs", type=int, default=4, help="training forward + backward passes an iteration")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    cfg, L, norm, rotary, rotate, act = model_parts(a.model, dtype)
    M, D, I = a.rows, cfg.hidden_size, cfg.intermediate_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or D // H

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    positions = torch.arange(M)[None]
    cos, sin = rotary(torch.zeros(1, M, D, dtype=dtype), positions)
    cases = [  # (name, function, inputs, calls per training forward + backward)
        ("RMS norm", lambda x: norm(x), (leaf(M, D),), 2 * L + 1),
        ("rotary (q and k)", lambda q, k: rotate(q, k, cos, sin), (leaf(1, H, M, d), leaf(1, KV, M, d)), L),
        ("SwiGLU activation", lambda g, u: act(g) * u, (leaf(M, I), leaf(M, I)), L),
    ]
    print(f"{a.model}: {a.precision}, {M} token rows, {L} layers; forward + backward per call, median of {a.repeat}")
    total_eager = total_compiled = 0.0
    for name, fn, inputs, calls in cases:
        eager = timed(lambda: forward_backward(fn, inputs), a.repeat)
        t0 = time.perf_counter()
        compiled = torch.compile(fn, dynamic=True)
        forward_backward(compiled, inputs)
        compile_s = time.perf_counter() - t0
        fused = timed(lambda: forward_backward(compiled, inputs), a.repeat)
        total_eager += calls * eager
        total_compiled += calls * fused
        print(f"  {name:20s} eager {eager * 1e3:6.3f} ms, compiled {fused * 1e3:6.3f} ms ({eager / fused:4.2f}×; "
              f"compiling {compile_s:4.1f} s) × {calls} a pass: {calls * (eager - fused) * 1e3:5.1f} ms less")
    saved = total_eager - total_compiled
    print(f"  a training forward + backward: {total_eager * 1e3:.0f} → {total_compiled * 1e3:.0f} ms of these "
          f"({saved * 1e3:.0f} ms less); {a.epochs} a PPO iteration: {a.epochs * saved:.2f} s less")


if __name__ == "__main__":
    main()
