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

Prepacked weights. oneDNN computes a product from a weight it first rearranges into its blocked layout, and for a
few-row product that rearranging is most of the work: a decoding step of 8 rows over SmolLM2-135M's [1536, 576] MLP
weights took 101 µs in bf16 and 142 µs in fp32 (oneDNN) against 51 and 97 µs from a copy rearranged once
(`torch.ops.mkldnn._reorder_linear_weight`, the packing torch's CPU compiler does), the same bits on this machine
(`python benchmarks/cpu_decode_matmul.py --packed`). The base is frozen, so `few_row_linear` packs each frozen
plain `nn.Linear` (weight and bias without gradients, fp32 or bf16) once, at its first product of the decode, and
drops the copies when decoding ends — when this CPU measured the packed product at least MIN_SPEEDUP × faster and the decode's steps repay
the packing (`packing_costs`, measured once per machine and dtype), and the copies fit in 1/PACK_MEMORY_SHARE of the
memory the process may use (`memory_bytes`: the machine's or its container's, a fixed share so that one seed samples
alike run after run). The benchmark trainer's bf16 rollout of 8 × 32 tokens: its weights packed in ~45 ms, its
generation 0.11–0.21 s shorter (`benchmarks/ppo_throughput.py`, README). Training passes keep their products:
a packed copy beside the weights would cost the base's size again for a 6–10 % faster product.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..cpu_linear import (MIN_SPEEDUP, _onednn_op, best_seconds, calibration_weights, check_backend, is_routed,
                          kept_per_machine, machine_key, measured_once, onednn_product)

_LINEAR = F.linear
CALIBRATION_ROWS = (8, 16, 32, 64)  # decode batches worth checking; above 64 rows the gain measured small or none
PACKED_ROWS = 64  # the packed forward serves products of up to this many rows (decoding steps); more: the plain one
PACK_MEMORY_SHARE = 8  # the packed copies may take at most 1/8 of the memory (`memory_bytes`)
PACKABLE = (torch.float32, torch.bfloat16)


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


@kept_per_machine
def rows_range(key: str) -> range:
    """`calibrate()`'s range for this machine (`machine_key`, its thread count included), measured once and kept
    (`cpu_linear.measured_once`); called without arguments."""
    def measure():
        found = calibrate()
        return [found.start, found.stop]

    return measured_once(key, measure, lambda v: range(int(v[0]), int(v[1])))


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


# -- prepacked weights ---------------------------------------------------------------------------------------------
@functools.cache
def _pack_op():
    """torch's oneDNN weight packing for linears (a private op of torch's CPU compiler), or None without oneDNN."""
    if _onednn_op() is None:
        return None
    return getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)


