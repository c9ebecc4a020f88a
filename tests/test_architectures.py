"""The architectures people bring: every family in `rlhf_ext.testing.ARCHITECTURES` (tiny, random, built from
transformers' own config classes, no network) through the whole library —

  * default LoRA targets resolve per architecture from PEFT's own table (fallback: the attention projections);
  * the reward trainer trains K=2 heads and K=2 adapters (loss finite, every LoRA-B and head moves), the latter with
    the frozen-prefix cache, whose scores equal the uncached ones;
  * PPO, default LoRA on the top layer, runs 2 iterations under the hard KL controller: the exact KL of each
    iteration's batch by the independent oracle (kl_oracle.py) is ≤ δ, and the policy did move — in fp32 and in bf16
    (bf16 weights, `bf16=True`);
  * with gradient checkpointing (LoRA on every layer) the reward trainer and PPO end where the same runs without it
    end;
  * the frozen-prefix cache is on and exact (cached logits = full-forward logits) — or off with a reason;
  * with LoRA on every layer, the shared prompt prefix is on and exact (logits, values, log-probs, gradients);
  * the saved policy reloads with plain PEFT to the same logits (1e-5);
  * 4-bit NF4 (bitsandbytes on the CPU) loads from a saved folder and trains one PPO iteration within δ; the memory
    plan's parameter counts equal what that load quantised and left as it was (an MoE's fused experts); and with
    the 7B QLoRA recipes' settings together (bf16 compute, `bf16=True`, gradient checkpointing).

Unsupported models are refused at start-up with a message naming the architecture and the fix.
`python scripts/support_table.py` runs this file and prints the README's support table from the outcomes (each test
records what it saw with `record_property`).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.architectures import UnsupportedArchitectureError, default_lora_target_modules
from rlhf_ext.data import pad_ids
from rlhf_ext.models import activation_checkpointing_on, load_model
from rlhf_ext.prefix_cache import positions
from rlhf_ext.testing import ARCHITECTURES, save_tiny_model_for, tiny_model_for

from .conftest import FOUR_BIT_HIDDEN, preference_rows
from .kl_oracle import exact_batch_kl

ARCHS = list(ARCHITECTURES)
DELTA = 0.02
# What the default LoRA must adapt: PEFT's table where it has the model type, the fallback where it has not.
EXPECTED_TARGETS = {
    "llama3": ["q_proj", "v_proj"], "qwen2.5": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "qwen3-moe": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt-neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"], "opt-350m": ["q_proj", "v_proj"], "olmo2": ["q_proj", "v_proj"], "smollm3": ["q_proj", "v_proj"],
    "gpt-oss": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "deepseek-v3": ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"],  # latent attention: all
    # hybrids: attention layers' q/v, the other layers' fused mixer input (linear attention, convolution, Mamba)
    "qwen3.5": ["q_proj", "v_proj", "in_proj_qkv"], "qwen3.5-moe": ["q_proj", "v_proj", "in_proj_qkv"],
    "lfm2": ["q_proj", "v_proj", "in_proj"],
    "granite4": ["q_proj", "v_proj", "in_proj"], "falcon-h1": ["q_proj", "v_proj"],  # attention in every layer
    "mixtral": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "stablelm": ["q_proj", "v_proj"],
    "falcon": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "bloom": ["query_key_value"],
    "gemma": ["q_proj", "v_proj"], "cohere": ["q_proj", "v_proj"], "granite": ["q_proj", "v_proj"],
    "qwen2-moe": ["q_proj", "v_proj"], "olmoe": ["q_proj", "v_proj"], "starcoder2": ["q_proj", "v_proj"],
    "glm4": ["q_proj", "v_proj"], "olmo": ["q_proj", "v_proj"], "phimoe": ["q_proj", "v_proj"],
}
# Cells known not to work yet: (arch, test) -> reason (shown as xfail, and in the support table).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _xfail_known(arch: str, test: str):
    reason = KNOWN_FAILURES.get((arch, test))
    if reason:
        pytest.xfail(reason)


def positive(tok):
    pos = set(tok.convert_tokens_to_ids("good great nice love happy wonderful excellent fun best".split()))

    def positive_words(prompts, completions, completion_ids, **kw):
        return [10.0 * sum(t in pos for t in ids) / max(1, len(ids)) for ids in completion_ids]

    return positive_words


def prompt_data(n=8):
    subjects = "movie book song film food place day night".split()
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"write a short review of the {subjects[i % 8]} ."}]
                                         for i in range(n)]})


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    """arch -> a saved tiny model folder (fp32, hidden 32), made on first use."""
    root, made = tmp_path_factory.mktemp("archs"), {}

    def get(arch, hidden=32):
        key = (arch, hidden)
        if key not in made:
            made[key] = save_tiny_model_for(root / f"{arch}-{hidden}", arch, tok, hidden_size=hidden)
        return made[key]

    return get


# ------------------------------------------------------------------------------------------ default LoRA targets
@pytest.mark.parametrize("arch", ARCHS)
def test_default_lora_targets(arch, tok, record_property):
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model = tiny_model_for(arch, tok)
    targets = default_lora_target_modules(model)
    record_property("targets", targets)
    record_property("config_class", type(model.config).__name__)
    assert targets == EXPECTED_TARGETS[arch]
    mapped = PEFT_DEFAULTS.get(model.config.model_type)
    if mapped is not None:  # PEFT knows the type: exactly its choice
        assert targets == list(mapped)
    from rlhf_ext.models import trunk_of

    assert default_lora_target_modules(trunk_of(model)) == targets  # the reward trunk resolves the same
    expected = _modules_named(model, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: PEFT switches fan_in_fan_out on for Conv1D itself
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
    lora_layers = [n for n, m in peft.named_modules() if isinstance(m, BaseTunerLayer)]
    assert {n.rsplit(".", 1)[-1] for n in lora_layers} == set(targets)
    assert len(lora_layers) == len(expected)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert {_layer_index(n) for n in lora_layers} == set(range(n_layers))  # every layer adapted, hybrids included


def _modules_named(model, leaves, layers=None) -> list[str]:
    """Names of `model`'s linear / Conv1D modules whose last name is in `leaves` (in decoder layers `layers`: all)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and n.rsplit(".", 1)[-1] in leaves and (layers is None or _layer_index(n) in layers)]


