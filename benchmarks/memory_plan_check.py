"""Does `rlhf-ext plan` predict what PPO really holds? Measured peak memory vs the plan, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/memory_plan_check.py              # every configuration (≈ 35 min, 1 thread)
    OMP_NUM_THREADS=1 python benchmarks/memory_plan_check.py --only mid-256,smollm2-135m
    OMP_NUM_THREADS=1 python benchmarks/memory_plan_check.py --only mid-256-bf16,mid-256-autocast,mid-256-bf16-autocast

Each PPO configuration — a random-initialised model built from a config (a tiny Llama, mid sizes, a GPT-2-style
model, an NF4 base, SmolLM2-135M's shape), on CPU — runs `--iterations` real PPO iterations of rlhf_ext's PPOTrainer
(responses of exactly R tokens) in a fresh subprocess, through the same `run_case` as scripts/gpu_check.py. They vary
what the plan's phases depend on: the hard controller (exact KL, the reference logits kept) or a fixed one,
one minibatch (the memoised θ_old forward) or two, gradient checkpointing, long prompts, a wide MLP, an NF4 base,
long completions with MHA and top-layer LoRA (generation is the peak there; the training step everywhere else since
the trainer frees each step's logits and computes the exact KL one sequence at a time), and, on its own, reward
scoring (4 LoRA reward adapters in one mixed batch). Four of them (mid-256, mid-512-mb2-ckpt, smollm2-135m and its
top-8 placement) also run in the other precisions, suffixed: `-bf16` (bf16 weights, no autocast), `-autocast`
(fp32 weights, PPOConfig(bf16=True): every pass under bf16 autocast) and `-bf16-autocast` (bf16 weights and
autocast, what a GPU user runs); the plan is `estimate(dtype=…, bf16=…)` with the trainer's dtype semantics.
(The plan once counted a CPU-only bf16 effect: the LM head on `logits_to_keep`'s non-contiguous slice copied its
weight once per row. The policy now hands the head a contiguous input, so the copy is gone from both.)
Measured = peak RSS (VmHWM, reset just before the model is built) minus the RSS at that point (imports, one tiny
warm-up iteration of the same architecture, the tokenizer and the prompts already there). Planned =
`rlhf_ext.plan.estimate(..., device="cpu")`: what torch allocates at the peak, no allocator slack. The plan must
agree within ±20 % for the mid and SmolLM2 sizes; the tiny Llama is dominated by fixed costs, listed for reference.
Each phase is also measured on its own (`PhaseMeter`: VmHWM read and reset at the trainer's phase boundaries) and
printed against the plan's phase total, so the phases that are not the peak (the exact-KL check, the reference
pass, the monitor's review queue, …) are checked too. The prompts all have exactly P tokens, so batches carry no
padding and SDPA takes native GQA without a mask — as, on CPU, every pass now does with one
(`rlhf_ext/grouped_kv.py`), which the CPU plan counts: k and v at their own heads.

glibc's malloc keeps freed heap memory for reuse and moves its mmap threshold up to 32 MiB, so RSS can sit far
above the live tensors (1.5–2× here); the workers set MALLOC_MMAP_THRESHOLD_=65536 (tensors ≥ 64 KiB come from and
go back to mmap), so RSS follows what torch holds — the CPU analogue of torch.cuda.max_memory_allocated.
`--default-malloc` measures without it.

On a CPU with native bf16 (AVX512-BF16 / AMX), oneDNN JIT-compiles and caches a kernel per bf16 matmul shape: code
and caches, not tensors, which grow with every new shape a phase brings — mid-256 under bf16 autocast measured
116 MiB at its peak against the plan's 84 (phases 15–34 MiB above their plans), and 85.4 with oneDNN capped below
its bf16 ISA. The workers cap it (ONEDNN_MAX_CPU_ISA=AVX512_CORE, a maximum: nothing changes on a CPU without
AVX512-BF16), like the mmap threshold, so RSS follows what torch holds; `--native-isa` measures without the cap.
For the same reason the fp32 runs keep torch's own matmuls (PPOConfig(cpu_matmul_backend="torch")): where the trainer
sends the frozen base through oneDNN (rlhf_ext/cpu_linear.py), oneDNN keeps ≈ 0.7 MiB of compiled kernel per
product shape — code, not tensors, which the plan does not count (mid-256 measured 1.38–1.48× its plan with them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MATMULS = "torch"  # torch's own fp32 matmuls: RSS then follows the tensors the plan counts (docstring)
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "scripts"))


def llama(vocab, hidden, inter, layers, heads, kv, tied=True):
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                max_position_embeddings=1024)


GPT2_SMALL = dict(model_type="gpt2", vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=256)
RUN = dict(batch=8, prompt_length=32, completion_length=32, ppo_epochs=3, minibatches=1)
# name → (shape or shipped shape name, run options, counts towards the ±20 % criterion)
CONFIGS = {
    "tiny-llama": (llama(1024, 64, 176, 2, 4, 2), dict(RUN, batch=4, prompt_length=16, completion_length=16), False),
    "mid-256": (llama(8192, 256, 688, 4, 4, 2), RUN, True),
    "mid-512": (llama(16384, 512, 1376, 8, 8, 4), RUN, True),
    "mid-384-vocab50k": (llama(50304, 384, 1024, 6, 6, 2, tied=False), dict(RUN, completion_length=48), True),
    "gpt2-style-256": (GPT2_SMALL, RUN, True),
    "mid-512-mb2-ckpt": (llama(16384, 512, 1376, 8, 8, 4), dict(RUN, minibatches=2, gradient_checkpointing=True), True),
    "mid-512-fixed-kl": (llama(16384, 512, 1376, 8, 8, 4), dict(RUN, kl_controller="fixed"), True),
    "mid-512-fixed-kl-P128": (llama(16384, 512, 1376, 8, 8, 4), dict(RUN, kl_controller="fixed", prompt_length=128),
                              True),
    "wide-1024-vocab2k-fixed-kl": (llama(2048, 1024, 2816, 4, 16, 4),
                                   dict(RUN, kl_controller="fixed", prompt_length=96), True),
    "mid-512-ckpt-fixed-kl-P128": (llama(16384, 512, 1376, 8, 8, 4),
                                   dict(RUN, kl_controller="fixed", prompt_length=128, gradient_checkpointing=True),
                                   True),
    "mid-512-nf4": (llama(16384, 512, 1376, 8, 8, 4), dict(RUN, precision="4bit"), True),
    "mha-512-long-gen": (llama(2048, 512, 1376, 8, 8, 8),
                         dict(batch=16, prompt_length=16, completion_length=192, ppo_epochs=2, minibatches=4,
                              lora_top_layers=1, gradient_checkpointing=True, kl_controller="fixed"), True),
    "smollm2-135m": ("SmolLM2-135M-Instruct", RUN, True),
    "smollm2-135m-top8": ("SmolLM2-135M-Instruct", dict(RUN, lora_top_layers=8), True),
}
# The same runs in the other precisions (PRECISIONS): bf16 weights; fp32 weights under bf16 autocast
# (PPOConfig(bf16=True)); bf16 weights under bf16 autocast (what a GPU user runs).
for _name, _precision in [(n, p) for n in ("mid-256", "mid-512-mb2-ckpt", "smollm2-135m", "smollm2-135m-top8")
                          for p in ("bf16", "autocast", "bf16-autocast")]:
    _shape, _opts, _judged = CONFIGS[_name]
    CONFIGS[f"{_name}-{_precision}"] = (_shape, dict(_opts, precision=_precision), _judged)
# precision → (the weights' dtype as the trainer is given it, PPOConfig(bf16=…), 4-bit)
PRECISIONS = {"fp32": ("float32", False, False), "bf16": ("bfloat16", False, False),
              "autocast": ("float32", True, False), "bf16-autocast": ("bfloat16", True, False),
              "4bit": (None, False, True)}


def scoring_worker(name: str) -> dict:
    """Reward scoring on the shared base alone: K LoRA adapters + heads scoring 16 texts through
    RewardEnsemble.score_sequences (the path PPO's RewardPipeline takes: mixed-adapter batches of ≤ 16 rows), no grad.
    Planned: `reward_scoring_bytes`."""
    import gc

    import torch
    from gpu_check import hf_config, reset_peak_rss, rss_bytes, synthetic_tokenizer
    from peft import LoraConfig
    from torch import nn
    from transformers import AutoModel

    from rlhf_ext.adapters import wrap_with_peft
    from rlhf_ext.plan import reward_scoring_bytes
    from rlhf_ext.reward.ensemble import RewardEnsemble

    shape, opts, _ = SCORING[name]
    K, rows, T = opts["ensemble"], opts["batch"], opts["seq_len"]
    torch.set_flush_denormal(True)
    tok = synthetic_tokenizer(shape["vocab_size"])
    ids = torch.randint(4, shape["vocab_size"], (rows, T))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0

    def build():
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        peft = wrap_with_peft(AutoModel.from_config(hf_config(shape, tok)), lora, "rm0")
        for k in range(1, K):
            peft.add_adapter(f"rm{k}", lora)
        spec = {"mode": "adapters", "adapters": [f"rm{k}" for k in range(K)], "members": [f"m{k}" for k in range(K)]}
        return RewardEnsemble(peft, tok, spec, nn.ModuleDict({f"rm{k}": nn.Linear(shape["hidden_size"], 1)
                                                              for k in range(K)}))

    build().score_sequences([[5, 6, 7], [5, 6]])  # warm-up: lazy imports (trl's pad), first-use buffers
    ens = build()
    gc.collect()
    reset_peak_rss()
    base = rss_bytes()
    ens.score_sequences([row[m.bool()].tolist() for row, m in zip(ids, mask)])
    measured = rss_bytes("VmHWM") - base
    planned = reward_scoring_bytes(shape, rows, T, K, "adapters", a=4)
    return {"name": name, "measured": measured, "planned": planned, "peak_phase": "reward scoring",
            "phases": {"reward scoring": planned}, "parts": {"reward_scoring": planned}}

# Reward scoring alone (the PPO configurations above score with a Python function): the no-grad working set of a
# mixed-adapter batches, measured around RewardEnsemble.score_sequences with the model already built.
SCORING = {
    "scoring-4-adapters-mid-512": (llama(16384, 512, 1376, 8, 8, 4), dict(ensemble=4, batch=16, seq_len=128), True),
}


class PhaseMeter:
    """Peak RSS per phase of the plan, in one run: at every phase boundary VmHWM is read (the peak since the last
    boundary, charged to the phase that was running) and reset. Boundaries are the trainer's own calls, wrapped in
    this worker process only:

      generation      PolicyAndValue.generate in PPOTrainer._rollout
      reward scoring  RewardPipeline.score in _rollout
      reference pass  PolicyAndValue.lower / .logits(reference=True) to the end of _rollout (its token log-probs too)
      training step   the rest of PPOTrainer._iteration: θ_old and training forwards, losses, backward, steps
      exact-KL check  PolicyAndValue.sequence_kl and the no-grad forward before it (.logits) inside _iteration
      monitor         RewardHackingMonitor._queue (only when a 'queue' detector fires), everything inside it
      setup / between model build, start-up checks, the monitor's reference measurement; the rest of the loop
    """

    ROLLOUT = {"generate": "generation", "score": "reward scoring", "lower": "reference pass"}

    def __init__(self):
        self.base, self.label, self.peaks = None, "setup", {}

    def start(self, base_rss: int) -> None:
        from gpu_check import reset_peak_rss

        self.base = base_rss
        reset_peak_rss()

    def mark(self, label: str) -> None:
        from gpu_check import reset_peak_rss, rss_bytes

        if self.base is not None:
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss_bytes("VmHWM") - self.base)
            reset_peak_rss()
        self.label = label

    def _wrap(self, owner, name, label_of, restore: bool, static: bool = False, after: str | None = None):
        """Wrap owner.name: mark label_of(previous label, args, kwargs) on entry; on exit mark `after` when given,
        else the previous label again when `restore`."""
        import functools

        f = getattr(owner, name)

        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            prev = self.label
            new = prev if prev == "monitor" else label_of(prev, args, kwargs)
            if new != prev:
                self.mark(new)
            try:
                return f(*args, **kwargs)
            finally:
                if after is not None:
                    self.mark(after)
                elif restore and self.label != prev:
                    self.mark(prev)

        setattr(owner, name, staticmethod(wrapped) if static else wrapped)

    def install(self) -> None:
        from rlhf_ext.monitor.monitor import RewardHackingMonitor
        from rlhf_ext.ppo.policy import PolicyAndValue
        from rlhf_ext.ppo.trainer import PPOTrainer
        from rlhf_ext.reward.pipeline import RewardPipeline

        in_iteration = lambda prev: prev not in ("setup", "between iterations")  # noqa: E731
        # after _rollout the iteration goes on in "training step"; after _iteration, "between iterations"
        self._wrap(PPOTrainer, "_iteration", lambda *_: "training step", restore=False, after="between iterations")
        self._wrap(PPOTrainer, "_rollout", lambda *_: "generation", restore=False, after="training step")
        self._wrap(PolicyAndValue, "generate", lambda p, a, k: "generation" if in_iteration(p) else p, restore=False)
        self._wrap(RewardPipeline, "score", lambda p, a, k: "reward scoring" if in_iteration(p) else p, restore=False)
        self._wrap(PolicyAndValue, "lower", lambda p, a, k: "reference pass" if in_iteration(p) else p, restore=False)
        self._wrap(PolicyAndValue, "logits",
                   lambda p, a, k: p if not in_iteration(p) else "reference pass" if k.get("reference") else
                   "exact-KL check", restore=False)
        self._wrap(PolicyAndValue, "forward", lambda p, a, k: "training step" if in_iteration(p) else p, restore=False)
        self._wrap(PolicyAndValue, "sequence_kl", lambda p, a, k: "exact-KL check" if in_iteration(p) else p,
                   restore=True, static=True)
        self._wrap(RewardHackingMonitor, "_queue", lambda *_: "monitor", restore=True)

    def finish(self) -> dict:
        self.mark("end")
        return dict(self.peaks)


def bf16_autocast_config():
    """run_case (scripts/gpu_check.py) sets PPOConfig(bf16=…) on GPU only; for the autocast precisions on CPU this
    worker process swaps in a PPOConfig with bf16=True (autocast around every pass, as on a GPU)."""
    import rlhf_ext

    base = rlhf_ext.PPOConfig

    class BF16Config(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "bf16": True})

    rlhf_ext.PPOConfig = BF16Config


def worker(name: str, iterations: int) -> dict:
    from gpu_check import run_case

    from rlhf_ext.plan import estimate, load_shape

    if name in SCORING:
        return scoring_worker(name)
    shape_spec, opts, _ = CONFIGS[name]
    opts = dict(opts)
    precision = opts.pop("precision", "fp32")
    dtype, autocast, four_bit = PRECISIONS[precision]
    model_precision = "4bit" if four_bit else {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    if autocast:
        bf16_autocast_config()
    shape = load_shape(shape_spec) if isinstance(shape_spec, str) else shape_spec
    # Warm-up: one tiny iteration of the same architecture and precision, so that lazily imported modules (the model
    # class, Trainer, generation, autocast's kernels) and the libraries' first-use buffers are part of the baseline,
    # not of the measurement.
    tiny = dict(GPT2_SMALL if shape["model_type"] == "gpt2" else llama(1024, 64, 176, 2, 4, 2),
                vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    run_case(tiny, precision="fp32" if four_bit else model_precision, device="cpu", iterations=1, batch=2,
             prompt_length=4, completion_length=4, ppo_epochs=2, minibatches=1,
             gradient_checkpointing=opts.get("gradient_checkpointing", False), cpu_matmul_backend=MATMULS)
    meter = PhaseMeter()
    meter.install()
    res = run_case(shape, precision=model_precision, device="cpu", iterations=iterations, measure="rss",
                   on_baseline=meter.start, cpu_matmul_backend=MATMULS, **opts)
    measured_phases = meter.finish()  # the meter resets VmHWM: the whole-run peak is the largest phase's
    plan = estimate(shape, dtype=dtype, bf16=autocast, load_in_4bit=four_bit, device="cpu",
                    cpu_matmul_backend=MATMULS, **opts)
    return {"name": name, "precision": precision, "measured": max(measured_phases.values()),
            "planned": plan["peak_allocated"], "peak_phase": plan["peak_phase"],
            "measured_peak_phase": max(measured_phases, key=measured_phases.get),
            "phases": {k: v["total"] for k, v in plan["phases"].items()}, "measured_phases": measured_phases,
            "parts": plan["phases"][plan["peak_phase"]]["parts"], "iteration_s": res["iterations"][-1]["iteration_s"],
            "kl_after_update": [i["kl_after_update"] for i in res["iterations"]]}


def worker_env(default_malloc: bool = False, native_isa: bool = False) -> dict:
    """The workers' environment, so that RSS follows what torch holds (docstring): tensors ≥ 64 KiB from mmap, and
    oneDNN capped below its native-bf16 kernels (a maximum: nothing changes on a CPU without AVX512-BF16)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if not native_isa:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE"
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma list of: " + ", ".join([*CONFIGS, *SCORING]))
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold dynamic")
    ap.add_argument("--native-isa", action="store_true", help="let oneDNN use its native bf16 kernels (AVX512-BF16 / "
                    "AMX), whose per-shape JIT code and caches then count in RSS")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.json_out).write_text(json.dumps(worker(args.worker, args.iterations)))
        return 0
    names = args.only.split(",") if args.only else [*CONFIGS, *SCORING]
    unknown = [n for n in names if n not in CONFIGS and n not in SCORING]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join([*CONFIGS, *SCORING])}")
    failed = []
    env = worker_env(args.default_malloc, args.native_isa)
    rows = []
    for name in names:
        out = tempfile.mktemp(suffix=".json")
        r = subprocess.run([sys.executable, __file__, "--worker", name, "--iterations", str(args.iterations),
                            "--json-out", out], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: worker failed\n{r.stderr[-3000:]}", flush=True)
            failed.append(name)
            continue
        row = json.loads(Path(out).read_text())
        rows.append(row)
        print(f"{name:20s} measured {row['measured'] / 2**20:8.1f} MiB  planned {row['planned'] / 2**20:8.1f} MiB  "
              f"ratio {row['measured'] / row['planned']:.3f}  (peak phase: {row['peak_phase']}; measured: "
              f"{row.get('measured_peak_phase', row['peak_phase'])})", flush=True)
    print(f"\n{'configuration':20s} {'measured MiB':>12s} {'planned MiB':>12s} {'ratio':>6s}  {'within ±20%':>11s}  "
          f"peak phase; largest parts at the peak (MiB)")
    ok = True
    for row in rows:
        ratio = row["measured"] / row["planned"]
        judged = {**CONFIGS, **SCORING}[row["name"]][2]
        good = abs(ratio - 1) <= 0.2
        ok &= good or not judged
        parts = sorted(row["parts"].items(), key=lambda kv: -kv[1])[:4]
        print(f"{row['name']:20s} {row['measured'] / 2**20:12.1f} {row['planned'] / 2**20:12.1f} {ratio:6.3f}  "
              f"{('yes' if good else 'NO') if judged else '(n/a)':>11s}  {row['peak_phase']}; "
              + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in parts))
    # each phase on its own: its measured peak (PhaseMeter) against the plan's phase total
    phase_names = ["generation", "reward scoring", "reference pass", "training step", "exact-KL check", "monitor"]
    print(f"\nper phase, measured / planned (MiB; '-' = not run, e.g. the monitor's review queue when no detector "
          f"fired):\n{'configuration':20s} " + " ".join(f"{p:>20s}" for p in phase_names))
    for row in rows:
        if "measured_phases" not in row:
            continue
        cells = []
        for p in phase_names:
            m, pl = row["measured_phases"].get(p), row["phases"].get(p)
            cells.append(f"{m / 2**20:6.0f}/{pl / 2**20:<6.0f}{m / pl:6.2f}" if m and pl else f"{'-':>20s}")
        print(f"{row['name']:20s} " + " ".join(f"{c:>20s}" for c in cells))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    if failed:
        print(f"\nfailed: {', '.join(failed)}", flush=True)
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
