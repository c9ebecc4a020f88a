"""A pre-quantised 4-bit checkpoint — what "…-bnb-4bit" Hub repos are: a folder whose config.json carries
bitsandbytes' `quantization_config` and whose safetensors hold the packed weights — handed to the trainers by folder,
as a user on one small GPU does, instead of a full-precision model with `load_in_4bit`. Made here without the Hub: a
tiny model loaded with a BitsAndBytesConfig and saved. Both trainers load it in 4-bit as saved (no flag needed), PPO
keeps the hard KL bound (independent oracle) and its policy reloads with plain PEFT on the same folder; the reward
artifact reloads alone without transformers' warning about a quantization_config it did not pass; the memory plan
counts the checkpoint as 4-bit; settings that differ from the stored ones are named; a bitsandbytes 8-bit checkpoint
is refused as `load_in_8bit` is; Falcon's FalconLinear layers, which transformers 5 saved full precision, are
quantised at load as a fresh 4-bit load quantises them."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.testing import save_tiny_model_for

from .conftest import FOUR_BIT_HIDDEN, preference_rows
from .kl_oracle import exact_batch_kl
from .test_architectures import positive, prompt_data

bnb = pytest.importorskip("bitsandbytes")
DELTA = 0.02


def _saved_quantized(src, out, tok, **bnb_settings):
    """What a "-bnb-4bit" repo is: `src` loaded with a BitsAndBytesConfig, then save_pretrained (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32)
    settings.update(bnb_settings)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**settings)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("prequantized")
    src = save_tiny_model_for(root / "fp32", "llama3", tok, hidden_size=FOUR_BIT_HIDDEN)
    return {"fp32": src, "nf4": _saved_quantized(src, root / "nf4", tok),
            "nf4-single": _saved_quantized(src, root / "nf4-single", tok, bnb_4bit_use_double_quant=False)}


def _quantization_warnings(caught):
    return [str(w.message) for w in caught if "quantization_config" in str(w.message)]


