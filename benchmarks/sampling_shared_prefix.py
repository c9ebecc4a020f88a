"""Sampling from a prefilled prompt head: the benchmark trainer's generate() with the rows' common prompt head run once
(`PPOConfig.share_prompt_prefix`, the default) and without it (ppo_throughput's configuration and first batch).

    python benchmarks/sampling_shared_prefix.py               # fp32 and bf16, 32 tokens and the prefill alone (1)
    python benchmarks/sampling_shared_prefix.py --precision bf16 --pairs 10

Prints seconds per generate() (median of --pairs, the two alternated after a warm-up of each, so the machine's drift
falls on both alike) and whether the fp32 tokens drawn from one seed are the same.
"""

from __future__ import annotations

import argparse

import torch

from _common import alternated  # (importing _common also sets the offline env and flushes denormals)
from ppo_throughput import trainer_at
from rlhf_ext.data import pad_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--pairs", type=int, default=6)
    a = ap.parse_args()
    for precision in a.precision.split(","):
        tr = trainer_at(precision)
        pol, batch = tr.policy, tr._next_prompts()
        ids, mask = pad_ids([p for _, p in batch], pol.pad_id, side="left", device=pol.device)
        head = pol._n_shared(ids, mask, 0, 32)
        print(f"{precision}: {len(batch)} prompts, {head} common tokens ({tr.startup['shared_prompt_prefix']})")
        drawn = {}
        for share in (True, False):
            pol.share_prefix = share
            torch.manual_seed(5)
            drawn[share] = pol.generate(batch, tr.tokenizer, 32, 1.0, False).resp
        for n_new in (32, 1):
            on, off = alternated(lambda share: setattr(pol, "share_prefix", share),
                                 lambda: pol.generate(batch, tr.tokenizer, n_new, 1.0, False), a.pairs)
            print(f"  {n_new:2d} token(s): shared head {on:.3f} s, full prompts {off:.3f} s ({1 - on / off:.0%} less)")
        print(f"  same tokens drawn: {torch.equal(drawn[True], drawn[False])} (expected in fp32; bf16 rounds otherwise)")


if __name__ == "__main__":
    main()
