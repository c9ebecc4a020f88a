"""ppo/logprobs.py against independent computations, over many shapes, dtypes, temperatures and logit spreads:
the forward is bit-equal to the plain slice/cast/divide and to TRL's `selective_log_softmax`, and the hand-written
backward equals a float64 autograd computation of the same math (the wide spread puts many log-probabilities below
the e^−87 floor of the backward's exp)."""

import itertools

import pytest
import torch
from trl.trainer.utils import selective_log_softmax

from rlhf_ext.ppo.logprobs import response_logits, response_logprobs, token_logprobs

SHAPES = [(1, 1, 7), (3, 5, 50), (2, 9, 257)]  # B, R, V
CASES = list(itertools.product([torch.float32, torch.bfloat16], [1.0, 0.7], [3.0, 60.0], SHAPES, [0, 3]))


def _inputs(dtype, spread, shape, extra, seed):
    """raw: the head's output over R + 1 (+ `extra` earlier, as without `logits_to_keep`) positions."""
    B, R, V = shape
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(B, R + 1 + extra, V, generator=g) * spread).to(dtype)
    tokens = torch.randint(0, V, (B, R), generator=g)
    g_logp, g_z = torch.randn(B, R, generator=g), torch.randn(B, R, V, generator=g) * 0.1
    return raw, tokens, g_logp, g_z


@pytest.mark.parametrize("dtype,T,spread,shape,extra", CASES)
def test_forward_equals_the_plain_chain_and_trl_bit_for_bit(dtype, T, spread, shape, extra):
    raw, tokens, *_ = _inputs(dtype, spread, shape, extra, seed=1)
    R = shape[1]
    want_z = raw[:, -R - 1 : -1].float() / T
    want_logp = selective_log_softmax(want_z, tokens)
    for leaf in (raw, raw.clone().requires_grad_()):  # the no-grad path (reference, KL checks) and the training one
        z, logp = response_logprobs(leaf, tokens, T)
        assert z.dtype == torch.float32 and torch.equal(z.detach(), want_z)
        assert torch.equal(logp.detach(), want_logp)
        # θ_old's log-probs from a no-grad pass equal the training pass's: the first epoch's ratio is exactly 1
        assert torch.equal(token_logprobs(z, tokens), want_logp)
        assert torch.equal(response_logits(leaf, R, T), want_z)


@pytest.mark.parametrize("dtype,T,spread,shape,extra", CASES)
@pytest.mark.parametrize("through", ["logp", "logp+z", "z"])
def test_backward_equals_float64_autograd(dtype, T, spread, shape, extra, through):
    """d/d raw of Σ g·logp (the PPO loss) and/or Σ g_z·z (what an entropy bonus sends to the logits directly)."""
    raw, tokens, g_logp, g_z = _inputs(dtype, spread, shape, extra, seed=2)
    R = shape[1]

    def loss(z, logp):  # a term left out is not in the graph at all: its gradient reaches the backward as None
        terms = {"logp": lambda: (logp * g_logp.to(logp.dtype)).sum(), "z": lambda: (z * g_z.to(z.dtype)).sum()}
        return sum(f() for name, f in terms.items() if name in through.split("+"))

    leaf = raw.clone().requires_grad_()
    loss(*response_logprobs(leaf, tokens, T)).backward()
    ref = raw.double().requires_grad_()
    z64 = ref[:, -R - 1 : -1] / T
    loss(z64, z64.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)).backward()

    got, want = leaf.grad, ref.grad
    assert got.dtype == dtype and got.shape == raw.shape
    assert not got[:, : raw.shape[1] - R - 1].any() and not got[:, -1].any()  # outside the response states: 0
    # fp32: rounding of the same math; bf16: the gradient is stored in bf16 (8 bits of mantissa)
    rtol = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("B,R,V", [(1, 1, 5), (2, 15, 40), (3, 16, 40), (2, 37, 300)])
def test_sequence_kl_in_blocks_changes_no_bit(B, R, V):
    """PolicyAndValue.sequence_kl works EXACT_KL_STATES response states at a time: equal, bit for bit, to the whole
    sequence at once, and to torch's kl_div as an independent computation (float64)."""
    from rlhf_ext.plan.sizes import EXACT_KL_STATES
    from rlhf_ext.ppo.policy import PolicyAndValue

    assert EXACT_KL_STATES == 16  # the shapes above straddle it
    g = torch.Generator().manual_seed(R)
    z, ref = torch.randn(B, R, V, generator=g) * 4, (torch.randn(B, R, V, generator=g) * 4).log_softmax(-1)
    mask = (torch.rand(B, R, generator=g) > 0.2).float()
    got = PolicyAndValue.sequence_kl(z, ref, mask)
    whole = torch.stack([((lp := z[b].double().log_softmax(-1)).exp() * (lp - ref[b].double().log_softmax(-1))).sum(-1)
                         .mul(mask[b].double()).sum() for b in range(B)])
    assert torch.equal(got, whole)
    per_state = torch.nn.functional.kl_div(ref.double().log_softmax(-1), z.double().log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1)
    torch.testing.assert_close(got, (per_state * mask.double()).sum(1), rtol=1e-12, atol=1e-12)