def test_both_trainers_train_on_a_prequantized_folder_and_what_they_save_reloads(tmp_path, tok, folders):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from peft import PeftModel
    from rlhf_ext.models import keep_4bit_trainable
    from rlhf_ext.reward.ensemble import RewardEnsemble

    folder = folders["nf4"]
    rm_args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=1,
                                   per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
                                   save_strategy="no", use_cpu=True, disable_tqdm=True, normalization_samples=8)
    rm = RewardEnsembleTrainer(folder, args=rm_args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))  # no load_in_4bit
    assert rm.quantized and rm.four_bit_layout["quant_type"] == "nf4" and rm.four_bit_layout["double_quant"]
    rm.train()
    rm.save_model(str(tmp_path / "rm"))
    rows = Dataset.from_list(preference_rows(4, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = load_reward_model(tmp_path / "rm")  # its own load of the recorded base: the stored layout, as trained
    # transformers warned that a quantization_config was passed for a model that has one: the artifact's own
    assert not _quantization_warnings(caught), _quantization_warnings(caught)
    rm.model.eval()
    with torch.no_grad():
        assert torch.allclose(alone.score_texts(rows["prompt"], rows["chosen"]),
                              rm.model.score_texts(rows["prompt"], rows["chosen"]), atol=1e-5)

    exact = []

    class Oracle(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            exact.append((exact_batch_kl(tr.policy.peft, tr.rollout, tr.args.temperature),
                          tr._metrics_history[-1]["kl/after_update"]))

    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.1,
                     num_ppo_epochs=4, max_completion_length=6, kl_controller="hard", kl_target=DELTA,
                     init_kl_coef=0.0, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, monitor=False,
                     reward_model_path=str(tmp_path / "rm"))
    tr = PPOTrainer(folder, reward_funcs=[positive(tok)], args=args, train_dataset=prompt_data(), callbacks=[Oracle()])
    assert tr.quantized and [m for m in tr.rewards.members if isinstance(m, RewardEnsemble) and not m.owns_base]
    bases = [m.base_layer for m in tr.policy.peft.modules() if hasattr(m, "lora_B") and hasattr(m, "base_layer")]
    assert bases and all(isinstance(b, bnb.nn.Linear4bit) for b in bases)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_B" in n and ".policy" in n}
    tr.train()
    assert before and all(not torch.equal(before[n], p) for n, p in tr.model.named_parameters() if n in before)
    (kl, logged), = exact
    assert kl <= DELTA + 1e-6 and abs(kl - logged) <= 1e-6, (kl, logged)

    tr.save_model(str(tmp_path / "policy"))
    # the same pre-quantised folder, plainly; bitsandbytes' trainable layout kept (its CPU inference kernel, which an
    # eval forward switches to on AVX512-BF16 CPUs, rounds differently: ~2e-3 on these logits)
    loaded = PeftModel.from_pretrained(keep_4bit_trainable(AutoModelForCausalLM.from_pretrained(folder)),
                                       str(tmp_path / "policy")).eval()
    ro = tr.rollout
    with torch.no_grad():
        want = tr.policy.logits(ro.ids, ro.mask, ro.R) * tr.args.temperature
        positions = (ro.mask.cumsum(-1) - 1).clamp(min=0)
        got = loaded(input_ids=ro.ids, attention_mask=ro.mask, position_ids=positions).logits[:, -ro.R - 1:-1]
    m = ro.resp_mask.bool()
    assert torch.allclose(want[m], got[m].float(), atol=1e-5), float((want[m] - got[m]).abs().max())


def _held_weight_bytes(model) -> int:
    """Bytes of a loaded 4-bit model's weights as PPO holds them: packed 4-bit weights, their quantisation constants
    (absmax, and with double quantisation the absmax of those), every other parameter."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None) if isinstance(p, bnb.nn.Params4bit) else None
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("name", ["nf4", "nf4-single"])
def test_the_memory_plan_counts_a_prequantized_checkpoint_in_4bit(name, folders, capsys):
    """`rlhf-ext plan --model FOLDER` (no --load-in-4bit: the checkpoint needs none) counted every weight in fp32, as
    if unquantised (3.3× the weights PPO holds here; ~3× for a 7B model)."""
    from peft import prepare_model_for_kbit_training

    from rlhf_ext import plan
    from rlhf_ext.models import load_model
    from rlhf_ext.plan.cli import main

    shape = plan.load_shape(folders[name])
    options = dict(batch=4, prompt_length=16, completion_length=4)
    weights = plan.estimate(shape, **options)["weights"]
    held = _held_weight_bytes(prepare_model_for_kbit_training(load_model(folders[name], "causal"),
                                                              use_gradient_checkpointing=False))
    assert abs(weights["total"] - held) <= 0.001 * held, (weights, held)
    if name == "nf4":  # the same as the full-precision checkpoint planned with --load-in-4bit
        assert weights == plan.estimate(plan.load_shape(folders["fp32"]), load_in_4bit=True, **options)["weights"]
    # as a second (reward) model too, whatever dtype is asked: it loads as saved
    assert plan.ScoringModel.parse(f"{folders[name]}@bfloat16").dtype == "nf4"
    assert main(["--model", folders[name], "--batch", "4", "--prompt-length", "16", "--completion-length", "4"]) == 0
    assert "pre-quantised" in capsys.readouterr().out


def test_settings_that_differ_from_a_prequantized_checkpoint_are_named(folders):
    from transformers import BitsAndBytesConfig

    from rlhf_ext.models import load_model

    fp4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"already quantised to 4-bit .*quant type 'fp4' asked, 'nf4' stored — the "
                                         r"stored setting is used") as caught:
        model = load_model(folders["nf4"], "causal", quantization_config=fp4)
    assert {m.weight.quant_state.quant_type for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {"nf4"}
    assert len(_quantization_warnings(caught)) == 1  # ours; not transformers' too
    with warnings.catch_warnings(record=True) as caught:  # the stored settings asked for: nothing to say
        warnings.simplefilter("always")
        load_model(folders["nf4"], "causal", load_in_4bit=True)
    assert not _quantization_warnings(caught) and not [w for w in caught if "already quantised" in str(w.message)]


def test_load_in_4bit_without_a_dtype_asks_no_compute_dtype(tmp_path, tok, folders):
    """A "-bnb-4bit" repo usually computes in bf16. load_in_4bit=True with no dtype (or dtype="auto", "the
    checkpoint's own") was warned as "compute dtype 'float32' asked": a default, not a request, which only setting a
    dtype for the other weights silenced. A dtype named is still compared, and the warning says how to load as saved."""
    from rlhf_ext.models import load_model

    bf16 = _saved_quantized(folders["fp32"], tmp_path / "bf16-compute", tok, bnb_4bit_compute_dtype=torch.bfloat16)
    for dtype in (None, "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_model(bf16, "causal", load_in_4bit=True, dtype=dtype)
        assert not [w for w in caught if "already quantised" in str(w.message)], dtype
    with pytest.warns(UserWarning, match=r"compute dtype 'float16' asked, 'bfloat16' stored.*needs no load_in_4bit"):
        load_model(bf16, "causal", load_in_4bit=True, dtype="float16")


def test_an_8bit_reward_model_that_only_scores_is_still_a_judge(tmp_path, tok):
    """The 8-bit refusal is about layers that train or host members; a separate sequence-classification reward model
    only scores, in eval mode, as TRL's online trainers load it. It scored before the refusal came in, and was then
    refused as 'neither an rlhf_ext artifact nor a sequence-classification model transformers can load'."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig, LlamaForSequenceClassification

    from rlhf_ext.testing import tiny_causal_lm, tiny_config

    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_config(tok, num_labels=1, hidden_size=FOUR_BIT_HIDDEN)).save_pretrained(
        tmp_path / "fp")
    AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "fp", quantization_config=BitsAndBytesConfig(load_in_8bit=True)).save_pretrained(tmp_path / "judge8")
    tok.save_pretrained(tmp_path / "judge8")
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, max_completion_length=6,
                     kl_controller="fixed", use_cpu=True, save_strategy="no", disable_tqdm=True, monitor=False,
                     audit_model_paths=[str(tmp_path / "judge8")])
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=[positive(tok)], args=args,
                    train_dataset=Dataset.from_dict({"prompt": ["write a short review"] * 4}), processing_class=tok)
    assert isinstance(tr.train()[0]["audit/judge8"], float)


