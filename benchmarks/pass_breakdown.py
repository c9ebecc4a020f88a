"""Where one PPO pass goes: the benchmark trainer's no-gradient forward over a rollout (ppo_throughput's configuration,
LoRA on all layers), timed per module type, beside the same matmuls run alone.

    python benchmarks/pass_breakdown.py                     # fp32 and bf16
    python benchmarks/pass_breakdown.py --precision bf16 --repeat 5
    python benchmarks/pass_breakdown.py --ops --precision fp32   # a training forward + backward, per tensor operation

For each precision it prints
  * the forward's seconds (median of --repeat) with and without the timing hooks (the hooks' own cost);
  * each module type's exclusive time (its own time, its children's subtracted), largest first; `Linear` covers the
    base layers, LoRA's A and B and PEFT's wrapper around them;
  * "matmuls alone": every base `nn.Linear` of the model (the LM head at R + 1 positions a row, as the pass runs it)
    applied to random inputs of the pass's row count through its own forward (oneDNN where the trainer routed it,
    rlhf_ext/cpu_linear.py) — what the pass would cost if it were nothing but its matmuls.
With `--ops`, one training forward + backward of the same trainer (the update's step) instead, every tensor operation
timed as it runs (`op_times`: the time inside each ATen operation; what is outside them — Python, autograd's
bookkeeping — is the pass's time less their sum), grouped into products, attention and the rest, and each product
shape's rate in the pass beside the same product timed alone, its operands hot in cache.
A pass whose time is mostly `Linear`, close to "matmuls alone", is bound by this CPU's matmul rate: what is left to
gain there is in the kernels, not in the code around them.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _common  # noqa: F401  (sets the offline env and flushes denormals)
from ppo_floor import matmul_rate, timed, training_step  # timed: median seconds after a warm-up
from ppo_throughput import trainer_at


def exclusive_times(model: torch.nn.Module, fn, repeat: int) -> tuple[dict, dict, float]:
    """{module type: exclusive seconds per call of fn}, {type: calls per fn}, seconds per fn with the hooks on."""
    own, calls, stack = defaultdict(float), defaultdict(int), []

    def pre(module, *_):
        stack.append([time.perf_counter(), 0.0])

    def post(module, *_):
        t0, children = stack.pop()
        dt = time.perf_counter() - t0
        own[type(module).__name__] += dt - children
        calls[type(module).__name__] += 1
        if stack:
            stack[-1][1] += dt

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        fn()
        own.clear()
        calls.clear()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        total = (time.perf_counter() - t0) / repeat
    finally:
        for h in hooks:
            h.remove()
    return {k: v / repeat for k, v in own.items()}, {k: v // repeat for k, v in calls.items()}, total


PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "_linear_pointwise", "linear"}
VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "expand", "unsqueeze", "squeeze", "detach",
         "as_strided", "alias", "permute", "reshape", "split", "split_with_sizes", "chunk", "unbind"}


class OpTimer(TorchDispatchMode):
    """Times every ATen operation run inside it (forward and backward alike): `seconds[name]`, `calls[name]`, and for
    the 2-D products `products[(m, k, n, dtype, onednn)] → [calls, seconds]` — torch.mm's and addmm's operand shapes,
    and oneDNN's linear (`cpu_linear`'s frozen fp32 base) as x [m, k] · w [n, k]ᵀ."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls, self.products = Counter(), Counter(), defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t0
        name = func.overloadpacket.__name__
        self.seconds[name] += dt
        self.calls[name] += 1
        key = None
        if name in ("mm", "addmm"):
            a, b = args[-2], args[-1]
            key = (a.shape[0], a.shape[1], b.shape[1], a.dtype, False)
        elif name == "_linear_pointwise":
            x, w = args[0], args[1]
            key = (x.numel() // x.shape[-1], w.shape[1], w.shape[0], x.dtype, True)
        if key is not None:
            entry = self.products[key]
            entry[0] += 1
            entry[1] += dt
        return out


def category(name: str) -> str:
    if name in PRODUCTS:
        return "products"
    if "attention" in name:
        return "attention"
    return "views (no data moved)" if name in VIEWS else "element-wise and the rest"


def op_times(fn) -> OpTimer:
    """Run `fn` once inside an `OpTimer` and return it."""
    with OpTimer() as timer:
        fn()
    return timer


def report_ops(tr, ro, repeat: int) -> None:
    """`--ops`: one training forward + backward of the update (`ppo_floor.training_step`), each operation timed."""
    plain = timed(lambda: training_step(tr, ro), repeat)
    timer = op_times(lambda: training_step(tr, ro))
    inside = sum(timer.seconds.values())
    groups = Counter()
    for name, s in timer.seconds.items():
        groups[category(name)] += s
    print(f"\n  one training forward + backward: {plain * 1e3:.0f} ms; inside tensor operations {inside * 1e3:.0f} ms "
          f"(timed, {sum(timer.calls.values())} operations)")
    for group, s in groups.most_common():
        print(f"    {group:28s} {s * 1e3:8.1f} ms  {s / inside:5.1%}")
    print("  the largest operations:")
    for name, s in timer.seconds.most_common(12):
        print(f"    {name:44s} {s * 1e3:8.1f} ms  {timer.calls[name]:5d} calls")
    print("  products by shape (m × k × n): in the pass against alone, hot in cache:")
    for (m, k, n, dtype, onednn), (count, s) in sorted(timer.products.items(), key=lambda kv: -kv[1][1])[:10]:
        flop = 2 * m * k * n * count
        print(f"    {m:5d} × {k:5d} × {n:6d} {str(dtype)[6:]:9s}{' oneDNN' if onednn else ''} {count:4d} calls "
              f"{s * 1e3:7.1f} ms {flop / s / 1e9:6.0f} GFLOP/s in the pass, "
              f"{matmul_rate(m, k, n, dtype, onednn):6.0f} alone")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", action="store_true", help="a training forward + backward, per tensor operation")
    a = ap.parse_args()
    for precision in a.precision.split(","):
        tr = trainer_at(precision)
        ro = tr._rollout(tr._next_prompts())
        if a.ops:
            print(f"\n{precision}: {ro.ids.shape[0]} × {ro.ids.shape[1]} tokens")
            report_ops(tr, ro, a.repeat)
            continue
        pol = tr.policy
        n_shared = pol._n_shared(ro.ids, ro.mask, ro.R)  # 0 where the pass runs full rows
        rows = n_shared + ro.ids.shape[0] * (ro.ids.shape[1] - n_shared)

        @torch.no_grad()
        def forward():
            pol(ro.ids, ro.mask, ro.R, ro.h_low, training=False)

        own, calls, with_hooks = exclusive_times(pol, forward, a.repeat)
        plain = timed(forward, a.repeat)
        base = pol.peft.get_base_model()
        head = base.get_output_embeddings()
        linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
        weights = [m.weight for m in linears]
        head_rows = ro.ids.shape[0] * (ro.R + 1)  # the head runs at `logits_to_keep` = R + 1 positions a row
        inputs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

        @torch.no_grad()
        def matmuls():  # each module's own forward: the kernel the pass uses (oneDNN where cpu_linear routed it)
            for m in linears:
                x = inputs[m.weight.shape[1], m.weight.dtype]
                m(x[:head_rows] if m is head else x)

        alone = timed(matmuls, a.repeat)
        flops = sum(2 * w.numel() * (head_rows if w is head.weight else rows) for w in weights)
        print(f"\n{precision}: one no-gradient pass over {ro.ids.shape[0]} × {ro.ids.shape[1]} tokens "
              f"({rows} token rows: {n_shared} shared prompt tokens run once), {plain * 1e3:.0f} ms "
              f"({with_hooks * 1e3:.0f} ms with the timing hooks)")
        for name, s in sorted(own.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {name:28s} {s * 1e3:8.1f} ms  {s / with_hooks:5.1%}  {calls[name]:5d} calls")
        print(f"  matmuls alone ({len(weights)} base linears, {flops / 1e9:.1f} GFLOP): {alone * 1e3:.0f} ms "
              f"({flops / alone / 1e9:.0f} GFLOP/s) = {alone / plain:.0%} of the pass")
        del tr, ro, pol


if __name__ == "__main__":
    main()
