"""The tasks a run trains on and the proxy reward models it optimises: `real_task` (SmolLM2 on the shipped sentiment
data, templated or wide prompts), `quick_task` (a tiny random model on a handful of prompts, for `--quick`),
`train_rms` (the real proxies, one `recipes/reward_modeling.py` run each), `train_quick_rms` (tiny proxies in the
same artifact format), `retrain_rm` (a proxy again, with reviewed pairs added: the human loop) and `rm_dir` (where
the proxies live)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .variants import DATA, LORA_PROXY, MODEL, NOISY, NOISY_DATA, RMS, ROOT, SHIPPED_RECIPE


def rm_dir(args) -> Path:
    return Path(args.rm_dir) if args.rm_dir else Path(args.workdir) / "rms"


def real_task(prompts: str = "templates"):
    """`templates`: the one-sentence templated prompts. `wide`: those plus the open-ended family (train: 768 + 512
    shuffled together; held-out: templated and open test prompts alternating); the transfer prompts stay unseen."""
    from datasets import concatenate_datasets, interleave_datasets
    from peft import LoraConfig

    from rlhf_ext.data import load_split
    from rlhf_ext.models import load_model, load_tokenizer

    def split(name):
        return load_split(str(DATA), name, "prompts")

    train, heldout = split("train"), split("test")
    if prompts == "wide":
        train = concatenate_datasets([train, split("train_open")]).shuffle(seed=0)
        heldout = interleave_datasets([heldout, split("test_open")])
    tok = load_tokenizer(MODEL)
    return (load_model(MODEL, "causal"), tok, train, heldout, split("transfer"),
            lambda: LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def quick_task(model_path, prompts: str = "templates"):
    def task():
        from datasets import Dataset
        from peft import LoraConfig

        from rlhf_ext.models import load_model
        from rlhf_ext.testing import tiny_tokenizer

        tok = tiny_tokenizer()
        subjects = "movie book song film food place day night".split()

        def ds(n, off):
            return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a short review of the "
                                                   f"{subjects[(i + off) % 8]} ."}] for i in range(n)]})

        train = ds(32, 0)
        if prompts == "wide":  # the same wiring as the real task's, on tiny data
            from datasets import concatenate_datasets

            train = concatenate_datasets([train, Dataset.from_dict(
                {"prompt": [[{"role": "user", "content": f"what about the {w} ?"}] for w in subjects]})]).shuffle(seed=0)
        return (load_model(model_path, "causal"), tok, train, ds(8, 3), ds(8, 5),
                lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    return task


def swap_pair(row: dict) -> dict:
    """The pair the other way round: chosen ↔ rejected, and every `<x>_chosen` ↔ `<x>_rejected` column with them."""
    out = dict(row)
    for key in row:
        if key == "chosen" or key.endswith("_chosen"):
            other = key[: -len("chosen")] + "rejected"
            out[key], out[other] = row[other], row[key]
    return out


def noisy_gold_data(out: Path, pairs: int, noise: float, seed: int) -> Path:
    """The shipped preference pairs relabelled by the gold (chosen = the higher gold score: no planted length bias),
    `pairs` of them drawn at random with a `noise` share of their labels flipped (`flipped` in each row); the test
    split relabelled without noise, to measure the proxies' gold accuracy. Pairs with equal gold are left out."""
    import json
    import random

    from rlhf_ext.integrity import write_text_atomic

    def relabel(row, flip):
        better = row["gold_chosen"] > row["gold_rejected"]
        return {**(swap_pair(row) if better == flip else row), "flipped": flip}

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(x) for x in (DATA / f"preferences_{split}.jsonl").read_text().splitlines() if x.strip()]
        rows = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
        if split == "train":
            rows = rng.sample(rows, pairs)
            flips = set(rng.sample(range(pairs), round(noise * pairs)))
        else:
            flips = set()
        write_text_atomic(out / f"preferences_{split}.jsonl", "".join(
            json.dumps(relabel(r, i in flips), ensure_ascii=False) + "\n" for i, r in enumerate(rows)))
    return out


QUICK_RMS = {"k1": {}, "k4_heads": {"ensemble_size": 4},
             "k4_heads_decor": {"ensemble_size": 4, "length_decorrelation_coef": 0.2},
             "k4_adapters": {"ensemble_size": 4, "ensemble_mode": "adapters"},
             "k1_decor": {"length_decorrelation_coef": 0.2}, "k1_3ep": {},
             "gn_k1": {}, "gn_k4_heads": {"ensemble_size": 4},
             "gn_k4_adapters": {"ensemble_size": 4, "ensemble_mode": "adapters"},
             "probe": {"ensemble_size": 4, "length_decorrelation_coef": 0.2, "heads_only": True}}