def test_an_8bit_checkpoint_is_refused_as_load_in_8bit_is(tmp_path, tok, folders):
    """PPO failed at start-up with a message about dropout it could not switch off (bitsandbytes' 8-bit layers compute
    differently in training mode), and the reward trainer trained on it, recording `load_in_4bit: true`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    eight = AutoModelForCausalLM.from_pretrained(folders["fp32"], quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    eight.save_pretrained(tmp_path / "int8")
    tok.save_pretrained(tmp_path / "int8")
    ppo_args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                         save_strategy="no", disable_tqdm=True, monitor=False)
    with pytest.raises(ValueError, match=r"bitsandbytes 8-bit checkpoint .*8-bit layers are not supported"):
        PPOTrainer(str(tmp_path / "int8"), reward_funcs=[positive(tok)], args=ppo_args, train_dataset=prompt_data())
    with pytest.raises(ValueError, match=r"PPOTrainer: the model is loaded in bitsandbytes 8-bit"):
        PPOTrainer(eight, reward_funcs=[positive(tok)], args=ppo_args, train_dataset=prompt_data(), processing_class=tok)
    rm_args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, report_to="none", use_cpu=True,
                                   save_strategy="no", disable_tqdm=True)
    with pytest.raises(ValueError, match=r"bitsandbytes 8-bit checkpoint"):
        RewardEnsembleTrainer(str(tmp_path / "int8"), args=rm_args, peft_config=LoraConfig(r=4),
                              train_dataset=Dataset.from_list(preference_rows(8, 0)))


def test_a_prequantized_falcon_is_4bit_without_the_flag(tmp_path, tok):
    """transformers 5 quantises nn.Linear only, so a Falcon checkpoint it loaded in 4-bit and saved holds its
    FalconLinear layers full precision: loaded without load_in_4bit they stayed so (the whole model, fp32 after PPO's
    kbit preparation, while it reports being 4-bit), with it they were quantised — by the flag's settings."""
    from rlhf_ext.models import load_model

    src = save_tiny_model_for(tmp_path / "falcon", "falcon", tok, hidden_size=FOUR_BIT_HIDDEN)
    folder = _saved_quantized(src, tmp_path / "falcon-nf4", tok)
    model = load_model(folder, "causal")
    assert not [n for n, m in model.named_modules() if type(m).__name__ == "FalconLinear"]
    states = [m.weight.quant_state for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(states) == 8 and {s.quant_type for s in states} == {"nf4"} and all(s.nested for s in states)


def test_a_reward_model_hosted_at_another_precision_than_it_trained_is_said(tmp_path, tok, folders):
    """Members trained on a 4-bit trunk were hosted on the same checkpoint loaded in full precision without a word
    (the base's fingerprint is the weights', whatever their precision): on this tiny model the scores moved by up to
    0.95 against a standard deviation of 1.55. Hosting is kept (a second copy of the base would cost its memory);
    the mismatch is said, with the setting that removes it."""
    rm_args = RewardEnsembleConfig(str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=8, report_to="none",
                                   save_strategy="no", use_cpu=True, disable_tqdm=True, normalization_samples=8)
    rm = RewardEnsembleTrainer(folders["fp32"], args=rm_args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                               peft_config=LoraConfig(r=4, lora_dropout=0.0), load_in_4bit=True)
    rm.train()
    rm.save_model(str(tmp_path / "rm"))
    args = PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1, use_cpu=True, monitor=False,
                     save_strategy="no", disable_tqdm=True, reward_model_path=str(tmp_path / "rm"))
    said = r"trained on a 4-bit copy of this base and is hosted on the policy's full-precision one.*load_in_4bit=True"
    with pytest.warns(UserWarning, match=said):
        PPOTrainer(folders["fp32"], reward_funcs=[], args=args, train_dataset=prompt_data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = PPOTrainer(folders["fp32"], reward_funcs=[], args=args, train_dataset=prompt_data(), load_in_4bit=True)
    assert tr.quantized and not [w for w in caught if "copy of this base" in str(w.message)]
    # the reverse on a pre-quantised policy, which loads in 4-bit whatever load_in_4bit says: the fix is the
    # full-precision checkpoint, not load_in_4bit=False (which the user has already)
    full = RewardEnsembleTrainer(folders["fp32"], args=RewardEnsembleConfig(
        str(tmp_path / "rm-full"), max_steps=1, per_device_train_batch_size=8, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, normalization_samples=8),
        train_dataset=Dataset.from_list(preference_rows(8, 0)), peft_config=LoraConfig(r=4, lora_dropout=0.0))
    full.train()
    full.save_model(str(tmp_path / "rm-full"))
    args.reward_model_path = str(tmp_path / "rm-full")
    with pytest.warns(UserWarning, match=r"full-precision copy of this base and is hosted on the policy's 4-bit one.*"
                                         rf"from '{folders['fp32']}' without load_in_4bit") as caught:
        PPOTrainer(folders["nf4"], reward_funcs=[], args=args, train_dataset=prompt_data())
    assert not [w for w in caught if "load_in_4bit=False" in str(w.message)]
