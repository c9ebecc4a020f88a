"""How short can a PPO iteration be on this machine? A floor under `iteration / generation` (ppo_throughput's goal).

    python benchmarks/ppo_floor.py     # the ppo_throughput configuration the goal is set on: LoRA on all layers, fp32
    python benchmarks/ppo_floor.py --precision bf16   # bf16 weights + autocast, as ppo_throughput's bf16 rows; the
                                                      # rates are then bf16 matmul rates

Everything after sampling is dense matmuls whose count is fixed by the algorithm, not by the implementation:

    reference forward (adapters off)                 F_layers + F_head
    reward member forward (its adapter, no LM head)  F_layers
    each PPO epoch: forward + backward               2 (F_layers + F_head)   (θ_old is epoch 1's forward)

F_full = 2 × (matmul weights of the decoder, LoRA included) × B·T tokens + attention (QKᵀ, AV: 4·T·d per token and
layer); F_layers is the same over the token rows the policy's passes run: with the rows' common prompt head shared
(`PPOConfig.share_prompt_prefix`, on by default; `--share-prefix off` for full passes) that head's S tokens once
(attending to S keys) and each row's other T − S. A reward member hosted on the policy's base shares its batch's head
too; its rows (its own tokenization of prompt + completion) are counted as the policy's.
F_head = 2 · hidden · vocab × B·(R+1) (`logits_to_keep`). The backward of a frozen matmul still computes its
input gradient (the same FLOPs as its forward): the adapters below need it. Divided by the best rate this CPU
reaches (measured here: the model's matmul shapes and a 1024³ product, through torch's product and oneDNN's, and our
own passes), that is the least time the work after sampling can take, whatever the code; generation is measured with
the trainer's own `generate`. The script also times our real forward and forward + backward, to show how close to
that rate they run, and those passes' products alone — every linear call of the pass at its own shape, timed on its
own, with the backward's products for it — so that what is left of a pass (attention, element-wise work, casts,
Python) is a measured number too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from contextlib import nullcontext

import torch

import _common  # noqa: F401  (offline env, flush denormals)
from ppo_throughput import build_ours, parser
from rlhf_ext.cpu_linear import _onednn_op, onednn_product


def timed(fn, repeat: int = 3) -> float:
    """Median wall time (s) of `repeat` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, onednn: bool = False) -> float:
    """GFLOP/s of one [m, k] × [k, n] product in `dtype` on this CPU: torch's `@`, or oneDNN's linear (what the
    trainer runs a frozen fp32 base through where this CPU measured it faster, rlhf_ext/cpu_linear.py)."""
    a = torch.randn(m, k, dtype=dtype)
    if onednn:
        w = torch.randn(n, k, dtype=dtype)
        return 2 * m * k * n / timed(lambda: onednn_product(a, w), repeat=5) / 1e9
    b = torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / timed(lambda: a @ b, repeat=5) / 1e9


def training_step(tr, ro) -> None:
    """One training forward + backward of `tr`'s update over the rollout `ro` (the log-probs and values, as the PPO
    loss reads them), its gradients cleared after."""
    logits, values, logp = tr.train_policy(ro.ids, ro.mask, ro.R, ro.h_low)
    (logp.mean() + values.mean()).backward()
    for p in tr.trainable_parameters():
        p.grad = None


def decoder_flops(model, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of the decoder layers on `tokens` positions of length-`seq_len` sequences."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    weights = sum(m.weight.numel() for m in base.modules()
                  if isinstance(m, torch.nn.Linear) and m is not head)
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # None in some configs
    attn_width = cfg.num_attention_heads * head_dim
    return 2 * weights * tokens + 4 * seq_len * attn_width * cfg.num_hidden_layers * tokens


def linear_calls(model: torch.nn.Module, run) -> tuple[Counter, dict]:
    """Every `nn.Linear` product `run()` makes in `model` (LoRA's A and B included), counted by shape:
    (rows, in, out, compute dtype, input needs a gradient, weight gets one) → calls, and → one module that made it.
    The compute dtype is autocast's where it is on, else the weight's; without grad mode neither needs a gradient."""
    calls, modules = Counter(), {}

    def record(module, args):
        x = args[0]
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else module.weight.dtype
        grad = torch.is_grad_enabled()
        key = (x.numel() // x.shape[-1], module.in_features, module.out_features, dtype, grad and x.requires_grad,
               grad and module.weight.requires_grad)
        calls[key] += 1
        modules.setdefault(key, module)

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls, modules


def product_seconds(calls: Counter, modules: dict, backward: bool) -> float:
    """The time of `calls`' products (`linear_calls`), each shape timed alone in its dtype (median of 5): the forward's
    x·Wᵀ through the module that made it (so through oneDNN where `cpu_linear` routes the frozen base there), and with
    `backward` also the products autograd runs for them — dY·W where the input needs a gradient, dYᵀ·X where the
    weight is trained."""
    total = 0.0
    for key, count in calls.items():
        rows, k, n, dtype, input_grad, weight_grad = key
        module = modules[key]
        x, w, dy = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(rows, n, dtype=dtype)
        autocast = torch.autocast("cpu", dtype) if module.weight.dtype != dtype else nullcontext()
        with torch.no_grad(), autocast:
            total += count * timed(lambda: module(x), repeat=5)
        if backward and input_grad:
            total += count * timed(lambda: dy @ w, repeat=5)
        if backward and weight_grad:
            total += count * timed(lambda: dy.t() @ x, repeat=5)
    return total