def _layer_index(name: str) -> int | None:
    found = re.search(r"\.(?:layers|h)\.(\d+)\.", "." + name)
    return int(found.group(1)) if found else None


def _four_bit_folder(arch, folders):
    """The saved tiny model a 4-bit test loads: every quantised linear ≥ 64 inputs (bitsandbytes' CPU block;
    OPT-350m's project_in reads hidden / 2)."""
    return folders(arch, 2 * FOUR_BIT_HIDDEN if arch == "opt-350m" else FOUR_BIT_HIDDEN)


def _adapted_base_layers(model) -> list:
    """The base layer of every LoRA-adapted module of `model`."""
    return [m.base_layer for m in model.modules() if hasattr(m, "lora_B") and hasattr(m, "base_layer")]


# ------------------------------------------------------------------------------------------------ reward models
def _reward_trainer(tmp_path, tok, arch, mode, top, **config):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode=mode, max_steps=2,
                                per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
                                save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True,
                                logging_steps=1, normalization_samples=8, lora_top_layers=top,
                                cache_frozen_layers=bool(top), seed=0, **config)
    data = Dataset.from_list(preference_rows(16, 0))
    # target_modules=None: the trainer resolves the architecture's default (architectures.resolve_lora_config)
    return RewardEnsembleTrainer(tiny_model_for(arch, tok), args=args, train_dataset=data, processing_class=tok,
                                 peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))


