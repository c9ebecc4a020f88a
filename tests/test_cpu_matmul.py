"""ppo/cpu_matmul.py: decoding's few-row matmuls as (W·xᵀ)ᵀ compute F.linear to fp32 rounding, only inside the
decoding loop, only where they may (fp32, no gradient, no autocast, few rows, plain nn.Linear), and sampling through
them still passes the start-up check against the training forward. The speed is measured by
benchmarks/cpu_decode_matmul.py, not here."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from rlhf_ext import cpu_linear
from rlhf_ext.ppo import cpu_decode, cpu_matmul, sampling
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


# -- prepacked weights ---------------------------------------------------------------------------------------------
needs_packing = pytest.mark.skipif(cpu_matmul._pack_op() is None, reason="this torch build has no oneDNN packing")
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@needs_packing
@pytest.mark.parametrize("dtype", cpu_matmul.PACKABLE)
@pytest.mark.parametrize("rows", [1, 3, 8, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_weight_computes_the_linear(dtype, rows, bias):
    """The product from the packed copy against float64 from the same (rounded) inputs: each output one dot product
    rounded once to `dtype` — and against torch's own product in that dtype, to its rounding."""
    g = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(96, 40, bias=bias).to(dtype).requires_grad_(False)
    x = torch.randn(rows, 1, 96, generator=g).to(dtype)
    with torch.no_grad():
        y = cpu_matmul._PackedForward(layer, rows, layer.forward)(x)
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert y.shape == (rows, 1, 40) and y.dtype == dtype
    torch.testing.assert_close(y.double(), exact, **TOLERANCE[dtype])
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), **TOLERANCE[dtype])


@needs_packing
def test_outside_its_cases_a_packed_module_runs_its_own_forward():
    """With gradients, more than PACKED_ROWS rows, or an input of another dtype outside autocast: the forward the
    module had (here a spy, which then refuses the mixed dtypes as F.linear does). Under CPU autocast to the packed
    dtype an fp32 input is cast first, as F.linear's is."""
    layer = torch.nn.Linear(32, 16).to(torch.bfloat16).requires_grad_(False)
    calls = []

    def plain(x):
        calls.append(tuple(x.shape))
        return F.linear(x, layer.weight, layer.bias)

    few, many = torch.randn(8, 32).to(torch.bfloat16), torch.randn(cpu_matmul.PACKED_ROWS + 1, 32).to(torch.bfloat16)
    fwd = cpu_matmul._PackedForward(layer, 8, plain)
    fwd(few)
    assert calls == [(8, 32)]  # gradients on
    with torch.no_grad():
        fwd(many)
        with pytest.raises(RuntimeError, match="dtype"):  # what F.linear says of mixed dtypes, as without packing
            fwd(few.float())
        assert calls == [(8, 32), (cpu_matmul.PACKED_ROWS + 1, 32), (8, 32)] and fwd.packed is None  # not yet used
        fwd(few)
        assert fwd.packed is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fwd(few.float())
            assert torch.equal(y, F.linear(few.float(), layer.weight, layer.bias))
        assert len(calls) == 3