def packed_weight(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w [out, in] rearranged once into oneDNN's layout for products of about `rows` rows (an opaque tensor that only
    `onednn_product` reads)."""
    return _pack_op()(w.detach(), rows)


class _PackedForward:
    """A packed module's forward while decoding: a no-gradient product of up to PACKED_ROWS rows in the weight's dtype
    (autocast's cast to it made here, as `F.linear` would have had it made) from a copy of the weight packed for
    `rows` rows; `plain` — the forward the module had before — otherwise. The copy is packed at the first product
    that uses it, so a layer the loop never calls (another adapter's, a reward member's) costs nothing."""

    def __init__(self, module: torch.nn.Linear, rows: int, plain):
        self.module, self.rows, self.plain, self.packed = module, rows, plain, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.module.weight
        if x.numel() // max(1, x.shape[-1]) <= PACKED_ROWS and not torch.is_grad_enabled() and x.device.type == "cpu":
            if x.dtype != w.dtype and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == w.dtype:
                x = x.to(w.dtype)
            if x.dtype == w.dtype:
                if self.packed is None:
                    self.packed = packed_weight(w, self.rows)
                return onednn_product(x.contiguous(), self.packed, self.module.bias)
        return self.plain(x)


PACKING_ROWS = (1, 8)  # the calibration's row counts: one sequence (a matrix-vector product), and a batch
PACKING_WEIGHTS = 24  # the packing calibration's weights: 81 MiB in fp32, more than an L3 cache (calibration_weights)


def packing_costs(dtype: torch.dtype, rows: int = 8) -> tuple[float, float, float]:
    """(a product of `rows` rows over PACKING_WEIGHTS `calibration_weights` in `dtype` the fastest unpacked way —
    torch's or oneDNN's —, the same from packed copies, packing them) measured at one row for `rows` = 1 and at 8
    for more (PACKING_ROWS), once per machine and dtype, and kept."""
    def measure():
        g = torch.Generator().manual_seed(0)
        weights = [w.to(dtype) for w in calibration_weights(g, PACKING_WEIGHTS)]
        costs = {}
        with torch.no_grad():
            for m in PACKING_ROWS:
                x = torch.randn(m, 576, generator=g).to(dtype)
                t0 = time.perf_counter()
                packed = [packed_weight(w, m) for w in weights]
                pack = time.perf_counter() - t0
                onednn_product(x, packed[0])  # first-use costs out of the timing
                plain = min(best_seconds(lambda: [_LINEAR(x, w) for w in weights]),
                            best_seconds(lambda: [onednn_product(x, w) for w in weights]))
                costs[str(m)] = [plain, best_seconds(lambda: [onednn_product(x, p) for p in packed]), pack]
        return costs

    key = f"{machine_key()} | packed decode {str(dtype).removeprefix('torch.')}"
    costs = measured_once(key, measure, lambda v: {int(m): tuple(float(t) for t in c) for m, c in v.items()})
    return costs[PACKING_ROWS[0] if rows <= 1 else PACKING_ROWS[1]]


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def memory_bytes(meminfo: str = "/proc/meminfo", limits=CGROUP_LIMITS) -> int:
    """The memory this process may use: the machine's (MemTotal), or a container's limit (cgroup v2 or v1) where
    that is lower; 0 where neither can be read."""
    found = []
    try:
        with open(meminfo, encoding="utf-8") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:")]
    except (OSError, ValueError, IndexError):
        pass
    for path in limits:
        try:
            with open(path, encoding="utf-8") as f:
                found.append(int(f.read().strip()))  # "max" (no limit) is not a number: skipped
        except (OSError, ValueError):
            pass
    return min(found, default=0)


def within_memory_share(nbytes: int) -> bool:
    """Whether packed copies of `nbytes` fit in the 1/PACK_MEMORY_SHARE of the memory they may take."""
    return nbytes <= memory_bytes() / PACK_MEMORY_SHARE


def _packing_pays(dtype: torch.dtype, steps: int, rows: int, backend: str) -> bool:
    """Whether a decode of `steps` steps over `rows` sequences packs its `dtype` weights: "onednn" says yes, "torch"
    no; "auto" where this CPU measured the packed product ≥ MIN_SPEEDUP × faster at that row count and `steps` of
    that gain repay the packing (on an AMD Zen 5 in fp32 it did not at one row: 1.01×)."""
    if backend != "auto" or steps < 1:
        return backend == "onednn" and steps >= 1
    plain, packed, pack = packing_costs(dtype, rows)
    return plain >= MIN_SPEEDUP * packed and steps * (plain - packed) >= pack


def _packed_linears(model: torch.nn.Module, steps: int, rows: int, backend: str) -> list[torch.nn.Linear]:
    """The frozen plain `nn.Linear`s of `model` a decode of `steps` steps over `rows` sequences packs (module
    docstring); [] where there is no packing op, the copies would take more than 1/PACK_MEMORY_SHARE of the memory,
    or packing does not pay."""
    if backend == "torch" or _pack_op() is None:
        return []
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype in PACKABLE
              and m.weight.device.type == "cpu" and not m.weight.requires_grad
              and (m.bias is None or (not m.bias.requires_grad and m.bias.dtype == m.weight.dtype))
              and ("forward" not in m.__dict__ or is_routed(m))]
    total = sum(m.weight.numel() * m.weight.element_size() for m in frozen)
    if not frozen or not within_memory_share(total):
        return []
    dtypes = {m.weight.dtype for m in frozen}
    pays = {d for d in dtypes if _packing_pays(d, steps, rows, backend)}
    return [m for m in frozen if m.weight.dtype in pays]


@contextmanager
def few_row_linear(model: torch.nn.Module, steps: int = 0, rows: int = 8, backend: str = "auto"):
    """The context a decoding loop of `steps` steps over `rows` sequences runs in, on CPU. The frozen plain
    `nn.Linear`s whose packing pays (`_packed_linears`: fp32 or bf16, oneDNN's routing of the base included) compute
    from copies packed for `rows` rows; of the others, where this CPU measured (W·xᵀ)ᵀ faster, every
    `torch.nn.Linear` of `model` with fp32 weights (exactly that class: not bitsandbytes' 4-bit layers; PEFT's LoRA
    layers are made of them) runs `_forward`; a module with its own `forward` (an accelerate hook, or oneDNN's
    routing: `rlhf_ext/cpu_linear.py`) keeps it. Instance attributes for the loop's duration, restored after, not a
    TorchFunctionMode: a mode puts a Python call in front of every tensor operation of the step (~3.5 µs × 90 000
    per 32-token rollout here). `backend`: `PPOConfig.cpu_matmul_backend` ("torch": no packing)."""
    check_backend(backend)
    saved = {}  # module → the instance forward it had (None: none)
    try:
        for m in _packed_linears(model, steps, rows, backend):
            plain = m.__dict__.get("forward")
            saved[m] = plain
            m.forward = _PackedForward(m, max(1, rows), plain or functools.partial(torch.nn.Linear.forward, m))
        linears = [] if torch.is_autocast_enabled("cpu") else [
            m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        few = rows_range() if linears else range(0)  # measured only where there is something to use it on
        for m in linears if few else ():
            saved[m] = None
            m.forward = functools.partial(_forward, m, few)
        yield
    finally:
        for m, plain in saved.items():
            if plain is None:
                del m.forward
            else:
                m.forward = plain
