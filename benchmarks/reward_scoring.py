"""Scoring cost of reward ensembles on one shared base.

    python benchmarks/reward_scoring.py [--tiny] [--batch 32] [--repeats 5]

Prints, on the same inputs: the time to score with a single reward model (K=1), with K=4 `heads` (one trunk
pass, target ≤ 1.3× single), and with K=4 `adapters` (one mixed-adapter batch); plus parameters resident and
peak RSS, to show that K adapters cost about one base in memory.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig
from torch import nn

from _common import baseline_prompts, median, peak_rss_mib, unique_params
from rlhf_ext.adapters import wrap_with_peft
from rlhf_ext.models import load_model, load_tokenizer
from rlhf_ext.data import pad_ids
from rlhf_ext.reward.ensemble import RewardEnsemble, reward_input_ids


def build(base, mode: str, K: int, hidden: int) -> RewardEnsemble:
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters = ["reward"] if mode == "heads" else [f"reward_{k}" for k in range(K)]
    torch.manual_seed(0)
    model = wrap_with_peft(base, LoraConfig(**lora), adapters[0])
    for a in adapters[1:]:
        model.add_adapter(a, LoraConfig(**lora))
    for n, p in model.named_parameters():  # random LoRA-B so every member computes something different
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    heads = nn.ModuleDict({a: nn.Linear(hidden, K if mode == "heads" else 1) for a in adapters})
    spec = {"mode": mode, "adapters": adapters, "members": [f"member_{k}" for k in range(K)]}
    return RewardEnsemble(model.eval(), None, spec, heads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="random 2-layer model (seconds, for a smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.tiny:
        from rlhf_ext.testing import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        make_base = lambda: tiny_causal_lm(tok).model  # noqa: E731
    else:
        tok = load_tokenizer(args.model)
        make_base = lambda: load_model(args.model, "trunk")  # noqa: E731
    prompts = baseline_prompts(args.batch)
    seqs = [reward_input_ids(tok, [{"role": "user", "content": p}],
                             [{"role": "assistant", "content": "It is a wonderful film with a great cast and a moving story."}])
            for p in prompts]
    ids, mask = pad_ids(seqs, tok.pad_token_id)
    print(f"inputs: {ids.shape[0]} sequences x {ids.shape[1]} tokens; torch threads {torch.get_num_threads()}")
    rss0 = peak_rss_mib()
    base = make_base()
    hidden = base.config.hidden_size
    n_base = unique_params(base)
    rows = {}
    for name, mode, K in (("single (K=1)", "heads", 1), ("K=4 heads", "heads", 4), ("K=4 adapters", "adapters", 4)):
        ens = build(copy.deepcopy(base) if name != "K=4 adapters" else base, mode, K, hidden)
        ens.score_ids(ids, mask)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = ens.score_ids(ids, mask)
            times.append(time.perf_counter() - t)
        assert out.shape == (ids.shape[0], K)
        rows[name] = (median(times), unique_params(ens.model, ens.heads))
    single = rows["single (K=1)"][0]
    print(f"{'configuration':16s} {'median s':>9s} {'x single':>9s} {'params resident':>16s} {'x one base':>10s}")
    for name, (t, n) in rows.items():
        print(f"{name:16s} {t:9.3f} {t / single:9.2f} {n / 1e6:14.2f} M {n / n_base:10.3f}")
    print(f"one base: {n_base / 1e6:.2f} M params; peak RSS of this process {peak_rss_mib():.0f} MiB "
          f"(before loading {rss0:.0f} MiB; the base was deep-copied twice for the K=1/K=4-heads rows)")


if __name__ == "__main__":
    main()
