"""Drawing tokens on CPU: torch.multinomial against `rlhf_ext.ppo.sampling.draw`, then the trainer's whole rollout
generate() with transformers' loop and with `sampling.decode` (ppo_throughput's configuration).

    python benchmarks/sampling_draw.py                    # 8 rows × SmolLM2's 49,152 tokens; rollouts in fp32 and bf16
    python benchmarks/sampling_draw.py --rows 8 --vocab 151936 --no-rollout

Prints milliseconds per draw (median of --repeat after a warm-up) and seconds per 32-token rollout (median of
--pairs, the two loops alternated), each with its ratio to transformers' own path in the same run.
"""

from __future__ import annotations

import argparse

import torch

from _common import alternated  # (importing _common also sets the offline env and flushes denormals)
from ppo_floor import timed  # median seconds after a warm-up
from rlhf_ext.ppo.sampling import draw


def rollouts(precision: str, pairs: int) -> tuple[float, float]:
    """Median seconds per rollout of the benchmark trainer's generate(), transformers' loop and `decode` alternated
    `pairs` times after a warm-up of each (the machine's drift falls on both alike) → (transformers', decode's)."""
    from ppo_throughput import trainer_at

    tr = trainer_at(precision)
    pol, batch = tr.policy, tr._next_prompts()
    fast, theirs = alternated(lambda on: setattr(pol, "cpu_sampling", on),  # off: PPOConfig(cpu_fast_sampling=False)
                              lambda: pol.generate(batch, tr.tokenizer, 32, 1.0, False), pairs)
    return theirs, fast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--pairs", type=int, default=5, help="rollouts of each loop, alternated")
    ap.add_argument("--no-rollout", action="store_true")
    a = ap.parse_args()
    probs = torch.softmax(torch.randn(a.rows, a.vocab, generator=torch.Generator().manual_seed(0)) * 3, -1)
    multinomial = timed(lambda: torch.multinomial(probs, 1), a.repeat)
    inverse_cdf = timed(lambda: draw(probs), a.repeat)
    print(f"{a.rows} rows × {a.vocab} tokens, {torch.get_num_threads()} threads: torch.multinomial "
          f"{multinomial * 1e3:.2f} ms, draw {inverse_cdf * 1e3:.2f} ms ({multinomial / inverse_cdf:.1f}× faster)")
    if a.no_rollout:
        return
    for precision in ("fp32", "bf16"):
        theirs, ours = rollouts(precision, a.pairs)
        print(f"{precision}: 32-token rollout, transformers' loop {theirs:.2f} s, decode {ours:.2f} s "
              f"(saves {theirs - ours:.2f} s, {1 - ours / theirs:.0%})")


if __name__ == "__main__":
    main()