@pytest.mark.parametrize("mode", ["heads", "adapters"])
@pytest.mark.parametrize("arch", ARCHS)
def test_reward_ensemble_trains(arch, mode, tmp_path, tok):
    """K=2 heads on one adapter (every layer), or K=2 adapters on the top layer with the frozen-prefix cache."""
    _xfail_known(arch, f"reward_{mode}")
    top = 1 if mode == "adapters" else 0
    tr = _reward_trainer(tmp_path, tok, arch, mode, top)
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    lora_b = [n for n in params if "lora_B" in n]
    n_layers = tr.model.config.get_text_config().num_hidden_layers
    adapters = 2 if mode == "adapters" else 1
    adapted = _modules_named(tiny_model_for(arch, tok), EXPECTED_TARGETS[arch],
                             range(n_layers - top, n_layers) if top else None)
    assert adapted and len(lora_b) == adapters * len(adapted)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    after = dict(tr.model.named_parameters())
    unmoved = [n for n in params if ("lora_B" in n or n.startswith("heads.")) and torch.equal(params[n], after[n])]
    assert not unmoved, unmoved
    # the two members score differently
    seqs = [tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=True, return_dict=True)["input_ids"]
            for r in preference_rows(4, 1)]
    ids, mask = pad_ids(seqs, tok.pad_token_id)
    scores = tr.model.score_ids(ids, mask)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all() and (scores[:, 0] - scores[:, 1]).abs().max() > 0
    if top:  # the frozen-prefix cache is on and scores exactly like the full forward
        assert tr.prefix_cache is not None, "frozen-prefix cache switched itself off"
        cache, tr.model.prefix_cache = tr.model.prefix_cache, None
        full = tr.model.score_ids(ids, mask)
        tr.model.prefix_cache = cache
        assert torch.allclose(scores, full, atol=1e-5), float((scores - full).abs().max())


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_gradient_checkpointing_matches_plain_training(arch, tmp_path, tok):
    """`gradient_checkpointing=True` (the 7B reward recipe's setting, which crashed at `train()` before), K=2 adapters
    on every layer: two steps end at the parameters of the same run without checkpointing, and layer 0's adapters —
    whose gradient crosses every checkpointed layer — trained."""
    _xfail_known(arch, "reward_checkpointing")
    runs = {}
    for checkpointing in (True, False):
        torch.manual_seed(0)
        tr = _reward_trainer(tmp_path / str(checkpointing), tok, arch, "adapters", 0,
                             gradient_checkpointing=checkpointing)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        tr.train()
        assert tr.model.is_activation_checkpointing == checkpointing  # the comparison is not plain against plain
        runs[checkpointing] = before, {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    (before, after), (_, plain) = runs[True], runs[False]
    for n in after:
        assert torch.allclose(after[n], plain[n], atol=1e-5), (n, float((after[n] - plain[n]).abs().max()))
    first = [n for n in after if "lora_B" in n and _layer_index(n) == 0]
    assert len(first) >= 2 and all(not torch.equal(after[n], before[n]) for n in first), first


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_qlora_as_the_7b_recipe_sets_it(arch, tmp_path, tok, folders):
    """The 7B reward recipe's settings together — NF4 base with bf16 compute, `bf16=True`, gradient checkpointing —,
    K=2 adapters: the loss is finite and every LoRA-B and head moves."""
    import bitsandbytes as bnb

    _xfail_known(arch, "reward_qlora")
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=1,
                                per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
                                save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
                                normalization_samples=8, bf16=True, gradient_checkpointing=True, seed=0)
    tr = RewardEnsembleTrainer(load_model(_four_bit_folder(arch, folders), "causal", load_in_4bit=True,
                                          dtype="bfloat16"),
                               args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    bases = _adapted_base_layers(tr.model)
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) and b.compute_dtype == torch.bfloat16 for b in bases)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.train()
    assert tr.model.is_activation_checkpointing
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    after = dict(tr.model.named_parameters())
    unmoved = [n for n in before if ("lora_B" in n or n.startswith("heads.")) and torch.equal(before[n], after[n])]
    assert not unmoved, unmoved


# ------------------------------------------------------------------------------------------------------------ PPO
class _Oracle:
    def __init__(self):
        self.trainer, self.rows = None, []

    def callback(self):
        from transformers import TrainerCallback

        oracle = self

        class OracleCheck(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                tr = oracle.trainer
                autocast = torch.bfloat16 if tr.args.bf16 else None  # a bf16 run's π is its bf16 forward
                oracle.rows.append((exact_batch_kl(tr.policy.peft, tr.rollout, tr.args.temperature, autocast),
                                    tr._metrics_history[-1]))

        return OracleCheck()


def _ppo(tmp_path, tok, path, four_bit=False, iterations=2, bf16=False, checkpointing=False):
    oracle = _Oracle()
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=iterations, learning_rate=0.1,
                     num_ppo_epochs=4, max_completion_length=6, kl_controller="hard", kl_target=DELTA,
                     init_kl_coef=0.0, use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=10**6,
                     seed=0, lora_top_layers=1, monitor=False, bf16=bf16, gradient_checkpointing=checkpointing)
    model = load_model(path, "causal", load_in_4bit=four_bit, dtype="bfloat16" if bf16 else None)
    # peft_config=None: the trainer's default LoRA (r=16) on the architecture's default targets, top layer only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = PPOTrainer(model, reward_funcs=positive(tok), args=args, train_dataset=prompt_data(),
                        processing_class=tok, callbacks=[oracle.callback()])
    tr.cache_warning = next((str(w.message) for w in caught if "Frozen-prefix cache" in str(w.message)), None)
    tr.experts_warning = next((str(w.message) for w in caught if "fused MoE experts" in str(w.message)), None)
    oracle.trainer = tr
    tr.model_name = path
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.train()
    return tr, oracle.rows, before


_PPO_RUNS: dict = {}


def ppo_run(arch, tmp_path_factory, tok, folders):
    """One PPO run per architecture, shared by the PPO, prefix-cache and reload tests (an exception is re-raised in
    each of them)."""
    if arch not in _PPO_RUNS:
        try:
            _PPO_RUNS[arch] = _ppo(tmp_path_factory.mktemp(f"ppo-{arch}"), tok, folders(arch))
        except Exception as e:  # noqa: BLE001 — every cell that needs the run reports it
            _PPO_RUNS[arch] = e
    run = _PPO_RUNS[arch]
    if isinstance(run, Exception):
        raise run
    return run


