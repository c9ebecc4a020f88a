"""Attention forward + backward on CPU at one layer of ppo_throughput's shapes: torch's kernel (flash on CPU), SDPA's
math backend, and torch's forward with rlhf_ext's backward (`rlhf_ext/ppo/cpu_attention.py`).

    python benchmarks/cpu_attention.py                      # 8 sequences × 9 heads × 74 tokens × 64, padded mask
    python benchmarks/cpu_attention.py --seqs 16 --tokens 256
    python benchmarks/cpu_attention.py --kv-heads 3 --query-tokens 50   # SmolLM2's 3 key/value heads; a training
                                                                         # pass's 50 queries after a shared 24-token prompt

Prints milliseconds per call (median of --repeat after one warm-up) in fp32 and bf16, and each gradient's largest
error against float64 autograd on the same inputs.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _common  # noqa: F401  (offline env, flush denormals)
from ppo_floor import timed  # median seconds after a warm-up
from rlhf_ext.ppo import cpu_attention


@contextmanager
def fp32_operands():
    """rlhf_ext's backward with dV, dQ, dK from fp32 copies of their operands (its earlier form)."""
    cpu_attention.FP32_OPERANDS = True
    try:
        yield
    finally:
        cpu_attention.FP32_OPERANDS = False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=74)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention); default: --heads")
    ap.add_argument("--query-tokens", type=int, help="queries per sequence (the last ones); default: --tokens")
    ap.add_argument("--repeat", type=int, default=20)
    a = ap.parse_args()
    B, H, T, D = a.seqs, a.heads, a.tokens, a.head_dim
    Hk = H if a.kv_heads is None else a.kv_heads
    Tq = T if a.query_tokens is None else a.query_tokens
    for name, value in (("--seqs", B), ("--heads", H), ("--tokens", T), ("--head-dim", D), ("--kv-heads", Hk),
                        ("--query-tokens", Tq), ("--repeat", a.repeat)):
        if value < 1:
            ap.error(f"{name} must be at least 1 (got {value})")
    if H % Hk:
        ap.error(f"--heads {H} is not a multiple of --kv-heads {Hk}: each key/value head serves a whole group of "
                 f"query heads (SmolLM2-135M: --heads 9 --kv-heads 3)")
    if Tq > T:
        ap.error(f"--query-tokens {Tq} exceeds --tokens {T}: the queries are the last of the sequence's tokens")
    g = torch.Generator().manual_seed(0)
    # q, k, v as the models hand them: [B, tokens, heads, D] transposed to [B, heads, tokens, D] (not contiguous)
    base = [torch.randn(B, t, h, D, generator=g).transpose(1, 2) for h, t in ((H, Tq), (Hk, T), (Hk, T), (H, Tq))]
    mask = torch.ones(B, 1, Tq, T, dtype=torch.bool).tril(T - Tq)
    mask[0, :, :, :3] = False  # the first sequence left-padded by 3
    if Tq == T:
        mask[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    gqa = {"enable_gqa": True} if Hk != H else {}
    print(f"{B} sequences × {H} heads ({Hk} key/value heads) × {Tq} queries over {T} tokens × {D}, padded causal "
          f"mask, {torch.get_num_threads()} threads")
    print(f"{'dtype':8s} {'variant':40s} {'forward ms':>10s} {'fwd + bwd ms':>12s} {'max grad err vs fp64':>21s}")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, go = (x.to(dtype) for x in base)
        ref = [x.double().requires_grad_() for x in (q, k, v)]
        F.scaled_dot_product_attention(*ref, attn_mask=mask, **gqa).backward(go.double())
        variants = {"torch (flash on CPU)": (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]), F.scaled_dot_product_attention),
                    "math backend": (lambda: sdpa_kernel([SDPBackend.MATH]), F.scaled_dot_product_attention),
                    "torch fwd, rlhf_ext bwd": (nullcontext, cpu_attention.sdpa),
                    "torch fwd, rlhf_ext bwd, fp32 operands": (fp32_operands, cpu_attention.sdpa)}
        for name, (ctx, attention) in variants.items():
            if "rlhf_ext" in name and dtype == torch.float32:
                continue  # used in 16-bit only
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]

            def fwd():
                with ctx(), torch.no_grad():
                    attention(q, k, v, attn_mask=mask, **gqa)

            def fwd_bwd():
                for x in leaves:
                    x.grad = None
                with ctx():  # the backward too: FP32_OPERANDS is read there
                    attention(*leaves, attn_mask=mask, **gqa).backward(go)

            f_ms, fb_ms = timed(fwd, a.repeat) * 1e3, timed(fwd_bwd, a.repeat) * 1e3
            err = max(float((x.grad.double() - r.grad.nan_to_num(0.0)).abs().max()) for x, r in zip(leaves, ref))
            print(f"{str(dtype).replace('torch.', ''):8s} {name:40s} {f_ms:10.2f} {fb_ms:12.2f} {err:21.2e}")


if __name__ == "__main__":
    main()
