"""One benchmark run, a (variant, seed): `Run` builds the trainer the variant names (our PPOTrainer, or TRL's
RLOO/GRPO with the same reward pipeline, completion budget and LoRA), evaluates every `eval_every` iterations, writes
the run's record after each evaluation, checkpoints, resumes a killed run where it stopped, and on completion keeps
the monitor's alarms and the review queue's size in the record."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .evaluation import evaluate, prompt_rows
from .tasks import rm_dir
from .variants import BETA, VARIANTS


class Run:
    """One (variant, seed): builds the trainer, evaluates every `eval_every` iterations, checkpoints, resumes."""

    def __init__(self, name, seed, args, st):
        self.spec = VARIANTS[name]
        if not args.quick:  # a variant may ask for more budget (e.g. the noisy-proxy scenario's longer runs)
            st = {**st, **self.spec.get("settings", {})}
        self.name, self.seed, self.args, self.st = name, seed, args, st
        self.dir = Path(args.workdir) / "runs" / f"{name}__s{seed}"
        self.record_path = Path(args.workdir) / "runs" / f"{name}__s{seed}.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {
            "variant": name, "seed": seed, "spec": self.spec, "settings": st, "points": [], "train": [],
            "done": False, "train_seconds": 0.0}

    def save(self):
        from rlhf_ext.integrity import write_text_atomic

        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record_path, json.dumps(self.record, indent=1))

    # -- pieces shared by our PPO and TRL's trainers
    def _judges(self, tok):
        from rlhf_ext.sentiment import gold_judge, vader_judge

        return gold_judge(tok.eos_token_id), vader_judge()

    def _rm_path(self, name):
        return str(rm_dir(self.args) / name)

    def _point(self, iteration, policy, tok, heldout, transfer, proxy, gold, vader):
        st = self.st
        # Iteration 0 is the reference policy itself (checked at start-up: π_θ0 = π_ref) evaluated with the same seed
        # for every variant, so it is computed once per settings and reused.
        cache = Path(self.args.workdir) / f"reference_point_{'quick' if self.args.quick else 'full'}.json"
        if iteration == 0 and cache.is_file() and json.loads(cache.read_text())["settings"] == st:
            p = {**json.loads(cache.read_text())["point"], "train_seconds": 0.0}
        else:
            p = {"iteration": iteration, "train_seconds": self.record["train_seconds"],
                 **evaluate(policy, tok, heldout, gold, vader, proxy, st["max_tokens"])}
            if iteration % st["transfer_every"] == 0:
                t = evaluate(policy, tok, transfer, gold, vader, proxy, st.get("transfer_tokens", st["max_tokens"]))
                p["transfer"] = {k: t[k] for k in ("gold", "sentiment", "vader", "kl", "length", "eos", "gold_se",
                                                   "samples")}
            if iteration == 0:
                from rlhf_ext.integrity import write_text_atomic

                cache.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(cache, json.dumps({"settings": st, "point": p}))
        self.record["points"] = [q for q in self.record["points"] if q["iteration"] < iteration] + [p]
        print(f"[{self.name} s{self.seed}] it {iteration:3d}  gold {p['gold']:+.3f}  vader {p['vader']:+.3f}  "
              f"proxy {p['proxy']:+.2f}  KL {max(p['kl'], 0.0):.2f}  len {p['length']:.1f}  eos {p['eos']:.2f}"
              + (f"  transfer gold {p['transfer']['gold']:+.3f}" if "transfer" in p else ""), flush=True)

    def execute(self):
        if self.record["done"]:
            return
        (self._execute_trl if self.spec["trainer"] != "ppo" else self._execute_ppo)()

    # -- our PPO
    def _ppo_trainer(self, reward: str | None = None, **config):
        """The variant's PPOTrainer (reward: a reward-model path instead of the variant's proxy) and what evaluation
        needs: (trainer, tokenizer, gold, vader, proxy yardstick, held-out rows, transfer rows)."""
        import torch

        from rlhf_ext import PPOConfig, PPOTrainer
        from rlhf_ext.reward.artifact import load_reward_model

        st, spec = self.st, self.spec
        model, tok, train, heldout_ds, transfer_ds, lora = self.args.task()
        gold, vader = self._judges(tok)
        cfg = PPOConfig(str(self.dir), kl_controller=spec["kl_controller"], kl_target=spec.get("kl_target"),
                        init_kl_coef=BETA, kl_controller_kwargs=spec.get("kl_controller_kwargs"),
                        aggregation=spec.get("aggregation", "mean"), aggregation_kwargs=spec.get("aggregation_kwargs"),
                        shapers=spec.get("shapers"), per_device_train_batch_size=st["batch"],
                        max_completion_length=st["max_tokens"], num_ppo_epochs=st["epochs"], learning_rate=st["lr"],
                        max_steps=st["iterations"], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                        seed=self.seed, logging_steps=10**6, disable_tqdm=True, report_to="none",
                        lora_top_layers=st["lora_layers"], max_prompt_length=512, **config)
        rewards = [reward] if reward else [self._rm_path(spec["rm"])] if spec["rm"] else [gold]
        tr = PPOTrainer(model, reward_funcs=rewards, args=cfg, train_dataset=train, processing_class=tok,
                        peft_config=lora(), audit_funcs=[gold])
        proxy = load_reward_model(self._rm_path(self.spec.get("yardstick", "k1")))
        heldout, transfer = prompt_rows(heldout_ds, tok, st["heldout"]), prompt_rows(transfer_ds, tok, st["transfer"])
        return tr, tok, gold, vader, proxy, heldout, transfer

    def _execute_ppo(self):
        tr, tok, gold, vader, proxy, heldout, transfer = self._ppo_trainer()
        tr.add_callback(self._eval_callback(tr, tok, gold, vader, proxy, heldout, transfer))
        self._train(tr, tok, gold, vader, proxy, heldout, transfer)
        self._finish()

    def _train(self, tr, tok, gold, vader, proxy, heldout, transfer):
        """Train from the run's checkpoint when there is one (the record cut back to it), else from iteration 0."""
        ckpt = self.dir / "checkpoint"
        if (ckpt / "manifest.json").is_file():
            done_it = json.loads((ckpt / "ppo_state.json").read_text())["iteration"]
            self.record["points"] = [q for q in self.record["points"] if q["iteration"] <= done_it]
            self.record["train"] = self.record["train"][:done_it]
            print(f"[{self.name} s{self.seed}] resuming from iteration {done_it}", flush=True)
            tr.train(resume_from_checkpoint=str(ckpt))
        else:
            self.record["points"], self.record["train"], self.record["train_seconds"] = [], [], 0.0
            self._point(0, tr.policy, tok, heldout, transfer, proxy, gold, vader)
            self.save()
            tr.train()

    def _eval_callback(self, tr, tok, gold, vader, proxy, heldout, transfer):
        """Logs each iteration into the record; evaluates, checkpoints and saves the record every `eval_every`."""
        from transformers import TrainerCallback

        st, run = self.st, self

        class EvalAndCheckpoint(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                h = tr._metrics_history[-1]
                run.record["train_seconds"] += h["time/iteration_s"]
                run.record["train"].append({k: h.get(k) for k in (
                    "objective/scores", "objective/kl", "objective/beta", "kl/after_update", "response/length_mean",
                    "response/eos_rate", "rewards/ensemble_std", "audit/gold", "time/iteration_s")})
                if state.global_step % st["eval_every"] == 0:
                    run._point(state.global_step, tr.policy, tok, heldout, transfer, proxy, gold, vader)
                    tr.save_checkpoint(str(run.dir / "checkpoint"))
                    run.save()

        return EvalAndCheckpoint()

    def _finish(self):
        """Keep what the monitor and the review queue wrote (alarms into the record; the folders for the report),
        drop the checkpoints."""
        from rlhf_ext.monitor.queue import read_jsonl

        self.record["alarms"] = read_jsonl(self.dir / "monitor" / "alarms.jsonl")
        self.record["queued_pairs"] = len(read_jsonl(self.dir / "review" / "queue.jsonl"))
        self.record["done"] = True
        self.save()
        for p in list(self.dir.glob("checkpoint*")):
            shutil.rmtree(p, ignore_errors=True)

    # -- TRL 1.16's RLOO / GRPO with the same reward pipeline, same budget (completions), same LoRA
    def _execute_trl(self):
        import torch
        from torch import nn
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        from rlhf_ext.ppo.policy import PolicyAndValue
        from rlhf_ext.reward.artifact import load_reward_model
        from rlhf_ext.reward.pipeline import RewardPipeline

        st, spec = self.st, self.spec
        model, tok, train, heldout_ds, transfer_ds, lora = self.args.task()
        gold, vader = self._judges(tok)
        import copy

        trl_tok = copy.deepcopy(tok)
        if "<|endoftext|>" in trl_tok.get_vocab() and trl_tok.pad_token == trl_tok.eos_token:
            trl_tok.pad_token = "<|endoftext|>"  # TRL finds completion ends by pad/EOS ids: keep them apart
        proxy = load_reward_model(self._rm_path(self.spec.get("yardstick", "k1")))
        pipeline = RewardPipeline([load_reward_model(self._rm_path(spec["rm"]))], eos_token_id=tok.eos_token_id)
        Config, Trainer = (RLOOConfig, RLOOTrainer) if spec["trainer"] == "rloo" else (GRPOConfig, GRPOTrainer)
        cfg = Config(str(self.dir), per_device_train_batch_size=st["batch"], num_generations=2,
                     max_completion_length=st["max_tokens"], temperature=1.0, beta=BETA, learning_rate=st["lr"],
                     max_steps=st["iterations"], save_strategy="steps", save_steps=st["eval_every"],
                     save_total_limit=1, use_cpu=not torch.cuda.is_available(), bf16=False, seed=self.seed,
                     report_to="none", logging_steps=10**6, disable_tqdm=True, gradient_checkpointing=False)
        tr = Trainer(model=model, reward_funcs=pipeline, args=cfg, train_dataset=train, processing_class=trl_tok,
                     peft_config=lora())
        policy = PolicyAndValue(tr.model, nn.Linear(1, 1), "shared", 1.0)
        heldout, transfer = prompt_rows(heldout_ds, tok, st["heldout"]), prompt_rows(transfer_ds, tok, st["transfer"])
        run = self

        class EvalEvery(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                run.record["train_seconds"] += time.perf_counter() - self.t
                if state.global_step % st["eval_every"] == 0:
                    run._point(state.global_step, policy, tok, heldout, transfer, proxy, gold, vader)
                    run.save()

        tr.add_callback(EvalEvery())
        last = max((int(p.name.split("-")[-1]) for p in self.dir.glob("checkpoint-*")), default=0)
        if last:
            self.record["points"] = [q for q in self.record["points"] if q["iteration"] <= last]
            tr.train(resume_from_checkpoint=True)
        else:
            self.record["points"], self.record["train_seconds"] = [], 0.0
            self._point(0, policy, tok, heldout, transfer, proxy, gold, vader)
            self.save()
            tr.train()
        self._finish()
