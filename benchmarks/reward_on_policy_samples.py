"""Does a reward model carry the task on the text PPO will show it? Score the base policy's own samples.

    python benchmarks/reward_on_policy_samples.py ARTIFACT [ARTIFACT ...] [--samples 4] [--prompts 40]

Held-out pair accuracy (`reward_gold_accuracy.py`) is measured on the annotator's pairs; PPO instead asks the reward
model to rank the policy's own samples — including answers to the transfer prompts (other topics and phrasings,
long answers) that no preference pair resembles. This script samples the embedded SmolLM2-135M-Instruct policy
(temperature 1, 48 new tokens, as the demo's PPO does) on the held-out prompts and on the transfer prompts, with a
fixed seed, and prints for each reward-model artifact the Pearson correlation of its reward (mean of the normalised
members) with per-sentence sentiment (the task), with the gold (sentiment minus the missing-EOS and repetition
terms) and with length in words, per split. A reward PPO can follow to better text correlates with the task here,
not only on the pairs it was trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common  # noqa: F401  (offline, thread and denormal settings)
import torch

from rlhf_ext.data import SHIPPED
from rlhf_ext.models import load_model, load_tokenizer, resolve_model_path
from rlhf_ext.reward.artifact import load_reward_model
from rlhf_ext.rl_math import pearson
from rlhf_ext.sentiment import _analyzer, gold_score, sentence_sentiment

SPLITS = {"heldout": "prompts_test.jsonl", "transfer": "prompts_transfer.jsonl"}


@torch.no_grad()
def policy_samples(model_name: str, data: Path, prompts: int, samples: int, seed: int) -> dict:
    """{split: {"prompts", "texts", "ended"}}: `samples` answers per prompt from the base policy."""
    tok = load_tokenizer(model_name)
    tok.padding_side = "left"
    model = load_model(model_name, "causal").eval()
    out = {}
    for split, name in SPLITS.items():
        rows = [json.loads(line)["prompt"] for line in (data / name).open()][:prompts]
        res = {"prompts": [], "texts": [], "ended": []}
        for i in range(0, len(rows), 8):
            chunk = rows[i : i + 8]
            torch.manual_seed(seed + i)
            enc = tok.apply_chat_template(chunk, add_generation_prompt=True, return_tensors="pt", padding=True,
                                          return_dict=True)
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48,
                                 num_return_sequences=samples, pad_token_id=tok.pad_token_id)
            for j, row in enumerate(gen[:, enc["input_ids"].shape[1]:]):
                res["prompts"].append(chunk[j // samples])
                res["texts"].append(tok.decode(row, skip_special_tokens=True))
                res["ended"].append(bool((row == tok.eos_token_id).any()))
        out[split] = res
        print(f"sampled {len(res['texts'])} answers to {len(rows)} {split} prompts", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="reward-model artifact folders")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the policy whose samples are scored")
    ap.add_argument("--data-dir", default=None, help="default: the shipped sentiment data")
    ap.add_argument("--prompts", type=int, default=40, help="prompts per split")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    data = Path(args.data_dir) if args.data_dir else SHIPPED / "sentiment"
    samples = policy_samples(resolve_model_path(args.model), data, args.prompts, args.samples, args.seed)
    analyzer = _analyzer()
    rms = {path: load_reward_model(path) for path in args.artifacts}
    results = {}
    for split, s in samples.items():
        sentiment = torch.tensor([sentence_sentiment(t, analyzer) for t in s["texts"]])
        gold = torch.tensor([gold_score(t, e, analyzer) for t, e in zip(s["texts"], s["ended"])])
        words = torch.tensor([float(len(t.split())) for t in s["texts"]])
        print(f"\n{split}: {len(s['texts'])} answers, per-sentence sentiment {sentiment.mean():+.3f}, "
              f"{words.mean():.1f} words, EOS rate {sum(s['ended']) / len(s['ended']):.2f}")
        print(f"  {'reward model':48s} {'r(sentiment)':>12s} {'r(gold)':>8s} {'r(words)':>9s}")
        completions = [[{"role": "assistant", "content": t}] for t in s["texts"]]
        for path, rm in rms.items():
            r = rm.score_texts(s["prompts"], completions, normalize=True).mean(-1)
            row = {"r_sentiment": pearson(r, sentiment).item(), "r_gold": pearson(r, gold).item(),
                   "r_words": pearson(r, words).item()}
            results.setdefault(str(path), {})[split] = row
            print(f"  {str(path)[-48:]:48s} {row['r_sentiment']:>+12.3f} {row['r_gold']:>+8.3f} {row['r_words']:>+9.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
