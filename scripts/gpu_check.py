"""A prepared GPU check: PPO iterations of rlhf_ext's PPOTrainer on random-initialised models of real shapes.

    python scripts/gpu_check.py --out gpu_check.json            # one GPU; estimated 3–5 min on an H100 (≤ 8)
    python scripts/gpu_check.py --cpu --out cpu_check.json      # the same code path, tiny sizes, CPU, ≈ 15 s

For each case — a gpt2-shaped, a SmolLM2-1.7B-shaped (1.7 B) and a Qwen2.5-7B-shaped model, in bf16 (every pass
under bf16 autocast), 4-bit NF4 when bitsandbytes imports, with and without gradient checkpointing, and the 7B QLoRA
recipe's own shape (recipes/configs/ppo_7b_qlora.yaml: 16 × (512 + 256) tokens, 4 minibatches) — it builds the model from the shape in `rlhf_ext/plan_shapes/` with random weights (no
network, no checkpoint), a word-level tokenizer generated in code with the model's full vocabulary (every id a
random model samples decodes), prompts of exactly `prompt_length` tokens and a cheap Python reward, then runs a
few PPO iterations (hard KL controller, responses of exactly `completion_length` tokens) and records:

  tokens/s and seconds per iteration (median of iterations 2..N), the generation share of an iteration,
  peak torch.cuda.max_memory_allocated (and reserved) over the iterations, the plan's prediction for the same
  configuration (`rlhf_ext.plan.estimate`) and measured / planned, and `kl/after_update ≤ δ` on every iteration.

Each case runs in a fresh subprocess (its peak memory is its own; an OOM or a crash stays there). Everything goes
to one JSON file (--out, rewritten after every case); the console gets a table. A case that fails is recorded with
its error and the next one runs; no case starts once --budget-s is spent. On the lent GPU machine (`run` tool):
`python scripts/gpu_check.py --install-wheels shared/wheels --out $OUT/gpu_check.json`, timeout_s ≈ 560.

Dependencies. rlhf_ext imports `trl` and `datasets`; the 4-bit cases need `bitsandbytes`. A GPU machine without
network that has torch, transformers, peft and accelerate can get the rest from wheels carried in the repository
folder (shared/wheels/, which travels with the working tree):

    # on a machine with network, once; match the GPU machine's Python (the script prints the exact command
    # for its own Python and platform when something is missing):
    pip download --no-deps -d shared/wheels --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \\
        trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 'dill>=0.3.0,<0.4.2' 'multiprocess<0.70.20' xxhash
    # + 'pyarrow>=24' pandas fsspec psutil jinja2 if that machine lacks them (pyarrow ≈ 40 MB and bitsandbytes
    # ≈ 60–70 MB are the large ones; trl, datasets and the rest are < 1 MB each)
    # on the GPU machine:
    python scripts/gpu_check.py --install-wheels shared/wheels --out gpu_check.json
    #   (= pip install --no-deps shared/wheels/*.whl, then the check)

Without them the script prints what is missing and exits with status 3 before touching the GPU.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# module → (pip requirement, who needs it, required?)
DEPENDENCIES = {
    "torch": ("torch", "everything", True),
    "transformers": ("transformers>=5.2", "models", True),
    "peft": ("peft>=0.21", "LoRA adapters", True),
    "accelerate": ("accelerate>=1.15", "transformers.Trainer", True),
    "trl": ("trl==1.16.0", "rlhf_ext (PPOTrainer imports trl.trainer.utils)", True),
    "datasets": ("datasets==5.2.0", "rlhf_ext (prompt datasets)", True),
    # what trl 1.16 / datasets 5.2 import in turn (often absent from a bare torch image)
    "pyarrow": ("pyarrow>=24", "datasets", True),
    "pandas": ("pandas", "datasets, trl", True),
    "dill": ("dill>=0.3.0,<0.4.2", "datasets", True),
    "multiprocess": ("multiprocess<0.70.20", "datasets", True),
    "xxhash": ("xxhash", "datasets", True),
    "fsspec": ("fsspec>=2023.1.0,<=2026.9.0", "datasets", True),
    "huggingface_hub": ("huggingface-hub>=1.31,<3", "datasets, transformers", True),
    "psutil": ("psutil", "trl", True),
    "jinja2": ("jinja2", "trl, chat templates", True),
    "bitsandbytes": ("bitsandbytes==0.50.2", "the 4-bit cases only", False),
}
# GPU cases: (name, shipped shape, batch, prompt tokens, completion tokens, variants). A variant is a precision —
# fp32, bf16 (bf16 weights + bf16 autocast on every pass), fp16 (the same in fp16, with the loss scaler: a T4's or
# V100's 16-bit mode), 4bit (NF4, bf16 compute + autocast) — with "-gc" for
# gradient checkpointing. "7B-recipe" is recipes/configs/ppo_7b_qlora.yaml's shape: 4-bit, bf16, checkpointing,
# 16 prompts × (512 + 256) tokens, 4 minibatches; last, so the time budget protects the cases before it.
GPU_CASES = [
    ("gpt2", "gpt2", 32, 64, 128, ("bf16", "bf16-gc", "fp16")),
    ("1.7B", "SmolLM2-1.7B-Instruct", 16, 64, 128, ("bf16", "4bit")),
    ("7B", "Qwen2.5-7B-Instruct", 8, 64, 128, ("bf16", "4bit", "4bit-gc")),
    ("7B-recipe", "Qwen2.5-7B-Instruct", 16, 512, 256, ("4bit-gc",)),
]
MINIBATCHES = {"7B-recipe": 4}
TINY = {  # --cpu: the same code path at tiny sizes
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      max_position_embeddings=128),
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=256),
}
CPU_CASES = [("tiny-gpt2", "tiny-gpt2", 4, 8, 8, ("fp32",)),
             ("tiny-llama", "tiny-llama", 4, 8, 8, ("fp32", "bf16", "4bit", "4bit-gc"))]


def split_variant(variant: str) -> tuple[str, bool]:
    """"4bit-gc" → ("4bit", True): the precision, and whether gradient checkpointing is on."""
    return variant.removesuffix("-gc"), variant.endswith("-gc")


def find_case(case: str, cases) -> tuple:
    """The (name, shape, batch, P, R, variants) row of a case id "NAME-VARIANT" (exact, so "7B-recipe-4bit-gc" is
    not read as the "7B" case)."""
    for row in cases:
        if case.startswith(row[0] + "-") and case[len(row[0]) + 1:] in row[5]:
            return row
    raise ValueError(f"Unknown case {case!r}.")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]


# ------------------------------------------------------------------------------------------------ dependencies
def check_dependencies() -> dict:
    """{"missing": [(module, requirement, why, required)], "versions": {module: version}}; a module whose own
    import fails on a missing dependency (e.g. datasets without pyarrow) reports that dependency too."""
    missing, versions = [], {}
    for mod, (req, why, required) in DEPENDENCIES.items():
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ModuleNotFoundError as e:
            dep = (e.name or "").split(".")[0]
            if dep and dep != mod and dep not in DEPENDENCIES:
                missing.append((dep, dep, f"needed by {mod}", required))
            missing.append((mod, req, why, required))
        except Exception as e:  # noqa: BLE001 — e.g. bitsandbytes without a usable CUDA binary
            missing.append((mod, req, f"{why} (import failed: {type(e).__name__}: {str(e)[:120]})", required))
    return {"missing": missing, "versions": versions}


def explain_missing(missing) -> str:
    reqs = " ".join(f"'{req}'" for _, req, _, _ in dict.fromkeys(missing))
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = ["Missing Python packages:"]
    lines += [f"  {mod:16s} {'required' if req_ else 'optional'}: {why}" for mod, _, why, req_ in missing]
    lines += ["Provide them as wheels carried in the repository folder (no network needed on this machine):",
              f"  (elsewhere)  pip download --no-deps -d shared/wheels --only-binary=:all: --python-version {py} "
              f"--platform manylinux_2_28_{platform.machine()} --platform manylinux2014_{platform.machine()} {reqs}",
              "  (here)       python scripts/gpu_check.py --install-wheels shared/wheels ...",
              "               (which runs: pip install --no-deps shared/wheels/*.whl)"]
    return "\n".join(lines)


def install_wheels(folder: str) -> None:
    wheels = sorted(glob.glob(str(Path(folder) / "*.whl")))
    if not wheels:
        print(f"--install-wheels: no *.whl in {folder}", flush=True)
        return
    print(f"installing {len(wheels)} wheel(s) from {folder} (--no-deps)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *wheels], check=False)
    importlib.invalidate_caches()


# --------------------------------------------------------------------------------------------- model and data
def synthetic_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with exactly `vocab_size` tokens ("<|im_end|>" is EOS and pad, then w4, w5, …),
    built in code: every id a random model can sample decodes, and a prompt of n words is n tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="[UNK]", additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def hf_config(shape: dict, tokenizer):
    """A transformers config for `shape` (plan_shapes format), with the tokenizer's special ids."""
    from transformers import AutoConfig, GPT2Config

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if shape["model_type"] == "gpt2":
        return GPT2Config(vocab_size=shape["vocab_size"], n_embd=shape["hidden_size"],
                          n_layer=shape["num_hidden_layers"], n_head=shape["num_attention_heads"],
                          n_inner=shape["intermediate_size"], n_positions=shape["max_position_embeddings"],
                          tie_word_embeddings=shape["tie_word_embeddings"], **ids)
    extra = {"head_dim": shape["head_dim"]} if shape.get("head_dim") else {}
    if shape["model_type"] == "mistral":
        extra["sliding_window"] = None  # v0.3
    return AutoConfig.for_model(
        shape["model_type"], vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=shape["max_position_embeddings"], tie_word_embeddings=shape["tie_word_embeddings"],
        **extra, **ids)


