"""Print the README's "Supported architectures" table from an actual run of tests/test_architectures.py.

    python scripts/support_table.py                  # run the matrix (about 30 s on one CPU thread), print the table
    python scripts/support_table.py --update-readme  # and write it between <!-- SUPPORT:START --> / <!-- SUPPORT:END -->

Each cell is the outcome of that architecture's test: ✓ passed; ✗ failed (first line of the error); xfail: a known
failure, with its reason. The tiny models are random and built from transformers' own config classes (no network).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "test_architectures.py"
README = ROOT / "README.md"
START, END = "<!-- SUPPORT:START -->", "<!-- SUPPORT:END -->"

FAMILY = {"llama3": "Llama 3", "qwen2.5": "Qwen2.5", "qwen3": "Qwen3", "qwen3-moe": "Qwen3-MoE", "mistral": "Mistral",
          "gemma2": "Gemma 2", "gemma3": "Gemma 3 (text)", "phi3": "Phi-3", "gpt2": "GPT-2", "gpt-neox": "GPT-NeoX / Pythia",
          "opt": "OPT", "opt-350m": "OPT-350m (project_in/out)", "olmo2": "OLMo 2", "smollm3": "SmolLM3",
          "gpt-oss": "gpt-oss (sinks, MoE)", "llama4": "Llama 4 (text)", "deepseek-v3": "DeepSeek-V3 (latent attention)",
          "qwen3.5": "Qwen3.5 (linear attention hybrid)", "qwen3.5-moe": "Qwen3.5-MoE (hybrid, experts)",
          "lfm2": "LFM2 (convolution hybrid)", "granite4": "Granite 4 (Mamba hybrid)",
          "falcon-h1": "Falcon-H1 (attention ∥ Mamba)", "mixtral": "Mixtral (MoE)", "phi": "Phi-1 / Phi-2",
          "stablelm": "StableLM", "falcon": "Falcon (multi-query)", "gptj": "GPT-J", "bloom": "BLOOM (ALiBi)",
          "gemma": "Gemma", "cohere": "Command R (Cohere)", "granite": "Granite 3", "qwen2-moe": "Qwen2-MoE",
          "olmoe": "OLMoE", "starcoder2": "StarCoder2", "glm4": "GLM-4", "olmo": "OLMo", "phimoe": "Phi-3.5-MoE"}

# column -> (test function, extra parameter values that select the cell)
COLUMNS = {
    "reward K=2 heads": ("test_reward_ensemble_trains", {"mode": "heads"}),
    "reward K=2 adapters (+ prefix cache)": ("test_reward_ensemble_trains", {"mode": "adapters"}),
    "PPO, hard KL ≤ δ (oracle)": ("test_ppo_hard_kl", {}),
    "PPO in bf16, KL ≤ δ (oracle)": ("test_ppo_bf16_hard_kl", {}),
    "reward, gradient checkpointing (= plain run)": ("test_reward_gradient_checkpointing_matches_plain_training", {}),
    "PPO, gradient checkpointing (= plain run)": ("test_ppo_gradient_checkpointing_matches_plain_training", {}),
    "frozen-prefix cache": ("test_prefix_cache_exact", {}),
    "shared prompt prefix": ("test_shared_prompt_prefix_exact", {}),
    "PEFT reload (logits 1e-5)": ("test_policy_reloads_with_plain_peft", {}),
    "4-bit NF4 (CPU)": ("test_4bit_ppo", {}),
    "reward, QLoRA as the 7B recipe (4-bit, bf16, checkpointing)": ("test_reward_qlora_as_the_7b_recipe_sets_it", {}),
    "PPO, QLoRA as the 7B recipe (4-bit, bf16, checkpointing)": ("test_qlora_as_the_7b_recipes_set_it", {}),
}
# a pass means "on, and exact" — or, where the test recorded "off (reason)", off for that reason, which it checked
EXACTNESS_COLUMNS = {"frozen-prefix cache": "prefix_cache", "shared prompt prefix": "shared_prefix"}

# tests without parameters -> what they show (a bullet under the table)
CHECKS = {
    "test_multimodal_gemma3_adapts_the_language_model_only":
        "Gemma 3 4B+ as `Gemma3ForConditionalGeneration` (vision tower + language model): the default LoRA sits on "
        "the language model only (the tower's `q_proj`/`v_proj` would get no gradient from text), and PPO trains.",
    "test_moe_router_jitter_is_held_in_eval_mode":
        "A MoE router with jitter (Mixtral's `router_jitter_noise`; Phi-3.5-MoE's, whose router also samples its "
        "experts in training) is held in eval mode, so a training pass computes what θ_old's and the guard's passes "
        "do, and the adapters train (the start-up check used to refuse Mixtral's, asking to edit the config). "
        "Qwen3-MoE's router is deterministic and needs nothing.",
    "test_custom_code_runs_only_with_trust_remote_code":
        "A checkpoint with its own modelling code (`auto_map`) is refused by both trainers unless "
        "`trust_remote_code=True`, naming that option, and its code does not run; with it, PPO and the reward "
        "trainer train on the checkpoint's own class.",
    "test_encoder_decoder_is_refused_at_start_up":
        "An encoder-decoder model (T5) is refused at start-up, naming the architecture; use a decoder-only model.",
    "test_no_default_targets_is_refused_naming_the_architecture":
        "A model type PEFT does not list and whose attention projections cannot be found is refused at start-up, "
        "naming the architecture and asking for `target_modules`.",
    "test_explicit_targets_that_skip_a_hybrids_layers_warn_with_the_fix":
        "Explicit attention-only `target_modules` on a hybrid (the 7B recipes' q/k/v/o on Qwen3.5 adapt one layer in "
        "four) warn at start-up, naming the module to add (`in_proj_qkv`, `in_proj`); lists that reach every layer, "
        "`all-linear` and dense models do not.",
    "test_qwen3_5_as_released_loads_as_its_language_model_and_trains":
        "Qwen3.5 as released (`Qwen3_5ForConditionalGeneration`: vision tower + hybrid language model, one composite "
        "config) loads through `load_model` as its language model alone, with the released model's text logits; "
        "PPO trains within δ.",
    "test_prefix_cache_off_with_a_reason_where_inexact":
        "The frozen-prefix cache switches itself off, with a warning giving the reason, where it would be inexact "
        "(dropout kept below the adapted layers).",
}


class Collector:
    """Outcome, recorded properties and error line of every parametrised test, keyed by (function, params)."""

    def __init__(self):
        self.params, self.results = {}, {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            callspec = getattr(item, "callspec", None)
            self.params[item.nodeid] = (item.originalname, dict(callspec.params) if callspec else {})

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.failed or report.skipped):
            return
        name, params = self.params.get(report.nodeid, (None, {}))
        if name is None:
            return
        key = (name, tuple(sorted(params.items())))
        if hasattr(report, "wasxfail"):
            outcome, detail = "xfail", report.wasxfail
        elif report.failed:
            outcome, detail = "failed", _first_error_line(report)
        elif report.skipped:
            outcome, detail = "skipped", str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        else:
            outcome, detail = "passed", ""
        self.results[key] = (outcome, detail, dict(report.user_properties))


def _first_error_line(report) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:120] if text.strip() else "failed"


def run_matrix() -> Collector:
    import pytest

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    collector = Collector()
    os.chdir(ROOT)
    with contextlib.redirect_stdout(sys.stderr):  # pytest's own report stays off the table
        pytest.main(["-q", "-p", "no:cacheprovider", "-W", "ignore", str(TESTS.relative_to(ROOT))], plugins=[collector])
    return collector


def _cell(result, column: str) -> str:
    if result is None:
        return "not run"
    outcome, detail, props = result
    if outcome == "passed":
        state = str(props.get(EXACTNESS_COLUMNS.get(column), ""))
        if state.startswith("off ("):  # "off (<model> has …: <why>)" → "off: <model> has …"
            return "off: " + state.removeprefix("off (").split(":")[0]
        if column in EXACTNESS_COLUMNS:
            return "exact (on)"
        return f"✓ ({props['note']})" if props.get("note") else "✓"
    if column == "check":
        return f"✗ ({outcome}: {detail})" if detail else f"✗ ({outcome})"
    if outcome == "xfail":
        return f"off: {detail}" if column in EXACTNESS_COLUMNS else f"xfail: {detail}"
    return f"✗ {detail}".replace("|", "\\|")


def table(collector: Collector) -> str:
    import bitsandbytes
    import peft
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from rlhf_ext.testing import ARCHITECTURES

    head = ["architecture", "config class", "default LoRA targets", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, (cfg_name, model_name, _) in ARCHITECTURES.items():
        targets = collector.results.get(("test_default_lora_targets", (("arch", arch),)))
        if targets is None:
            target_cell = "not run"
        elif targets[0] == "passed":
            target_cell = ", ".join(f"`{t}`" for t in targets[2].get("targets", []))
        else:
            target_cell = _cell(targets, "targets")
        row = [f"{FAMILY.get(arch, arch)}: `{model_name}`", f"`{cfg_name}`", target_cell]
        for column, (fn, extra) in COLUMNS.items():
            key = (fn, tuple(sorted({"arch": arch, **extra}.items())))
            row.append(_cell(collector.results.get(key), column))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Beyond the matrix, the same run checks:")
    lines.append("")
    for fn, text in CHECKS.items():
        lines.append(f"* {_cell(collector.results.get((fn, ())), 'check')} {text}")
    lines.append("")
    lines.append(f"Generated by `python scripts/support_table.py` from `tests/test_architectures.py` (transformers "
                 f"{transformers.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, torch "
                 f"{torch.__version__}; tiny random models, CPU).")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"{README} has no {START} … {END} markers.")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", readme, count=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update-readme", action="store_true", help=f"write the table into README.md between {START} and {END}")
    args = parser.parse_args(argv)
    text = table(run_matrix())
    print(text)
    if args.update_readme:
        update_readme(text)


if __name__ == "__main__":
    main()
