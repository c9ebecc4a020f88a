"""What the benchmark compares and on what budget: the paths and model it uses, the recipes of the proxy reward
models (`RMS`), the fixed KL coefficient and shaping settings, every variant (`VARIANTS`: plain PPO, each
mitigation, the gold oracle and TRL's RLOO/GRPO), the priority order in which runs are scheduled (`SCHEDULE`,
`schedule`) and the per-run training/evaluation settings (`settings`, full or `--quick`, templated or wide prompts)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m-instruct"
DATA = ROOT / "data" / "sentiment"

# Proxy reward models: the reward recipe with a LoRA-tuned trunk (LoRA q/v on the top 8 layers, last-token pooling,
# frozen-prefix cache) for ONE epoch, as the demo trained it until it moved to heads-only reward models: cheap, and
# it learns mostly the planted length bias first (held-out reward–length Pearson 0.81 against 0.38 after three
# epochs) — the realistic, exploitable proxy. `k1_3ep` is three epochs, for one comparison run (plain PPO against
# the better reward model). LORA_PROXY pins those settings over the recipe YAML's, so the proxies stay the ones the
# committed results were measured with whatever the shipped recipe recommends.
LORA_PROXY = ["--heads_only", "false", "--pooling", "last", "--lora_top_layers", "8", "--learning_rate", "1e-3",
              "--weight_decay", "0.0", "--max_length", "256"]
ONE_EPOCH = ["--num_train_epochs", "1"]
NO_DECOR, DECOR = ["--length_decorrelation_coef", "0.0"], ["--length_decorrelation_coef", "0.2"]
RMS = {
    "k1": ONE_EPOCH + NO_DECOR + ["--ensemble_size", "1"],
    "k4_heads": ONE_EPOCH + NO_DECOR + ["--ensemble_size", "4", "--ensemble_mode", "heads"],
    "k1_decor": ONE_EPOCH + DECOR + ["--ensemble_size", "1"],
    "k4_heads_decor": ONE_EPOCH + DECOR + ["--ensemble_size", "4", "--ensemble_mode", "heads"],
    "k4_adapters": ONE_EPOCH + NO_DECOR + ["--ensemble_size", "4", "--ensemble_mode", "adapters"],
    "k1_3ep": ["--num_train_epochs", "3"] + NO_DECOR + ["--ensemble_size", "1"],
}
# The failure ensembles exist for (Coste et al. 2023): proxies whose errors come from noise and limited data, not from
# a bias every member shares — the shipped pairs relabelled by the gold, a quarter of the labels flipped, 384 pairs
# (`tasks.noisy_gold_data`, written beside the proxies; NOISY_DATA stands for its folder), three epochs.
NOISY = {"pairs": 384, "noise": 0.25, "seed": 0}
NOISY_DATA = "{noisy_gold_data}"
_NOISY_RECIPE = ["--num_train_epochs", "3", "--dataset_name", NOISY_DATA] + NO_DECOR
RMS.update({
    "gn_k1": _NOISY_RECIPE + ["--ensemble_size", "1"],
    "gn_k4_heads": _NOISY_RECIPE + ["--ensemble_size", "4", "--ensemble_mode", "heads"],
    "gn_k4_adapters": _NOISY_RECIPE + ["--ensemble_size", "4", "--ensemble_mode", "adapters"],
})
# The demo's reward model (issue: does the shipped configuration improve the task?): the shipped reward recipe as it
# is — K=4 heads on the frozen base (a linear probe of its features), response pooling, length de-correlation 0.2,
# three epochs — without LORA_PROXY's pins. It tracks per-sentence sentiment on the policy's own samples at r ≈ 0.5
# where the LoRA-tuned proxies read ≈ 0.15 (README, demo section).
RMS["probe"] = []
SHIPPED_RECIPE = {"probe"}  # proxies trained by the shipped YAML alone
NOISY_SETTINGS = {"iterations": 60, "transfer_every": 30}  # long enough for plain PPO to peak and fall

BETA = 0.01  # small enough that plain PPO over-optimises within the budget (the probe)
LINEAR = {"name": "linear", "alpha": 0.05, "free_tokens": 24}
DELTAS = (2.0, 5.0, 10.0, 20.0)  # hard-KL sweep, spanning the KL plain PPO reaches
HEADLINE_DELTA = 5.0
# the human loop's defaults: 10 % of decisions flipped, 64 labels in all, retrain every 16, the monitor's order, the
# proxy fine-tuned on its data plus the reviewed pairs (each 16 times) for a third of an epoch (`tasks.FINETUNE`);
# "scratch" trains it again as it was first trained, the reviewed pairs added once (16 among 1536 pairs: they
# barely move it — the first measured loop run)
LOOP = {"error": 0.1, "budget": 64, "per_round": 16, "order": "queue", "retrain": "finetune"}
EARLY_LOOP = {**LOOP, "queue_on": ["length_correlation"]}  # the reward–length correlation alarm queues too


def _variants() -> dict:
    v = {
        "plain": dict(rm="k1"),
        "plain_rm3ep": dict(rm="k1_3ep"),
        "adaptive": dict(rm="k1", kl_controller="adaptive", kl_target=HEADLINE_DELTA,
                         kl_controller_kwargs={"horizon": 100}),
        **{f"hard_{d:g}": dict(rm="k1", kl_controller="hard", kl_target=d) for d in DELTAS},
        **{f"ens_{m}_{a}": dict(rm=f"k4_{m}", aggregation=a, aggregation_kwargs={"lam": 1.0} if a == "uwo" else None)
           for m in ("heads", "adapters") for a in ("mean", "min", "uwo")},
        "len_linear": dict(rm="k1", shapers=[LINEAR]),
        "len_target": dict(rm="k1", shapers=[{"name": "target", "alpha": 0.05, "target_length": 20}]),
        "len_overlong": dict(rm="k1", shapers=[{"name": "overlong", "max_length": 48, "cache_length": 16}]),
        "debias": dict(rm="k1", shapers=[{"name": "debias", "momentum": 0.9}]),
        "decor": dict(rm="k1_decor"),
        # ablation of `all`: its two shapers alone, on the plain reward model with the fixed β
        "len_eos": dict(rm="k1", shapers=[LINEAR, {"name": "missing_eos", "penalty": 1.0}]),
        "all": dict(rm="k4_heads_decor", aggregation="uwo", aggregation_kwargs={"lam": 1.0}, kl_controller="hard",
                    kl_target=HEADLINE_DELTA, shapers=[LINEAR, {"name": "missing_eos", "penalty": 1.0}]),
        "oracle": dict(rm=None),  # PPO on the gold itself: the upper bound
        # the oracle given twice the iterations (a "more budget" variant; the learning rate decays over 60, not 30):
        # at 30 it is no upper bound (best +0.096, below `all`'s)
        "oracle_long": dict(rm=None, settings={"iterations": 60, "transfer_every": 30}),
        # the human loop (loop.py): a simulated reviewer labels queued pairs by the gold, the proxy is retrained
        "plain_loop": dict(rm="k1", loop=LOOP),
        # the queue's order only matters when a round chooses: 16 labels from a pool of 32 pending pairs, each order
        "plain_loop_pool": dict(rm="k1", loop={**LOOP, "pool": 32}),
        "plain_loop_margin": dict(rm="k1", loop={**LOOP, "pool": 32, "order": "proxy_margin"}),
        "plain_loop_scratch": dict(rm="k1", loop={**LOOP, "retrain": "scratch"}),
        # the reward–length correlation alarm (log-only by default) queues too: on plain PPO it fires at iterations
        # 2–3, five or more before the length/EOS alarms, while most answers still end
        "plain_loop_early": dict(rm="k1", loop=EARLY_LOOP),
        # the budget and reviewer-error axes, on the early-alarm loop (the one that recovers every seed)
        **{f"plain_loop_early_b{b}": dict(rm="k1", loop={**EARLY_LOOP, "budget": b}) for b in (16, 32, 128)},
        # (exact flips: the stated share of decisions, not Bernoulli draws, whose realised share over 16–64 labels
        # varies 0–19 % at 10 % — reviewer.py)
        **{f"plain_loop_early_e{round(100 * e)}": dict(rm="k1", loop={**EARLY_LOOP, "error": e, "flips": "exact"})
           for e in (0.0, 0.25)},
        "trl_rloo": dict(rm="k1", trainer="rloo"),
        "trl_grpo": dict(rm="k1", trainer="grpo"),
    }
    # `all` + the loop on the early alarm (the loop that helped plain PPO): does the KL bound hold what the
    # reviewed pairs win, once the alarm goes quiet?
    v["all_loop"] = {**v["all"], "loop": EARLY_LOOP}
    # the demo's configuration on the benchmark: `all` with the demo's reward model, and that reward model without
    # any mitigation (is the probe itself hackable?)
    v["all_probe"] = {**v["all"], "rm": "probe"}
    v["plain_probe"] = dict(rm="probe")
    noisy = dict(settings=NOISY_SETTINGS, yardstick="gn_k1")  # the proxy axis: the run's own kind of proxy
    v.update({
        "noisy_plain": dict(rm="gn_k1", **noisy),
        f"noisy_hard_{HEADLINE_DELTA:g}": dict(rm="gn_k1", kl_controller="hard", kl_target=HEADLINE_DELTA, **noisy),
        **{f"noisy_ens_{m}_{a}": dict(rm=f"gn_k4_{m}", aggregation=a, **noisy,
                                      aggregation_kwargs={"lam": 1.0} if a == "uwo" else None)
           for m in ("heads", "adapters") for a in ("mean", "min", "uwo")},
    })
    for spec in v.values():
        spec.setdefault("kl_controller", "fixed")
        spec.setdefault("trainer", "ppo")
    return v


VARIANTS = _variants()
# Priority order (first runs first): the headline comparison, then the sweep, then the rest, then extra seeds.
SCHEDULE = (["plain:0", "all:0", "oracle:0", f"hard_{HEADLINE_DELTA:g}:0", "plain:1", "all:1", "plain:2", "all:2"]
            + [f"{n}:0" for n in VARIANTS if n not in ("plain", "all", "oracle", f"hard_{HEADLINE_DELTA:g}")
               and "loop" not in VARIANTS[n] and "settings" not in VARIANTS[n]]  # on request (--runs)
            + [f"hard_{HEADLINE_DELTA:g}:1", f"hard_{HEADLINE_DELTA:g}:2"])
HEADLINE = ("plain", "all", f"hard_{HEADLINE_DELTA:g}")


def settings(quick: bool, prompts: str = "templates") -> dict:
    if quick:
        st = dict(iterations=3, eval_every=1, transfer_every=3, batch=8, max_tokens=8, heldout=8, transfer=8,
                  lr=3e-2, lora_layers=1, epochs=2)
    else:
        st = dict(iterations=30, eval_every=5, transfer_every=15, batch=8, max_tokens=48, heldout=32, transfer=40,
                  lr=2e-3, lora_layers=8, epochs=4)
    if prompts == "wide":
        # Open-ended questions rarely end within the 48-token training budget, even for the base model; a larger
        # evaluation budget on the transfer prompts lets their gold measure sentiment rather than truncation.
        st.update(prompts="wide", transfer_tokens=2 * st["max_tokens"])
    return st


def proxies_for(keys: list[str]) -> set[str]:
    """The proxy reward models the runs `keys` ("variant:seed") read: the one they train on and the one their
    evaluation's proxy axis uses (`yardstick`, default k1)."""
    names = set()
    for key in keys:
        spec = VARIANTS[key.split(":")[0]]
        names |= {r for r in (spec["rm"], spec.get("yardstick", "k1")) if r}
    return names


def schedule(args) -> list[str]:
    if args.runs:
        return args.runs.split(",")
    if args.quick:
        return ["plain:0", "hard_5:0", "ens_heads_uwo:0", "all:0", "oracle:0", "trl_rloo:0"]
    return SCHEDULE
