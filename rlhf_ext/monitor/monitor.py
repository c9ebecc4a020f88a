"""The reward-hacking monitor: a TrainerCallback that runs the detectors after every PPO iteration.

On by default (`PPOConfig.monitor`). Every iteration it adds `monitor/<detector>` statistics and
`monitor/<detector>_alarm` flags to the iteration's metrics (so `report_to` — trackio, tensorboard, wandb — shows
them), and appends to `OUTPUT_DIR/monitor/`:

    run.json        the run's settings (δ, controller, aggregation, shapers, detectors), written at the start
    metrics.jsonl   every iteration's metrics
    alarms.jsonl    every firing: iteration, detector, value, threshold, action
    samples.jsonl   a few samples per iteration (highest reward first) for the report's table

A detector whose action is "queue" sends its most suspicious samples to the review queue (`monitor/queue.py`) beside
a sample of the reference policy for the same prompt; "halt" saves a checkpoint, stops, and says how to resume.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data import PromptRow, message_text
from ..ppo.sampling import forked_rng
from ..plugins.detectors import DEFAULT_DETECTORS, Observation
from ..plugins.shaping import content_ids, repeated_ngram_fraction
from ..progress import progress
from ..registry import build, numbered
from .queue import ReviewQueue, append_jsonl

# the per-iteration logs in OUTPUT_DIR/monitor/ (a resumed run truncates them to its checkpoint; a run that replaces
# an earlier one, ppo/checkpoint.py's clear_earlier_run, removes them with run.json)
LOGS = ("metrics.jsonl", "alarms.jsonl", "samples.jsonl")


def build_detectors(specs) -> list:
    """From config: names or {"name": ..., "threshold": ..., "action": ...} dicts; None → every built-in."""
    out = []
    for spec in DEFAULT_DETECTORS if specs is None else specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        out.append(build("detector", spec.pop("name"), **spec))
    return out


def reference_statistics(lengths: list, eos: list, ids: list, cap: int, ngram_sizes=()) -> dict:
    """What the detectors compare a run against: the reference policy's mean length, EOS rate and repeated-n-gram
    fractions, with the standard deviations the detectors' noise gates need."""

    def mean_sd(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0

    (length, length_sd), (eos_rate, _) = mean_sd(lengths), mean_sd(eos)
    ref = {"length": length, "length_sd": length_sd, "eos": eos_rate, "n": len(lengths), "cap": cap}
    for k in sorted(set(ngram_sizes) | {4}):
        ref[f"repetition_{k}"], ref[f"repetition_{k}_sd"] = mean_sd([repeated_ngram_fraction(x, k)
                                                                     for x in content_ids(ids, lengths)])
    return ref


class RewardHackingMonitor(TrainerCallback):
    def __init__(self, trainer, detectors, max_queue: int = 2, cooldown: int = 5, samples_per_iteration: int = 3):
        self.trainer, self.detectors = trainer, detectors
        for key, d in numbered(detectors, lambda d: d.name).items():  # a second "repetition" is "repetition#2": its
            d.key = key                                                # own metric, alarms and checkpointed state
        self.max_queue, self.cooldown, self.samples_per_iteration = max_queue, cooldown, samples_per_iteration
        self.dir = Path(trainer.args.output_dir) / "monitor"
        self.queue = ReviewQueue(trainer.args.output_dir)
        self.reference: dict = {}
        self.last_queued: dict[str, int] = {}
        self.halted_by: str | None = None
        self.announced: set[str] = set()  # detectors whose first firing this process has printed

    # -- state (saved in PPO checkpoints) -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"reference": self.reference, "last_queued": self.last_queued,
                "detectors": {d.key: d.state_dict() for d in self.detectors}}

    def load_state_dict(self, state: dict) -> None:
        self.resumed_at = self.trainer.iteration  # set by the trainer before this is called
        self.reference, self.last_queued = state.get("reference", {}), state.get("last_queued", {})
        for d in self.detectors:
            if d.key in state.get("detectors", {}):
                d.load_state_dict(state["detectors"][d.key])

    @property
    def writes(self) -> bool:
        return self.trainer.accelerator.is_main_process

    # -- the reference policy's length and EOS rate: what "drift" is measured against ----------------------------
    @torch.no_grad()
    def _measure_reference(self):
        tr = self.trainer
        # A random sample of the training prompts, not the first batch: with prompts of different kinds (one-line
        # requests beside open questions) one batch's mean length says more about its mix than about the policy,
        # and drift against it fires before the policy has moved.
        n = min(tr.args.monitor_reference_prompts, len(tr.prompts))
        pick = random.Random(tr.args.seed + 7919).sample(range(len(tr.prompts)), n)
        step = tr.args.per_device_train_batch_size
        lengths, eos, ids = [], [], []
        with forked_rng(tr.policy.device):  # sampling here must not change the run's random streams (a GPU's too)
            torch.manual_seed(tr.args.seed + 7919)
            for i in progress(tr, range(0, n, step), desc="Monitor: the reference policy's length and EOS rate",
                              unit="batch", leave=False):
                g = tr.policy.generate([tr.prompts[j] for j in pick[i : i + step]], tr.tokenizer,
                                       tr.args.max_completion_length, tr.args.top_p, tr.args.stop_on_eos, reference=True)
                lengths += g.lengths.float().tolist()
                eos += g.has_eos.float().tolist()
                ids += g.completion_ids
        self.reference = reference_statistics(lengths, eos, ids, int(tr.args.max_completion_length),
                                              {getattr(d, "n", 4) for d in self.detectors if d.name == "repetition"})

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.reference:
            self._measure_reference()
        if self.writes and getattr(self, "resumed_at", None) is not None:
            self._truncate_logs(self.resumed_at)
        if self.writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            # the temporary files of writers killed mid-rewrite (a live one's, a review server's, is kept)
            from ..integrity import sweep_temp_files

            sweep_temp_files(self.dir)
            self.queue.sweep()
            a = self.trainer.args
            run = {"kl_controller": a.kl_controller, "kl_target": a.kl_target, "init_kl_coef": a.init_kl_coef,
                   "aggregation": a.aggregation, "shapers": a.shapers, "members": self.trainer.rewards.member_names,
                   "audits": list(self.trainer.audit_funcs), "reference": self.reference,
                   "detectors": [{"name": d.key, "threshold": d.threshold, "action": d.action,
                                  "direction": d.direction} for d in self.detectors]}
            from ..integrity import write_text_atomic

            write_text_atomic(self.dir / "run.json", json.dumps(run, indent=1))  # a crash mid-write leaves no torn file

    def _truncate_logs(self, iteration: int):
        """A resumed run repeats the iterations after its checkpoint: drop what the killed run logged for them (a line at
        a time: a long run's logs are hundreds of MB; left as they are when nothing follows the checkpoint)."""
        from .queue import keep_jsonl_records

        for name in LOGS:
            keep_jsonl_records(self.dir / name, lambda r: r.get("iteration", 0) <= iteration)

    # -- every iteration --------------------------------------------------------------------------------------
    def _observe(self, metrics) -> tuple[Observation, Observation]:
        """(global, local) observations of this iteration. Under data parallelism each process holds its own share
        of the batch; detectors see all of it (gathered), so every process takes the same decision (a halt on one
        rank alone left the others waiting in a collective). `local`: this process's share, for the review queue."""
        tr, ro = self.trainer, self.trainer.rollout
        local = Observation(iteration=tr.iteration, lengths=ro.lengths.cpu(), has_eos=ro.has_eos.cpu(),
                            texts=ro.texts, ids=ro.completion_ids, scores=ro.scores.cpu(), norm=ro.norm.cpu(),
                            valid=ro.valid.cpu(), audit=ro.audit, metrics=metrics, reference=self.reference)
        acc = tr.accelerator
        if acc.num_processes == 1:
            return local, local
        from accelerate.utils import gather_object

        def cat(t):
            return acc.gather(t.to(tr.args.device)).cpu()

        every = gather_object([{"texts": ro.texts, "ids": ro.completion_ids, "audit": ro.audit}])
        glob = Observation(iteration=tr.iteration, lengths=cat(ro.lengths.float()), has_eos=cat(ro.has_eos),
                           texts=[t for e in every for t in e["texts"]], ids=[i for e in every for i in e["ids"]],
                           scores=cat(ro.scores.float()), norm=cat(ro.norm.float()), valid=cat(ro.valid),
                           audit={k: [v for e in every for v in e["audit"][k]] for k in ro.audit},
                           metrics=metrics, reference=self.reference)
        return glob, local

    def on_step_end(self, args, state, control, **kwargs):
        tr, ro = self.trainer, self.trainer.rollout
        metrics = tr._metrics_history[-1]
        obs, local = self._observe(metrics)
        halting, queueing = None, []
        for d in self.detectors:
            value, fired = d.update(obs)
            if value is not None:
                metrics[f"monitor/{d.key}"] = value
            metrics[f"monitor/{d.key}_alarm"] = int(fired)
            if fired:
                if self._act(d, local, control):
                    queueing.append(d)
                halting = halting or (d if d.action == "halt" else None)
                self._announce(d)
        if queueing:  # after every detector: a sample two of them picked is queued once, naming both
            self._queue(queueing, local)
        if self.writes:
            append_jsonl(self.dir / "metrics.jsonl", {"iteration": tr.iteration, **_plain(metrics)})
            order = torch.argsort(ro.scores.cpu(), descending=True)[: self.samples_per_iteration].tolist()
            for i in order:
                append_jsonl(self.dir / "samples.jsonl", {
                    "iteration": tr.iteration, "prompt": prompt_text(ro.prompts[i]), "text": ro.texts[i],
                    "score": float(ro.scores[i]), "length": int(ro.lengths[i]), "eos": bool(ro.has_eos[i]),
                    "audit": {k: float(v[i]) for k, v in ro.audit.items()}})
        if halting is not None:  # every process decides this together (the same gathered batch)
            self._halt(halting, control)  # the loop saves after this callback: every detector has seen the iteration

    def _act(self, d, obs, control):
        tr = self.trainer
        record = {"iteration": tr.iteration, "detector": d.key, "value": d.value, "threshold": d.limit,
                  "direction": d.direction, "action": d.action}
        if self.writes:
            append_jsonl(self.dir / "alarms.jsonl", record)
        if d.action == "queue" and tr.iteration - self.last_queued.get(d.key, -10**9) >= self.cooldown:
            self.last_queued[d.key] = tr.iteration
            return True
        return False

    def _announce(self, d):
        """A detector's first firing in this run, one line on the console (main process): the alarm flag sits among
        some fifty numbers of the iteration's log, and a queued sample waits for review where nothing said so. Later
        firings go to alarms.jsonl and the logged metrics only. A halt says more in its own warning."""
        if not self.writes or d.action == "halt" or d.key in self.announced:
            return
        self.announced.add(d.key)
        out = self.trainer.args.output_dir
        then = (f"its most suspicious samples go to {Path(out) / 'review' / 'queue.jsonl'}; review them with "
                f"`rlhf-ext review {out}`" if d.action == "queue" else f"logged in {self.dir / 'alarms.jsonl'}")
        from tqdm.auto import tqdm

        tqdm.write(f"Reward-hacking monitor: {d.describe()} at iteration {self.trainer.iteration} — {then}. Later "
                   f"firings of {d.key} are logged, not printed (rlhf-ext report {out} shows them all).",
                   file=sys.stderr)

    def _halt(self, d, control):
        """Stop after this iteration with a checkpoint of it: the flags, on every process alike (every detector saw
        the same gathered batch); the train loop then writes the checkpoint with every process taking part. The
        warning is the main process's alone (one per process repeated it under DDP)."""
        tr = self.trainer
        control.should_training_stop = control.should_save = True
        self.halted_by = d.key
        path = Path(tr.args.output_dir) / f"checkpoint-{tr.iteration}"
        if not self.writes:
            return
        warnings.warn(
            f"Reward-hacking monitor halted training at iteration {tr.iteration}: {d.describe()}. Checkpoint: "
            f"{path}. Look at the samples (rlhf-ext report {tr.args.output_dir}; rlhf-ext review "
            f"{tr.args.output_dir}), change what lets the policy exploit the reward (a length penalty, a larger "
            f"β or smaller δ, a retrained reward model), then resume with "
            f"trainer.train(resume_from_checkpoint=True) — recipes: --resume_from_checkpoint true. To silence "
            f"this detector set its action to 'log' in monitor_detectors.", stacklevel=2)

    @torch.no_grad()
    def _queue(self, detectors, obs):
        """Each detector's most suspicious samples, each beside a reference-policy sample for the same prompt. A
        sample several detectors picked in this iteration is one pair naming them all: queued once per detector, a
        reviewer judged it twice and preferences.jsonl held it twice (or both ways)."""
        tr, ro = self.trainer, self.trainer.rollout
        by_sample = {}  # sample index -> [(detector key, its rank among that detector's picks)]
        for d in detectors:
            mine, seen = [], set()
            for i in d.suspicious(obs, 4 * self.max_queue):
                key = json.dumps(ro.prompts[i], sort_keys=True, default=str)
                if bool(ro.valid[i]) and key not in seen:
                    mine.append(i)
                    seen.add(key)
                if len(mine) == self.max_queue:
                    break
            for rank, i in enumerate(mine):
                by_sample.setdefault(i, []).append((d.key, rank))
        picked = list(by_sample)
        if not picked or not self.writes:
            return
        with forked_rng(tr.policy.device):
            batch = [PromptRow(ro.prompts[i], ro.ids[i, : ro.ids.shape[1] - ro.R][ro.mask[i, : ro.ids.shape[1] - ro.R]
                                                                                  .bool()].tolist(),
                               {k: v[i] for k, v in ro.columns.items()}) for i in picked]
            ref = tr.policy.generate(batch, tr.tokenizer, tr.args.max_completion_length, tr.args.top_p,
                                     tr.args.stop_on_eos, reference=True)
        saved = tr.rewards.state_dict()  # scoring for display must not move running statistics (debias, callables)
        try:  # nor a member that fails after another scored: the trainer saves a checkpoint after the failure
            ref_scores, _, ref_raw, _ = tr.rewards.score(ref.prompts, ref.completions, ref.completion_ids,
                                                         has_eos=ref.has_eos.cpu(), **tr.reward_kwargs(ref, log=False))
        finally:
            tr.rewards.load_state_dict(saved)
        ref_audit = tr.judge_scores(ref, tr.audit_funcs, log=False)
        rows = torch.tensor(picked)
        logits = tr.policy.logits(ro.ids[rows], ro.mask[rows], ro.R, None if ro.h_low is None else ro.h_low[rows])
        ref_z = tr.policy.logits(ro.ids[rows], ro.mask[rows], ro.R, None if ro.h_low is None else ro.h_low[rows],
                                 reference=True)
        kls = tr.policy.sequence_kl(logits, ref_z, ro.resp_mask[rows]).tolist()
        names = tr.rewards.member_names
        for j, i in enumerate(picked):
            self.queue.add({
                "id": "it{}-{}-{}".format(tr.iteration, *by_sample[i][0]), "iteration": tr.iteration,
                "detectors": [key for key, _ in by_sample[i]],
                "prompt": ro.prompts[i],
                "flagged": _side(ro.completions[i], ro.texts[i], ro.lengths[i], ro.has_eos[i], kls[j], ro.scores[i],
                                 ro.raw[i], names, {k: v[i] for k, v in ro.audit.items()}),
                "reference": _side(ref.completions[j], ref.texts[j], ref.lengths[j], ref.has_eos[j], 0.0, ref_scores[j],
                                   ref_raw[j], names, {k: v[j] for k, v in ref_audit.items()}),
            })


def _side(completion, text, length, eos, kl, score, raw, names, audit) -> dict:
    return {"completion": completion, "text": text, "length": int(length), "eos": bool(eos), "kl": float(kl),
            "score": float(score), "rewards": {n: float(r) for n, r in zip(names, raw.tolist())},
            "audit": {k: float(v) for k, v in audit.items()}}


def prompt_text(p) -> str:
    return "\n".join(f"{m['role']}: {message_text([m])}" for m in p) if isinstance(p, list) else p


def _plain(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