def _check_kl(rows, iterations, bf16=False):
    from .test_kl_guarantee import AGREE  # the oracle's unpadded forward against the trainer's batch: by precision

    atol, rtol = AGREE[torch.bfloat16 if bf16 else None]
    assert len(rows) == iterations
    for it, (exact, logged) in enumerate(rows, 1):
        assert exact <= DELTA + atol, f"iteration {it}: exact KL {exact:.6g} > δ {DELTA}"
        assert logged["kl/after_update"] <= DELTA + 1e-9, (it, logged["kl/after_update"])
        assert abs(logged["kl/after_update"] - exact) <= atol + rtol * exact, (it, logged["kl/after_update"], exact)
        assert math.isfinite(logged["loss/policy"])


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_hard_kl(arch, tmp_path_factory, tok, folders, record_property):
    _xfail_known(arch, "ppo")
    tr, rows, before = ppo_run(arch, tmp_path_factory, tok, folders)
    _check_kl(rows, 2)
    record_property("max_kl", max(e for e, _ in rows))
    assert max(e for e, _ in rows) > 0.2 * DELTA  # the policy moved, and the guard had to act to keep it inside δ
    assert sum(r["kl/backtracks"] + r["kl/restored"] + r["kl/shrunk"] for _, r in rows) > 0
    moved = [n for n, p in tr.model.named_parameters() if n in before and "lora_B" in n and not torch.equal(before[n], p)]
    assert moved and all(".1." in n for n in moved)  # the top layer only (lora_top_layers=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_bf16_hard_kl(arch, tmp_path, tok, folders):
    """bf16 as a GPU user runs it — bf16 weights, `bf16=True` (autocast for every pass) —: PPO starts (sampling,
    training pass and reference agree at θ₀ within the bf16 tolerance, `precision.py`) and 2 iterations stay within δ
    by the independent oracle under the same autocast, the top layer's adapter moving."""
    _xfail_known(arch, "bf16")
    tr, rows, before = _ppo(tmp_path, tok, folders(arch), bf16=True)
    assert next(tr.policy.peft.get_base_model().parameters()).dtype == torch.bfloat16 and tr.policy.autocast
    _check_kl(rows, 2, bf16=True)
    moved = [n for n, p in tr.model.named_parameters() if n in before and "lora_B" in n and not torch.equal(before[n], p)]
    assert moved and all(".1." in n for n in moved)


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_gradient_checkpointing_matches_plain_training(arch, tmp_path, tok, folders):
    """`gradient_checkpointing=True` (as the 7B recipes set it), LoRA on every layer: one PPO iteration ends at the
    parameters the same run reaches without checkpointing, and layer 0's adapter — whose gradient crosses every
    checkpointed layer — trained."""
    _xfail_known(arch, "checkpointing")

    def run(checkpointing):
        args = PPOConfig(str(tmp_path / f"ppo-{checkpointing}"), per_device_train_batch_size=4, max_steps=1,
                         learning_rate=0.05, num_ppo_epochs=2, max_completion_length=6, kl_controller="fixed",
                         use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=10**6, seed=0,
                         monitor=False, gradient_checkpointing=checkpointing,
                         share_prompt_prefix=False)  # the plain run takes the full pass, as checkpointing does
        tr = PPOTrainer(load_model(folders(arch), "causal"), reward_funcs=positive(tok), args=args,
                        train_dataset=prompt_data(), processing_class=tok)
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
        tr.train()
        assert activation_checkpointing_on(tr.policy.peft.get_base_model()) == checkpointing
        return before, {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}

    before, after = run(True)
    _, plain = run(False)
    assert after.keys() == plain.keys()
    for n in after:
        assert torch.allclose(after[n], plain[n], atol=1e-5), (n, float((after[n] - plain[n]).abs().max()))
    first = [n for n in after if "lora_B" in n and _layer_index(n.split("base_model.model.", 1)[-1]) == 0]
    assert first and all(not torch.equal(after[n], before[n]) for n in first), first


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_exact(arch, tmp_path_factory, tok, folders, record_property):
    """LoRA on the top layer: the cache is on, and the cached pass gives the full forward's logits (trained adapter
    active, left-padded batch, eval mode)."""
    _xfail_known(arch, "prefix_cache")
    tr, _, _ = ppo_run(arch, tmp_path_factory, tok, folders)
    split = tr.policy.split
    record_property("prefix_cache", "exact" if split is not None else "off")
    assert split is not None and split.k == 1, tr.cache_warning or "frozen-prefix cache off"
    ro = tr.rollout
    pol = tr.policy
    cached = pol.logits(ro.ids, ro.mask, ro.R, pol.lower(ro.ids, ro.mask))
    full = pol.logits(ro.ids, ro.mask, ro.R, None)
    ref_cached = pol.logits(ro.ids, ro.mask, ro.R, pol.lower(ro.ids, ro.mask), reference=True)
    ref_full = pol.logits(ro.ids, ro.mask, ro.R, None, reference=True)
    m = ro.resp_mask.bool()
    assert (full[m] - ref_full[m]).abs().max() > 1e-4  # the trained adapter matters on this batch
    assert torch.allclose(cached[m], full[m], atol=1e-5), float((cached[m] - full[m]).abs().max())
    assert torch.allclose(ref_cached[m], ref_full[m], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_prefix_exact(arch, tmp_path, tok, record_property):
    """LoRA on every layer, prompt-prefix sharing on: the shared pass gives the full pass's logits, values, log-probs
    and gradients on a left-padded batch (`test_shared_prefix.py`)."""
    from .test_shared_prefix import check_shared_pass_equals_full_pass

    _xfail_known(arch, "shared_prefix")
    check_shared_pass_equals_full_pass(arch, tmp_path, tok, record_property)


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_reloads_with_plain_peft(arch, tmp_path_factory, tok, folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _xfail_known(arch, "reload")
    tr, _, _ = ppo_run(arch, tmp_path_factory, tok, folders)
    out = tmp_path / "policy"
    tr.save_model(str(out))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders(arch)), str(out)).eval()
    ro = tr.rollout
    with torch.no_grad():
        want = tr.policy.logits(ro.ids, ro.mask, ro.R) * tr.args.temperature
        got = loaded(input_ids=ro.ids, attention_mask=ro.mask, position_ids=positions(ro.mask)).logits
        got = got[:, -ro.R - 1 : -1].float()
    m = ro.resp_mask.bool()
    assert torch.allclose(want[m], got[m], atol=1e-5), float((want[m] - got[m]).abs().max())


