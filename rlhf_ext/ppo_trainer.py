"""PPO on one shared base: policy (LoRA), reference (adapters off), critic and reward members.

One iteration, top to bottom (see `_iteration`):
  rollout (generate) → score (rewards → normalise → aggregate → shape; frozen-prefix cache; ref log-probs)
  → per-token KL penalty → GAE → epochs × minibatches of clipped policy + value loss → KL enforcement (hard mode)
  → β update → log. The math lives in `rl_math.py`; the KL controllers in `kl.py`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import rl_math as F
from .ensemble import ExternalRewardModel, RewardPipeline
from .kl import build_controller
from .models import ensure_pad_token, is_quantized, load_model, load_tokenizer, trunk_of
from .ppo_config import PPOConfig
from .registry import build
from .reward_model import RewardEnsemble, load_reward_model, message_text, pad_ids, read_spec
from .split_trunk import frozen_prefix_split, positions, restrict_to_top_layers

POLICY, CRITIC = "policy", "critic"


# ------------------------------------------------------------------------------------------------- data
def tokenize_prompts(dataset, tokenizer, args: PPOConfig):
    """TRL prompt-only data (text or conversational) → list of (prompt, token ids). Bad rows raise or drop."""
    if "prompt" not in dataset.column_names:
        raise ValueError(
            f"The PPO dataset needs a 'prompt' column (TRL prompt-only format); it has {dataset.column_names}."
        )
    rows, too_long = [], []
    for i, prompt in enumerate(dataset["prompt"]):
        text = message_text(prompt)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"Prompt {i} is empty. Remove empty prompts from the dataset.")
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(text=prompt)["input_ids"]
        if len(ids) > args.max_prompt_length:
            too_long.append((i, len(ids)))
            if args.prompt_overflow == "drop":
                continue
            if args.prompt_overflow == "truncate":
                ids = ids[-args.max_prompt_length :]
        rows.append((prompt, list(ids)))
    if too_long:
        msg = (f"{len(too_long)} prompt(s) exceed max_prompt_length={args.max_prompt_length} tokens (first: row "
               f"{too_long[0][0]} with {too_long[0][1]} tokens).")
        if args.prompt_overflow == "error":
            raise ValueError(msg + " Raise `max_prompt_length`, or set `prompt_overflow` to 'drop' or 'truncate'.")
        warnings.warn(msg + f" prompt_overflow={args.prompt_overflow!r}: they were {args.prompt_overflow}ped."
                      if args.prompt_overflow == "drop" else msg + " They were truncated on the left.")
    if len(rows) < args.per_device_train_batch_size:
        raise ValueError(f"Only {len(rows)} usable prompts for a batch of {args.per_device_train_batch_size}.")
    return rows


# ----------------------------------------------------------------------------------------------- trainer
class PPOTrainer(Trainer):
    """PPO for the current HF stack; call shape mirrors TRL's GRPO/RLOO trainers.

    Args:
        model: hub id, local folder, `.gguf`, the embedded default name, a causal LM, or a `PeftModel`.
        reward_funcs: one or a list of: reward-model artifact path / `RewardEnsemble` (members attached to the
            policy's base as adapters when it matches), an `ExternalRewardModel`, or a Python callable with TRL's
            `reward_funcs` signature.
        args: `PPOConfig`.  train_dataset: TRL prompt-only dataset.  processing_class: tokenizer.
        peft_config: LoRA config for the policy (and the separate critic); default LoRA r=16 on attention
            projections when `model` is not already a `PeftModel`.
        audit_funcs: judges with the `reward_funcs` signature (e.g. a gold reward), logged as `audit/<name>` beside
            the proxy reward to spot reward hacking; never used in the loss.
    """

    def __init__(self, model, reward_funcs, args: PPOConfig | None = None, train_dataset=None,
                 processing_class=None, peft_config=None, callbacks: list[TrainerCallback] | None = None,
                 load_in_4bit: bool = False, audit_funcs=None):
        from peft import LoraConfig, PeftModel, get_peft_model

        args = args or PPOConfig("ppo-output")
        if not isinstance(args, PPOConfig):
            raise TypeError("`args` must be a rlhf_ext.PPOConfig.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required (TRL prompt-only format: a 'prompt' column).")
        torch.manual_seed(args.seed)

        # Policy = LoRA adapter on the frozen base; reference = the same base with adapters disabled
        self.model_name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        if isinstance(model, str):
            if processing_class is None:
                processing_class = load_tokenizer(model, trust_remote_code=args.trust_remote_code)
            model = load_model(model, "causal", load_in_4bit=load_in_4bit, trust_remote_code=args.trust_remote_code,
                               **(args.model_init_kwargs or {}))
        if processing_class is None:
            raise ValueError("Pass `processing_class` (the tokenizer) when `model` is an instantiated model.")
        self.tokenizer = ensure_pad_token(processing_class)
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("`model` is already a PeftModel; drop `peft_config` or pass the base model.")
            self.policy_adapter = model.active_adapter  # the user's adapter is the policy
        else:
            if is_quantized(model):
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
            peft_config = peft_config or LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            peft_config.task_type = "CAUSAL_LM"
            restrict_to_top_layers(peft_config, model, args.lora_top_layers)
            model = get_peft_model(model, peft_config, adapter_name=POLICY)
            self.policy_adapter = POLICY
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs or {"use_reentrant": False})
            model.enable_input_require_grads()

        # Critic: value head on the policy trunk (shared, default) or its own adapter on the same base
        hidden = model.get_base_model().config.get_text_config().hidden_size
        if args.critic == "separate":
            torch.manual_seed(args.seed + 1)
            model.add_adapter(CRITIC, model.peft_config[self.policy_adapter])
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(model.parameters()).device)

        # Rewards: members → normalise → aggregate → shape
        reward_funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if args.reward_model_path:
            reward_funcs = [args.reward_model_path, *reward_funcs]
        if not reward_funcs:
            raise ValueError("Pass at least one reward: `reward_funcs=` a reward-model path, model or callable.")
        members = [self._reward_member(r, model) for r in reward_funcs]
        self.rewards = RewardPipeline(members, args.aggregation, args.aggregation_kwargs, args.shapers,
                                      args.nonfinite_rewards, eos_token_id=self.tokenizer.eos_token_id)
        self.kl_ctl = build_controller(args.kl_controller, args.init_kl_coef, args.kl_target,
                                       **(args.kl_controller_kwargs or {}))
        self.kl_estimator = build("kl_estimator", args.kl_estimator)
        # Audit judges (e.g. a gold reward) are logged next to the proxy to spot hacking; they never train.
        self.audit_funcs = {getattr(f, "__name__", f"audit_{i}"): f for i, f in enumerate(audit_funcs or [])}

        # Frozen-prefix cache: layers below every trained adapter run once per rollout, not once per pass
        trained = [self.policy_adapter] + ([CRITIC] if args.critic == "separate" else [])
        self.split = frozen_prefix_split(model, trained) if args.cache_frozen_layers else None

        self.prompts = tokenize_prompts(train_dataset, self.tokenizer, args)
        self.args = args  # read by _set_trainable before Trainer.__init__ sets it
        self._set_trainable(model)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=self.tokenizer,
                         callbacks=callbacks)
        self.iteration, self.data_epoch, self.data_pos = 0, 0, 0
        self._metrics_history: list[dict] = []

    # -- setup helpers -----------------------------------------------------------------------------------------
    def _reward_member(self, r, model):
        from transformers import PreTrainedModel

        if isinstance(r, (str, os.PathLike)):
            spec = read_spec(r)
            same_base = spec["mode"] != "full" and spec.get("base_model") == self.model_name
            if same_base:  # members become adapters on our base: no second model copy
                return load_reward_model(r, base_model=model, tokenizer=None, adapter_prefix="rm_")
            warnings.warn(f"Reward model {r} was trained on {spec.get('base_model')!r}, not {self.model_name!r}: "
                          "loading it as a separate model.")
            return load_reward_model(r)
        if isinstance(r, PreTrainedModel):
            return ExternalRewardModel(r, load_tokenizer(r.config._name_or_path))
        if isinstance(r, RewardEnsemble) or callable(r) or hasattr(r, "score_completions"):
            return r
        raise TypeError(f"Unsupported reward {type(r).__name__}: use a path, RewardEnsemble, model or callable.")

    def _set_trainable(self, model):
        trainable = {self.policy_adapter} | ({CRITIC} if self.args.critic == "separate" else set())
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n and any(f".{a}." in n for a in trainable))
        if is_quantized(model):  # keep LoRA math in fp32 on a 4-bit base
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
            self.optimizer = cls(self.trainable_parameters(), **kwargs)
        return self.optimizer

    def _policy_params(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and f".{self.policy_adapter}." in n]

    # -- forward passes ----------------------------------------------------------------------------------------
    def _forward(self, ids, mask, n_resp, adapter=None, values=True, h_low=None):
        """Logits/temperature and values for the response positions. ids, mask: [B, P+R] → [B, R, V], [B, R].

        adapter: None (policy), "ref" (adapters off) or CRITIC (separate critic: values only, logits None).
        h_low: the cached hidden state entering the lowest adapted layer ([B, P+R, H]); only the layers above run.
        """
        pos = positions(mask)  # same positions as generate() uses for left-padded prompts
        peft = self.model

        def hidden():
            if h_low is not None:
                return self.split.upper(h_low, mask, pos)
            return trunk_of(peft)(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state

        with self.accelerator.autocast():
            if adapter == "ref":
                with peft.disable_adapter():
                    h = hidden()
            elif adapter == CRITIC:
                peft.base_model.set_adapter(CRITIC)
                try:
                    h = hidden()
                finally:
                    peft.base_model.set_adapter(self.policy_adapter)
                    self._set_trainable(peft)  # set_adapter flips requires_grad; restore ours
                return None, self.value_head(h[:, -n_resp - 1 : -1].float()).squeeze(-1)
            else:
                h = hidden()
            h = h[:, -n_resp - 1 : -1]  # states that predict each response token
            # lm_head is linear: scaling its input by 1/T equals scaling the logits, without a [B, R, V] copy
            logits = peft.get_base_model().get_output_embeddings()(h / self.args.temperature).float()
        v = None
        if values and self.args.critic == "shared" and adapter != "ref":
            v = self.value_head(h.float()).squeeze(-1)
        return logits, v

    @torch.no_grad()
    def _lower(self, ids, mask):
        """The frozen-prefix cache: hidden state entering the lowest adapted layer, or None when disabled."""
        if self.split is None:
            return None
        with self.accelerator.autocast():
            return self.split.lower(ids, mask, positions(mask))

    def _policy_values(self, ids, mask, n_resp, h_low=None):
        """(logits, values) under the current policy and critic."""
        logits, v = self._forward(ids, mask, n_resp, h_low=h_low)
        if self.args.critic == "separate":
            v = self._forward(ids, mask, n_resp, adapter=CRITIC, h_low=h_low)[1]
        return logits, v

    # -- rollout -----------------------------------------------------------------------------------------------
    def _next_prompts(self):
        """This process's share of the next global batch (same order on every process, disjoint slices)."""
        B, world, rank = self.args.per_device_train_batch_size, self.accelerator.num_processes, self.accelerator.process_index
        if self.data_pos + B * world > len(self.prompts):
            self.data_epoch, self.data_pos = self.data_epoch + 1, 0
        g = torch.Generator().manual_seed(self.args.seed + self.data_epoch)
        order = torch.randperm(len(self.prompts), generator=g).tolist()
        start = self.data_pos + rank * B
        batch = [self.prompts[i] for i in order[start : start + B]]
        self.data_pos += B * world
        return batch

    def _mean_over_processes(self, x: float) -> float:
        """Every process must take the same KL decisions, or their adapters drift apart."""
        if self.accelerator.num_processes == 1:
            return x
        return float(self.accelerator.reduce(torch.tensor(x, device=self.args.device), reduction="mean"))

    def _sync_grads(self):
        """Data parallel by hand: only LoRA + value head train, so all-reduce their gradients (the trainer calls
        the trunk directly, not through a DDP wrapper)."""
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for p in self.trainable_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.accelerator.num_processes

    @torch.no_grad()
    def _generate(self, batch):
        """Sample one response per prompt with the policy adapter. batch: list of (prompt, ids)."""
        args, tok, peft = self.args, self.tokenizer, self.model
        device = self.args.device
        p_ids, p_mask = pad_ids([ids for _, ids in batch], tok.pad_token_id, side="left")
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        peft.eval()
        t0 = time.perf_counter()
        gen = peft.generate(input_ids=p_ids, attention_mask=p_mask, do_sample=True, temperature=args.temperature,
                            top_p=args.top_p, top_k=0, max_new_tokens=args.max_completion_length,
                            eos_token_id=tok.eos_token_id if args.stop_on_eos else None, pad_token_id=tok.pad_token_id,
                            min_new_tokens=1)
        t_gen = time.perf_counter() - t0
        resp = gen[:, p_ids.shape[1]:]
        # Response mask from the first EOS (inclusive), never from pad ids: pad == EOS for SmolLM2
        is_eos = resp == tok.eos_token_id if args.stop_on_eos else torch.zeros_like(resp, dtype=torch.bool)
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(resp[:, 0], resp.shape[1]))
        r_mask = (torch.arange(resp.shape[1], device=device)[None] <= first[:, None]).long()
        has_eos = is_eos.any(1)
        resp = torch.where(r_mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
        completion_ids = [resp[i, : int(r_mask[i].sum())].tolist() for i in range(len(batch))]
        texts = tok.batch_decode([c[:-1] if h else c for c, h in zip(completion_ids, has_eos.tolist())],
                                 skip_special_tokens=True)
        prompts = [p for p, _ in batch]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        return dict(ids=torch.cat([p_ids, resp], 1), mask=torch.cat([p_mask, r_mask], 1), resp=resp, r_mask=r_mask,
                    has_eos=has_eos, completion_ids=completion_ids, texts=texts, prompts=prompts,
                    completions=completions, t_gen=t_gen, R=resp.shape[1])

    @torch.no_grad()
    def _rollout(self, batch):
        """Generate, then score: rewards (members → aggregate → shape) and reference log-probs."""
        g = self._generate(batch)
        ids, mask, resp, r_mask, has_eos, R = g["ids"], g["mask"], g["resp"], g["r_mask"], g["has_eos"], g["R"]
        texts, prompts, t_gen = g["texts"], g["prompts"], g["t_gen"]
        scores, valid, raw, norm = self.rewards.score(prompts, g["completions"], g["completion_ids"], has_eos=has_eos.cpu())
        device = ids.device
        audit = {name: fn(prompts=prompts, completions=g["completions"], completion_ids=g["completion_ids"])
                 for name, fn in self.audit_funcs.items()}  # monitoring only: never enters the loss

        h_low = self._lower(ids, mask)  # shared by the reference pass, every epoch, the critic and KL checks
        with self.accelerator.autocast():
            ref_logits, _ = self._forward(ids, mask, R, adapter="ref", values=False, h_low=h_low)
        ref_logp = F.logprobs_from_logits(ref_logits, resp)
        out = dict(ids=ids, mask=mask, resp=resp, r_mask=r_mask.float() * valid.to(device)[:, None].float(),
                   ref_logp=ref_logp, scores=scores.to(device), valid=valid, raw=raw, norm=norm, has_eos=has_eos,
                   texts=texts, prompts=prompts, t_gen=t_gen, R=R, audit=audit, h_low=h_low)
        if self.kl_ctl.enforce or self.args.log_kl_after_update:
            out["ref_lp_full"] = ref_logits.log_softmax(-1)  # exact KL checks need the whole distribution
        return out

    def _rewards_and_advantages(self, ro, old_logp, old_values):
        """Per-token reward −β·kl_t, plus the sequence score at the last response token; then GAE."""
        m = ro["r_mask"]
        kl_t = self.kl_estimator(old_logp, ro["ref_logp"]) * m  # [B, R]
        rewards = -self.kl_ctl.beta * kl_t
        last = (m.sum(1) - 1).clamp(min=0).long()
        rewards[torch.arange(len(last)), last] += ro["scores"] * ro["valid"].to(m)
        adv, returns = F.gae(rewards * m, old_values, m, self.args.gamma, self.args.lam)
        if self.args.whiten_advantages:
            adv = F.masked_whiten(adv, m)
        return kl_t, adv, returns

    # -- KL enforcement ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch_kl(self, ro, logits=None) -> float:
        """Exact KL(π‖π_ref) per visited state (full vocabulary), summed over the response, mean over sequences."""
        if logits is None:
            logits, _ = self._forward(ro["ids"], ro["mask"], ro["R"], values=False, h_low=ro["h_low"])
        kl = F.full_kl(logits.log_softmax(-1), ro["ref_lp_full"])  # [B, R]
        m = ro["r_mask"]
        n = (m.sum(1) > 0).float()
        return self._mean_over_processes(float(((kl * m).sum(1) * n).sum() / n.sum().clamp(min=1)))

    @torch.no_grad()
    def _enforce_kl(self, ro, before: list[torch.Tensor], kl: float, stats: dict) -> float:
        """Backtrack θ_before + α(θ − θ_before) (α = f, f², …); else θ_before; else shrink LoRA-B towards the
        reference (scale c → 0 gives π = π_ref exactly, so some candidate always satisfies KL ≤ δ)."""
        ctl, params = self.kl_ctl, [p for _, p in self._policy_params()]
        after = [p.detach().clone() for p in params]

        def set_to(alpha):
            for p, a, b in zip(params, after, before):
                p.copy_(b + alpha * (a - b))

        alpha = 1.0
        for _ in range(ctl.max_backtracks):
            alpha *= ctl.backtrack_factor
            set_to(alpha)
            stats["kl/backtracks"] += 1
            kl = self._batch_kl(ro)
            if ctl.accept(kl):
                return kl
        set_to(0.0)
        stats["kl/restored"] += 1
        kl = self._batch_kl(ro)
        lora_b = [p for n, p in self._policy_params() if "lora_B" in n]
        base_b = [p.detach().clone() for p in lora_b]
        c = 1.0
        while not ctl.accept(kl):
            c = c * ctl.backtrack_factor if c > 1e-3 else 0.0
            for p, b in zip(lora_b, base_b):
                p.copy_(c * b)
            stats["kl/shrunk"] += 1
            kl = self._batch_kl(ro)
            if c == 0.0:
                break
        return kl

    # -- one PPO iteration ------------------------------------------------------------------------------------
    def _iteration(self):
        args, stats = self.args, {"kl/backtracks": 0, "kl/restored": 0, "kl/shrunk": 0}
        t0 = time.perf_counter()
        ro = self._rollout(self._next_prompts())
        ids, mask, resp, m, R, h_low = ro["ids"], ro["mask"], ro["resp"], ro["r_mask"], ro["R"], ro["h_low"]
        B, mb = ids.shape[0], args.num_mini_batches
        self.model.train()
        if mb > 1:  # old log-probs/values need their own pass; with one minibatch epoch 1's forward gives them
            with torch.no_grad():
                logits, v = self._policy_values(ids, mask, R, h_low)
                old_logp, old_values = F.logprobs_from_logits(logits, resp), v
                kl_t, adv, returns = self._rewards_and_advantages(ro, old_logp, old_values)
        acc: dict[str, list] = {}
        stopped = False
        for epoch in range(args.num_ppo_epochs):
            before = [p.detach().clone() for _, p in self._policy_params()] if self.kl_ctl.enforce else None
            for idx in torch.randperm(B).split(B // mb) if mb > 1 else [torch.arange(B)]:
                logits, values = self._policy_values(ids[idx], mask[idx], R, None if h_low is None else h_low[idx])
                logp = F.logprobs_from_logits(logits, resp[idx])
                if mb == 1 and epoch == 0:  # θ = θ_old here: reuse this forward as the rollout pass
                    old_logp, old_values = logp.detach(), values.detach()
                    kl_t, adv, returns = self._rewards_and_advantages(ro, old_logp, old_values)
                    if self.kl_ctl.enforce:
                        stats["kl/before_update"] = self._batch_kl(ro, logits.detach())
                elif mb == 1 and self.kl_ctl.enforce:  # this forward measures the last update for free
                    kl_now = self._batch_kl(ro, logits.detach())
                    if not self.kl_ctl.accept(kl_now):
                        stats["kl/after_update"] = self._enforce_kl(ro, prev_before, kl_now, stats)
                        stopped = True
                        break
                mi = m[idx]
                pg_loss, clipfrac, approx_kl = F.policy_loss(logp, old_logp[idx], adv[idx], mi, args.clip_range)
                vf_loss, vf_clipfrac = F.value_loss(values, old_values[idx], returns[idx], mi, args.clip_range_value)
                entropy = F.masked_mean(F.entropy_from_logits(logits.detach() if args.ent_coef == 0 else logits), mi)
                loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * entropy  # PPO objective (CleanRL form)
                self.accelerator.backward(loss)
                self._sync_grads()
                if args.max_grad_norm:
                    self.accelerator.clip_grad_norm_(self.trainable_parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for k, val in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("policy/clipfrac", clipfrac),
                               ("policy/approx_kl", approx_kl), ("val/clipfrac", vf_clipfrac),
                               ("policy/entropy", entropy)):
                    acc.setdefault(k, []).append(float(val.detach()))
            if stopped:
                break
            if self.kl_ctl.enforce and (mb > 1 or epoch == args.num_ppo_epochs - 1):
                kl_now = self._batch_kl(ro)
                if not self.kl_ctl.accept(kl_now):
                    kl_now = self._enforce_kl(ro, before, kl_now, stats)
                    stats["kl/after_update"] = kl_now
                    break
                stats["kl/after_update"] = kl_now
            prev_before = before
        if not self.kl_ctl.enforce and args.log_kl_after_update:
            stats["kl/after_update"] = self._batch_kl(ro)
        self.model.eval()

        # KL controller sees the rollout's sequence KL (estimator on sampled tokens, mean over sequences)
        valid_rows = (m.sum(1) > 0).float()
        kl_seq = float((kl_t.sum(1) * valid_rows).sum() / valid_rows.sum().clamp(min=1))
        beta_used = self.kl_ctl.beta
        kl_seq = self._mean_over_processes(kl_seq)
        self.kl_ctl.update(kl_seq, n_steps=B * self.accelerator.num_processes)
        lengths = ro["r_mask"].sum(1)[ro["valid"].to(m.device)]
        dt = time.perf_counter() - t0
        metrics = {k: sum(v) / len(v) for k, v in acc.items()}
        metrics.update({
            "objective/kl": kl_seq, "objective/beta": beta_used, "objective/scores": float(ro["scores"][ro["valid"]].mean()),
            "val/explained_variance": F.explained_variance(old_values, returns, m),
            "val/mean": float(F.masked_mean(old_values, m)),
            "response/length_mean": float(lengths.float().mean()) if len(lengths) else 0.0,
            "response/eos_rate": float(ro["has_eos"].float().mean()),
            "rewards/dropped_nonfinite": int((~ro["valid"]).sum()),
            "time/iteration_s": dt, "time/generate_s": ro["t_gen"],
            "time/tokens_per_s": float(ro["r_mask"].sum()) / dt,
            **{k: float(v) for k, v in stats.items()},
        })
        for j, name in enumerate(self.rewards.member_names):
            metrics[f"rewards/{name}_raw"] = float(ro["raw"][:, j][ro["valid"]].mean())
        for name, vals in ro["audit"].items():
            metrics[f"audit/{name}"] = sum(vals) / len(vals)
        if ro["norm"].shape[1] > 1:
            metrics["rewards/ensemble_std"] = float(ro["norm"][ro["valid"]].std(-1).mean())
        return metrics, ro

    @torch.no_grad()
    def evaluate_policy(self, dataset, judges=None, batch_size: int | None = None, adapters: bool = True) -> dict:
        """Sample responses for held-out prompts; report judge scores, lengths, EOS rate and the exact KL to the
        reference (adapters off) per sequence. `adapters=False` evaluates the reference policy itself."""
        rows = tokenize_prompts(dataset, self.tokenizer, self.args)
        bs = batch_size or self.args.per_device_train_batch_size
        judges = judges or {}
        out = {"kl": [], "length": [], "eos": [], "texts": [], **{k: [] for k in judges}}
        for i in range(0, len(rows), bs):
            batch = rows[i : i + bs]
            if adapters:
                g = self._generate(batch)
            else:
                with self.model.disable_adapter():
                    g = self._generate(batch)
            h_low = self._lower(g["ids"], g["mask"])
            lp = self._forward(g["ids"], g["mask"], g["R"], values=False, h_low=h_low)[0].log_softmax(-1)
            ref = self._forward(g["ids"], g["mask"], g["R"], adapter="ref", values=False, h_low=h_low)[0].log_softmax(-1)
            out["kl"] += (F.full_kl(lp, ref) * g["r_mask"]).sum(1).tolist()
            out["length"] += g["r_mask"].sum(1).tolist()
            out["eos"] += g["has_eos"].float().tolist()
            out["texts"] += g["texts"]
            for k, fn in judges.items():
                out[k] += list(fn(prompts=g["prompts"], completions=g["completions"], completion_ids=g["completion_ids"]))
        summary = {f"{k}_mean": sum(v) / len(v) for k, v in out.items() if k != "texts"}
        return {**summary, "samples": out}

    # -- training loop -----------------------------------------------------------------------------------------
    def _total_iterations(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        per_epoch = len(self.prompts) // (self.args.per_device_train_batch_size * self.accelerator.num_processes)
        return max(1, int(math.ceil(self.args.num_train_epochs * per_epoch)))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        args = self.args
        total = self._total_iterations()
        self.create_optimizer_and_scheduler(num_training_steps=total * args.num_ppo_epochs * args.num_mini_batches)
        self.state.max_steps, self.state.global_step = total, 0
        self.state.logging_steps, self.state.save_steps = args.logging_steps, args.save_steps
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"No checkpoint found in {args.output_dir} to resume from.")
            self._load_checkpoint(resume_from_checkpoint)
        if self.accelerator.num_processes > 1:  # same init everywhere (seeded above), different samples per process
            torch.manual_seed(args.seed + 1000 * self.accelerator.process_index + self.iteration)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        while self.iteration < total and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            metrics, _ = self._iteration()
            self.iteration += 1
            self.state.global_step = self.iteration
            self.state.epoch = self.data_epoch + self.data_pos / max(1, len(self.prompts))
            self._metrics_history.append(metrics)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if args.logging_steps and self.iteration % int(args.logging_steps) == 0:
                self.log(metrics)
            if args.save_strategy == "steps" and args.save_steps and self.iteration % int(args.save_steps) == 0:
                if self.accelerator.is_main_process:  # adapters are identical on every process
                    self.save_checkpoint()
                self.accelerator.wait_for_everyone()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return self._metrics_history

    # -- checkpoints: atomic, complete (policy + critic + value head + optimizer + controller + RNG + data) -----
    def save_checkpoint(self, output_dir: str | None = None) -> str:
        from safetensors.torch import save_file

        final = Path(output_dir or Path(self.args.output_dir) / f"checkpoint-{self.iteration}")
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        adapters = [self.policy_adapter] + ([CRITIC] if self.args.critic == "separate" else [])
        self.model.save_pretrained(tmp / "adapters", selected_adapters=adapters, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(tmp / "value_head.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict()},
                   tmp / "optimizer.pt")
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"iteration": self.iteration, "data_epoch": self.data_epoch, "data_pos": self.data_pos,
                 "kl_controller": self.kl_ctl.state_dict(), "rewards": self.rewards.state_dict(),
                 "python_rng": _jsonable(random.getstate()), "metrics": self._metrics_history}
        (tmp / "ppo_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a killed run leaves either the old checkpoint or the new one, never half of one
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        return str(final)

    def _load_checkpoint(self, path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "ppo_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a complete PPO checkpoint (ppo_state.json missing).")
        for a in [self.policy_adapter] + ([CRITIC] if self.args.critic == "separate" else []):
            sub = path / "adapters" / (a if a != "default" else "")
            sd = load_file(str(sub / "adapter_model.safetensors"))
            set_peft_model_state_dict(self.model, sd, adapter_name=a)
        self._set_trainable(self.model)
        self.value_head.load_state_dict(load_file(str(path / "value_head.safetensors")))
        opt = torch.load(path / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.lr_scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
        state = json.loads((path / "ppo_state.json").read_text())
        self.iteration, self.data_epoch, self.data_pos = state["iteration"], state["data_epoch"], state["data_pos"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.rewards.load_state_dict(state["rewards"])
        random.setstate(_untuple(state["python_rng"]))
        self._metrics_history = state["metrics"]
        self.state.global_step = self.iteration

    # -- saving the policy (never the critic wrapper) ----------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, merge: bool = False):
        """Save the policy: its LoRA adapter (default) or, with `merge=True`, merged full weights."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        if merge:
            if is_quantized(self.model):
                raise ValueError("Cannot merge LoRA into a 4-bit base; save the adapter (merge=False) or reload the "
                                 "base in bf16/fp32, load the adapter and merge there.")
            import copy

            merged = copy.deepcopy(self.model)
            merged.base_model.set_adapter(self.policy_adapter)
            merged = merged.merge_and_unload(adapter_names=[self.policy_adapter])
            merged.save_pretrained(output_dir, safe_serialization=True)
        else:
            self.model.save_pretrained(output_dir, selected_adapters=[self.policy_adapter], safe_serialization=True)
        self.tokenizer.save_pretrained(output_dir)
        self._write_model_card(output_dir)

    def _write_model_card(self, output_dir):
        last = self._metrics_history[-1] if self._metrics_history else {}
        card = (f"---\nlibrary_name: peft\nbase_model: {self.model_name}\ntags: [rlhf_ext, ppo, trl, rlhf]\n---\n\n"
                f"# PPO policy trained with rlhf_ext\n\nBase model: `{self.model_name}`. KL controller: "
                f"`{self.args.kl_controller}` (δ = {self.args.kl_target}), aggregation `{self.args.aggregation}`, "
                f"shapers `{self.args.shapers}`.\n\nIterations: {self.iteration}. Last logged KL: "
                f"{last.get('objective/kl', float('nan')):.3f} nats/sequence.\n")
        Path(output_dir, "README.md").write_text(card)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _untuple(x):
    return tuple(_untuple(v) for v in x) if isinstance(x, list) else x
