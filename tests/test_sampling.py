"""ppo/sampling.py: `draw` samples each row's distribution (counts against the probabilities, zero-probability tokens
never, invalid rows refused), and `decode` is transformers' own decoding loop — the same tokens and scores as
`generate()` without it when both draw alike — on every architecture of the matrix, with EOS padding; PPO's rollouts
on CPU go through it and the start-up check measures what it samples from."""

import math

import pytest
import torch

from rlhf_ext.ppo import cpu_matmul, sampling
from rlhf_ext.ppo.sampling import cpu_decoder, decode, draw
from rlhf_ext.testing import ARCHITECTURES, tiny_model_for

from .test_precision import trainer


def _chi2_upper(df: int, z: float = 5.0) -> float:
    """The chi-square quantile about z standard deviations up (Wilson–Hilferty): p ≈ 3e-7 at z = 5."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draw_samples_each_row_s_distribution(seed):
    g = torch.Generator().manual_seed(seed)
    V, n = 50, 40_000
    p = torch.rand(2, V, generator=g) ** 4  # uneven, some tokens rare
    p[0, ::7] = 0.0  # zero-probability tokens, the last one included in row 0 (index 49)
    p[0, -1] = 0.0
    p = p / p.sum(-1, keepdim=True) * torch.tensor([[1.0], [3.5]])  # rows need not sum to 1
    rows = p.repeat_interleave(n, 0)
    tokens = draw(rows, generator=g).view(2, n)
    for r in range(2):
        counts = torch.bincount(tokens[r], minlength=V).double()
        expected = n * p[r].double() / p[r].double().sum()
        assert counts[expected == 0].sum() == 0  # never a zero-probability token
        live = expected > 0
        stat = float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())
        assert stat < _chi2_upper(int(live.sum()) - 1), (r, stat)


def test_draw_never_picks_a_zero_token_when_u_rounds_up_to_the_total(monkeypatch):
    p = torch.tensor([[0.2, 0.3, 0.5, 0.0, 0.0]])
    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=torch.float64))  # u = 1
    assert draw(p).tolist() == [2]


@pytest.mark.parametrize("bad", ["nan", "negative", "zeros", "inf"])
def test_draw_refuses_what_multinomial_refuses(bad):
    p = torch.tensor([[0.5, 0.5, 0.0]])
    p[0, 0] = {"nan": float("nan"), "negative": -0.1, "zeros": 0.0, "inf": float("inf")}[bad]
    if bad == "zeros":
        p[0, 1] = 0.0
    with pytest.raises(RuntimeError):
        torch.multinomial(p, 1)
    with pytest.raises(RuntimeError, match="probability tensor"):
        draw(p)


def _generate(model, ids, mask, eos, custom, seed, **kw):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                          max_new_tokens=12, pad_token_id=0, eos_token_id=eos, output_scores=True,
                          return_dict_in_generate=True, **({"custom_generate": decode} if custom else {}), **kw)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decode_is_transformers_loop_token_for_token(arch, tok, monkeypatch):
    """Both loops draw with `draw` (torch.multinomial patched to it): the same prefill, cache, input preparation and
    stopping give the same tokens and the same scores. With EOS set to the second token row 1 drew without one, the
    same seed makes row 1 finish after two tokens, so the padding of finished rows is covered too. Bit for bit, so
    with decoding's few-row matmuls in torch's own order and unpacked weights (tests/test_cpu_matmul.py covers the
    others)."""
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: draw(probs)[:, None])
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(0))
    monkeypatch.setattr(cpu_matmul, "_packing_pays", lambda *a: False)
    model = tiny_model_for(arch, tok, seed=3).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, len(tok), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    with torch.no_grad():
        first = _generate(model, ids, mask, None, False, seed=0)
        eos = int(first.sequences[1, ids.shape[1] + 1])
        for stop in (None, eos):
            theirs = _generate(model, ids, mask, stop, False, seed=0)
            ours = _generate(model, ids, mask, stop, True, seed=0)
            assert torch.equal(ours.sequences, theirs.sequences), (arch, stop)
            assert len(ours.scores) == len(theirs.scores)
            for a, b in zip(ours.scores, theirs.scores):
                assert torch.equal(a, b)
        assert ours.sequences[1, ids.shape[1] + 1] == eos and (ours.sequences[1, ids.shape[1] + 2:] == 0).all()


def test_decode_without_a_cache_is_transformers_loop_too(tok, monkeypatch):
    """use_cache=False: every step feeds the whole sequence (`next_sequence_length` None), as transformers does."""
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples: draw(probs)[:, None])
    monkeypatch.setattr(cpu_matmul, "rows_range", lambda: range(0))
    monkeypatch.setattr(cpu_matmul, "_packing_pays", lambda *a: False)
    model = tiny_model_for("llama3", tok, seed=3).eval()
    ids = torch.randint(5, len(tok), (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = _generate(model, ids, torch.ones_like(ids), None, True, seed=0, use_cache=False)
        theirs = _generate(model, ids, torch.ones_like(ids), None, False, seed=0, use_cache=False)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, theirs.scores))


def test_decode_falls_back_to_transformers_loop_for_greedy_decoding(tok):
    model = tiny_model_for("llama3", tok).eval()
    ids = torch.randint(5, len(tok), (2, 6))
    with torch.no_grad():
        ours = model.generate(input_ids=ids, do_sample=False, max_new_tokens=5, pad_token_id=0,
                              custom_generate=decode)
        theirs = model.generate(input_ids=ids, do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_cpu_decoder_is_offered_on_cpu_only_and_where_transformers_helpers_match(tok, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    model = tiny_model_for("llama3", tok)
    assert cpu_decoder(model) == {"custom_generate": decode, "cpu_matmul_backend": "auto"}
    assert cpu_decoder(model, "torch") == {"custom_generate": decode, "cpu_matmul_backend": "torch"}
    with monkeypatch.context() as m:
        m.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
        assert cpu_decoder(model) == {}
    sampling._helpers_match.cache_clear()
    with monkeypatch.context() as m:  # transformers 5.2.0's _prefill took no is_first_iteration
        m.setattr(GenerationMixin, "_prefill", lambda self, input_ids, generation_config, model_kwargs: None)
        assert cpu_decoder(model) == {}
        sampling._helpers_match.cache_clear()
    assert cpu_decoder(model) == {"custom_generate": decode, "cpu_matmul_backend": "auto"}


@pytest.mark.parametrize("fast", [True, False])
def test_ppo_rollouts_and_the_start_up_check_sample_through_it_unless_told_not_to(tmp_path, tok, tiny_path,
                                                                                   monkeypatch, fast):
    calls = []
    real = sampling.draw
    monkeypatch.setattr(sampling, "draw", lambda probs, generator=None: calls.append(probs.shape) or real(probs))
    tr = trainer(tmp_path, tok, tiny_path, max_steps=1, cpu_fast_sampling=fast)
    assert bool(calls) == fast and tr.startup["sampling_vs_training"] <= tr.startup["sampling_vs_training_tolerance"]
    calls.clear()
    ro = tr._rollout(tr._next_prompts())
    assert len(calls) == (ro.R if fast else 0)  # one draw per generated position
