"""The shipped preference pairs relabelled by the task itself — per-sentence sentiment — for a demo reward model
without the annotator's planted length bias.

    python benchmarks/relabel_by_sentiment.py outputs/gl/data [--noise 0.1]
    rlhf-ext demo --data-dir outputs/gl/data --output-dir outputs/gl/demo_s0

Each pair's chosen answer becomes the one with the higher mean VADER compound per sentence (the demo's "per-sentence
sentiment"); pairs where both are equal are dropped; in the train split each label is then flipped with probability
`noise` (one seeded draw per pair, in file order), the test split is left clean so that its accuracy is the proxy's
accuracy on the task. The prompt files are copied, so the folder is a complete `--data-dir` for `rlhf-ext demo`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import _common  # noqa: F401  (offline settings)
from overopt.tasks import swap_pair

from rlhf_ext.data import SHIPPED
from rlhf_ext.sentiment import sentiment_judge


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the folder to write (a --data-dir for rlhf-ext demo)")
    ap.add_argument("--noise", type=float, default=0.1, help="share of train labels flipped at random")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.noise <= 1:
        ap.error(f"--noise is a probability in [0, 1], got {args.noise}")
    src, sentiment, rng = SHIPPED / "sentiment", sentiment_judge(), random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for f in src.glob("prompts_*.jsonl"):
        shutil.copy(f, args.out / f.name)
    for split in ("train", "test"):
        rows, agreed = [], 0
        for line in (src / f"preferences_{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            chosen, rejected = sentiment(completions=[row["chosen"], row["rejected"]])
            if chosen == rejected:
                continue
            keep = chosen > rejected
            agreed += keep
            if split == "train" and rng.random() < args.noise:
                keep = not keep
            rows.append(json.dumps(row if keep else swap_pair(row), ensure_ascii=False))
        (args.out / f"preferences_{split}.jsonl").write_text("\n".join(rows) + "\n")
        print(f"{split}: {len(rows)} pairs; the shipped annotator chose the more positive answer in {agreed}")


if __name__ == "__main__":
    main()
