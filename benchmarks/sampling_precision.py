"""How far `generate()` (incremental decoding with a KV cache) is from the training forward, per precision.

    python benchmarks/sampling_precision.py                  # SmolLM2-135M-Instruct, 4 prompts x 32 tokens
    python benchmarks/sampling_precision.py --model ./my-model --tokens 64
    python benchmarks/sampling_precision.py --only fp16      # the fp16 rows only (GPUs before Ampere)

The two compute the same distribution in a different order of operations, so they differ by rounding only; this
measures how much, in the precisions PPOTrainer runs in, beside two kinds of logits processing the start-up check
must still catch (a repetition penalty of 1.1; sampling at T = 1 while training at T = 0.95), and in fp32 also
through rlhf_ext's CPU decoding loop with its few-row matmuls forced on (rlhf_ext/ppo/cpu_matmul.py) and with the
frozen base's matmuls through oneDNN (rlhf_ext/cpu_linear.py), both passes; in fp32 (oneDNN) and bf16 also with
decoding from packed weights (cpu_matmul.py, forced on; for this Llama-family model its lean steps, cpu_decode.py),
and in fp32 and bf16 with a trained-like LoRA adapter on q/v, the model's steps against lean steps that fold the
adapter into their products. The tolerances in
`rlhf_ext/precision.py` (SAMPLING_KL_TOLERANCE) come from this table. Prints one row per setting:
mean and max per-token KL(generate ‖ training forward), max |Δ log p| (all tokens, and tokens with p > 1e-3),
max total variation.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from rlhf_ext.cpu_linear import route_frozen_linears
from rlhf_ext.models import load_model, load_tokenizer
from rlhf_ext.ppo import cpu_matmul
from rlhf_ext.ppo.sampling import decode


ONEDNN = "fp32, the frozen base's matmuls through oneDNN (cpu_linear.py), rlhf_ext's CPU decoding loop"
UNPACKED = {"custom_generate": decode, "cpu_matmul_backend": "torch"}  # rlhf_ext's loop, weights as they are
PACKED = {"custom_generate": decode, "cpu_matmul_backend": "onednn"}  # rlhf_ext's loop from packed weights


def measure(model, enc, pad_id, tokens, ctx, extra=None, train_temperature=1.0) -> dict:
    with torch.no_grad(), ctx():
        g = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                           output_scores=True, return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=None,
                           **(extra or {}))
        sampled = torch.stack(g.scores, 1).double().log_softmax(-1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(g.sequences[:, enc["input_ids"].shape[1]:])], 1)
        out = model(input_ids=g.sequences, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        R = sampled.shape[1]
        trained = (out.logits[:, -R - 1 : -1].double() / train_temperature).log_softmax(-1)
    p = sampled.exp()
    gap = (sampled - trained).abs()
    kl = (p * (sampled - trained)).sum(-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "max_dlogp": float(gap.max()),
            "max_dlogp_p>1e-3": float(gap[p > 1e-3].max()),
            "max_tv": float(0.5 * (p - trained.exp()).abs().sum(-1).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", default=None, help="run only the settings whose name contains this (e.g. fp16)")
    args = ap.parse_args(argv)
    # the few-row row measures that order whatever this CPU's calibration chose
    cpu_matmul.rows_range = lambda: range(1, max(cpu_matmul.CALIBRATION_ROWS) + 1)
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    questions = ["Write a short review of a movie.", "Tell me about your day.", "What is a good book?",
                 "Describe the sea."]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             if tok.chat_template else q for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    settings = [("fp32", {}, nullcontext), (ONEDNN, {}, nullcontext), ("fp32 weights + bf16 autocast", {}, bf16),
                ("bf16 weights", {"dtype": "bfloat16"}, nullcontext),
                ("4-bit NF4, bf16 compute", {"load_in_4bit": True, "dtype": "bfloat16"}, nullcontext),
                # GPUs before Ampere (T4, V100): fp16 in place of bf16
                ("fp32 weights + fp16 autocast", {}, fp16), ("fp16 weights", {"dtype": "float16"}, nullcontext),
                ("4-bit NF4, fp16 compute", {"load_in_4bit": True, "dtype": "float16"}, nullcontext)]
    settings = [s for s in settings if args.only is None or args.only in s[0]]
    if not settings:
        ap.error(f"--only {args.only!r} matches no setting")
    print("| setting | mean KL / token | max KL / token | max abs dlogp | max abs dlogp (p > 1e-3) | max TV | s |")
    print("|---|---|---|---|---|---|---|")
    for name, load_kw, ctx in settings:
        model = load_model(args.model, **load_kw).eval()
        rows = [(name, {}, 1.0)]
        if name == ONEDNN:  # frozen, as the trainer's base is: only frozen layers take oneDNN (cpu_linear.py)
            route_frozen_linears(model.requires_grad_(False), "onednn")
            rows = [(name, UNPACKED, 1.0), (f"{ONEDNN} from packed weights, lean steps (cpu_decode.py)", PACKED, 1.0)]
        if name == "bf16 weights":  # frozen: only frozen layers are packed
            rows += [("bf16 weights, rlhf_ext's CPU decoding loop from packed weights, lean steps (cpu_decode.py)",
                      PACKED, 1.0)]
            model.requires_grad_(False)
        if name == "fp32":
            rows += [("fp32, rlhf_ext's CPU decoding loop, few-row matmuls as (W·xᵀ)ᵀ", UNPACKED, 1.0),
                     ("fp32, repetition penalty 1.1 in generate", {"repetition_penalty": 1.1}, 1.0),
                     ("fp32, trained at T = 0.95, sampled at T = 1", {}, 0.95)]
        if name == "fp32 weights + fp16 autocast":  # fp16's rounding is small enough to show this mismatch
            rows += [("fp32 weights + fp16 autocast, trained at T = 0.95, sampled at T = 1", {}, 0.95)]
        if name in ("fp32", "bf16 weights"):  # a policy that has trained: lean steps fold its adapter in
            model = trained_lora(model)
            rows += [(f"{name} + a trained LoRA (q/v, r=16), rlhf_ext's CPU decoding loop, the model's steps",
                      UNPACKED, 1.0),
                     (f"{name} + a trained LoRA (q/v, r=16), lean steps from packed weights, the adapter folded in "
                      "(cpu_decode.py)", PACKED, 1.0)]
        for label, extra, t_train in rows:
            t0 = time.perf_counter()
            r = measure(model, enc, tok.pad_token_id, args.tokens, ctx, extra, t_train)
            print(f"| {label} | {r['mean_kl']:.2g} | {r['max_kl']:.2g} | {r['max_dlogp']:.3g} | "
                  f"{r['max_dlogp_p>1e-3']:.3g} | {r['max_tv']:.3g} | {time.perf_counter() - t0:.1f} |", flush=True)
    return 0


def trained_lora(model):
    """`model` with the benchmark trainer's LoRA (r=16, alpha 32, q/v) whose B is not zero (std 0.01: at θ₀ it is,
    and the fold then adds nothing), frozen, as a rollout sees it."""
    from peft import LoraConfig

    from rlhf_ext.adapters import wrap_with_peft

    peft = wrap_with_peft(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                          "default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return peft.requires_grad_(False).eval()


if __name__ == "__main__":
    raise SystemExit(main())