# ---------------------------------------------------------------------------------------------------------- 4-bit
@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_ppo(arch, tmp_path, tok, folders, record_property):
    """NF4 base from a saved folder: the default targets sit on 4-bit layers, one PPO iteration stays within δ
    (independent oracle) and every LoRA-B on them moves; the memory plan counts what the load quantised (an MoE's
    fused experts stay full precision: bitsandbytes converts nn.Linear only, and the trainer warns)."""
    import bitsandbytes as bnb

    _xfail_known(arch, "4bit")
    tr, rows, before = _ppo(tmp_path, tok, _four_bit_folder(arch, folders), four_bit=True, iterations=1)
    bases = _adapted_base_layers(tr.policy.peft)
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
    _check_kl(rows, 1)
    lora_b = [n for n in before if "lora_B" in n and ".policy" in n]
    unmoved = [n for n, p in tr.model.named_parameters() if n in lora_b and torch.equal(before[n], p)]
    assert lora_b and not unmoved, unmoved
    if _check_plan_counts(arch, _four_bit_folder(arch, folders), tr):
        record_property("note", "the linear layers; the fused experts stay full precision, bitsandbytes#1849")


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_as_the_7b_recipes_set_it(arch, tmp_path, tok, folders):
    """The 7B QLoRA recipes' settings together — NF4 base with bf16 compute, `bf16=True`, gradient checkpointing —:
    PPO starts, one iteration stays within δ by the independent oracle under bf16 autocast, and the adapter on the
    4-bit layers moves."""
    import bitsandbytes as bnb

    _xfail_known(arch, "qlora")
    tr, rows, before = _ppo(tmp_path, tok, _four_bit_folder(arch, folders), four_bit=True, iterations=1, bf16=True,
                            checkpointing=True)
    bases = _adapted_base_layers(tr.policy.peft)
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) and b.compute_dtype == torch.bfloat16 for b in bases)
    assert tr.policy.autocast and activation_checkpointing_on(tr.policy.peft.get_base_model())
    _check_kl(rows, 1, bf16=True)
    lora_b = [n for n in before if "lora_B" in n and ".policy" in n]
    assert lora_b and not [n for n, p in tr.model.named_parameters() if n in lora_b and torch.equal(before[n], p)]


def _check_plan_counts(arch, folder, tr):
    """The memory plan's parameter counts for this architecture's config against what the 4-bit load made of it:
    `linear` = the weights bitsandbytes quantised (two per packed byte), `total` = every parameter, `experts` = the
    fused MoE expert tensors it left unquantised — which the start-up warning names. Returns that expert count."""
    import bitsandbytes as bnb

    from rlhf_ext import plan

    counts = plan.parameter_counts(plan.load_shape(folder))
    params = {id(p): p for p in tr.policy.peft.get_base_model().parameters()}.values()
    packed = [p for p in params if isinstance(p, bnb.nn.Params4bit)]
    quantized = 2 * sum(p.numel() for p in packed)
    total = quantized + sum(p.numel() for p in params if not isinstance(p, bnb.nn.Params4bit) and not p.requires_grad)
    owners = {id(p): m for m in tr.policy.peft.get_base_model().modules() for p in m.parameters(recurse=False)}
    experts = sum(p.numel() for p in params if p.dim() >= 3 and not isinstance(p, bnb.nn.Params4bit)
                  and type(owners[id(p)]).__name__.endswith("Experts"))  # transformers' fused-experts modules
    assert counts["linear"] == quantized, (arch, counts, quantized)
    assert counts["total"] == total, (arch, counts, total)
    assert counts["experts"] == experts, (arch, counts, experts)
    assert (tr.experts_warning is not None) == (experts > 0), tr.experts_warning
    return experts