def benchmark_args(args: argparse.Namespace) -> argparse.Namespace:
    """ppo_throughput's configuration with this script's options, every other one at that benchmark's default. LoRA on
    all layers: on the top layers only the frozen-prefix cache runs the layers below once per rollout, and the count
    here (every layer in every pass) would not hold."""
    return parser().parse_args(["--model", args.model, "--prompts", str(args.prompts), "--completion-length",
                                str(args.completion_length), "--epochs", str(args.epochs), "--precision", args.precision,
                                "--share-prefix", args.share_prefix, "--lora-layers", "0", "--iters", "1"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--share-prefix", choices=["on", "off"], default="on",
                    help="the policy's passes run the rows' common prompt head once (the trainer's default), or not")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tr = build_ours(benchmark_args(args))
    pol, a = tr.policy, tr.args

    batch = tr._next_prompts()
    gen_s = timed(lambda: pol.generate(batch, tr.tokenizer, a.max_completion_length, a.top_p, a.stop_on_eos))
    ro = pol.generate(batch, tr.tokenizer, a.max_completion_length, a.top_p, a.stop_on_eos)
    B, T = ro.ids.shape
    R = ro.R
    fwd_s = timed(lambda: pol.logits(ro.ids, ro.mask, R))

    fb_s = timed(lambda: training_step(tr, ro))
    # the same passes' products alone, at their own shapes: what is left of a pass is everything else
    calls, modules = linear_calls(pol.peft, lambda: tr.train_policy(ro.ids, ro.mask, R, None))
    fwd_products = product_seconds(*linear_calls(pol.peft, lambda: pol.logits(ro.ids, ro.mask, R)), backward=False)
    fb_products = product_seconds(calls, modules, backward=True)

    cfg = pol.peft.get_base_model().config
    S = pol._n_shared(ro.ids, ro.mask, R)  # the common head the reference and training passes run once (0: none)
    f_layers = decoder_flops(pol.peft, S, S) + decoder_flops(pol.peft, B * (T - S), T)  # full rows when S = 0
    f_head = 2 * cfg.hidden_size * cfg.vocab_size * B * (R + 1)
    after = (f_layers + f_head) + f_layers + args.epochs * 2 * (f_layers + f_head)  # reference, reward, epochs
    # the best rate seen anywhere: the model's two largest shapes, a large square product, our own passes
    kernels = [False, True] if _onednn_op() is not None else [False]
    peak = max(*(rate for onednn in kernels for rate in (
                   matmul_rate(B * T, cfg.hidden_size, cfg.intermediate_size, dtype, onednn),
                   matmul_rate(B * (R + 1), cfg.hidden_size, cfg.vocab_size, dtype, onednn),
                   matmul_rate(1024, 1024, 1024, dtype, onednn))),
               (f_layers + f_head) / fwd_s / 1e9, 2 * (f_layers + f_head) / fb_s / 1e9)
    floor_after = after / peak / 1e9
    real_after = 2 * fwd_s + args.epochs * fb_s  # reference, reward (≈ a policy forward), epochs

    print(f"\n{args.model}, LoRA on all layers, {args.precision}, {torch.get_num_threads()} threads; batch {B} × {T} "
          f"tokens ({R} response), {args.epochs} epochs; {S} common prompt tokens run once per policy pass "
          f"({S + B * (T - S)} token rows, the reward member's alike)")
    print(f"generation (the trainer's generate, median of 3)          {gen_s:7.2f} s")
    print(f"best {args.precision} rate seen (model shapes, 1024³: torch, oneDNN; our passes) {peak:7.1f} GFLOP/s")
    fwd = (f_layers + f_head) / 1e9
    print(f"one forward: {fwd:6.1f} GFLOP in {fwd_s:.2f} s = {fwd / fwd_s:5.1f} GFLOP/s; "
          f"forward + backward: {2 * fwd:6.1f} GFLOP in {fb_s:.2f} s = {2 * fwd / fb_s:5.1f} GFLOP/s")
    print(f"their products alone ({sum(calls.values())} linear calls a pass, each shape timed on its own): forward "
          f"{fwd_products:.2f} s, forward + backward {fb_products:.2f} s → the rest (attention, element-wise work, "
          f"casts, Python) {fwd_s - fwd_products:.2f} s / {fb_s - fb_products:.2f} s")
    print(f"after sampling: {after / 1e9:.0f} GFLOP (reference + reward forwards, {args.epochs} × forward + backward)")
    print(f"  at the best matmul rate (floor)                           {floor_after:7.2f} s  → iteration / generation "
          f"≥ {(gen_s + floor_after) / gen_s:.2f}")
    print(f"  at our measured pass times                                {real_after:7.2f} s  → iteration / generation "
          f"≈ {(gen_s + real_after) / gen_s:.2f}")


if __name__ == "__main__":
    main()
