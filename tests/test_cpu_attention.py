"""ppo/cpu_attention.py: torch's attention forward, bit for bit, with a backward recomputed in fp32 — checked against
float64 autograd over masks (padding, additive, causal, none), grouped-query attention, explicit scales and both
16-bit dtypes; and the passes that take it: PPO's training passes on CPU in 16-bit, not fp32, not no-grad passes,
not under gradient checkpointing."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rlhf_ext.models import load_model
from rlhf_ext.ppo import cpu_attention
from rlhf_ext.ppo.cpu_attention import cheaper_attention_backward
from rlhf_ext.testing import save_tiny_model

from .test_precision import trainer

MASKS = ["padding", "additive", "causal", "none"]
CASES = list(itertools.product([torch.bfloat16, torch.float16], MASKS, [False, True], [None, 0.3], [(1, 1, 5), (3, 7, 13)]))


def _inputs(dtype, mask_kind, gqa, B, Tq, Tk):
    g = torch.Generator().manual_seed(Tq * 7 + B)
    Hq, Hk, D = 4, (2 if gqa else 4), 8
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, Tk, D, generator=g).to(dtype) for _ in range(2))
    kw = {"enable_gqa": gqa}
    if mask_kind == "padding":  # left padding: the first sequence's first key is masked, its first query sees nothing
        m = torch.ones(B, 1, Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        m[0, :, :, 0] = False
        kw["attn_mask"] = m
    elif mask_kind == "additive":
        kw["attn_mask"] = (torch.randn(1, Hq, Tq, Tk, generator=g) * 2).to(dtype)
    elif mask_kind == "causal":
        kw["is_causal"] = True
    return q, k, v, kw, torch.randn(B, Hq, Tq, 8, generator=g).to(dtype)


@pytest.mark.parametrize("dtype,mask_kind,gqa,scale,BTT", CASES)
def test_forward_is_torch_s_and_backward_equals_float64_autograd(dtype, mask_kind, gqa, scale, BTT):
    B, Tq, Tk = BTT
    if mask_kind == "causal":
        Tk = Tq  # torch's is_causal aligns top-left; the models hand it square attention only
    q, k, v, kw, go = _inputs(dtype, mask_kind, gqa, B, Tq, Tk)
    kw["scale"] = scale
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = cpu_attention.sdpa(*leaves, **kw)
    assert torch.equal(out.detach(), F.scaled_dot_product_attention(q, k, v, **kw))  # the forward, bit for bit
    assert out.grad_fn.name().endswith("_AttentionBackward")
    out.backward(go)

    ref = [x.double().requires_grad_() for x in (q, k, v)]
    kw64 = {**kw, **({"attn_mask": kw["attn_mask"].double()} if mask_kind == "additive" else {})}
    F.scaled_dot_product_attention(*ref, **kw64).backward(go.double())
    for got, want in zip(leaves, ref):
        finite = want.grad.nan_to_num(0.0)  # a query that sees no key has no gradient
        torch.testing.assert_close(got.grad.double(), finite, rtol=2**-7, atol=2**-7 * float(finite.abs().max()))


def test_only_passes_that_need_a_gradient_take_it():
    q, k, v, kw, _ = _inputs(torch.bfloat16, "padding", False, 2, 5, 5)
    with torch.no_grad():
        assert cpu_attention.sdpa(q.requires_grad_(), k, v, **kw).grad_fn is None
    dropped = cpu_attention.sdpa(q, k, v, dropout_p=0.1, **kw)  # dropout: torch's own
    assert not dropped.grad_fn.name().endswith("_AttentionBackward")
    checkpointed = torch.nn.Sequential(torch.nn.Linear(2, 2))
    checkpointed[0].gradient_checkpointing = True  # as transformers marks a model that recomputes its layers
    sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    for dtype, model in ((torch.float32, None), (torch.bfloat16, checkpointed)):  # fp32, or checkpointing: nothing
        with cheaper_attention_backward(torch.device("cpu"), dtype, model):
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before
    with torch.no_grad(), cheaper_attention_backward(torch.device("cpu"), torch.bfloat16):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before
    with cheaper_attention_backward(torch.device("cpu"), torch.bfloat16, torch.nn.Linear(2, 2)):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__ is sdpa_before


def test_only_transformers_attention_function_runs_under_the_mode_and_the_mapping_is_restored(monkeypatch):
    """Inside the context transformers' "sdpa" attention function routes its SDPA call through the cheaper backward,
    under a TorchFunctionMode that covers that function only (the pass's other operations run without it); nested
    contexts wrap it once; after the outermost the mapping is as it was — no local override left behind, or the
    user's own kept."""
    q, k, v, kw, _ = _inputs(torch.bfloat16, "padding", False, 2, 5, 5)
    q.requires_grad_()
    seen = []
    real = cpu_attention._AttentionWithCheaperBackward.__torch_function__
    monkeypatch.setattr(cpu_attention._AttentionWithCheaperBackward, "__torch_function__",
                        lambda self, func, *a, **k: seen.append(func) or real(self, func, *a, **k))
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    assert "sdpa" not in local
    module = torch.nn.Module()
    module.is_causal = False
    ctx = lambda: cheaper_attention_backward(torch.device("cpu"), torch.bfloat16)  # noqa: E731
    with ctx():
        routed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        with ctx():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is routed  # wrapped once
        torch.add(q, 1)  # outside the attention function: no mode
        assert not seen
        out, _ = routed(module, q, k, v, kw["attn_mask"])  # [B, T, heads, D]: SDPA's output transposed, a copy
        assert "_AttentionBackward" in _graph_names(out.grad_fn)
        assert F.scaled_dot_product_attention in seen and torch.add not in seen
    assert "sdpa" not in local
    users = lambda *a, **k: None  # noqa: E731
    local["sdpa"] = users
    try:
        with ctx():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"].__wrapped__ is users
        assert local["sdpa"] is users
    finally:
        del local["sdpa"]


def _graph_names(fn, depth: int = 6) -> set:
    """The names of autograd nodes within `depth` steps of `fn`."""
    if fn is None or depth == 0:
        return set()
    return {fn.name()}.union(*(_graph_names(f, depth - 1) for f, _ in fn.next_functions))


def test_16_bit_operands_against_fp32_operands(monkeypatch):
    """dV, dQ, dK from P and dS rounded to bf16 (FlashAttention-2's precision) stay within 2× the error of the same
    products from fp32 copies, against float64 autograd, over masks and grouped-query attention."""
    worst = {}
    for mask_kind, gqa in itertools.product(MASKS, [False, True]):
        q, k, v, kw, go = _inputs(torch.bfloat16, mask_kind, gqa, 3, 7, 7 if mask_kind == "causal" else 13)
        ref = [x.double().requires_grad_() for x in (q, k, v)]
        kw64 = {**kw, **({"attn_mask": kw["attn_mask"].double()} if mask_kind == "additive" else {})}
        F.scaled_dot_product_attention(*ref, **kw64).backward(go.double())
        for fp32 in (False, True):
            monkeypatch.setattr(cpu_attention, "FP32_OPERANDS", fp32)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            cpu_attention.sdpa(*leaves, **kw).backward(go)
            err = max(float((x.grad.double() - r.grad.nan_to_num(0.0)).abs().max() / r.grad.nan_to_num(0.0).abs().max())
                      for x, r in zip(leaves, ref))
            worst[fp32] = max(worst.get(fp32, 0.0), err)
    assert worst[False] <= 2 * worst[True], worst


@pytest.mark.parametrize("setting", ["bf16 weights", "fp32", "bf16 weights + checkpointing"])
def test_ppo_training_passes_take_it_on_cpu_in_16_bit(tmp_path, tok, monkeypatch, setting):
    """A bf16 policy's training pass routes every layer's attention through the cheaper backward (and stays exact:
    train vs eval 0, KL at θ₀ 0 — the start-up check); fp32 and gradient checkpointing keep torch's."""
    calls = []
    real = cpu_attention._Attention.apply
    monkeypatch.setattr(cpu_attention._Attention, "apply", lambda *a: calls.append(1) or real(*a))
    model = load_model(save_tiny_model(tmp_path / "m", tok), **({} if setting == "fp32" else {"dtype": "bfloat16"}))
    tr = trainer(tmp_path, tok, model, gradient_checkpointing="checkpointing" in setting)
    assert tr.startup["train_vs_eval"] == 0.0 and tr.startup["training_vs_reference"] <= 1e-9
    calls.clear()
    ro = tr._rollout(tr._next_prompts())
    assert not calls  # sampling, scoring and the reference: no gradient
    logits, values, logp = tr.train_policy(ro.ids, ro.mask, ro.R, ro.h_low)
    (logp.mean() + values.mean()).backward()
    layers = model.config.num_hidden_layers
    assert len(calls) == (layers if setting == "bf16 weights" else 0)
    assert all(torch.isfinite(p.grad).all() for p in tr.trainable_parameters() if p.grad is not None)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_a_backward_split_into_chunks_of_sequences_equals_the_whole_batch_s(monkeypatch, mask_kind):
    """CHUNK_BYTES bounds the backward's fp32 temporaries by splitting the batch: each chunk computes what the whole
    batch would have for its sequences, bit for bit (masks of one row or one per sequence, per-head masks)."""
    B, Tq, Tk = 5, 7, 7 if mask_kind == "causal" else 11
    q, k, v, kw, go = _inputs(torch.bfloat16, mask_kind, True, B, Tq, Tk)

    def grads():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        cpu_attention.sdpa(*leaves, **kw).backward(go)
        return [x.grad for x in leaves]

    whole = grads()
    # as the models hand them over: [B, T, heads, D] transposed to [B, heads, T, D], not contiguous
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q.is_contiguous()
    for a, b in zip(whole, grads()):
        assert torch.equal(a, b)
    monkeypatch.setattr(cpu_attention, "CHUNK_BYTES", 1)  # one sequence per chunk
    for a, b in zip(whole, grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("argv, says", [(["--heads", "9", "--kv-heads", "2"], "not a multiple of --kv-heads 2"),
                                        (["--query-tokens", "80"], "--query-tokens 80 exceeds --tokens 74"),
                                        (["--repeat", "0"], "--repeat must be at least 1"),
                                        (["--kv-heads", "0"], "--kv-heads must be at least 1")])
def test_the_benchmark_refuses_shapes_it_cannot_build(argv, says):
    """Query heads not a whole multiple of the key/value heads ended in a RuntimeError from deep in torch."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_attention.py"
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
