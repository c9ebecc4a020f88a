"""ppo/cpu_matmul.py: decoding's few-row matmuls as (W·xᵀ)ᵀ compute F.linear to fp32 rounding, only inside the
decoding loop, only where they may (fp32, no gradient, no autocast, few rows, plain nn.Linear), and sampling through
them still passes the start-up check against the training forward. The speed is measured by
benchmarks/cpu_decode_matmul.py, not here."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from rlhf_ext import cpu_linear
from rlhf_ext.ppo import cpu_matmul, sampling
from rlhf_ext.ppo.cpu_matmul import few_row_linear, tall_linear
from rlhf_ext.testing import tiny_model_for

from .test_precision import trainer
from .test_sampling import _generate


@pytest.mark.parametrize("shape", [(1, 16), (8, 576), (3, 1, 64), (2, 5, 32), (64, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_tall_linear_is_linear_to_fp32_rounding(shape, bias):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = torch.randn(*shape, generator=g)
    w = torch.randn(24, shape[-1], generator=g)
    b = torch.randn(24, generator=g) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # the independent computation
    y = tall_linear(x, w, b)
    assert y.shape == (*shape[:-1], 24) and y.is_contiguous() and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


def _linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def test_the_patch_lasts_the_loop_and_covers_plain_fp32_linears_only(tok, monkeypatch):
    """Inside: every plain nn.Linear (base layers and LoRA's A/B) runs the few-row forward; a module with its own
    `forward` (an accelerate hook) and a bf16 one are left alone. After (also after an exception) nothing is left."""
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(1, 65))
    model = get_peft_model(tiny_model_for("llama3", tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    linears = _linears(model)
    hooked, half = linears[0], linears[1]
    hooked.forward = hooked_forward = lambda x: F.linear(x, hooked.weight)
    half.to(torch.bfloat16)
    assert any("lora_A" in n for n, m in model.named_modules() if m in linears)
    with pytest.raises(RuntimeError, match="stop"), few_row_linear(model):
        patched = [m for m in linears if "forward" in m.__dict__ and m is not hooked]
        assert len(patched) == len(linears) - 2 and half not in patched
        assert hooked.forward is hooked_forward
        raise RuntimeError("stop")
    assert [m for m in linears if "forward" in m.__dict__] == [hooked]
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(0))  # a CPU where it measured no faster: nothing changes
    with few_row_linear(model):
        assert [m for m in linears if "forward" in m.__dict__] == [hooked]


def test_outside_its_cases_the_forward_is_f_linear_bit_for_bit(monkeypatch):
    """More rows than the limit, a pass with gradients, autocast: torch's F.linear itself."""
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(1, 9))
    layer = torch.nn.Linear(32, 48)
    holder = torch.nn.Sequential(layer)
    g = torch.Generator().manual_seed(0)
    few, many = torch.randn(2, 4, 32, generator=g), torch.randn(3, 4, 32, generator=g)  # 8 and 12 rows
    with few_row_linear(holder), torch.no_grad():
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))
        torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    with few_row_linear(holder):
        out = layer(few)
        assert out.requires_grad and torch.equal(out, F.linear(few, layer.weight, layer.bias))


@pytest.mark.parametrize("arch", ["llama3", "qwen2.5", "phi3", "gpt-neox", "gpt2"])
def test_decoding_through_it_samples_what_transformers_loop_samples(arch, tok, monkeypatch):
    """Both loops draw with `draw`: with the few-row matmuls on, the tokens are the same and every step's scores are
    transformers' to fp32 rounding (GPT-2's Conv1D layers are not nn.Linear and keep their own matmul)."""
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: sampling.draw(probs)[:, None])
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(1, 65))
    model = tiny_model_for(arch, tok, seed=3).eval()
    ids = torch.randint(5, len(tok), (3, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = _generate(model, ids, torch.ones_like(ids), None, False, seed=0)
        ours = _generate(model, ids, torch.ones_like(ids), None, True, seed=0)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("limit", [0, 64])
def test_the_start_up_check_measures_sampling_through_it(tmp_path, tok, tiny_path, monkeypatch, limit):
    """PPO samples through the few-row matmuls where they are on, and the start-up check, which samples the same way,
    finds the sampling distribution within the fp32 tolerance of the training forward's either way; at θ₀ the
    training pass and the reference still agree exactly (neither uses them)."""
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(1, limit + 1))
    monkeypatch.setattr(cpu_linear, "onednn_faster", lambda: False)  # oneDNN's routing would take these layers over
    calls = []
    real = cpu_matmul.tall_linear
    monkeypatch.setattr(cpu_matmul, "tall_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    tr = trainer(tmp_path, tok, tiny_path, max_steps=1)
    s = tr.startup
    assert s["sampling_vs_training"] <= s["sampling_vs_training_tolerance"] == 1e-5
    assert s["training_vs_reference"] <= 1e-9
    assert bool(calls) == bool(limit)


def test_the_calibration_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """Two processes on one machine use one range (a timing near the threshold could go either way, and one seed must
    sample alike): the first measures and writes it under the machine's key, the next reads it; a damaged file or
    another machine's entry only means measuring this one's again, keeping the others'."""
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(cpu_matmul, "calibrate", lambda: measured.append(1) or range(2, 17))
    path = tmp_path / "cpu_matmul.json"

    def new_process():
        cpu_matmul.rows_range.cache_clear()
        return cpu_matmul.rows_range()

    try:
        assert new_process() == range(2, 17) and len(measured) == 1
        assert json.loads(path.read_text()) == {cpu_matmul.machine_key(): [2, 17]}
        assert new_process() == range(2, 17) and len(measured) == 1  # read, not measured
        path.write_text("{not json")
        assert new_process() == range(2, 17) and len(measured) == 2
        path.write_text(json.dumps({"another CPU": [1, 65]}))
        assert new_process() == range(2, 17) and len(measured) == 3
        assert json.loads(path.read_text()) == {"another CPU": [1, 65], cpu_matmul.machine_key(): [2, 17]}
        path.unlink()
        path.mkdir()  # unwritable: measured, used, not kept
        assert new_process() == range(2, 17) and len(measured) == 4
    finally:
        cpu_matmul.rows_range.cache_clear()
