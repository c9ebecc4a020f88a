"""Decoding's few-row matmuls on this CPU: F.linear (x·Wᵀ) against (W·xᵀ)ᵀ, the order rlhf_ext/ppo/cpu_matmul.py
uses while decoding where it measures faster.

    python benchmarks/cpu_decode_matmul.py             # the matmuls alone, SmolLM2-135M's weight shapes
    python benchmarks/cpu_decode_matmul.py --rollout   # + the throughput benchmark's 32-token rollout, both orders
    python benchmarks/cpu_decode_matmul.py --packed --rows 1,8,32,64   # unpacked against prepacked weights,
                                                                        # fp32 and bf16
    python benchmarks/cpu_decode_matmul.py --packed --rollout --precision bf16   # + the rollout: lean steps,
                                                                   # the model's from packed weights, unpacked

The matmuls: one pass over SmolLM2-135M's 211 weight matrices (30 layers × q, k, v, o, gate, up, down, and the LM
head: 545 MB in fp32, more than any cache) at M rows, best of 5, fp32, torch's threads as set. "(W·xᵀ)ᵀ" includes
making the result contiguous, as the model's next operations need it. Then the calibration, run now, beside the
range this machine keeps (`rows_range()`, what the trainer uses). `--rollout`: the throughput benchmark's trainer
(ppo_throughput.py, fp32, all-layer LoRA), its first batch sampled 32 tokens at a time with the few-row order on and
off, alternated `--repeats` times.
`--packed`: the same pass over the weights in fp32 and bf16 from F.linear, from oneDNN with the weights as they are
(`onednn_product`), and from copies packed once by oneDNN (`packed_weight`, what decoding uses where it pays:
cpu_matmul.py), the time to pack all 211, and this machine's kept `packing_costs`; with `--rollout`, the rollout in
`--precision` three ways, alternated: lean steps (ppo/cpu_decode.py), the model's steps from packed weights, and the
model's steps from the weights as they are.
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (sets the offline env and flushes denormals)
from rlhf_ext.ppo import cpu_matmul

# SmolLM2-135M: hidden 576, 9 heads of 64 (3 KV heads), MLP 1536, 30 layers, vocabulary 49152
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SHAPES = LAYER * 30 + [(49152, 576)]


def matmul_table(rows_list):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*s, generator=g) for s in SHAPES]
    flops_per_row = sum(2 * o * i for o, i in SHAPES)
    print(f"{'rows':>5} | {'F.linear ms':>11} | {'(W·xᵀ)ᵀ ms':>11} | {'GFLOP/s':>15} | speed-up")
    with torch.no_grad():
        for m in rows_list:
            x = {i: torch.randn(m, i, generator=g) for i in (576, 1536)}
            plain = cpu_matmul.best_seconds(lambda: [F.linear(x[w.shape[1]], w) for w in weights])
            tall = cpu_matmul.best_seconds(lambda: [cpu_matmul.tall_linear(x[w.shape[1]], w) for w in weights])
            rate = f"{flops_per_row * m / plain / 1e9:.1f} / {flops_per_row * m / tall / 1e9:.1f}"
            print(f"{m:>5} | {plain * 1e3:>11.1f} | {tall * 1e3:>11.1f} | {rate:>15} | {plain / tall:.2f}×",
                  flush=True)


def rollout_ab(repeats: int):
    from ppo_throughput import trainer_at

    tr = trainer_at("fp32")
    batch = tr._next_prompts()
    rows = cpu_matmul.rows_range()
    times = {"on": [], "off": []}
    for _ in range(repeats):
        for key, r in (("on", rows), ("off", range(0))):
            cpu_matmul.rows_range = lambda r=r: r
            t0 = time.perf_counter()
            tr.policy.generate(batch, tr.tokenizer, 32, 1.0, False)
            times[key].append(time.perf_counter() - t0)
    on, off = times["on"], times["off"]
    print(f"\n32-token rollout of {len(batch)} prompts (ppo_throughput's trainer, fp32), {repeats} alternated runs:")
    runs = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    print(f"  few-row order (rows {rows.start}–{rows.stop - 1}): median {median(on):.2f} s  ({runs(on)})")
    print(f"  F.linear throughout:        median {median(off):.2f} s  ({runs(off)})")
    print(f"  speed-up {median(off) / median(on):.2f}×")


def packed_table(rows_list):
    g = torch.Generator().manual_seed(0)
    flops_per_row = sum(2 * o * i for o, i in SHAPES)
    for dtype in cpu_matmul.PACKABLE:
        weights = [torch.randn(*s, generator=g).to(dtype) for s in SHAPES]
        print(f"\n{str(dtype).removeprefix('torch.')}: {sum(w.nbytes for w in weights) / 2**20:.0f} MiB of weights")
        print(f"{'rows':>5} | {'pack ms':>7} | {'F.linear ms':>11} | {'oneDNN ms':>9} | {'packed ms':>9} | "
              f"{'packed GFLOP/s':>14} | packed vs the faster unpacked")
        with torch.no_grad():
            for m in rows_list:
                x = {i: torch.randn(m, i, generator=g).to(dtype) for i in (576, 1536)}
                t0 = time.perf_counter()
                packed = [cpu_matmul.packed_weight(w, m) for w in weights]
                pack = time.perf_counter() - t0
                plain = cpu_matmul.best_seconds(lambda: [F.linear(x[w.shape[1]], w) for w in weights])
                onednn = cpu_matmul.best_seconds(
                    lambda: [cpu_matmul.onednn_product(x[w.shape[1]], w) for w in weights])
                fast = cpu_matmul.best_seconds(
                    lambda: [cpu_matmul.onednn_product(x[w.shape[1]], p) for w, p in zip(weights, packed)])
                print(f"{m:>5} | {pack * 1e3:>7.1f} | {plain * 1e3:>11.2f} | {onednn * 1e3:>9.2f} | "
                      f"{fast * 1e3:>9.2f} | {flops_per_row * m / fast / 1e9:>14.1f} | "
                      f"{min(plain, onednn) / fast:.2f}×", flush=True)
                del packed
        for m in cpu_matmul.PACKING_ROWS:
            plain, fast, pack = cpu_matmul.packing_costs(dtype, m)
            pays = (f"pays after {pack / (plain - fast):.0f} steps" if plain >= cpu_matmul.MIN_SPEEDUP * fast
                    else f"not {cpu_matmul.MIN_SPEEDUP}× faster: never packed")
            print(f"kept packing_costs at {m} row(s), over the calibration weights: {plain * 1e3:.2f} ms unpacked, "
                  f"{fast * 1e3:.2f} ms packed, packing {pack * 1e3:.2f} ms: {pays}")


def rollout_packed_ab(precision: str, repeats: int):
    from ppo_throughput import trainer_at

    from rlhf_ext.ppo.cpu_decode import LeanDecoder

    tr = trainer_at(precision)
    batch = tr._next_prompts()
    fits = LeanDecoder.fits
    variants = {  # decoding's backend, and whether a Llama-family model takes lean steps (cpu_decode.py)
        "lean steps from packed weights": ("onednn", fits),
        "the model's steps from packed weights": ("onednn", lambda *a: None),
        "the model's steps, unpacked": ("torch", fits)}
    times = {name: [] for name in variants}
    try:
        for rep in range(repeats + 1):  # the first round: first-use costs, not timed
            for name, (backend, lean) in variants.items():
                tr.policy.cpu_matmul_backend, LeanDecoder.fits = backend, staticmethod(lean)
                t0 = time.perf_counter()
                tr.policy.generate(batch, tr.tokenizer, 32, 1.0, False)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    finally:
        LeanDecoder.fits = staticmethod(fits)
    runs = lambda ts: ", ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    print(f"\n32-token rollout of {len(batch)} prompts (ppo_throughput's trainer, {precision}), {repeats} alternated "
          "(packing included):")
    base = median(times["the model's steps, unpacked"])
    for name, ts in times.items():
        print(f"  {name:40s} median {median(ts):.3f} s, {base / median(ts):.2f}× the unpacked  ({runs(ts)})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,424", help="comma list of row counts")
    ap.add_argument("--rollout", action="store_true", help="also time the throughput benchmark's rollout")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--packed", action="store_true", help="unpacked against packed weights (fp32 and bf16)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="--packed --rollout's trainer")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    if args.packed:
        packed_table([int(r) for r in args.rows.split(",")])
        if args.rollout:
            rollout_packed_ab(args.precision, args.repeats)
        return 0
    matmul_table([int(r) for r in args.rows.split(",")])
    t0 = time.perf_counter()
    now = cpu_matmul.calibrate()
    print(f"\ncalibrate() now: {now} ({time.perf_counter() - t0:.2f} s); the range this machine keeps (rows_range(), "
          f"$RLHF_EXT_CACHE/cpu_matmul.json): {cpu_matmul.rows_range()} — an empty range keeps F.linear")
    if args.rollout:
        rollout_ab(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