# ---------------------------------------------------------------------------------------------- refused at start-up
def test_custom_code_runs_only_with_trust_remote_code(tmp_path, tok):
    """A checkpoint with its own modelling code (`auto_map`, as InternLM / Baichuan-style repos ship): both trainers
    refuse it by default with transformers' message naming `trust_remote_code=True`, and its code never runs (a marker
    file it would write stays absent); with `trust_remote_code=True` it loads as its own class, and PPO and the reward
    trainer train on it (default LoRA targets by the fallback: PEFT does not know the type)."""
    import json

    from rlhf_ext.testing import save_tiny_model

    folder = tmp_path / "custom"
    save_tiny_model(folder, tok)
    marker = tmp_path / "custom_code_ran"
    (folder / "modeling_custom.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"Path({str(marker)!r}).touch()\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
               auto_map={k: f"modeling_custom.{v}" for k, v in (("AutoConfig", "CustomConfig"),
                                                                 ("AutoModel", "CustomForCausalLM"),
                                                                 ("AutoModelForCausalLM", "CustomForCausalLM"))})
    (folder / "config.json").write_text(json.dumps(cfg))

    def ppo(trust):
        args = PPOConfig(str(tmp_path / f"ppo-{trust}"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                         max_completion_length=4, num_ppo_epochs=1, save_strategy="no", disable_tqdm=True,
                         monitor=False, trust_remote_code=trust)
        return PPOTrainer(str(folder), reward_funcs=positive(tok), args=args, train_dataset=prompt_data())

    def reward(trust):
        args = RewardEnsembleConfig(str(tmp_path / f"rm-{trust}"), ensemble_size=2, max_steps=1, use_cpu=True,
                                    per_device_train_batch_size=8, report_to="none", save_strategy="no",
                                    disable_tqdm=True, normalization_samples=8, trust_remote_code=trust)
        return RewardEnsembleTrainer(str(folder), args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)))

    for build in (ppo, reward):
        with pytest.raises(ValueError, match=r"(?s)contains custom code.*trust_remote_code=True"):
            build(False)
    assert not marker.exists()
    tr = ppo(True)
    assert marker.exists() and type(tr.policy.peft.get_base_model()).__name__ == "CustomForCausalLM"
    assert math.isfinite(tr.train()[0]["loss/policy"])
    assert reward(True).train().training_loss > 0


def test_encoder_decoder_is_refused_at_start_up(tmp_path, tok):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                             num_heads=4, decoder_start_token_id=tok.pad_token_id))
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                     save_strategy="no", disable_tqdm=True)
    with pytest.raises(UnsupportedArchitectureError, match=r"T5ForConditionalGeneration \(model_type 't5'\) is an "
                                                           r"encoder-decoder model.*decoder-only"):
        PPOTrainer(t5, reward_funcs=positive(tok), args=args, train_dataset=prompt_data(), processing_class=tok)


