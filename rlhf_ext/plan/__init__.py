"""How much GPU memory one PPO iteration of rlhf_ext needs, from the model's config alone (`rlhf-ext plan`: its
command line, table and notes are in cli.py).

    rlhf-ext plan --model Qwen2.5-7B-Instruct --load-in-4bit --dtype bfloat16 --bf16 --gpu-memory 24 --batch 16 \\
                  --prompt-length 512 --completion-length 256 --minibatches 4 --gradient-checkpointing
    rlhf-ext plan --model gpt2 --gpu-memory 24 --completion-length 128            # largest batch that fits
    rlhf-ext plan --model ./my-model/ --dtype auto --bf16 --json                   # a folder, or its config.json
    rlhf-ext plan --model SmolLM2-1.7B-Instruct --dtype bfloat16 --bf16 --num-processes 8 \\
                  --separate-reward-model Qwen2.5-7B-Instruct@bfloat16 --audit-model SmolLM2-135M-Instruct

No weights are read: a local folder's (or a path's) config.json, `transformers.AutoConfig` for Hub ids (online
only), or a shape shipped in `rlhf_ext/plan_shapes/*.json`.

What the plan counts is what the trainer holds (ppo/trainer.py, ppo/policy.py, monitor/monitor.py), phase by
phase; every iteration is alike (the previous rollout is released before the next one is sampled). Notation: B prompts
per iteration, b = B / minibatches rows per training forward, P prompt and R completion tokens (T = P + R), V
vocabulary, H hidden, I MLP width, L layers (L_t of them trained: all, or the top `--lora-top-layers`), n_h / n_kv
attention / KV heads of size d. "logits" = one [B, R, V] fp32 tensor (4·B·R·V).

Precision — two settings, as in the trainer (`Precision` below):
  --dtype   the dtype the base is LOADED in, with the trainer's semantics (`model_init_kwargs={"dtype": …}`,
            `load_model(dtype=…)`, a recipe's `dtype:`): omitted → float32 (rlhf_ext.models loads float32 when no
            dtype is given, whatever the checkpoint holds), "auto" → the checkpoint's own dtype (the config's
            torch_dtype; float32 when it records none), or bfloat16 / float32 / float16.
  --bf16    `PPOConfig(bf16=True)` (or accelerate's mixed_precision bf16): every PPO pass under torch.autocast(bf16).
            Matmul outputs (attention, MLP, model logits, V cache: `a` bytes below) are then bf16 even over fp32
            weights, while what autocast does not cast — embeddings, residual stream, norm outputs, RoPE'd keys —
            keeps the weights' dtype (`h` bytes); over fp32 weights the training forward also keeps a bf16 cast of
            every frozen weight it needs for the input gradient. Reward members and separate reward / audit models
            score outside that context (PPOTrainer._rollout), in their weights' dtype.
  On a 4-bit base everything is counted fp32 (a = h = 4), as before: PEFT's `prepare_model_for_kbit_training`
  upcasts the non-quantised parts to fp32, so the hidden states, the KV cache and the logits are fp32 too (an upper
  bound under --bf16, not validated there).

Per process. Under DDP (`accelerate launch`, `--num-processes N`) every process holds the whole plan — its own base,
adapters, optimizer state, reward and audit models — for its own batch: the plan is per GPU, the global batch is
batch × N, and each process adds DDP's gradient buckets (one fp32 copy of the trained parameters).

  generation     weights + trainable state + KV cache + prefill (nothing of the previous rollout is alive); on CPU
                 (`device="cpu"`) also decoding's packed copies of the frozen linear weights (ppo/cpu_matmul.py)
  reward scoring weights + … + K reward members scoring min(16, B) texts (× K in adapters mode, one mixed batch),
                 then each separate reward model and each audit model scoring the B texts 16 at a time
  reference pass the reference's logits at the response positions, z/T [B, R, V] in fp32 (kept for the exact KL)
  training step  saved activations of the training forward + ONE policy logits tensor (each step's are freed before
                 the next forward; with one minibatch the θ_old forward is epoch 1's and is freed by it) + the
                 backward's transients (the logits' gradient, twice its size at once)
  exact-KL check (hard controller) Σ_v p (log p − log p_ref) in float64, one sequence at a time: 5 × [R, V] float64
  monitor        between iterations, while this iteration's rollout is still alive: the reward-hacking monitor's
                 review queue samples, scores (rewards and audits) and measures the KL of ≤ `monitor_max_queue` (2)
                 prompts

The package: `shapes.py` reads a model's shape; `sizes.py` holds the formulas, each a small function with its
derivation in the docstring; `estimate.py` builds the static components (`_static`) and each phase's moments (one
function per phase, named after the pass it models), and `estimate()` returns bytes per component and per phase;
`largest_batch()` searches the batch; `cli.py` is `rlhf-ext plan`. The numbers were checked against measured peaks
on CPU in fp32, bf16 weights and bf16 autocast (benchmarks/memory_plan_check.py) and, when a GPU is available,
scripts/gpu_check.py.
"""

from .shapes import (GiB, DTYPE_BYTES, DTYPE_NAMES, DTYPE_CHOICES, NF4_BYTES_PER_PARAM, NF4_CONSTANT_BYTES_PER_PARAM,
                     SHAPE_FIELDS, SHAPES_DIR, PlanError, shipped_shapes, shape_from_config, load_shape, model_dims,
                     is_gpt2)
from .sizes import (CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK, REWARD_SCORING_BATCH, TARGET_ALIASES, ALL_TARGETS,
                    parameter_counts, base_weight_bytes, normalize_targets, lora_modules, lora_parameter_count,
                    trainable_bytes, weight_dtype, Precision, decode_packed_bytes, precision_of, ScoringModel,
                    layer_activation_bytes_per_token, training_activation_bytes, autocast_weight_copy_bytes,
                    backward_transient_bytes, loss_transient_bytes, inference_working_bytes, kv_cache_bytes,
                    logits_bytes, exact_kl_bytes, forward_logits_bytes, reward_member_bytes, reward_scoring_bytes,
                    overhead_bytes)
from .estimate import PHASE_BUILDERS, PHASES, estimate, largest_batch

__all__ = [
    "GiB", "DTYPE_BYTES", "DTYPE_NAMES", "DTYPE_CHOICES", "NF4_BYTES_PER_PARAM", "NF4_CONSTANT_BYTES_PER_PARAM",
    "SHAPE_FIELDS", "SHAPES_DIR", "PlanError", "shipped_shapes", "shape_from_config", "load_shape", "model_dims",
    "is_gpt2", "CUDA_CONTEXT_BYTES", "ALLOCATOR_SLACK", "REWARD_SCORING_BATCH", "TARGET_ALIASES", "ALL_TARGETS",
    "parameter_counts", "base_weight_bytes", "normalize_targets", "lora_modules", "lora_parameter_count",
    "trainable_bytes", "weight_dtype", "Precision", "precision_of", "ScoringModel",
    "layer_activation_bytes_per_token", "training_activation_bytes", "autocast_weight_copy_bytes",
    "backward_transient_bytes", "loss_transient_bytes", "inference_working_bytes", "kv_cache_bytes", "logits_bytes",
    "exact_kl_bytes", "forward_logits_bytes", "reward_member_bytes", "reward_scoring_bytes", "overhead_bytes",
    "estimate", "PHASE_BUILDERS", "PHASES", "largest_batch",
]
