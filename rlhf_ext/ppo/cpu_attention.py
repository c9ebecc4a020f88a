"""A cheaper backward for attention on CPU in 16-bit; the forward is torch's own kernel, bit for bit.

On CPU in bf16, the backward of torch's flash-attention kernel costs more than the math backend's forward and
backward together (8 sequences × 9 heads × 74 tokens × 64, forward + backward: 8.9 ms against 3.9; fp32 flash 3.6;
`benchmarks/cpu_attention.py`), a quarter of a SmolLM2-135M training step. Choosing another backend for the training
passes would change the forward, and θ_old, the training pass and the reference must compute one function (the KL is
exactly 0 at θ₀). So the forward stays `F.scaled_dot_product_attention` with the arguments the model gave it, and only
the backward is replaced: recomputed from q, k, v a chunk of sequences at a time (fp32 temporaries ≤ CHUNK_BYTES
each), the query heads of one key/value head stacked as rows so that grouped-query attention needs no repeated k, v
(P = softmax(q·kᵀ·s + mask); dV = Pᵀ·dO; dS = P ∘ (dO·Vᵀ − rowsum(dO·Vᵀ ∘ P)); dQ = dS·K·s; dK = dSᵀ·Q·s). Its
precision is FlashAttention-2's backward's: the scores, the softmax, dP and dS in fp32, and the three products that
give dV, dQ and dK from P and dS rounded to the 16-bit dtype (each accumulated in fp32 by the kernel): at the
benchmark trainer's shapes (8 sequences × 9 query heads over 3 key/value heads × 50 queries × 74 keys × 64, bf16) the
backward took 1.05 ms against 1.39 with those products from fp32 copies (`FP32_OPERANDS`, the earlier backward), at
1.4–1.5× their gradient error against float64 (tests/test_cpu_attention.py bounds it at 2×; `benchmarks/
cpu_attention.py` prints both). It saves only q, k, v (flash also keeps its output and log-sum-exp).

Routing: inside `cheaper_attention_backward`, transformers' "sdpa" attention function runs under a TorchFunctionMode
that sends its `F.scaled_dot_product_attention` call to `sdpa` here; the rest of the pass runs without the mode, whose
Python call in front of every tensor operation cost ~15 ms a bf16 SmolLM2-135M training forward when it covered the
whole pass.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention_interface import can_replace_sdpa, sdpa_replaced
from ..models import activation_checkpointing_on

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


CHUNK_BYTES = 16 << 20  # one fp32 [sequences, heads, Tq, Tk] temporary of the backward stays under this
FP32_OPERANDS = False  # True: dV, dQ, dK from fp32 copies of P, dS, dO, Q, K (the earlier backward; benchmarks A/B)


def _grouped_mask(mask: torch.Tensor | None, Hk: int, groups: int) -> torch.Tensor | None:
    """An SDPA mask (broadcastable to [B, Hq, Tq, Tk]) as [B or 1, Hk or 1, groups or 1, Tq or 1, Tk]: query head
    h·groups + j reads key/value head h (`enable_gqa`'s order, `repeat_interleave`'s)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.reshape(mask.shape[0], Hk, groups, *mask.shape[2:])


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale, enable_gqa: bool):
        ctx.save_for_backward(q, k, v, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        # detached, as a no-grad pass calls it: the same kernel, the same bits
        return _SDPA(q.detach(), k.detach(), v.detach(), attn_mask=mask, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask = ctx.saved_tensors
        B, Hq, Tq, D = q.shape
        Hk, Tk = k.shape[1], k.shape[2]
        groups = Hq // Hk  # > 1 with enable_gqa: k, v carry the key/value heads only
        scale = ctx.scale if ctx.scale is not None else 1 / math.sqrt(D)
        lo = torch.float32 if FP32_OPERANDS else q.dtype  # the operands of the products that give dV, dQ, dK
        # the query heads that share a key/value head are stacked as rows, [b, Hk, groups·Tq, D]: one product per key
        # head instead of repeating k and v, and dK, dV summed over the group by the product itself
        m5 = _grouped_mask(mask, Hk, groups)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq) if ctx.is_causal else None
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        step = max(1, CHUNK_BYTES // (4 * Hq * Tq * Tk))  # sequences per chunk: bounded fp32 temporaries
        for b0 in range(0, B, step):
            sl = slice(b0, min(B, b0 + step))
            n = sl.stop - sl.start
            qs = q[sl].reshape(n, Hk, groups * Tq, D)  # the models hand q transposed: a copy
            gs = g[sl].reshape(n, Hk, groups * Tq, D)
            s = torch.matmul(qs.float(), k[sl].float().transpose(-1, -2)).mul_(scale).view(n, Hk, groups, Tq, Tk)
            if m5 is not None:
                m = m5[sl] if m5.shape[0] > 1 else m5
                s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m)
            if causal is not None:
                s.masked_fill_(~causal, float("-inf"))
            p = torch.softmax(s, -1).nan_to_num_(0.0).view(n, Hk, groups * Tq, Tk)  # a fully masked row: no gradient
            dp = torch.matmul(gs.float(), v[sl].float().transpose(-1, -2))        # dP = dO·Vᵀ
            ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(scale)    # dS·s = P ∘ (dP − rowsum(dP ∘ P))·s
            p, ds = p.to(lo), ds.to(lo)
            dv[sl] = torch.matmul(p.transpose(-1, -2), gs.to(lo))                # dV = Pᵀ·dO
            dq[sl] = torch.matmul(ds, k[sl].to(lo)).view(n, Hq, Tq, D)           # dQ = dS·K·s
            dk[sl] = torch.matmul(ds.transpose(-1, -2), qs.to(lo))               # dK = dSᵀ·Q·s
        return dq, dk, dv, None, None, None, None


def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention`, with the cheaper backward where the call needs a gradient on CPU without
    dropout; torch's own function (forward and backward) otherwise."""
    if (not dropout_p and q.dim() == 4 and q.device.type == "cpu" and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _Attention.apply(q, k, v, attn_mask, bool(is_causal), scale, bool(enable_gqa))
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 enable_gqa=enable_gqa)


class _AttentionWithCheaperBackward(TorchFunctionMode):
    """Routes `F.scaled_dot_product_attention` calls through `sdpa`; every other function goes through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and len(args) >= 3 and set(kwargs) <= set(_SDPA_ARGS):
            return sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _in_attention(inner):
    """transformers' attention function `inner`, run inside the mode: the mode's Python call then sits in front of
    the few tensor operations of the attention function only, not of every operation of the pass (~3.5 µs each,
    ~15 ms of a bf16 SmolLM2-135M training forward)."""

    @functools.wraps(inner)
    def attention(*args, **kwargs):
        with _AttentionWithCheaperBackward():
            return inner(*args, **kwargs)

    return attention


_routed = {"depth": 0}


@contextmanager
def _transformers_sdpa_routed():
    """transformers' "sdpa" attention function (what every model with `attn_implementation="sdpa"` looks up in
    `ALL_ATTENTION_FUNCTIONS` at each forward) replaced by `_in_attention(it)` for the context's duration, then the
    mapping restored as it was (`attention_interface.sdpa_replaced`). Re-entrant: a nested context wraps it once."""
    _routed["depth"] += 1
    try:
        with sdpa_replaced(_in_attention) if _routed["depth"] == 1 else nullcontext():
            yield
    finally:
        _routed["depth"] -= 1


def cheaper_attention_backward(device: torch.device, compute_dtype: torch.dtype, model: torch.nn.Module | None = None):
    """The context a pass runs in: the cheaper backward on CPU in 16-bit when the pass will have one; nothing
    otherwise. Not when `model` checkpoints activations: the recomputation in the backward runs outside this context,
    and must save what the first forward saved. (The module walk for that runs only once the cheap tests pass.)"""
    if (device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and not (model is not None and activation_checkpointing_on(model))):
        if can_replace_sdpa():
            return _transformers_sdpa_routed()
        return _AttentionWithCheaperBackward()  # no attention interface to route: every call of the pass
    return nullcontext()