def _frozen_lora_model(tok, dtype):
    model = get_peft_model(tiny_model_for("llama3", tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model.to(dtype)


@needs_packing
@pytest.mark.parametrize("dtype", cpu_matmul.PACKABLE)
def test_packing_covers_the_frozen_plain_linears_for_the_loop_only(tok, monkeypatch, dtype):
    """Inside: every frozen plain nn.Linear (the base's layers and LM head, oneDNN-routed ones too) computes from a
    copy packed at its first product; LoRA's trainable A/B and a module with its own forward (an accelerate hook) do not. After — also
    after an exception — each module has the forward it had: none, or oneDNN's routing."""
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(0))
    model = _frozen_lora_model(tok, dtype)
    linears = _linears(model)
    frozen = [m for m in linears if not m.weight.requires_grad]
    hooked, routed = frozen[0], frozen[1]
    hooked.forward = hooked_forward = lambda x: F.linear(x, hooked.weight)
    routed.forward = routed_forward = functools.partial(cpu_linear._forward, routed)
    with pytest.raises(RuntimeError, match="stop"), few_row_linear(model, steps=31, rows=2, backend="onednn"):
        packed = [m for m in linears if isinstance(m.__dict__.get("forward"), cpu_matmul._PackedForward)]
        assert packed == [m for m in frozen if m is not hooked] and len(packed) >= 2
        assert routed.forward.plain is routed_forward  # its fallback: the routing it had
        assert hooked.forward is hooked_forward
        # packed at a module's first product, not before: a layer the loop never calls costs nothing
        assert all(m.forward.packed is None for m in packed)
        with torch.no_grad():
            routed(torch.randn(2, routed.in_features, dtype=dtype))
        assert [m for m in packed if m.forward.packed is not None] == [routed]
        raise RuntimeError("stop")
    assert {m: m.__dict__.get("forward") for m in linears} == {
        m: {hooked: hooked_forward, routed: routed_forward}.get(m) for m in linears}


def test_packing_is_chosen_where_it_pays(tok, monkeypatch):
    """"auto" packs where the calibration measured the packed product ≥ MIN_SPEEDUP × faster at the decode's row
    count and its steps repay the packing; "onednn" always, "torch" never; nothing when the copies would pass 1/PACK_MEMORY_SHARE of the
    machine's memory."""
    # fp32 pays after 10 steps at 8 rows, never at one (1.0×); bf16 never (1.05× < MIN_SPEEDUP)
    costs = {(torch.float32, 8): (2.0, 1.0, 10.0), (torch.float32, 1): (1.0, 1.0, 0.0),
             (torch.bfloat16, 8): (1.05, 1.0, 0.0)}
    monkeypatch.setattr(cpu_matmul, "packing_costs", lambda dtype, rows: costs[dtype, min(rows, 8)])
    monkeypatch.setattr(cpu_matmul, "_pack_op", lambda: object())
    pays = cpu_matmul._packing_pays
    assert [pays(torch.float32, n, 8, "auto") for n in (0, 9, 10, 500)] == [False, False, True, True]
    assert not pays(torch.float32, 500, 1, "auto") and not pays(torch.bfloat16, 500, 8, "auto")
    assert pays(torch.bfloat16, 1, 8, "onednn") and not pays(torch.float32, 500, 8, "torch")
    model = _frozen_lora_model(tok, torch.float32)
    frozen = [m for m in _linears(model) if not m.weight.requires_grad]
    assert cpu_matmul._packed_linears(model, 10, 8, "auto") == frozen
    assert cpu_matmul._packed_linears(model, 9, 8, "auto") == [] == cpu_matmul._packed_linears(model, 500, 8, "torch")
    assert cpu_matmul._packed_linears(model, 500, 1, "auto") == []
    size = sum(m.weight.numel() * 4 for m in frozen)
    monkeypatch.setattr(cpu_matmul, "memory_bytes", lambda: size * cpu_matmul.PACK_MEMORY_SHARE)
    assert cpu_matmul._packed_linears(model, 10, 8, "onednn") == frozen
    monkeypatch.setattr(cpu_matmul, "memory_bytes", lambda: size * cpu_matmul.PACK_MEMORY_SHARE - 1)
    assert cpu_matmul._packed_linears(model, 10, 8, "onednn") == []


@needs_packing
@pytest.mark.parametrize("dtype", cpu_matmul.PACKABLE)
@pytest.mark.parametrize("arch", ["llama3", "qwen2.5", "phi3", "gpt2"])
def test_decoding_from_packed_weights_samples_what_unpacked_weights_sample(arch, dtype, tok, monkeypatch):
    """Both loops are ours and draw alike; with every frozen layer packed ("onednn") the tokens are those of the
    unpacked loop ("torch") and every step's scores theirs to the dtype's rounding."""
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(0))
    model = tiny_model_for(arch, tok, seed=3).eval().to(dtype).requires_grad_(False)
    ids = torch.randint(5, len(tok), (3, 7), generator=torch.Generator().manual_seed(5))
    used = []
    real = cpu_matmul.packed_weight
    for module in (cpu_matmul, cpu_decode):  # the Llama family's lean steps pack their own copies (cpu_decode.py)
        monkeypatch.setattr(module, "packed_weight", lambda w, rows: used.append(rows) or real(w, rows))
    with torch.no_grad():
        ours, theirs = (_generate(model, ids, torch.ones_like(ids), None, True, seed=0, cpu_matmul_backend=b)
                        for b in ("onednn", "torch"))
    assert used and set(used) == {3}  # packed for the decode's 3 rows, only where asked
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])


@needs_packing
def test_the_packing_calibration_is_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path))
    first = {(d, m): cpu_matmul.packing_costs(d, m) for d in cpu_matmul.PACKABLE for m in (1, 2, 8, 64)}
    assert all(len(c) == 3 and all(t > 0 for t in c) for c in first.values())
    for d in cpu_matmul.PACKABLE:  # one row measured apart; any batch reads the 8-row costs
        assert first[d, 2] == first[d, 8] == first[d, 64] != first[d, 1]
    kept = json.loads((tmp_path / "cpu_matmul.json").read_text())
    assert set(kept) == {f"{cpu_matmul.machine_key()} | packed decode {d}" for d in ("float32", "bfloat16")}
    assert all(set(v) == {"1", "8"} for v in kept.values())
    monkeypatch.setattr(cpu_matmul, "packed_weight", lambda *a: pytest.fail("measured again"))
    assert {(d, m): cpu_matmul.packing_costs(d, m) for d, m in first} == first  # read, not measured


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ppo_decodes_from_packed_weights_unless_told_not_to(tmp_path, tok, tiny_path, monkeypatch, backend):
    """PPO passes its `cpu_matmul_backend` to the decoding loop: where packing pays, its rollouts and the start-up
    check sample from packed weights, within the tolerance of the training forward; "torch" packs nothing."""
    monkeypatch.setattr(cpu_matmul, "_packing_pays", lambda dtype, steps, rows, b: b != "torch")
    used = []
    real = cpu_matmul.packed_weight
    for module in (cpu_matmul, cpu_decode):  # the Llama family's lean steps pack their own copies (cpu_decode.py)
        monkeypatch.setattr(module, "packed_weight", lambda w, rows: used.append(rows) or real(w, rows))
    tr = trainer(tmp_path, tok, tiny_path, max_steps=1, cpu_matmul_backend=backend)
    s = tr.startup
    assert s["sampling_vs_training"] <= s["sampling_vs_training_tolerance"] and s["training_vs_reference"] <= 1e-9
    used.clear()
    tr._rollout(tr._next_prompts())
    assert bool(used) == (backend == "auto" and cpu_matmul._pack_op() is not None)


def test_the_memory_share_is_of_the_machine_or_its_container_whichever_is_less(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683792 kB\nMemFree:        1000 kB\n")
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    assert cpu_matmul.memory_bytes(str(meminfo), [str(v2), str(tmp_path / "absent")]) == 24683792 * 1024
    v1.write_text(f"{4 << 30}\n")
    assert cpu_matmul.memory_bytes(str(meminfo), [str(v2), str(v1)]) == 4 << 30
    assert cpu_matmul.memory_bytes(str(tmp_path / "none"), [str(v1)]) == 4 << 30
    assert cpu_matmul.memory_bytes(str(tmp_path / "none"), []) == 0  # nothing readable: nothing is packed
