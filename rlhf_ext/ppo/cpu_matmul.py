"""Decoding's few-row matmuls on CPU in fp32, in the operand order the CPU's BLAS runs fastest.

A decoding step multiplies one row per sequence by every weight of the model: `F.linear(x, W)` = x·Wᵀ, x [M, in]
with M the batch. On an AMD EPYC Zen 1 with torch's MKL that product ran at 13 GFLOP/s for M = 8 over SmolLM2-135M's
weights — slower than M = 1 (5 GFLOP/s, but in a third of the time per row) —, while the same product computed as
(W·xᵀ)ᵀ took 2.4× less time (1.9× with the result made contiguous), and still 1.3× at M = 64; at training sizes
(M ≥ 256) the gain is gone once the result is copied contiguous (`python benchmarks/cpu_decode_matmul.py`). Which
order is faster is a property of the CPU and the BLAS, so it is measured the first time a decode step would use it
(`rows_range`: ~0.5 s), and the other order is used only for the row counts where it measured at least 10 % faster
— on a CPU where it is not, nothing changes (at one row, a matrix-vector product either way, it measured 0.93×
there: batch-1 decoding keeps F.linear). The result is kept per machine (CPU model, torch version, thread count) in
`$RLHF_EXT_CACHE/cpu_matmul.json`: a timing near the threshold could come out either way, and two runs of one seed
on one machine must sample alike, whichever process they run in.

Only decoding uses it (`sampling.decode`, CPU, fp32 weights, no autocast, no gradients): the passes that PPO's
ratios, the KL penalty and the guard compare — training, θ_old, the reference — keep `F.linear`, so they still
compute one function and the KL at θ₀ is still exactly 0. Sampling then differs from the training forward by fp32
rounding in the order of a sum, as the KV-cached decode already did; the start-up check measures that gap through
this very path (`PolicyAndValue._sampled_vs_training`) against the fp32 tolerance (precision.py).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..cpu_linear import MIN_SPEEDUP, best_seconds, calibration_weights, machine_key, measured_once

_LINEAR = F.linear
CALIBRATION_ROWS = (8, 16, 32, 64)  # decode batches worth checking; above 64 rows the gain measured small or none


def tall_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) computed as (w · xᵀ)ᵀ. x [..., in], w [out, in], b [out] → [..., out], contiguous."""
    y = torch.mm(w, x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if b is not None:
        y.add_(b)
    return y.view(*x.shape[:-1], w.shape[0])


def _forward(module: torch.nn.Linear, rows: range, x: torch.Tensor) -> torch.Tensor:
    """`module`'s forward while decoding: `tall_linear` for a row count in `rows`, without gradients or autocast."""
    if (x.numel() // max(1, x.shape[-1]) in rows and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")):
        return tall_linear(x, module.weight, module.bias)
    return _LINEAR(x, module.weight, module.bias)


@functools.cache
def rows_range() -> range:
    """`calibrate()`'s range for this machine, measured once and kept (`cpu_linear.measured_once`)."""
    def measure():
        found = calibrate()
        return [found.start, found.stop]

    return measured_once(machine_key(), measure, lambda v: range(int(v[0]), int(v[1])))


def calibrate() -> range:
    """The row counts for which (W·xᵀ)ᵀ measured ≥ MIN_SPEEDUP × faster than F.linear on this CPU: from 1 (or 2,
    where one row — batch-1 decoding, a matrix-vector product either way — is not faster) up to the largest of
    CALIBRATION_ROWS before the first that is not; empty = never. Each count is timed over `calibration_weights`."""
    g = torch.Generator().manual_seed(0)
    weights = calibration_weights(g)

    def faster(rows: int) -> bool:
        x = torch.randn(rows, 576, generator=g)
        best_seconds(lambda: [tall_linear(x, w) for w in weights], reps=1)  # first-use costs out of the timing
        plain = best_seconds(lambda: [_LINEAR(x, w) for w in weights])
        return plain >= MIN_SPEEDUP * best_seconds(lambda: [tall_linear(x, w) for w in weights])

    limit = 0
    with torch.no_grad():
        for rows in CALIBRATION_ROWS:
            if not faster(rows):
                break
            limit = rows
        return range(1 if limit and faster(1) else 2, limit + 1)


@contextmanager
def few_row_linear(model: torch.nn.Module):
    """The context a decoding loop runs in. On CPU, where this CPU measured (W·xᵀ)ᵀ faster, every `torch.nn.Linear`
    of `model` with fp32 weights (exactly that class: not bitsandbytes' 4-bit layers; PEFT's LoRA layers are made of
    them) runs `_forward` until the context ends; one that already has its own `forward` (an accelerate hook, or
    oneDNN's routing where this CPU runs that faster: `rlhf_ext/cpu_linear.py`) is left alone. An instance attribute
    for the loop's duration, not a TorchFunctionMode: a mode puts a Python call in front of every tensor operation of
    the step (~3.5 µs × 90 000 per 32-token rollout here)."""
    patched = []
    try:
        linears = [] if torch.is_autocast_enabled("cpu") else [
            m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        rows = rows_range() if linears else range(0)  # measured only where there is something to use it on
        for m in linears if rows else ():
            m.forward = functools.partial(_forward, m, rows)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