def train_quick_rm(out: Path, model_path: str, extra: dict, extra_preferences: list[str] | None = None):
    """One tiny reward model in seconds, for --quick: the same artifact format as the real ones."""
    import random

    from datasets import Dataset
    from peft import LoraConfig

    from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
    from rlhf_ext.testing import tiny_tokenizer

    tok, r = tiny_tokenizer(), random.Random(0)
    pos, neg = "good great nice love happy".split(), "bad awful terrible sad boring".split()
    rows = [{"prompt": [{"role": "user", "content": "write a short review of the movie ."}],
             "chosen": [{"role": "assistant", "content": f"the movie was {r.choice(pos)} ."}],
             "rejected": [{"role": "assistant", "content": f"the movie was {r.choice(neg)} ."}]} for _ in range(64)]
    extra = {"max_steps": 8, "normalization_samples": 32, **extra}
    args = RewardEnsembleConfig(str(out), per_device_train_batch_size=8, learning_rate=5e-3, report_to="none",
                                save_strategy="no", use_cpu=True, disable_tqdm=True,
                                extra_preferences=extra_preferences, **extra)
    tr = RewardEnsembleTrainer(model_path, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    tr.save_model(str(out))


def train_quick_rms(workdir: Path, model_path: str, names=None):
    """The tiny proxies `names` (default: every one) that `workdir` does not hold yet."""
    for name in QUICK_RMS if names is None else sorted(names):
        extra = QUICK_RMS[name]
        out = workdir / "rms" / name
        if not (out / "rlhf_ext_reward.json").is_file():
            train_quick_rm(out, model_path, extra)


def _run_recipe(rms: Path, name: str, out: Path, *more: str):
    """`recipes/reward_modeling.py` with the proxy `name`'s settings (its noisy-gold data written first if it uses
    it), into `out`; `more`: extra command-line arguments."""
    recipe = RMS[name]
    if NOISY_DATA in recipe:
        data = noisy_gold_data(rms / "noisy_gold_data", **NOISY)
        recipe = [str(data) if a == NOISY_DATA else a for a in recipe]
    cmd = [sys.executable, str(ROOT / "recipes" / "reward_modeling.py"), "--config",
           str(ROOT / "recipes" / "configs" / "reward_smollm2_sentiment.yaml"), "--output_dir", str(out),
           *([] if name in SHIPPED_RECIPE else LORA_PROXY), *recipe, *more]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# The loop's fine-tune: the proxy's own recipe, started from the reward model the run used, for 32 steps of 16 pairs
# (a third of the 1536 original pairs' epoch) with every reviewed pair counted 16 times — 64 reviewed pairs then
# make 40 % of what it sees. Checked offline on the first loop run's 64 reviewed pairs: on 32 queued pairs nobody
# reviewed, the proxy sided with the gold in 0.31 of them before and 0.94 after (0.34 after a from-scratch retrain);
# held-out gold accuracy 0.572 → 0.540.
FINETUNE = {"extra_preferences_weight": 16, "max_steps": 32, "normalization_samples": 256}


def retrain_rm(args, name: str, out: Path, extra_preferences: list[str], init: Path | None = None) -> Path:
    """The proxy `name` again with the reviewed pairs (`extra_preferences`): fine-tuned from `init` (the reward
    model the run used; `FINETUNE`), or, with `init` None, trained from scratch exactly as before."""
    if (out / "manifest.json").is_file():
        return out
    more = dict(FINETUNE, init_reward_model=str(init)) if init is not None else {}
    if args.quick:
        train_quick_rm(out, args.model_path, {**QUICK_RMS[name], **more}, extra_preferences)
    else:
        flags = [x for k, v in more.items() for x in (f"--{k}", str(v))]
        _run_recipe(rm_dir(args), name, out, "--extra_preferences", *extra_preferences, *flags)
    return out


def train_rms(args):
    workdir = rm_dir(args)
    names = args.rms.split(",") if args.rms else list(RMS)
    unknown = [n for n in names if n not in RMS]
    if unknown:
        sys.exit(f"unknown reward model(s) {unknown}; choose from {list(RMS)}")
    for name in names:
        if (workdir / name / "rlhf_ext_reward.json").is_file():
            print(f"{name}: exists")
            continue
        _run_recipe(workdir, name, workdir / name)