def test_no_default_targets_is_refused_naming_the_architecture(tmp_path, tok):
    """A model type PEFT does not list and whose attention projections cannot be found: refused at start-up, with the
    architecture and `target_modules` in the message (and it trains once they are given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class OddConfig(LlamaConfig):
        model_type = "odd_llama"

    model = LlamaForCausalLM(OddConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, bos_token_id=None))
    for layer in model.model.layers:  # rename the attention block: nothing recognisable is left
        layer.mixing = layer.self_attn
        del layer.self_attn
    with pytest.raises(UnsupportedArchitectureError, match=r"LlamaForCausalLM \(model_type 'odd_llama'\).*"
                                                           r"target_modules"):
        default_lora_target_modules(model)
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", use_cpu=True,
                                report_to="none", save_strategy="no")
    with pytest.raises(UnsupportedArchitectureError, match="odd_llama"):
        RewardEnsembleTrainer(model, args=args, train_dataset=Dataset.from_list(preference_rows(4, 0)),
                              processing_class=tok, peft_config=LoraConfig(r=4))


def test_explicit_targets_that_skip_a_hybrids_layers_warn_with_the_fix(tmp_path, tok):
    """Attention-only target_modules (the 7B recipes' q/k/v/o) on Qwen3.5 adapt one layer in four: the trainers warn,
    naming the module to add. Target lists that reach every layer (with the mixer input, or the MLP), "all-linear",
    the default targets and a dense model do not warn; whatever is asked is what gets adapted."""
    from rlhf_ext.architectures import resolve_lora_config

    def hints(arch, targets):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cfg = resolve_lora_config(LoraConfig(r=4, target_modules=targets), tiny_model_for(arch, tok))
        return [str(w.message) for w in seen if "LoRA target_modules" in str(w.message)], cfg

    for arch, leaf in (("qwen3.5", "in_proj_qkv"), ("lfm2", "in_proj"), ("granite4", "in_proj")):
        found, cfg = hints(arch, ["q_proj", "k_proj", "v_proj", "o_proj"])
        assert len(found) == 1 and f"Add '{leaf}' to target_modules" in found[0] and arch.split(".")[0][:4] in \
            found[0].lower(), found
        assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # not changed behind the user
    for arch, targets in (("qwen3.5", ["q_proj", "v_proj", "in_proj_qkv"]), ("qwen3.5", ["q_proj", "gate_proj"]),
                          ("qwen3.5", "all-linear"), ("qwen3.5", None), ("llama3", ["q_proj", "v_proj"])):
        assert hints(arch, targets)[0] == [], (arch, targets)
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=1, use_cpu=True, report_to="none",
                                save_strategy="no")
    with pytest.warns(UserWarning, match="Qwen3_5.*qwen3_5_text.*Add 'in_proj_qkv'"):  # the reward trunk
        RewardEnsembleTrainer(tiny_model_for("qwen3.5", tok), args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(preference_rows(4, 0)),
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_reward_trainer_warns_that_a_4bit_moe_keeps_its_experts(tmp_path, tok, folders):
    """The reward trainer on a 4-bit MoE says what the 4-bit load left full precision (PPO's warning is checked in
    test_4bit_ppo); a dense 4-bit model gets no such warning."""
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=1, use_cpu=True, report_to="none",
                                save_strategy="no")
    for arch, warned in (("qwen3-moe", True), ("llama3", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            RewardEnsembleTrainer(load_model(folders(arch, FOUR_BIT_HIDDEN), "trunk", load_in_4bit=True), args=args,
                                  processing_class=tok, train_dataset=Dataset.from_list(preference_rows(4, 0)),
                                  peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        found = [str(w.message) for w in caught if "fused MoE experts" in str(w.message)]
        assert len(found) == int(warned) and (not warned or "bitsandbytes#1849" in found[0]), (arch, found)


def test_ppo_warns_that_a_4bit_moe_keeps_its_experts_when_handed_a_peft_model(tmp_path, tok, folders):
    """A quantised PeftModel handed to PPOTrainer (its adapter is the policy) gets the warning too, not only a base
    the trainer loads and prepares itself (test_4bit_ppo); a dense one does not."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                     save_strategy="no", disable_tqdm=True)
    for arch, warned in (("qwen3-moe", True), ("llama3", False)):
        base = prepare_model_for_kbit_training(load_model(folders(arch, FOUR_BIT_HIDDEN), "causal", load_in_4bit=True),
                                               use_gradient_checkpointing=False)
        policy = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PPOTrainer(policy, reward_funcs=positive(tok), args=args, train_dataset=prompt_data(), processing_class=tok)
        found = [str(w.message) for w in caught if "fused MoE experts" in str(w.message)]
        assert len(found) == int(warned) and (not warned or "bitsandbytes#1849" in found[0]), (arch, found)


def test_moe_router_jitter_is_held_in_eval_mode(tmp_path, tok):
    """Qwen3-MoE's router is deterministic (it passes above). Mixtral's `router_jitter_noise` multiplies the router
    input by noise in training mode only (the start-up check used to refuse it, asking to edit the config); the
    trainers now hold a router with jitter in eval mode — whatever `model.train()` asks — so a training pass computes
    what θ_old's and the guard's passes compute, and the adapters still train. (Phi-3.5-MoE's router, which also
    draws its experts by Gumbel sampling in training, runs the whole matrix above the same way.)"""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        router_jitter_noise=0.1, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        bos_token_id=None)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "mixtral")
    args = dict(per_device_train_batch_size=4, max_steps=1, max_completion_length=4, use_cpu=True,
                save_strategy="no", disable_tqdm=True, kl_controller="hard", kl_target=DELTA, monitor=False)
    model = load_model(str(tmp_path / "mixtral"), "causal")
    jittery = [m for m in model.modules() if getattr(m, "jitter_noise", 0) > 0]
    assert len(jittery) == 2  # one router block a layer
    tr = PPOTrainer(model, reward_funcs=positive(tok), args=PPOConfig(str(tmp_path / "a"), **args),
                    train_dataset=prompt_data(), processing_class=tok)
    tr.model.train()
    assert tr.model.training and not any(m.training for m in jittery)
    assert tr.startup["train_vs_eval"] == 0.0
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    assert math.isfinite(tr.train()[0]["loss/policy"])
    assert all(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if n in before)