def quantize_4bit_(model, compute_dtype):
    """Turn the decoder layers' nn.Linear into bitsandbytes NF4 Linear4bit in place (double quantisation, compute
    dtype as given) — what `from_pretrained(quantization_config=rlhf_ext.models.quantization_config(True, dtype))`
    produces, without writing a multi-GB random checkpoint to disk. The LM head stays unquantised, as there."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child is head:
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            del child
    model.is_loaded_in_4bit = True
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=compute_dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def random_model(shape: dict, tokenizer, precision: str, device: str, seed: int = 0):
    """Random-initialised causal LM of `shape` on `device`: precision fp32 / bf16 / fp16 / 4bit (NF4, bf16 compute;
    fp32 compute on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import keep_4bit_trainable

    torch.manual_seed(seed)
    cpu = device == "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision, torch.float32 if cpu else torch.bfloat16)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape, tokenizer), dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if precision == "4bit":
        quantize_4bit_(model, dtype)
        keep_4bit_trainable(model)
    return model


def prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join(f"w{r.randrange(len(SPECIALS), vocab_size)}" for _ in range(length)) for _ in range(n)]


def sevens(prompts, completions, completion_ids, **kw):
    """A cheap, learnable reward: the fraction of response ids divisible by 7."""
    return [sum(t % 7 == 0 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def lora_targets(shape: dict, targets=("q", "k", "v", "o")) -> list[str]:
    if shape["model_type"] == "gpt2":
        names = {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"}
    else:
        names = {t: f"{t}_proj" for t in ("q", "k", "v", "o", "gate", "up", "down")}
    names["lm_head"] = "lm_head"
    return list(dict.fromkeys(names[t] for t in targets))


# ---------------------------------------------------------------------------------------------------- memory
def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------- runs
def run_case(shape: dict, *, precision: str, device: str, batch: int, prompt_length: int, completion_length: int,
             iterations: int = 3, ppo_epochs: int = 4, minibatches: int = 1, kl_target: float = 1.0,
             learning_rate: float = 1e-4, lora_r: int = 16, targets=("q", "k", "v", "o"), lora_top_layers: int = 0,
             gradient_checkpointing: bool = False, kl_controller: str = "hard", seed: int = 0,
             measure: str | None = None, on_baseline=None, cpu_matmul_backend: str = "auto") -> dict:
    """Build the model, run `iterations` PPO iterations, return timings, memory and KL per iteration.

    measure: "cuda" (max_memory_allocated after the model and trainer are built), "rss" (CPU: peak RSS minus the
    RSS before the model is built; the tokenizer and prompts are built first) or None. on_baseline(base_rss): called
    once that baseline is taken (benchmarks/memory_plan_check.py's per-phase meter). cpu_matmul_backend: PPOConfig's
    (CPU only)."""
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from rlhf_ext import PPOConfig, PPOTrainer

    if device == "cpu":
        torch.set_flush_denormal(True)  # random tiny models produce denormals, which slow CPU matmuls badly
    tok = synthetic_tokenizer(shape["vocab_size"])
    data = Dataset.from_dict({"prompt": prompts(batch * iterations, prompt_length, shape["vocab_size"], seed)})
    cfg = PPOConfig(tempfile.mkdtemp(prefix="gpu_check_"), per_device_train_batch_size=batch,
                    max_prompt_length=prompt_length, max_completion_length=completion_length, stop_on_eos=False,
                    num_ppo_epochs=ppo_epochs, num_mini_batches=minibatches, kl_controller=kl_controller,
                    kl_target=kl_target, learning_rate=learning_rate, max_steps=iterations, save_strategy="no",
                    logging_steps=10**6, disable_tqdm=True, report_to="none", seed=seed,
                    use_cpu=device == "cpu", bf16=precision == "bf16" or (precision == "4bit" and device != "cpu"),
                    fp16=precision == "fp16", gradient_checkpointing=gradient_checkpointing,
                    lora_top_layers=lora_top_layers, cpu_matmul_backend=cpu_matmul_backend)
    base_rss = None
    if measure == "rss":
        gc.collect()
        reset_peak_rss()
        base_rss = rss_bytes("VmRSS")
        if on_baseline is not None:
            on_baseline(base_rss)
    t_build = time.perf_counter()
    # gpt2 is built on the CPU, as from_pretrained loads a model by name: the trainer moves it (and the value head
    # with it) to the GPU, the path a user's script takes; the larger ones are built in place
    model = random_model(shape, tok, precision, "cpu" if shape.get("model_type") == "gpt2" else device, seed)
    trainer = PPOTrainer(model, reward_funcs=sevens, args=cfg, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                target_modules=lora_targets(shape, targets)))
    build_s = time.perf_counter() - t_build
    if measure == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    hist = trainer.train()
    out = {"build_s": build_s, "quantized": bool(trainer.quantized), "compute_dtype": trainer.startup["compute_dtype"],
           "sampling_vs_training": trainer.startup.get("sampling_vs_training"), "iterations": [
        {"iteration_s": h["time/iteration_s"], "generate_s": h["time/generate_s"],
         "tokens_per_s": h["time/tokens_per_s"], "kl_before_update": h.get("kl/before_update"),
         "kl_after_update": h.get("kl/after_update"), "kl_backtracks": h.get("kl/backtracks", 0),
         "objective_kl": h["objective/kl"], "score": h["objective/scores"]}
        for h in hist]}
    if measure == "cuda":
        torch.cuda.synchronize()
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
        out["peak_reserved"] = torch.cuda.max_memory_reserved()
    elif measure == "rss":
        out["peak_rss_delta"] = rss_bytes("VmHWM") - base_rss
    del trainer, model
    gc.collect()
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def plan_for(shape: dict, precision: str, device: str, **kw) -> dict:
    from rlhf_ext.plan import estimate

    dtype = precision if precision in ("fp32", "bf16", "fp16") else ("fp32" if device == "cpu" else "bf16")
    # as run_case sets PPOConfig.bf16 / fp16: fp16 autocast keeps what bf16's keeps (two bytes an activation)
    autocast = precision in ("bf16", "fp16") or (precision == "4bit" and device != "cpu")
    return estimate(shape, dtype=dtype, bf16=autocast, load_in_4bit=precision == "4bit",
                    device="cpu" if device == "cpu" else "cuda", **kw)


def summarize(name: str, shape_name: str, precision: str, opts: dict, res: dict, plan: dict, delta: float,
              device: str) -> dict:
    its = res["iterations"]
    steady = its[1:] or its
    med = lambda k: statistics.median(i[k] for i in steady)  # noqa: E731
    kls = [i["kl_after_update"] for i in its]
    measured = res.get("peak_allocated", res.get("peak_rss_delta"))
    row = {
        "name": name, "shape": shape_name, "precision": precision, **opts, "status": "ok",
        "quantized": res["quantized"], "build_s": res["build_s"],
        "iteration_s": med("iteration_s"), "tokens_per_s": med("tokens_per_s"),
        "generation_share": med("generate_s") / med("iteration_s"),
        "kl_after_update": kls, "kl_backtracks": sum(i["kl_backtracks"] or 0 for i in its),
        "kl_ok": all(k is not None and math.isfinite(k) and k <= delta + 1e-6 for k in kls),
        "measured_peak_gib": None if measured is None else measured / 2**30,
        "measured_kind": "torch.cuda.max_memory_allocated" if device != "cpu" else "peak RSS delta (VmHWM)",
        "planned_peak_allocated_gib": plan["peak_allocated"] / 2**30, "planned_peak_gib": plan["peak"] / 2**30,
        "planned_peak_phase": plan["peak_phase"],
        "ratio": None if not measured else measured / plan["peak_allocated"],
        "iterations": its,
    }
    if "peak_reserved" in res:
        row["measured_reserved_gib"] = res["peak_reserved"] / 2**30
    return row


def run_one(case: str, args) -> dict:
    """One case (name-precision) in this process: build, train, measure, plan → a summary row."""
    import torch

    from rlhf_ext.plan import load_shape

    device = "cpu" if args.cpu else "cuda"
    name, shape_name, batch, P, R, _ = find_case(case, CPU_CASES if args.cpu else GPU_CASES)
    precision, checkpointing = split_variant(case[len(name) + 1:])
    shape = TINY[shape_name] if shape_name in TINY else load_shape(shape_name)
    opts = dict(batch=batch, prompt_length=P, completion_length=R, ppo_epochs=2 if args.cpu else 4,
                minibatches=MINIBATCHES.get(name, 1), gradient_checkpointing=checkpointing)
    try:
        res = run_case(shape, precision=precision, device=device, iterations=args.iterations, kl_target=args.delta,
                       learning_rate=args.learning_rate, measure="cuda" if device == "cuda" else "rss", **opts)
        plan = plan_for(shape, precision, device, **opts)
        row = summarize(case, shape_name, precision, opts, res, plan, args.delta, device)
        row["compute_dtype"] = res.get("compute_dtype")
        if device == "cuda":
            row["device"] = torch.cuda.get_device_name()
            row["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        return row
    except Exception as e:  # noqa: BLE001 — record it (OOM, kernel) for the table
        row = {"name": case, "status": f"error: {type(e).__name__}: {str(e)[:300]}", **opts}
        if device == "cuda":
            row["measured_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return row


def run_isolated(case: str, args, flags: list[str], opts: dict, timeout: float) -> dict:
    """`run_one` in a fresh `--worker` subprocess; its row, or an error row with the end of its stderr."""
    row_file = Path(args.out).with_suffix(f".{case}.json")
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", case, "--out", str(row_file), *flags],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 and row_file.is_file():
            return json.loads(row_file.read_text())
        return {"name": case, "status": f"error: worker exited {r.returncode}: {r.stderr[-600:]}", **opts}
    except subprocess.TimeoutExpired:
        return {"name": case, "status": "error: timed out", **opts}
    finally:
        row_file.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    """Temporary file + rename, so a run killed at its deadline leaves the last complete JSON, never a torn one (no
    rlhf_ext import: the parent runs before the dependency check lets it import trl)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on CPU (the test suite runs this)")
    ap.add_argument("--iterations", type=int, default=None, help="PPO iterations per case (default 3 GPU, 2 CPU)")
    ap.add_argument("--delta", type=float, default=None, help="δ: the hard KL bound, nats/sequence (default 1.0 on "
                    "GPU; 0.1 on CPU, where the large learning rate makes the guard backtrack)")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="default 1e-4 (GPU), 3e-2 (CPU: engage the guard)")
    ap.add_argument("--only", default=None, help="comma list of case names (e.g. gpt2,7B) or precisions (bf16,4bit)")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new case after this many seconds")
    ap.add_argument("--deadline-s", type=float, default=540, help="no worker runs past this many seconds (inside "
                    "the run tool's 600 s command limit)")
    ap.add_argument("--install-wheels", default=None, help="pip install --no-deps FOLDER/*.whl first")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each case in a fresh subprocess (default: on GPU; off with --cpu, where the tiny cases run "
                         "in this process)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.iterations = args.iterations or (2 if args.cpu else 3)
    args.learning_rate = args.learning_rate or (3e-2 if args.cpu else 1e-4)
    args.delta = args.delta or (0.1 if args.cpu else 1.0)
    args.isolate = (not args.cpu) if args.isolate is None else args.isolate
    if args.worker:  # one case, in a fresh process (the parent's loop below)
        Path(args.out).write_text(json.dumps(run_one(args.worker, args)))
        return 0

    t0 = time.perf_counter()
    if args.install_wheels:
        install_wheels(args.install_wheels)
    deps = check_dependencies()
    required_missing = [m for m in deps["missing"] if m[3]]
    if deps["missing"]:
        print(explain_missing(deps["missing"]), flush=True)
    if required_missing:
        Path(args.out).write_text(json.dumps({"status": "missing dependencies", "missing": deps["missing"],
                                              "versions": deps["versions"]}, indent=2))
        return 3
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: run with --cpu for the CPU smoke test.", flush=True)
        return 4
    have_bnb = "bitsandbytes" in deps["versions"]
    only = set(args.only.split(",")) if args.only else None
    if only:
        known = {x for name, _, _, _, _, variants in (CPU_CASES if args.cpu else GPU_CASES) for v in variants
                 for x in (name, v, split_variant(v)[0], f"{name}-{v}")}
        if only - known:
            ap.error(f"--only: {', '.join(sorted(only - known))} names no {'CPU' if args.cpu else 'GPU'} case; "
                     f"choose from {', '.join(sorted(known))}")
    # the parent never touches the GPU (no CUDA context of its own next to the workers'); they report the device
    result = {"status": "ok", "mode": device, "device": platform.processor() or "cpu", "versions": deps["versions"],
              "python": platform.python_version(), "delta": args.delta, "learning_rate": args.learning_rate,
              "iterations_per_case": args.iterations, "missing_optional": deps["missing"], "cases": []}
    if device == "cpu":
        result["note"] = ("CPU mode checks the code path, not the memory model: at these tiny sizes the RSS delta "
                          "is fixed costs (lazy imports, first-use buffers). benchmarks/memory_plan_check.py "
                          "validates the plan on CPU.")
    flags = ["--iterations", str(args.iterations), "--delta", str(args.delta), "--learning-rate",
             str(args.learning_rate)] + (["--cpu"] if args.cpu else [])
    for name, shape_name, batch, P, R, variants in CPU_CASES if args.cpu else GPU_CASES:
        for variant in variants:
            case = f"{name}-{variant}"
            precision = split_variant(variant)[0]
            if only and not ({name, variant, precision, case} & only):
                continue
            opts = dict(batch=batch, prompt_length=P, completion_length=R)
            if precision == "4bit" and not have_bnb:
                result["cases"].append({"name": case, "status": "skipped: bitsandbytes not importable", **opts})
                continue
            left = args.budget_s - (time.perf_counter() - t0)
            if left <= 0:
                result["cases"].append({"name": case, "status": "skipped: time budget spent", **opts})
                continue
            print(f"== {case}: {shape_name}, batch {batch}, {P}+{R} tokens", flush=True)
            if args.isolate:  # a fresh process per case: its peak memory is its own, an OOM or a crash stays there
                row = run_isolated(case, args, flags, opts,
                                   timeout=max(1.0, min(left + 180, args.deadline_s - (time.perf_counter() - t0))))
            else:
                row = run_one(case, args)
            if row["status"] != "ok":
                print(f"   {row['status']}", flush=True)
            if "device" in row:
                result["device"], result["gpu_memory_gib"] = row.pop("device"), row.pop("gpu_memory_gib")
            result["cases"].append(row)
            write_text_atomic(args.out, json.dumps(result, indent=2))  # partial results survive a kill
    result["wall_s"] = time.perf_counter() - t0
    write_text_atomic(args.out, json.dumps(result, indent=2))

    print(f"\n{'case':14s} {'tok/s':>8s} {'s/iter':>7s} {'gen %':>6s} {'peak GiB':>9s} {'plan GiB':>9s} {'ratio':>6s} "
          f"{'KL≤δ':>5s}  status")
    for r in result["cases"]:
        if r["status"] != "ok":
            print(f"{r['name']:14s} {'':48s}  {r['status'][:200]}")
            continue
        print(f"{r['name']:14s} {r['tokens_per_s']:8.1f} {r['iteration_s']:7.2f} {100 * r['generation_share']:6.1f} "
              f"{r['measured_peak_gib']:9.3f} {r['planned_peak_allocated_gib']:9.3f} {r['ratio']:6.2f} "
              f"{'yes' if r['kl_ok'] else 'NO':>5s}  ok")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    bad = [r for r in result["cases"] if r["status"] == "ok" and not r["kl_ok"]]
    errors = [r for r in result["cases"] if r["status"].startswith("error")]
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
