"""The memory plan itself: one planned configuration (`_Run`), the static components, each phase's moments and the
peak; `estimate()` and `largest_batch()`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .shapes import PlanError, is_gpt2
from .sizes import (Precision, ScoringModel, autocast_weight_copy_bytes, backward_transient_bytes, base_weight_bytes,
                    decode_packed_bytes, exact_kl_bytes, forward_logits_bytes, inference_working_bytes, kv_cache_bytes,
                    logits_bytes, lora_parameter_count, loss_transient_bytes, normalize_targets, overhead_bytes,
                    parameter_counts, precision_of, reward_member_bytes, reward_scoring_bytes, trainable_bytes,
                    training_activation_bytes, weight_dtype)


PHASES = ("generation", "reward scoring", "reference pass", "training step", "exact-KL check", "monitor")


# --------------------------------------------------------------------------------------------------- the plan
@dataclass
class _Run:
    """One planned configuration: the sizes the phase builders read, and the working sets they share. Built by
    `estimate()` from its options; every `*_bytes` here is one of the formulas above with this run's arguments."""

    shape: dict
    B: int  # prompts per iteration (per process)
    P: int
    R: int
    M: int  # minibatches
    prec: Precision
    targets: tuple
    lora_r: int
    L_t: int  # trained layers
    checkpointing: bool
    critic: str
    ensemble: int
    ensemble_mode: str
    exact: bool  # hard controller: the reference logits are kept and the exact KL measured
    cache: bool  # frozen-prefix cache
    monitor_max_queue: int
    scorers: list = field(default_factory=list)  # separate reward models, then audit models (ScoringModel)
    device: str = "cuda"
    packs_for_decoding: bool = True  # PPOConfig.cpu_matmul_backend != "torch" (on CPU)

    @property
    def T(self) -> int:
        return self.P + self.R

    @property
    def b(self) -> int:  # rows per training forward
        return self.B // self.M

    @property
    def V(self) -> int:
        return self.shape["vocab_size"]

    @property
    def H(self) -> int:
        return self.shape["hidden_size"]

    @property
    def quantized(self) -> bool:
        return self.prec.weights == "nf4"

    # working sets and per-rollout tensors, by rows
    def activations(self, rows: int) -> int:
        return training_activation_bytes(self.shape, rows, self.T, targets=self.targets, r=self.lora_r, a=self.prec.a,
                                         trained_layers=self.L_t, checkpointing=self.checkpointing, critic=self.critic,
                                         h=self.prec.h, autocast=self.prec.casts, grouped_kv=self.device == "cpu")

    def weight_copies(self) -> int:
        if not self.prec.weight_copies:
            return 0
        return autocast_weight_copy_bytes(self.shape, targets=self.targets, trained_layers=self.L_t,
                                          checkpointing=self.checkpointing, critic=self.critic)

    def nograd(self, rows: int, seq_len: int) -> int:
        return inference_working_bytes(self.shape, rows, seq_len, a=self.prec.a, load_in_4bit=self.quantized,
                                       h=self.prec.h, autocast=self.prec.casts, weight_cast=self.prec.weight_copies)

    def head_transient(self, rows: int) -> int:
        """What the LM head's matmul adds beside its logits: under autocast over fp32 weights its bf16 cast
        (2·V·H). (Its input arrives contiguous — `policy._contiguous_input` — so torch's matmul folds the batch
        instead of expanding the weight per row, which on CPU in bf16 was a 2·rows·H·V copy.)"""
        return 2 * self.V * self.H if self.prec.weight_copies else 0

    def forward_logits(self, rows: int) -> int:
        return forward_logits_bytes(rows, self.R, self.V, self.prec.a, self.head_transient(rows))

    def no_grad_forward(self, rows: int) -> int:  # a no-grad forward of the policy, up to its logits
        return max(self.nograd(rows, self.T), self.forward_logits(rows))

    def backward(self, rows: int) -> int:
        """The backward's transients (`backward_transient_bytes`)."""
        return backward_transient_bytes(self.shape, rows, self.T, self.R, a=self.prec.a, load_in_4bit=self.quantized)

    def kv_cache(self, rows: int) -> int:
        return kv_cache_bytes(self.shape, rows, self.T, self.prec.a, k_bytes=self.prec.k_cache)

    def generation_working_set(self, rows: int) -> int:
        """The prefill's no-grad working set, or one layer's cache being extended by torch.cat (a copy), whichever
        is larger, + per-step sampling logits (fp32, ×4 copies) + what the LM head adds (`head_transient`)."""
        L = self.shape["num_hidden_layers"]
        return (max(self.nograd(rows, self.P), self.kv_cache(rows) // L) + 16 * rows * self.V
                + self.head_transient(rows))

    def packed_weights(self) -> int:  # decoding's packed weight copies, on CPU (`decode_packed_bytes`)
        on = self.device == "cpu" and self.packs_for_decoding
        return decode_packed_bytes(self.shape, self.prec.weights) if on else 0

    def member_scoring(self, rows: int) -> int:  # reward members on the shared base (weights' dtype)
        return reward_scoring_bytes(self.shape, rows, self.T, self.ensemble, self.ensemble_mode, a=self.prec.scoring,
                                    load_in_4bit=self.quantized)

    def logits(self, rows: int) -> int:
        return logits_bytes(rows, self.R, self.V)

    def prefix_cache(self, rows: int) -> int:  # Rollout.h_low (or its rows), the hidden state's dtype
        return rows * self.T * self.H * self.prec.h if self.cache else 0

    def exact_kl(self) -> int:
        return exact_kl_bytes(self.R, self.V) if self.exact else 0

    def reference_logits(self) -> int:  # Rollout.ref_logits_full, from the reference pass to the next rollout
        return self.logits(self.B) if self.exact else 0


def _static(run: _Run, num_processes: int = 1) -> dict:
    """What every phase holds: the base's weights, the trained state (LoRA + value head in fp32, AdamW, the KL
    guard's copies, DDP's gradient buckets under DDP), the reward members on the shared base, and the weights of
    every separate reward / audit model."""
    shape = run.shape
    n_policy = lora_parameter_count(shape, run.lora_r, run.targets, run.L_t)
    critic_targets = [t for t in run.targets if t != "lm_head"]  # the critic reads hidden states, never logits
    n_critic = lora_parameter_count(shape, run.lora_r, critic_targets, run.L_t) if run.critic == "separate" else 0
    n_value_head = run.H + 1
    return {
        "weights": (base_weight_bytes(shape, load_in_4bit=True) if run.quantized
                    else base_weight_bytes(shape, run.prec.weights)),
        "trained": trainable_bytes(n_policy + n_critic + n_value_head, n_policy if run.exact else 0,
                                   ddp=num_processes > 1),
        "reward_members": reward_member_bytes(shape, run.ensemble, run.ensemble_mode, run.lora_r, run.targets),
        "separate_models": sum(m.weight_bytes() for m in run.scorers),
        "n_policy": n_policy, "n_critic": n_critic, "n_value_head": n_value_head,
    }


def _common(static: dict) -> dict:
    return dict(base_weights=static["weights"]["total"], trainable=static["trained"]["total"],
                reward_members=static["reward_members"], separate_models=static["separate_models"])


def _generation(run: _Run, common: dict) -> list[dict]:
    """PolicyAndValue.generate (`self.rollout = None` first: nothing of the previous rollout is alive): the KV cache
    of B × (P + R) + the generation working set (+ on CPU decoding's packed weight copies)."""
    return [dict(**common, kv_cache=run.kv_cache(run.B), working_set=run.generation_working_set(run.B),
                 packed_weights=run.packed_weights())]


def _reward_scoring(run: _Run, common: dict) -> list[dict]:
    """RewardPipeline.score, then each audit: the members on the shared base (Python callables: nothing), then each
    separate reward model and each audit model, one scoring forward alive at a time."""
    moments = [dict(**common, reward_scoring=run.member_scoring(run.B))]
    moments += [dict(**common, reward_scoring=m.scoring_bytes(run.B, run.T)) for m in run.scorers]
    return moments


def _reference_pass(run: _Run, common: dict) -> list[dict]:
    """PolicyAndValue.lower (the frozen-prefix cache) and .logits(reference=True): the no-grad forward, its logits →
    z/T, the tensor the rollout keeps for the exact KL (hard controller; otherwise freed when _rollout returns) —
    token_logprobs reads it one sequence at a time."""
    held = dict(**common, prefix_cache=run.prefix_cache(run.B))
    z = {"reference_logits": run.reference_logits()} if run.exact else {"policy_logits": run.logits(run.B)}
    return [dict(held, working_set=run.nograd(run.B, run.T)),
            dict(held, working_set=run.forward_logits(run.B)),
            dict(held, **z)]


def _rollout_held(run: _Run, common: dict) -> dict:
    """What stays alive from the reference pass to the next rollout (training step, KL checks, the monitor): the
    rollout's prefix cache and reference logits."""
    return dict(**common, prefix_cache=run.prefix_cache(run.B), reference_logits=run.reference_logits())


def _training_step(run: _Run, common: dict) -> list[dict]:
    """The θ_old pass and every epoch's training forward, loss and backward. One minibatch: the θ_old forward with
    gradients IS epoch 1's training forward (memo; `del out` leaves the memo the only holder, and epoch 1 takes it);
    after each epoch but the last the forward that measures the KL is the next epoch's, memoised the same way; each
    step's logits are deleted before the next forward: one alive at a time. Minibatches: a θ_old pass without
    gradients over the whole batch (its logits freed once old_logp is taken), then b rows per step, each copying its
    rows of the prefix cache."""
    held = _rollout_held(run, common)
    if run.M == 1:
        trained = dict(held, activations=run.activations(run.B), weight_copies=run.weight_copies())
        return [dict(trained, working_set=run.forward_logits(run.B)),
                dict(trained, policy_logits=run.logits(run.B),
                     working_set=loss_transient_bytes(run.B, run.R, run.V)),
                dict(trained, policy_logits=run.logits(run.B), working_set=run.backward(run.B))]
    b, h_rows = run.b, run.prefix_cache(run.b)
    trained = dict(held, activations=run.activations(b), weight_copies=run.weight_copies())
    return [dict(held, working_set=run.no_grad_forward(run.B)),
            dict(trained, working_set=run.forward_logits(b) + h_rows),
            dict(trained, policy_logits=run.logits(b), working_set=loss_transient_bytes(b, run.R, run.V) + h_rows),
            dict(trained, policy_logits=run.logits(b), working_set=run.backward(b) + h_rows)]


def _exact_kl_check(run: _Run, common: dict) -> list[dict]:
    """Hard controller only: kl/before_update on the θ_old forward's logits (one minibatch: while the memo holds
    that forward's activations; minibatches: the no-grad θ_old pass's full-batch logits), and after the last epoch
    (every epoch without the memo, and in the guard's backtracking) PPOTrainer._measure: a no-grad forward of one
    minibatch of rows (b = B / minibatches) at a time, then PolicyAndValue.sequence_kl on its [b, R, V] logits."""
    if not run.exact:
        return []
    held = _rollout_held(run, common)
    before = dict(held, policy_logits=run.logits(run.B), exact_kl=run.exact_kl())
    if run.M == 1:
        before.update(activations=run.activations(run.B), weight_copies=run.weight_copies())
    return [before, dict(held, working_set=run.no_grad_forward(run.b)),
            dict(held, policy_logits=run.logits(run.b), exact_kl=run.exact_kl())]


def _monitor(run: _Run, common: dict) -> list[dict]:
    """Between iterations the monitor's review queue (when a 'queue' detector fires): self.rollout (its reference
    logits and prefix cache) is alive while q ≤ monitor_max_queue prompts are sampled from π_ref, scored
    (rewards, then audits), and their KL measured — the policy's and the reference's logits of q rows (each copying
    its rows of the prefix cache), then sequence_kl."""
    q = min(run.monitor_max_queue, run.B)
    if q <= 0:
        return []
    rollout = _rollout_held(run, common)
    h_q = run.prefix_cache(q)
    lq = run.logits(q)
    fwd = run.forward_logits(q)
    scoring = [run.member_scoring(q)] + [m.scoring_bytes(q, run.T) for m in run.scorers]
    return [dict(rollout, kv_cache=run.kv_cache(q), working_set=run.generation_working_set(q),
                 packed_weights=run.packed_weights()),
            *(dict(rollout, working_set=s) for s in scoring),
            dict(rollout, working_set=max(run.nograd(q, run.T), fwd) + h_q),
            dict(rollout, policy_logits=lq, working_set=fwd + h_q),
            dict(rollout, policy_logits=3 * lq),
            dict(rollout, policy_logits=2 * lq, exact_kl=exact_kl_bytes(run.R, run.V))]


PHASE_BUILDERS = {"generation": _generation, "reward scoring": _reward_scoring, "reference pass": _reference_pass,
                  "training step": _training_step, "exact-KL check": _exact_kl_check, "monitor": _monitor}


def _largest_moment(moments: list[dict]) -> dict | None:
    """A phase = its largest moment: {"total": bytes, "parts": {component: bytes}} (zero parts dropped)."""
    best = None
    for parts in moments:
        parts = {k: int(v) for k, v in parts.items() if v}
        total = sum(parts.values())
        if best is None or total > best["total"]:
            best = {"total": total, "parts": parts}
    return best


def estimate(shape: dict, *, batch: int = 8, prompt_length: int = 256, completion_length: int = 48,
             minibatches: int = 1, ppo_epochs: int = 4, dtype=None, bf16: bool = False, load_in_4bit: bool = False,
             lora_r: int = 16, lora_targets=("q", "k", "v", "o"), lora_top_layers: int = 0,
             gradient_checkpointing: bool = False, critic: str = "shared", ensemble: int = 0,
             ensemble_mode: str = "heads", kl_controller: str = "hard", monitor_max_queue: int = 2,
             separate_reward_models=(), audit_models=(), num_processes: int = 1, device: str = "cuda",
             cpu_matmul_backend: str = "auto") -> dict:
    """Peak memory of a PPO iteration, per process: bytes per component, per phase, the peak phase and the overhead.

    `dtype` has the trainer's semantics (`weight_dtype`: None → float32, "auto" → the config's torch_dtype, or a
    dtype); `bf16` = PPOConfig(bf16=True), autocast around every pass. `separate_reward_models` / `audit_models`:
    'MODEL[@DTYPE]' strings, dicts or ScoringModel (each adds its weights to every phase and its scoring forward to
    the reward-scoring phase and the monitor). `num_processes` > 1: DDP — the same plan per process, + DDP's
    gradient buckets; the global batch is batch × num_processes. `cpu_matmul_backend` (PPOConfig's): on CPU,
    "torch" means decoding packs no weight copies.

    Each phase is the largest of its "moments" — what is alive at one point of PPOTrainer._iteration (or of the
    monitor's review queue after it), read off the code; `monitor_max_queue` = PPOConfig.monitor_max_queue (0: no
    monitor, or no detector with the 'queue' action).

    Returns {"components": {name: bytes}, "phases": {phase: {"total": bytes, "parts": {name: bytes}}},
    "peak_phase", "peak_allocated" (what torch allocates at the peak; compare with torch.cuda.max_memory_allocated
    or a CPU RSS delta), "overhead", "peak" (= peak_allocated + overhead: what the GPU must have), "params",
    "activations_checkpointing", "activations_no_checkpointing", "precision", "options"}."""
    if critic not in ("shared", "separate"):
        raise PlanError(f"critic must be 'shared' or 'separate', got {critic!r}.")
    if ensemble_mode not in ("heads", "adapters"):
        raise PlanError(f"ensemble_mode must be 'heads' or 'adapters', got {ensemble_mode!r}.")
    if batch < 1 or minibatches < 1 or batch % minibatches:
        raise PlanError(f"batch ({batch}) must be a positive multiple of minibatches ({minibatches}).")
    if num_processes < 1:
        raise PlanError(f"num_processes must be ≥ 1, got {num_processes}.")
    if lora_r < 1:  # a negative rank gives negative parameter counts, a plan that reads as valid
        raise PlanError(f"lora_r must be ≥ 1, got {lora_r}.")
    if ensemble < 0 or monitor_max_queue < 0:
        raise PlanError(f"ensemble and monitor_max_queue must be ≥ 0, got {ensemble} and {monitor_max_queue}.")
    if cpu_matmul_backend not in ("auto", "onednn", "torch"):
        raise PlanError(f"cpu_matmul_backend must be 'auto', 'onednn' or 'torch', got {cpu_matmul_backend!r}.")
    # a pre-quantised checkpoint (config.json's quantization_config) loads in 4-bit whatever load_in_4bit says
    load_in_4bit = bool(load_in_4bit or shape.get("prequantized"))
    prec = precision_of(dtype, load_in_4bit, bf16, shape)
    L = shape["num_hidden_layers"]
    top = lora_top_layers or 0
    if not 0 <= top <= L:
        raise PlanError(f"lora_top_layers={top} but the model has {L} layers.")
    scorers = ([ScoringModel.parse(m, "reward") for m in separate_reward_models]
               + [ScoringModel.parse(m, "audit") for m in audit_models])
    run = _Run(shape=shape, B=batch, P=prompt_length, R=completion_length, M=minibatches, prec=prec,
               targets=normalize_targets(lora_targets), lora_r=lora_r, L_t=top or L,
               checkpointing=gradient_checkpointing, critic=critic, ensemble=ensemble, ensemble_mode=ensemble_mode,
               exact=kl_controller == "hard",
               cache=bool(top) and not is_gpt2(shape),  # frozen-prefix cache: verified off for GPT-2 (positions)
               monitor_max_queue=monitor_max_queue, scorers=scorers, device=device,
               packs_for_decoding=cpu_matmul_backend != "torch")

    static = _static(run, num_processes)
    common = _common(static)
    phases = {}
    for name, build in PHASE_BUILDERS.items():
        phase = _largest_moment(build(run, common))
        if phase is not None:
            phases[name] = phase
    peak_phase = max(phases, key=lambda k: phases[k]["total"])
    peak_allocated = phases[peak_phase]["total"]
    overhead = overhead_bytes(peak_allocated, device)
    act = {ck: training_activation_bytes(shape, run.b, run.T, targets=run.targets, r=lora_r, a=prec.a,
                                         trained_layers=run.L_t, checkpointing=ck, critic=critic, h=prec.h,
                                         autocast=prec.casts, grouped_kv=device == "cpu") for ck in (False, True)}
    components = {
        "base_weights": static["weights"]["total"], "trainable": static["trained"]["total"],
        "reward_members": static["reward_members"], "separate_models": static["separate_models"],
        "activations": run.activations(run.b), "weight_copies": run.weight_copies(), "kv_cache": run.kv_cache(run.B),
        "packed_weights": run.packed_weights(),
        "reward_scoring": max([run.member_scoring(run.B)] + [m.scoring_bytes(run.B, run.T) for m in scorers]),
        "policy_logits": run.logits(run.B), "reference_logits": run.reference_logits(),
        "exact_kl": run.exact_kl(), "prefix_cache": run.prefix_cache(run.B), "overhead": overhead,
    }
    return {
        "model": shape.get("name", shape.get("model_type")), "components": components, "phases": phases,
        "peak_phase": peak_phase, "peak_allocated": peak_allocated, "overhead": overhead,
        "peak": peak_allocated + overhead, "weights": static["weights"], "trained": static["trained"],
        "params": {**parameter_counts(shape), "lora_policy": static["n_policy"], "lora_critic": static["n_critic"],
                   "value_head": static["n_value_head"]},
        "activations_checkpointing": act[True], "activations_no_checkpointing": act[False],
        "activation_bytes": prec.a, "hidden_bytes": prec.h,
        "precision": {"weights": prec.weights, "autocast": prec.autocast, "a": prec.a, "h": prec.h,
                      "describe": prec.describe()},
        "scoring_models": [{"name": m.name, "role": m.role, "dtype": m.dtype, "weights": m.weight_bytes(),
                            "scoring": m.scoring_bytes(batch, run.T)} for m in scorers],
        "per_process": True, "num_processes": num_processes, "global_batch": batch * num_processes,
        "options": dict(batch=batch, prompt_length=prompt_length, completion_length=completion_length,
                        minibatches=minibatches, ppo_epochs=ppo_epochs, dtype=prec.weights if not load_in_4bit else
                        weight_dtype(dtype, shape), dtype_requested=dtype, bf16=bool(bf16),
                        load_in_4bit=load_in_4bit, lora_r=lora_r, lora_targets=list(run.targets),
                        lora_top_layers=top, gradient_checkpointing=gradient_checkpointing, critic=critic,
                        ensemble=ensemble, ensemble_mode=ensemble_mode, kl_controller=kl_controller,
                        monitor_max_queue=monitor_max_queue, separate_reward_models=[m.name for m in scorers
                                                                                     if m.role == "reward"],
                        audit_models=[m.name for m in scorers if m.role == "audit"], num_processes=num_processes,
                        device=device, cpu_matmul_backend=cpu_matmul_backend),
    }


def largest_batch(shape: dict, memory_bytes: float, *, limit: int = 1 << 16, **options) -> int:
    """The largest batch (a multiple of `minibatches`) whose plan peak (overhead included) fits `memory_bytes`;
    0 when not even one minibatch fits. The peak grows with the batch, so: doubling, then bisection."""
    step = options.get("minibatches", 1)
    fits = lambda n: estimate(shape, **{**options, "batch": n * step})["peak"] <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * step <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // step + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step
