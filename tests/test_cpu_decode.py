"""ppo/cpu_decode.py: the lean decoding step is the model's step — with LoRA adapters folded into its products, left
padding, fp32, bf16 weights and bf16 autocast —, its folded product is the adapter's arithmetic, and every decode it
does not reproduce (other families, adapter variants, a sliding window's cache, the "torch" backend) runs
transformers' steps. The speed is measured by benchmarks/ppo_throughput.py and benchmarks/cpu_decode_matmul.py."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from rlhf_ext.ppo import cpu_decode, cpu_matmul
from rlhf_ext.ppo.cpu_decode import LeanDecoder, _norm, _Product, _rotation
from rlhf_ext.testing import tiny_model_for

from .test_sampling import _generate

needs_packing = pytest.mark.skipif(cpu_matmul._pack_op() is None, reason="this torch build has no oneDNN packing")
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the lean family members of the architecture matrix (Mistral without its sliding window: covered below)
LEAN = {"llama3": {}, "qwen2.5": {}, "qwen3": {}, "mistral": {"sliding_window": None}}


def _adapted_model(tok, arch, dtype=torch.float32, targets=ALL_LINEARS, seed=3, **kw):
    """A tiny model of `arch` with a LoRA adapter whose B is not zero (an adapter that has trained), in eval mode."""
    model = tiny_model_for(arch, tok, seed=seed, **{**LEAN.get(arch, {}), **kw})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def _prompts(tok):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, len(tok), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    return ids, mask


def _decode_both_ways(model, tok, monkeypatch, autocast=None):
    """Scores of the same decode with lean steps ("onednn") and with transformers' steps from unpacked weights
    ("torch"), the lean one fed the other's tokens (teacher forcing: a rounding-level difference must not change
    what is compared); and how many lean steps ran."""
    steps = []
    real = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, t: steps.append(t) or real(self, t))
    ids, mask = _prompts(tok)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        theirs = _generate(model, ids, mask, None, True, seed=0, cpu_matmul_backend="torch")
        forced = iter(theirs.sequences[:, ids.shape[1]:].T)
        monkeypatch.setattr("rlhf_ext.ppo.sampling.draw", lambda probs: next(forced))
        ours = _generate(model, ids, mask, None, True, seed=0, cpu_matmul_backend="onednn")
    assert torch.equal(ours.sequences, theirs.sequences)
    return torch.stack(ours.scores, 1), torch.stack(theirs.scores, 1), len(steps)


def _log_probs(scores):
    return scores.double().log_softmax(-1)


@needs_packing
@pytest.mark.parametrize("arch", sorted(LEAN))
def test_lean_steps_are_the_model_s_steps_in_fp32(arch, tok, monkeypatch):
    """LoRA on every linear, left padding: every step's log-probabilities are transformers' to fp32 rounding."""
    model = _adapted_model(tok, arch)
    ours, theirs, steps = _decode_both_ways(model, tok, monkeypatch)
    assert steps == ours.shape[1] - 1  # every step after the prefill's was a lean one
    torch.testing.assert_close(_log_probs(ours), _log_probs(theirs), rtol=0, atol=1e-4)


@needs_packing
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
@pytest.mark.parametrize("precision", ["bf16 weights", "bf16 autocast"])
def test_lean_steps_are_the_model_s_steps_in_bf16(arch, precision, tok, monkeypatch):
    """bf16 weights, or fp32 weights under bf16 autocast (products in bf16 either way): the per-step distributions
    agree to bf16 rounding — mean KL far below the sampling tolerance the start-up check applies to bf16."""
    weights = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    model = _adapted_model(tok, arch, dtype=weights)
    ours, theirs, steps = _decode_both_ways(model, tok, monkeypatch, autocast=torch.bfloat16)
    assert steps == ours.shape[1] - 1
    p, q = _log_probs(theirs), _log_probs(ours)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.mean()) < 1e-3, float(kl.mean())
    assert float((p - q).abs().max()) < 0.1


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_folded_product_is_the_adapters_arithmetic(dtype, tok):
    """[q | k | v] with adapters on q and v (none on k) and biases: the one product gives each linear's
    W·x + b + s·B·A·x, checked in float64."""
    model = _adapted_model(tok, "qwen2.5", targets=["q_proj", "v_proj"])  # Qwen2: q/k/v biases
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(5, attn.q_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        product = _Product([attn.q_proj, attn.k_proj, attn.v_proj], dtype, rows=5)
        outs = product(x.to(dtype)).split(product.splits, -1)
    for out, lin in zip(outs, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
        base = getattr(lin, "base_layer", lin)
        expected = F.linear(x.double(), base.weight.double(), base.bias.double())
        if lin is not attn.k_proj:
            A, B, s = lin.lora_A["default"].weight, lin.lora_B["default"].weight, lin.scaling["default"]
            expected += s * F.linear(F.linear(x.double(), A.double()), B.double())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out.double(), expected, **tol)


def _starts(model, tok, backend="onednn", autocast=None, max_new_tokens=12):
    """Whether a decode of `model` took lean steps."""
    started = []
    real = LeanDecoder.start.__func__

    def spy(cls, *a, **k):
        found = real(cls, *a, **k)
        started.append(found is not None)
        return found

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LeanDecoder, "start", classmethod(spy))
        ids, mask = _prompts(tok)
        with torch.no_grad():
            _generate(model, ids, mask, None, True, seed=0, cpu_matmul_backend=backend)
    return started == [True]


@needs_packing
def test_what_a_lean_step_would_not_reproduce_runs_transformers_steps(tok):
    assert _starts(_adapted_model(tok, "llama3"), tok)
    assert not _starts(_adapted_model(tok, "llama3"), tok, backend="torch")  # asked not to
    for arch in ("gpt2", "phi3", "gemma2", "olmo2"):  # other families
        assert not _starts(tiny_model_for(arch, tok).eval(), tok), arch
    assert not _starts(_adapted_model(tok, "mistral", sliding_window=64), tok)  # a sliding window's cache
    dora = get_peft_model(tiny_model_for("llama3", tok), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not _starts(dora.eval(), tok)  # an adapter variant
    dropout = _adapted_model(tok, "llama3")
    dropout.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"] = torch.nn.Dropout(0.5)
    assert _starts(dropout, tok) and not _starts(dropout.train(), tok)  # dropout that would drop: not folded


@needs_packing
def test_a_decode_that_packing_does_not_repay_runs_transformers_steps(tok, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "packing_costs", lambda dtype, rows: (1.0, 1.0, 0.0))  # packing no faster
    model = _adapted_model(tok, "llama3")
    assert not _starts(model, tok, backend="auto") and _starts(model, tok, backend="onednn")
    monkeypatch.setattr(cpu_matmul, "memory_bytes", lambda: 0)  # the copies would not fit
    assert not _starts(model, tok, backend="onednn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_step_s_norm_and_rotation_are_the_model_s_or_the_model_s_own_are_used(dtype):
    """The shorter RMS norm and rotation give the model's bits (Llama's modules, on fresh inputs); a norm or rotation
    of another form (Gemma's 1 + weight, a rotation that is not rotate_half's) is left to the model's own code."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    llama = LlamaRMSNorm(16, eps=1e-5)
    llama.weight.data = torch.randn(16, generator=g)
    llama.to(dtype)
    x = torch.randn(5, 16, generator=g).to(dtype)
    norm = _norm(llama, dtype)
    assert norm is not llama and torch.equal(norm(x), llama(x))
    gemma = GemmaRMSNorm(16).to(dtype)
    assert _norm(gemma, dtype) is gemma

    q, cos, sin = (torch.randn(4, 6, 8, generator=g).to(dtype) for _ in range(3))
    cos, sin = cos[:, :1], sin[:, :1]
    rotate = _rotation(apply_rotary_pos_emb, dtype, 8)
    expected = apply_rotary_pos_emb(q[:, :, None], q[:, :, None], cos, sin)[0][:, :, 0]
    assert rotate.__name__ == "ours" and torch.equal(rotate(cos, sin)(q), expected)  # the shorter one, same bits
    def other(q, k, cos, sin, unsqueeze_dim=1):  # a rotation that is not rotate_half's
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos - q * sin, k

    torch.testing.assert_close(_rotation(other, dtype, 8)(cos, sin)(q), q * cos - q * sin)
