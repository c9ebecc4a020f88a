"""`rlhf-ext plan`: the memory plan (`rlhf_ext.plan`) on the command line — options, the printed table and notes, or
JSON. What is counted and why: the docstring of `rlhf_ext/plan/__init__.py`.

    rlhf-ext plan --model Qwen2.5-7B-Instruct --load-in-4bit --dtype bfloat16 --bf16 --gpu-memory 24 --batch 16 \\
                  --prompt-length 512 --completion-length 256 --minibatches 4 --gradient-checkpointing
    rlhf-ext plan --model gpt2 --gpu-memory 24 --completion-length 128            # largest batch that fits
    rlhf-ext plan --model ./my-model/ --dtype auto --bf16 --json                   # a folder, or its config.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..layer_types import recurrent_layer_types
from . import (DTYPE_BYTES, DTYPE_CHOICES, PHASES, REWARD_SCORING_BATCH, GiB, PlanError, ScoringModel, estimate,
               largest_batch, load_shape, overhead_bytes, shipped_shapes)


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _dtype_note(o: dict) -> str:
    """How the weights' dtype was decided (the trainer's rule), for the header."""
    req = o.get("dtype_requested")
    if req is None:
        return ("no --dtype: float32, what PPOTrainer loads when model_init_kwargs has no dtype — pass --dtype "
                "bfloat16 (or auto) if your run sets one")
    if str(req) == "auto":
        return f"--dtype auto: the checkpoint's {o['dtype']}"
    return f"--dtype {req}"


def format_plan(shape: dict, est: dict, gpu_bytes: float | None, best: int | None) -> str:
    o, c, w, p = est["options"], est["components"], est["weights"], est["params"]
    a, pr = est["activation_bytes"], est["precision"]
    pre = shape.get("prequantized")
    prec = (f"4-bit {pre['quant_type'].upper()} as saved (pre-quantised checkpoint, compute {pre['compute_dtype']})"
            if pre else f"4-bit NF4 (compute {o['dtype']})" if o["load_in_4bit"] else f"{o['dtype']} weights")
    layers = (f"top {o['lora_top_layers']} layers" if o["lora_top_layers"]
              else f"all {shape['num_hidden_layers']} layers")
    rewards = (f"{o['ensemble']} reward member(s), {o['ensemble_mode']} mode" if o["ensemble"]
               else "Python reward functions only")
    n_proc = est["num_processes"]
    autocast = "" if not o["bf16"] else (", fp16 autocast (planned as bf16: the same bytes)" if o.get("fp16")
                                         else ", bf16 autocast")
    lines = [
        f"rlhf-ext plan — {est['model']} ({shape.get('model_type')}, {_fmt_params(p['total'])} params), {prec}"
        f"{autocast}, {o['device']}",
        f"  weights: {_dtype_note(o)}",
        *([f"  pre-quantised: config.json's quantization_config (bitsandbytes {pre['quant_type']}"
           f"{', double quantisation' if pre['double_quant'] else ''}, compute {pre['compute_dtype']}): the trainers "
           f"load it in 4-bit whatever load_in_4bit says, and so does this plan"] if pre else []),
        f"  compute: {pr['describe']}",
        f"  batch {o['batch']} prompts × ({o['prompt_length']} prompt + {o['completion_length']} completion) tokens, "
        f"{o['minibatches']} minibatch(es), {o['ppo_epochs']} PPO epochs, LoRA r={o['lora_r']} on "
        f"{','.join(o['lora_targets'])} ({layers}), critic {o['critic']}, KL controller {o['kl_controller']}, "
        f"{rewards}, gradient checkpointing {'on' if o['gradient_checkpointing'] else 'off'}",
        (f"  PER PROCESS (per GPU): under DDP each of the {n_proc} processes holds everything below — its own base, "
         f"adapters, optimizer state, reward and audit models — for its own batch of {o['batch']}; global batch "
         f"{o['batch']} × {n_proc} = {est['global_batch']}" if n_proc > 1 else
         "  per process (per GPU): under DDP (accelerate launch) every process holds all of this for its own batch; "
         "--num-processes N states the global batch"),
    ]
    for m in est["scoring_models"]:
        lines.append(f"  {'separate reward model' if m['role'] == 'reward' else 'audit model'}: {m['name']} "
                     f"({m['dtype']}, loaded as a second model: weights {m['weights'] / GiB:.2f} GiB, scoring "
                     f"{min(REWARD_SCORING_BATCH, o['batch'])} texts at a time {m['scoring'] / GiB:.2f} GiB"
                     f"{', every rollout' if m['role'] == 'audit' else ''})")
    lines += ["", f"{'component':46s} {'GiB':>8s} {'at peak':>8s}  notes"]
    at_peak = est["phases"][est["peak_phase"]]["parts"]
    if o["load_in_4bit"]:
        wnote = (f"{_fmt_params(p['linear'])} 4-bit ({(w['quantized'] + w['quant_constants']) / GiB:.2f} GiB incl. "
                 f"{w['quant_constants'] / GiB:.2f} quant constants) + {_fmt_params(p['total'] - p['linear'])} fp32 "
                 f"({w['unquantized'] / GiB:.2f} GiB: embeddings, LM head, norms"
                 f"{', the MoE experts' if p.get('experts') else ''}; upcast by prepare_model_for_kbit_training)")
    else:
        wnote = f"{_fmt_params(p['total'])} params × {DTYPE_BYTES[o['dtype']]} B ({o['dtype']})"
    n_tr = p["lora_policy"] + p["lora_critic"] + p["value_head"]
    rows = [
        ("base weights", "base_weights", wnote),
        ("LoRA + value head + grads + AdamW (+ KL guard)", "trainable",
         f"{_fmt_params(n_tr)} trained params × 16 B"
         + (" + 2 fp32 copies of the policy adapter" if est["trained"]["kl_guard"] else "")
         + (" + DDP gradient buckets (4 B)" if est["trained"].get("ddp_buckets") else "")),
        ("reward members (adapters/heads)", "reward_members", rewards),
        ("separate reward / audit models (weights)", "separate_models",
         ", ".join(m["name"] for m in est["scoring_models"]) or "-"),
        ("reward scoring (transient)", "reward_scoring",
         "no-grad batch of ≤ 16 texts, largest scorer" if (o["ensemble"] or est["scoring_models"]) else "-"),
        ("KV cache (generation)", "kv_cache", f"B × (P+R) × {shape['num_hidden_layers']} layers × 2 × "
                                              f"{shape['num_key_value_heads']} KV heads, {a} B"
                                              + (f" (keys {est['hidden_bytes']} B)" if est["hidden_bytes"] != a
                                                 and not o["load_in_4bit"] else "")),
        ("packed weight copies (CPU decoding)", "packed_weights",
         "the frozen linears and LM head packed by oneDNN while sampling, where that pays (ppo/cpu_matmul.py)"),
        ("activations (training forward)", "activations",
         f"{'with' if o['gradient_checkpointing'] else 'without'} checkpointing; with: "
         f"{est['activations_checkpointing'] / GiB:.2f} GiB, without: "
         f"{est['activations_no_checkpointing'] / GiB:.2f} GiB"
         f" ({o['batch'] // o['minibatches']} rows)"),
        ("bf16 weight casts kept (training forward)", "weight_copies",
         "autocast over fp32 weights: the trained layers' and the LM head's" if c["weight_copies"] else "-"),
        ("policy logits [B,R,V] fp32", "policy_logits", "z/T at the response positions; one alive at a time (b rows "
                                                         "in a minibatch step)"),
        ("reference logits z [B,R,V] fp32 (kept)", "reference_logits", "for the exact KL (hard controller)"),
        ("exact-KL float64 temporaries", "exact_kl", "5 × [R,V] float64, one sequence at a time "
                                                     "(PolicyAndValue.sequence_kl)"),
        ("frozen-prefix cache", "prefix_cache", "hidden state below the adapted layers, [B,P+R,H]"),
    ]
    for label, key, note in rows:
        if key in ("separate_models", "weight_copies", "packed_weights") and not c[key]:
            continue
        held = at_peak.get(key, 0)
        lines.append(f"{label:46s} {_gib(c[key])} {_gib(held) if held else '       -'}  {note}")
    ws = at_peak.get("working_set", 0)
    lines.append(f"{'working set (at the peak)':46s} {'':8s} {_gib(ws) if ws else '       -'}  "
                 f"transients of the peak moment: a forward's logits, the backward's logit gradient, …")
    oh = "CUDA context 0.5 GiB + 10 % allocator slack" if o["device"] != "cpu" else "CPU: none counted"
    lines.append(f"{'CUDA context + allocator overhead':46s} {_gib(est['overhead'])} {_gib(est['overhead'])}  {oh}")
    lines += ["", f"{'phase (incl. overhead)':22s} {'GiB':>8s}"]
    for ph in PHASES:
        if ph in est["phases"]:
            mark = "   <- peak" if ph == est["peak_phase"] else ""
            total = est["phases"][ph]["total"]
            lines.append(f"{ph:22s} {_gib(total + overhead_bytes(total, o['device']))}{mark}")
    lines.append("")
    lines.append(f"peak: {est['peak'] / GiB:.2f} GiB per process ({est['peak_allocated'] / GiB:.2f} GiB allocated by "
                 f"torch + {est['overhead'] / GiB:.2f} GiB overhead) in the {est['peak_phase']} phase"
                 + (f"; × {n_proc} GPUs (NCCL's buffers, outside torch's allocator, not counted)" if n_proc > 1
                    else ""))
    biggest = max(at_peak, key=at_peak.get)
    if biggest == "exact_kl":
        lines.append("note: the exact-KL check's float64 temporaries dominate — PolicyAndValue.sequence_kl holds 5 "
                     "float64 [R,V] tensors of one sequence; lower --completion-length, or use a controller other "
                     "than hard (no exact KL)")
    elif est["peak_phase"] == "exact-KL check" and o["minibatches"] > 1:
        lines.append("note: the exact-KL check is the peak — the full batch's [B,R,V] logits (no-grad θ_old pass, "
                     "KL measurements) outgrow a minibatch's training step; a controller other than hard avoids "
                     "the reference logits and these measurements")
    elif est["peak_phase"] == "monitor":
        lines.append("note: the monitor's review queue is the peak (between iterations, with the rollout alive); "
                     "--monitor-max-queue 0 plans without it (PPOConfig.monitor_max_queue / monitor=False)")
    elif biggest == "activations" and not o["gradient_checkpointing"]:
        lines.append("note: activations dominate — --gradient-checkpointing, more --minibatches or --lora-top-layers "
                     "shrink them")
    experts = p.get("experts", 0)
    if experts and o["load_in_4bit"]:
        lines.append(f"note: {_fmt_params(experts)} of the {_fmt_params(p['total'])} parameters "
                     f"are fused MoE experts, which bitsandbytes' 4-bit loading does not quantise under transformers 5 "
                     f"(bitsandbytes#1849): counted in fp32, as PEFT's prepare_model_for_kbit_training upcasts them "
                     f"(the trainers warn at start-up too); the activations are modelled as a dense MLP's")
    elif experts:
        lines.append(f"note: {_fmt_params(experts)} of the parameters are MoE experts; the activations are modelled as "
                     f"a dense MLP of the config's intermediate size, an approximation — check the peak with a short run")
    if shape.get("model_type") in EAGER_ONLY_MODEL_TYPES:
        T = o["prompt_length"] + o["completion_length"]
        probs = shape["num_attention_heads"] * T * T * 6 * (o["batch"] // o["minibatches"])
        lines.append(f"note: {shape['model_type']} runs eager attention (transformers has no SDPA for it): every "
                     f"trained layer's forward also keeps its [rows, heads, T, T] attention weights (fp32 softmax + "
                     f"its cast, ≈ {probs / GiB:.2f} GiB per layer here) and the logits' softcap a copy of the "
                     f"logits, which this plan (SDPA-shaped) does not count"
                     + ("" if o["gradient_checkpointing"] else " — --gradient-checkpointing keeps one layer's")
                     + "; check the peak with a short run")
    if shape.get("param_counts_error"):
        lines.append(f"note: parameters from the dense-model formula — this transformers could not build the config "
                     f"to count them ({shape['param_counts_error']}); exact for Llama/Mistral/Qwen2/GPT-2 shapes only")
    recurrent = recurrent_layer_types(shape.get("layer_types"))
    if recurrent:
        n = sum(t in recurrent for t in shape["layer_types"])
        lines.append(f"note: {n} of the {len(shape['layer_types'])} layers are recurrent ({', '.join(recurrent)}): "
                     f"the plan models every layer as an attention layer (its KV cache, LoRA targets and activations; the "
                     f"parameters are counted exactly), an approximation for this hybrid — check the peak with a short "
                     f"run")
    if c["weight_copies"] and not o["load_in_4bit"]:
        lines.append(f"note: bf16 autocast over {o['dtype']} weights keeps {c['weight_copies'] / GiB:.2f} GiB of bf16 "
                     f"weight casts in the training forward on top of the {o['dtype']} weights; --dtype bfloat16 "
                     f"(bf16 weights) avoids both")
    if gpu_bytes:
        fit = "fits" if est["peak"] <= gpu_bytes else "does NOT fit"
        lines.append(f"on {gpu_bytes / GiB:.3g} GiB per GPU: {fit}; largest batch that fits: {best} per process"
                     + (f" (global {best * n_proc})" if n_proc > 1 and best else "")
                     + ((f" (the base weights alone take {w['total'] / GiB:.2f} GiB)" if w["total"] >= gpu_bytes else
                         " (not even one minibatch: lower the lengths, use --load-in-4bit / --gradient-checkpointing "
                         "/ --lora-top-layers, or more minibatches)") if best == 0 else ""))
    return "\n".join(lines)


# model types transformers runs with eager attention only (no SDPA: Gemma 2's attention-logit softcap)
EAGER_ONLY_MODEL_TYPES = ("gemma2",)


# the built-in controllers (rlhf_ext/plugins/kl.py): checked without importing the plugins, which import torch — the
# plan starts without it; any other name is asked of the registry (tests/test_plan.py keeps the two in step)
BUILTIN_KL_CONTROLLERS = ("adaptive", "fixed", "hard", "lagrangian")


def kl_controller_problem(name: str) -> str | None:
    """None when `name` is a KL controller PPOConfig(kl_controller=name) accepts, else what is wrong and the names
    that work. A name PPO would refuse at start-up is refused here too, rather than planned as a non-hard one."""
    if name in BUILTIN_KL_CONTROLLERS:
        return None
    from ..registry import get

    try:
        get("kl_controller", name)
    except ValueError as e:
        return f"--kl-controller: {e}"
    return None


_UNITS = {"": 1.0, "gib": 1.0, "g": 1.0, "mib": 1 / 1024, "m": 1 / 1024, "gb": 1e9 / GiB, "mb": 1e6 / GiB,
          "tib": 1024.0, "tb": 1e12 / GiB}


def gpu_memory(text: str) -> float:
    """--gpu-memory: GiB, or a number with a unit — 24GB (10⁹ bytes), 24 GiB, 23028MiB (what nvidia-smi prints)."""
    import re

    try:  # a plain number (nan, inf, -5 included): main() says what is wrong with it
        return float(text)
    except ValueError:
        pass
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = (m.group(2) if m else "").lower()
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size: write GiB (24), or a number with a unit: "
                                         f"24GiB, 24GB, 23028MiB (nvidia-smi's total)")
    return float(m.group(1)) * _UNITS[unit]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlhf-ext plan", description="GPU memory plan for a PPO run, per process (per "
                                 "GPU) under DDP (reads the model's config only).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="Hub id, local folder, path to config.json, or a shipped shape: "
                    + ", ".join(shipped_shapes()))
    ap.add_argument("--gpu-memory", type=gpu_memory, default=24.0, help="GPU memory per GPU, in GiB or with a unit "
                    "(24GB, 23028MiB): the total nvidia-smi reports — a '24 GB' A10G or L4 has 23028 MiB = 22.5 GiB, a "
                    "'16 GB' T4 15360 MiB = 15 GiB")
    ap.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    ap.add_argument("--dtype", default=None, choices=list(DTYPE_CHOICES),
                    help="the dtype the base is loaded in, as the trainer's model_init_kwargs['dtype'] / a recipe's "
                    "`dtype:`: omitted = float32 (what the trainer loads without one), auto = the checkpoint's "
                    "torch_dtype; on a 4-bit base, the compute dtype")
    sixteen = ap.add_mutually_exclusive_group()
    sixteen.add_argument("--bf16", action="store_true", help="PPOConfig(bf16=True) / accelerate mixed_precision "
                         "bf16: every pass under bf16 autocast (bf16 activations even over fp32 weights)")
    sixteen.add_argument("--fp16", action="store_true", help="PPOConfig(fp16=True) (GPUs before Ampere: T4, V100): "
                         "planned as --bf16, the same two bytes per activation and weight cast")
    ap.add_argument("--batch", type=int, default=None, help="prompts per iteration per process (omit: the largest "
                    "that fits)")
    ap.add_argument("--prompt-length", type=int, default=256, help="longest prompt, tokens")
    ap.add_argument("--completion-length", type=int, default=48, help="max_completion_length")
    ap.add_argument("--minibatches", type=int, default=1, help="num_mini_batches")
    ap.add_argument("--ppo-epochs", type=int, default=4, help="num_ppo_epochs")
    ap.add_argument("--ensemble", type=int, default=0, help="K reward members on the shared base (0: Python callables)")
    ap.add_argument("--ensemble-mode", default="heads", choices=["heads", "adapters"])
    ap.add_argument("--separate-reward-model", action="append", default=[], metavar="MODEL[@DTYPE]",
                    help="a reward model loaded as a second model (a 'full'-mode artifact, or one trained on another "
                    "base): its weights (as a trunk) + its scoring forward; DTYPE float32 (default: load_reward_model "
                    "without a recorded dtype), bfloat16, float16 or nf4. Repeatable")
    ap.add_argument("--audit-model", action="append", default=[], metavar="MODEL[@DTYPE]",
                    help="an audit model (audit_funcs, e.g. a gold reward model) scoring every rollout: same "
                    "accounting. Repeatable")
    ap.add_argument("--num-processes", type=int, default=1, help="DDP processes (GPUs): the plan is per process; "
                    "states the global batch and adds DDP's gradient buckets")
    ap.add_argument("--critic", default="shared", choices=["shared", "separate"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank (≥ 1)")
    ap.add_argument("--lora-targets", default="q,k,v,o",
                    help="comma list of q,k,v,o,gate,up,down,lm_head (default: q,k,v,o, the 7B recipes' targets; "
                         "PPOTrainer without target_modules takes PEFT's default for the architecture, q,v on Llama)")
    ap.add_argument("--lora-top-layers", type=int, default=0, help="LoRA on the top N layers only (0: all)")
    ap.add_argument("--kl-controller", default="hard", help="a registered KL controller (`rlhf-ext plugins`): hard "
                    "keeps the reference logits and measures the exact KL; the others (adaptive, fixed, lagrangian) do "
                    "neither")
    ap.add_argument("--monitor-max-queue", type=int, default=2, help="PPOConfig.monitor_max_queue: prompts the "
                    "reward-hacking monitor samples and measures for its review queue (0: monitor off)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _within_positions(shape: dict, prompt: int, completion: int) -> int:
    """The completion length the trainer will sample within the model's positions (it clips max_completion_length,
    with a warning, and refuses a prompt that fills them): said here too, so the plan is of the run that happens."""
    limit = shape.get("max_position_embeddings")
    if not limit:
        return completion
    if prompt >= limit:
        raise PlanError(f"--prompt-length {prompt} leaves no room in the model's {limit} positions "
                        f"(max_position_embeddings); PPOTrainer refuses such prompts. Plan a shorter prompt "
                        f"(max_prompt_length with prompt_overflow='truncate').")
    if prompt + completion > limit:
        print(f"rlhf-ext plan: note: {prompt} prompt + {completion} completion tokens exceed the model's {limit} "
              f"positions; PPOTrainer clips max_completion_length to {limit - prompt}, and this plan does too.",
              file=sys.stderr)
        return limit - prompt
    return completion


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("gpu_memory", "batch", "prompt_length", "completion_length", "minibatches", "ppo_epochs", "lora_r"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {value}.")
    if not math.isfinite(args.gpu_memory * GiB):  # inf GiB "fits" every batch up to the search's limit
        ap.error(f"--gpu-memory must be a finite number of GiB per GPU, got {args.gpu_memory}.")
    for name, zero in (("ensemble", "Python reward functions only"), ("monitor_max_queue", "monitor off"),
                       ("lora_top_layers", "every layer")):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 0 (0: {zero}), got {getattr(args, name)}.")
    problem = kl_controller_problem(args.kl_controller)
    if problem:
        ap.error(problem)
    try:
        shape = load_shape(args.model)
        args.completion_length = _within_positions(shape, args.prompt_length, args.completion_length)
        options = dict(prompt_length=args.prompt_length, completion_length=args.completion_length,
                       minibatches=args.minibatches, ppo_epochs=args.ppo_epochs, dtype=args.dtype,
                       bf16=args.bf16 or args.fp16,
                       load_in_4bit=args.load_in_4bit, lora_r=args.lora_r, lora_targets=args.lora_targets,
                       lora_top_layers=args.lora_top_layers, gradient_checkpointing=args.gradient_checkpointing,
                       critic=args.critic, ensemble=args.ensemble, ensemble_mode=args.ensemble_mode,
                       kl_controller=args.kl_controller, monitor_max_queue=args.monitor_max_queue,
                       separate_reward_models=[ScoringModel.parse(m, "reward") for m in args.separate_reward_model],
                       audit_models=[ScoringModel.parse(m, "audit") for m in args.audit_model],
                       num_processes=args.num_processes, device=args.device)
        gpu = args.gpu_memory * GiB if args.gpu_memory else None
        best = largest_batch(shape, gpu, **options) if gpu else None
        batch = args.batch or max(best or 0, args.minibatches)
        est = estimate(shape, batch=batch, **options)
    except PlanError as e:
        print(f"rlhf-ext plan: {e}", file=sys.stderr)
        return 2
    if args.fp16:  # fp16 autocast holds what bf16 autocast holds; the loss scaler's state is two numbers
        est["options"]["fp16"] = True
    if args.json:
        print(json.dumps({**est, "shape": shape, "gpu_memory_gib": args.gpu_memory, "largest_batch": best,
                          "fits": None if not gpu else est["peak"] <= gpu}, indent=2))
    else:
        print(format_plan(shape, est, gpu, best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
