"""A frozen base's fp32 matmuls on CPU through oneDNN, where this CPU runs them faster than torch's default BLAS.

torch computes an fp32 `F.linear` on CPU with MKL's sgemm, and MKL chooses its kernels by CPU vendor: on an AMD EPYC
Zen 5 (AVX-512, torch 2.13) `MKL_VERBOSE=1` names only "Intel(R) Architecture processors" where oneDNN reports
"avx512_core", and SmolLM2-135M's [424, 576] × [576, 1536] product took 4.5 ms with `F.linear` against 2.3 ms through
oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel torch's own compiler emits for CPU linears), its
input-gradient product 3.8 against 1.7 ms, an 8-row decoding step's 0.30 against 0.15 ms (`python
benchmarks/cpu_linear.py`). Both are fp32 products, equal to rounding in the order of a sum. On an Intel CPU MKL's
own AVX-512 kernels may be as fast: the calibration decides, per machine.

So, where a calibration measured oneDNN faster on this machine (`onednn_faster`, kept per machine like decoding's
calibration), every plain `nn.Linear` of the model with fp32 weights on CPU gets a forward that sends a *frozen*
layer (weight and bias without gradients: the base under LoRA, the reference, a reward member) through oneDNN, its
backward computing the input gradient only (dX = dY·W, the adapters below need it; a frozen weight needs none).
A trainable layer (LoRA's A and B, the value head, a fully trained model), a bf16 one, autocast, a GPU: `F.linear`,
decided at each call, so training an adapter or moving the model changes nothing. Installed once for the trainer's
life, not per pass: θ_old, the training pass, the reference, the critic, the KL checks, the checkpointed layers'
recomputation and the start-up checks all compute one function, so the KL at θ₀ is still exactly 0 (tested).
"""

from __future__ import annotations

import functools
import json
import platform
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_LINEAR = F.linear
BACKENDS = ("auto", "onednn", "torch")
MIN_SPEEDUP = 1.1  # what a calibration must measure before the other kernel is used: noise is not a reason


@functools.cache
def _onednn_op():
    """torch's oneDNN linear (a private op of torch's CPU compiler), or None where this build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def onednn_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x·wᵀ + b through oneDNN. x [..., in], w [out, in] (any strides), b [out] → [..., out]."""
    return _onednn_op()(x, w, b, "none", [], "")


def row_bucket(rows: int) -> int:
    """The row count a product of `rows` rows is computed at: `rows` up to 32, else rounded up to a multiple of
    2^(⌊log₂ rows⌋ − 4) — 16 sizes per doubling, at most 6.25 % more rows. oneDNN compiles kernels for each new shape
    and keeps them (≈ 0.7 MiB per product shape, measured): PPO's passes change their row count with every
    rollout's lengths, and unrounded, a long run's RSS grew by that much for each new length."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


def _bucketed_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`onednn_product` computed at `row_bucket(rows)` rows, the extra rows zero. Every pass pads a row count alike,
    so the passes still compute one function (on Zen 5 a row's result measured the same bits at any count ≥ 2)."""
    rows = x.numel() // x.shape[-1]
    target = row_bucket(rows)
    if target == rows:
        return onednn_product(x, w, b)
    padded = x.new_zeros(target, x.shape[-1])
    padded[:rows] = x.reshape(rows, x.shape[-1])
    return onednn_product(padded, w, b)[:rows].view(*x.shape[:-1], w.shape[0])


