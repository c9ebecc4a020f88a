"""What a trained reward model learned on the shipped sentiment data: the annotator's labels, the gold judge, length.

    python benchmarks/reward_gold_accuracy.py outputs/reward-smollm2-sentiment [--data-dir data/sentiment]

The held-out pairs carry the gold VADER score and word count of both responses, so besides the pairwise accuracy
on the (noisy, length-biased) labels (ensemble mean of raw member rewards, as in
the trainer's `eval_accuracy_ensemble`) this prints how often the ensemble mean ranks the gold-better response higher,
the same on "conflict" pairs (the longer response has the lower gold score: a length-driven reward model fails
these), and the Pearson correlation of the reward with gold and with length. For reference it also prints what
"the longer one wins", VADER alone and the annotator's own Bayes rule (parameters from meta.json) score on the
same labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlhf_ext.reward.artifact import load_reward_model
from rlhf_ext.rl_math import pearson


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="a reward-model artifact folder (recipes/reward_modeling.py output_dir)")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent / "data" / "sentiment"))
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (Path(args.data_dir) / "preferences_test.jsonl").open()]
    if not rows or "gold_chosen" not in rows[0]:
        raise SystemExit(f"{args.data_dir}/preferences_test.jsonl has no gold_chosen/gold_rejected columns.")
    rm = load_reward_model(args.artifact)
    prompts = [r["prompt"] for r in rows]
    r_c = rm.score_texts(prompts, [r["chosen"] for r in rows]).mean(-1)
    r_r = rm.score_texts(prompts, [r["rejected"] for r in rows]).mean(-1)
    col = lambda k: torch.tensor([float(r[k]) for r in rows])  # noqa: E731
    g_c, g_r, w_c, w_r = col("gold_chosen"), col("gold_rejected"), col("len_chosen"), col("len_rejected")

    def label_accuracy(score_c, score_r):  # ties count half
        return ((score_c > score_r).float() + 0.5 * (score_c == score_r).float()).mean().item()

    ranks_gold = (r_c > r_r) == (g_c > g_r)
    untied = g_c != g_r
    conflict = untied & (w_c != w_r) & ((g_c > g_r) != (w_c > w_r))
    rewards, gold, words = torch.cat([r_c, r_r]), torch.cat([g_c, g_r]), torch.cat([w_c, w_r])
    out = {
        "pairs": len(rows),
        "label_accuracy": (r_c > r_r).float().mean().item(),
        "longer_wins_label_accuracy": label_accuracy(w_c, w_r),
        "vader_only_label_accuracy": label_accuracy(g_c, g_r),
        "gold_accuracy": ranks_gold[untied].float().mean().item(),
        "gold_accuracy_conflict_pairs": ranks_gold[conflict].float().mean().item(),
        "conflict_pairs": int(conflict.sum()),
        "pearson_reward_gold": pearson(rewards, gold).item(),
        "pearson_reward_length_words": pearson(rewards, words).item(),
    }
    meta = Path(args.data_dir) / "meta.json"
    if meta.is_file():  # the annotator's Bayes rule: pick the side it prefers with probability > 1/2
        p = json.loads(meta.read_text())["params"]
        logit = (g_c - g_r) / p["tau"] + p["length_bias"] * (w_c - w_r) / 10.0
        out["annotator_bayes_label_accuracy"] = label_accuracy(logit, torch.zeros_like(logit))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}, indent=2))
    return out


if __name__ == "__main__":
    main()