def test_prefix_cache_off_with_a_reason_where_inexact(tmp_path, tok):
    """Dropout kept below the adapted layer (reward trainer, disable_dropout=False, GPT-2's 0.1 dropouts): a cached
    state could not reproduce a training pass, so the cache is off, with the reason in a warning."""
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="heads", max_steps=1,
                                per_device_train_batch_size=8, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=8, lora_top_layers=1,
                                cache_frozen_layers=True, disable_dropout=False)
    with pytest.warns(UserWarning, match="Frozen-prefix cache disabled: split forward differs"):
        tr = RewardEnsembleTrainer(tiny_model_for("gpt2", tok), args=args, processing_class=tok,
                                   train_dataset=Dataset.from_list(preference_rows(16, 0)), peft_config=LoraConfig(r=4))
    assert tr.prefix_cache is None


def test_multimodal_gemma3_adapts_the_language_model_only(tmp_path, tok):
    """Gemma 3 4B+ loads as Gemma3ForConditionalGeneration (vision tower + language model). Its vision tower has
    q_proj/v_proj too; LoRA there would never get a gradient from text-only RLHF (the trainers' gradient check stops
    on it). The default targets are the language model's, by full name, and every LoRA-B trains."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from rlhf_ext.testing import tiny_arch_config

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=tiny_arch_config("gemma3", tok).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    targets = default_lora_target_modules(model)
    assert targets and all(".language_model.layers." in t and t.endswith(("q_proj", "v_proj")) for t in targets)
    assert len(targets) == 2 * 2  # q and v in each of the 2 text layers; none in the vision tower
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
                     max_completion_length=4, use_cpu=True, save_strategy="no", disable_tqdm=True,
                     kl_controller="hard", kl_target=DELTA, monitor=False)
    tr = PPOTrainer(model, reward_funcs=positive(tok), args=args, train_dataset=prompt_data(), processing_class=tok)
    lora_b = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 and not any("vision_tower" in n for n in lora_b)
    tr.train()  # the gradient check passes: every adapter matrix is in the loss
    assert all(not torch.equal(lora_b[n], p) for n, p in tr.model.named_parameters() if n in lora_b)


def test_qwen3_5_as_released_loads_as_its_language_model_and_trains(tmp_path, tok):
    """Qwen3.5 checkpoints are released as Qwen3_5ForConditionalGeneration: a vision tower and the hybrid language
    model under one composite config. `load_model` (AutoModelForCausalLM) reads the language model alone — the same
    text logits as the released model —, the default LoRA adapts every one of its layers, and PPO stays within δ
    (independent oracle) with every LoRA-B moving."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from rlhf_ext.testing import tiny_arch_config

    torch.manual_seed(0)
    released = Qwen3_5ForConditionalGeneration(Qwen3_5Config(
        text_config=tiny_arch_config("qwen3.5", tok).to_dict(),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           patch_size=4, temporal_patch_size=1, spatial_merge_size=1))).eval()
    released.save_pretrained(tmp_path / "released")
    tok.save_pretrained(tmp_path / "released")
    model = load_model(str(tmp_path / "released"), "causal")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    ids = torch.tensor([tok.apply_chat_template(prompt_data(1)[0]["prompt"], tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, released(input_ids=ids).logits, atol=1e-5)
    assert default_lora_target_modules(model) == ["q_proj", "v_proj", "in_proj_qkv"]
    tr, rows, before = _ppo(tmp_path, tok, str(tmp_path / "released"), iterations=1)
    _check_kl(rows, 1)
    lora_b = [n for n in before if "lora_B" in n and ".policy" in n]
    assert lora_b and all(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if n in lora_b)


def test_the_callers_lora_config_is_not_changed(tmp_path, tok):
    """Both trainers used to write into the LoraConfig they were given (task_type, the resolved target_modules):
    the same object configuring a second trainer then carried the first one's settings."""
    from datasets import Dataset

    from .conftest import preference_rows

    user = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0)
    before = user.to_dict()
    RewardEnsembleTrainer(tiny_model_for("llama3", tok), peft_config=user, processing_class=tok,
                          train_dataset=Dataset.from_list(preference_rows(8, 0)),
                          args=RewardEnsembleConfig(str(tmp_path / "rm"), use_cpu=True, report_to="none"))
    PPOTrainer(tiny_model_for("llama3", tok), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
               peft_config=user, processing_class=tok, train_dataset=Dataset.from_dict({"prompt": ["a b c"] * 4}),
               args=PPOConfig(str(tmp_path / "ppo"), use_cpu=True, per_device_train_batch_size=4))
    assert user.to_dict() == before