class _FrozenLinear(torch.autograd.Function):
    """y = x·Wᵀ + b through oneDNN with W and b frozen: the backward returns dX = dY·W (through oneDNN too) and no
    gradient for W or b."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(w)
        y = _bucketed_product(x, w, b)
        # a view of the padded result would forbid the in-place ops models apply to a linear's output (Llama 4's MoE)
        return y if y._base is None else y.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return _bucketed_product(g, w.t()), None, None


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A routed module's forward: oneDNN for a frozen fp32 layer on CPU outside autocast, `F.linear` otherwise."""
    w, b = module.weight, module.bias
    if (x.dtype is torch.float32 and w.dtype is torch.float32 and x.device.type == "cpu" and w.device.type == "cpu"
            and not w.requires_grad and not (b is not None and b.requires_grad)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        # (under torch.compile: F.linear, which the compiler lowers itself — inductor cannot lower the oneDNN op from
        # an eager-mode call, and a routed model the user compiles after training failed)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, w, b)
        return _bucketed_product(x, w, b)
    return _LINEAR(x, w, b)


def is_routed(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _forward


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"cpu_matmul_backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}.")


def route_frozen_linears(models, backend: str = "auto", device: torch.device | None = None) -> int:
    """Install the oneDNN forward on every frozen plain `nn.Linear` with fp32 weights on CPU in `models` (one module or
    several: a policy's base, reward models loaded beside it) when `backend` is "onednn", or "auto" and this CPU
    measured it faster; "torch", or a `device` to train on that is not the CPU (the model still on CPU before it
    moves there): nothing, and no calibration. A module that already has its own `forward` (an accelerate hook) is
    left alone. Returns how many modules are routed."""
    check_backend(backend)
    if device is not None and torch.device(device).type != "cpu":
        return 0
    models = models if isinstance(models, (list, tuple)) else [models]
    # frozen ones only: a trained layer (a LoRA factor, a full-mode trunk) always takes F.linear (`_forward`), and
    # counting it made the model card's "N frozen fp32 linears" wrong
    linears = {id(m): m for model in models for m in model.modules() if type(m) is torch.nn.Linear
               and m.weight.dtype is torch.float32 and m.weight.device.type == "cpu" and not m.weight.requires_grad
               and ("forward" not in m.__dict__ or is_routed(m))}.values()  # a model listed twice counts once
    if backend == "torch" or not linears:
        return 0
    if backend == "onednn" and _onednn_op() is None:
        raise ValueError("cpu_matmul_backend='onednn', but this torch build has no oneDNN (torch.backends.mkldnn is "
                         "not available): use 'auto' or 'torch'.")
    if backend == "auto" and not onednn_faster():
        return 0
    for m in linears:
        m.forward = functools.partial(_forward, m)
    return len(linears)


# -- calibration: measured once per machine, kept ------------------------------------------------------------------
def best_seconds(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_key() -> str:
    """The CPU (name, family and model: a VM may name every EPYC alike), torch and its threads (read at each call:
    a process may change them between runs, `kept_per_machine`)."""
    return (f"{_cpu_name()} | torch {torch.__version__} | {torch.backends.cpu.get_cpu_capability()} | "
            f"{torch.get_num_threads()} threads")


@functools.cache
def _cpu_name() -> str:
    cpu = {"model name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("model name", "cpu family", "model"):
                    cpu[k.strip()] = v.strip()
                if not line.strip():
                    break  # the first processor's block is enough
    except OSError:
        pass
    return f"{cpu['model name']} (family {cpu.get('cpu family', '?')} model {cpu.get('model', '?')})"


def kept_per_machine(measure_for):
    """`measure_for(machine_key())`, remembered in this process per key. Not `functools.cache` on a function without
    arguments: that kept the first thread count's answer for the whole process, so a sweep that changed
    `torch.set_num_threads` between runs computed its later runs with kernels chosen for the first (other rounding
    than the same run in a new process, and the model card said so). `.cache_clear()` forgets every key."""
    kept = functools.cache(measure_for)

    def value():
        return kept(machine_key())

    value.__name__, value.__qualname__ = measure_for.__name__, measure_for.__qualname__
    value.__doc__ = measure_for.__doc__
    value.cache_clear = kept.cache_clear
    return value


def _read_cache(path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


@contextmanager
def _measuring_alone(path):
    """An exclusive lock on `path`.lock while this process measures. The processes of a DDP run on one machine start
    together, each with the same empty cache: with the lock they measure one after another (the first alone on the
    CPU, its neighbours waiting) and the others read what it wrote, so every rank computes with the same kernels.
    Where there is no `fcntl` (Windows) or no writable folder: no lock, each process measures."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(path, key: str, decode) -> tuple[bool, object]:
    """(True, decode(entry)) where the cache holds a readable entry `key`; (False, None) otherwise."""
    known = _read_cache(path)
    if key in known:
        try:
            return True, decode(known[key])
        except (ValueError, KeyError, TypeError, AttributeError):  # an entry of another shape: measured again
            pass
    return False, None


def measured_once(key: str, measure, decode):
    """`decode(value)` of this machine's entry `key` in `$RLHF_EXT_CACHE/cpu_matmul.json`, or `measure()`'s value,
    written there for the next process. A timing near a threshold could come out either way, and two runs of one seed
    on one machine must compute alike, whichever process they run in (DDP's ranks too: `_measuring_alone`). An
    unreadable or unwritable cache only means measuring again; other entries are kept."""
    from .integrity import write_text_atomic
    from .models import cache_dir

    path = cache_dir() / "cpu_matmul.json"
    found, value = _cached(path, key, decode)
    if found:
        return value
    with _measuring_alone(path):
        found, value = _cached(path, key, decode)  # another process may have measured while this one waited
        if found:
            return value
        value = measure()
        try:  # re-read: keep the entries other processes wrote meanwhile
            write_text_atomic(path, json.dumps({**_read_cache(path), key: value}, indent=1))
        except OSError:
            pass
    return decode(value)


def calibration_weights(g: torch.Generator, count: int = 8) -> list[torch.Tensor]:
    """What the CPU matmul calibrations time their products over: `count` of SmolLM2-135M's [1536, 576] fp32 MLP
    weights, 3.4 MiB each (8: 27 MiB, more than a core's caches hold; decoding's packing calibration takes 24, 81 MiB,
    more than a 32 MiB L3 too, as a model's weights are: there, at one row, a product from cache-resident weights
    measured packing 1.17× faster where over a model's weights it was not, 1.00×)."""
    return [torch.randn(1536, 576, generator=g) for _ in range(count)]


def calibrate() -> bool:
    """Whether oneDNN measured at least MIN_SPEEDUP × faster than torch's fp32 product on this CPU for a training pass's
    rows (forward and input gradient, 256 rows) and no slower for a decoding step's (8 rows), over
    `calibration_weights`."""
    if _onednn_op() is None:
        return False
    g = torch.Generator().manual_seed(0)
    weights = calibration_weights(g)
    few, many, grad = (torch.randn(8, 576, generator=g), torch.randn(256, 576, generator=g),
                       torch.randn(256, 1536, generator=g))
    pairs = [  # (torch's product, oneDNN's, the speed-up it must reach)
        (lambda: [_LINEAR(many, w) for w in weights], lambda: [onednn_product(many, w) for w in weights], MIN_SPEEDUP),
        (lambda: [torch.mm(grad, w) for w in weights], lambda: [onednn_product(grad, w.t()) for w in weights],
         MIN_SPEEDUP),
        (lambda: [_LINEAR(few, w) for w in weights], lambda: [onednn_product(few, w) for w in weights], 1.0),
    ]
    with torch.no_grad():
        for theirs, ours, need in pairs:
            try:
                ours()  # first-use costs out of the timing
            except RuntimeError:  # a build whose oneDNN cannot run this product here: torch's kernel, then
                return False
            if best_seconds(theirs) < need * best_seconds(ours):
                return False
    return True


@kept_per_machine
def onednn_faster(key: str) -> bool:
    """`calibrate()` for this machine (`machine_key`, its thread count included), measured once and kept; called
    without arguments."""
    return measured_once(key + " | onednn linear", calibrate, bool)
