"""The model side of PPO: one PeftModel whose adapters are the policy (trained), the critic (optional, trained) and
the reward members (frozen); the reference π_ref is the same model with every adapter disabled.

`PolicyAndValue` runs every pass a PPO iteration needs — sampling, the training forward, the reference and the
exact-KL measurements — so that they all agree:
  * log-probs come from the model's own forward (its LM head, biases, logit soft-capping, LoRA on `lm_head`
    included), only for the response positions (`logits_to_keep`), then divided by the temperature T — the very
    distribution `generate` samples from (checked at start-up);
  * no dropout (`adapters.zero_dropout`, default): training passes equal eval-mode passes, so ratios, values and
    the KL guard are exact; passes without a backward run in eval mode (`adapters.eval_mode`);
  * the reference disables adapters on the whole model, embeddings and LM head included;
  * with LoRA on the top layers only, the layers below run once per rollout (`prefix_cache.SplitTrunk`);
  * the prompt tokens every row of a batch begins with run once per pass (`shared_prefix.py`).
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from peft.helpers import disable_input_dtype_casting
from torch import nn

from .. import rl_math as rlm
from ..adapters import active_adapter, adapters_disabled, eval_mode
from ..data import pad_ids, stop_token_ids
from ..grouped_kv import grouped_kv_attention
from ..models import activation_checkpointing_on, trunk_of
from ..plan.sizes import EXACT_KL_STATES
from ..precision import SAME_PASS_KL_TOLERANCE, compute_dtype, full_precision, precision_context, sampling_tolerance
from ..prefix_cache import positions
from ..shared_prefix import (MIN_SAVED_ROWS, MIN_SHARED_TOKENS, cache_argument, prefilled_prompts, recurrent_layers,
                             shared_forward, shared_length, sliding_window)
from .cpu_attention import cheaper_attention_backward
from .logprobs import response_logits, response_logprobs
from .sampling import cpu_decoder, forked_rng

POLICY, CRITIC = "policy", "critic"


def completion_texts(tokenizer, prompt_ids: list[list[int]], prompts: list, completion_ids: list[list[int]]):
    """Each completion as text, decoded after its prompt's last token where the prompt is text: SentencePiece
    tokenizers (Llama 2, Mistral, Gemma) drop a sequence's leading space when decoding, so `'▁s', '▁this'` decoded
    alone is 's this' and `prompt + completion` — what reward models and functions read — fused two words. A chat
    prompt's completion is the assistant message's content, decoded alone (chat templates strip or add its space)."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    rows = [i for i, p in enumerate(prompts) if not isinstance(p, list) and prompt_ids[i] and completion_ids[i]]
    if not rows:
        return texts
    heads = tokenizer.batch_decode([prompt_ids[i][-1:] for i in rows], skip_special_tokens=True)
    fulls = tokenizer.batch_decode([prompt_ids[i][-1:] + completion_ids[i] for i in rows], skip_special_tokens=True)
    for i, head, full in zip(rows, heads, fulls):
        if full.startswith(head):  # (a byte split between the two tokens decodes differently: kept as it was)
            texts[i] = full[len(head):]
    return texts


@dataclass
class Rollout:
    """One batch of sampled responses and what PPO needs about them. B sequences, P prompt + R response positions.

    ids, mask:        [B, P+R]  left-padded prompt + right-padded response; attention mask (never found by pad id)
    resp:             [B, R]    response tokens (pad after the first EOS)
    resp_mask:        [B, R]    1 on response tokens up to and including the first EOS
    loss_mask:        [B, R]    resp_mask of samples whose reward is valid (dropped rewards never reach the loss)
    kept:             float     samples with a valid reward over every process (PPOTrainer._rollout; 0: no update)
    has_eos, valid:   [B]       bool; has_eos: the response stopped at its EOS — or, with stop_on_eos=False (nothing
                                stops), holds one anywhere: TRL 1.12's rule for missing_eos_penalty
    lengths:          [B]       response tokens excluding a final EOS
    scores:           [B]       shaped, aggregated reward (0 where invalid)
    raw, norm:        [B, K]    member rewards before / after normalisation
    ref_logprobs:     [B, R]    log π_ref of the sampled tokens
    ref_logits_full:  [B, R, V] the reference's z = logits/T over the vocabulary (exact KL; None when nothing
                                measures it)
    h_low:            [B, P+R, H] hidden state entering the lowest adapted layer (frozen-prefix cache) or None
    """

    ids: torch.Tensor
    mask: torch.Tensor
    resp: torch.Tensor
    resp_mask: torch.Tensor
    has_eos: torch.Tensor
    lengths: torch.Tensor
    prompts: list
    completions: list
    completion_ids: list
    texts: list
    gen_seconds: float
    scores: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    raw: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    ref_logits_full: torch.Tensor | None = None
    h_low: torch.Tensor | None = None
    kept: float = 0.0
    audit: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)  # the prompts' other dataset columns, a list each (reward kwargs)
    extra: dict = field(default_factory=dict)  # what reward functions passed to log_extra(), a list per column

    @property
    def R(self) -> int:
        return self.resp.shape[1]

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.resp_mask * self.valid.to(self.resp_mask)[:, None]


def _contiguous_input(module, args):
    """The LM head's input made contiguous. `logits_to_keep` hands it a strided slice of the final hidden states (in
    the training passes and in generate()'s prefill); on a strided 3-D input torch's matmul cannot fold the batch and
    expands the head's weight per row — on CPU in bf16 a [B, V, H] copy, 432 MiB at 135M and batch 8, and slower."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


class PolicyAndValue(nn.Module):
    """Policy + value on one PeftModel. `forward` is the one training pass (gradients flow); the rest are no-grad.

    critic: "shared" (value head on the policy's last hidden states: one pass gives both) or "separate" (the critic
    adapter + value head, one more pass through the trained layers).
    """

    def __init__(self, peft, value_head: nn.Module, critic: str, temperature: float, exact_training: bool = True,
                 autocast: torch.dtype | None = None, pad_id: int = 0, cpu_sampling: bool = True,
                 cpu_matmul_backend: str = "auto"):
        super().__init__()
        self.peft, self.value_head = peft, value_head
        self.critic, self.temperature, self.exact_training = critic, temperature, exact_training
        self.autocast = autocast  # one precision context for every pass (precision.py)
        self.compute_dtype = compute_dtype(peft, autocast)
        self.pad_id = pad_id  # an id inside the embedding: what padded positions hold when they reach the model
        self.split = None  # SplitTrunk when the frozen-prefix cache is on
        self.share_prefix = False  # run a batch's shared prompt prefix once per pass (verify_shared_prefix)
        self.cpu_sampling = cpu_sampling  # on CPU, draw tokens without torch.multinomial (sampling.py)
        self.cpu_matmul_backend = cpu_matmul_backend  # on CPU, who computes decoding's products (cpu_matmul.py)
        base = peft.get_base_model()
        self._keep_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._cache_kw, self._window = cache_argument(base), sliding_window(base)
        head = base.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(_contiguous_input)

    @property
    def device(self) -> torch.device:
        return next(self.value_head.parameters()).device

    @contextmanager
    def precision(self):
        """The precision context every pass runs in: sampling, θ_old, training, reference, critic, KL.

        Under autocast, PEFT's cast of a LoRA layer's input to the adapter's (fp32) dtype is skipped: autocast casts
        it straight back to bf16 for the matmul — a bit-exact round trip — and that second copy is what the backward
        kept, one more activation per adapted module beside the base layer's (θ_old's forward kept 38 MiB less for
        SmolLM2-135M with q/v adapted on all 30 layers, 8 prompts × 32 tokens). On CPU in 16-bit, attention that needs
        a gradient keeps torch's forward and gets a cheaper backward, and on CPU grouped-query attention runs without
        repeated key/value heads (`cpu_attention.py`, `grouped_kv.py`)."""
        with precision_context(self.device, self.autocast), \
                disable_input_dtype_casting(self.peft, active=self.autocast is not None), \
                cheaper_attention_backward(self.device, self.compute_dtype, self.peft), \
                grouped_kv_attention(self.device, self.peft):
            yield

    def _inputs(self, ids, mask):
        """Padded positions hold `pad_id`: a tokenizer's pad token may lie outside the embedding (TRL's PPO examples
        add `[PAD]` without resizing); masked positions never influence attended ones, so any in-range id is exact."""
        return ids.masked_fill(~mask.bool(), self.pad_id)

    # -- passes ---------------------------------------------------------------------------------------------------
    def _mode(self, training: bool):
        """Training passes run in train mode (and leave the model there, so gradient checkpointing recomputes the
        same function in the backward pass); the others in eval mode."""
        if training:
            self.peft.train()
            return nullcontext()
        return eval_mode(self.peft)

    def _lm(self, ids, mask, n_resp, h_low, want_hidden: bool, want_logprobs: bool = True):
        """The model's own forward → (logits/T, log-probs of the response tokens ids[:, −R:], last hidden states) at
        the R states that predict the response (`logprobs.response_logprobs`: one gradient buffer in the backward)."""
        captured = {}
        hook = None
        if want_hidden:  # the LM head's input is the final hidden state, whatever the architecture calls it
            head = self.peft.get_base_model().get_output_embeddings()
            hook = head.register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
        ids = self._inputs(ids, mask)  # what the model reads, and the response tokens the log-probs are of
        kw = {"logits_to_keep": n_resp + 1} if self._keep_logits else {}
        try:
            with self.precision():
                if h_low is None:
                    out = self._batch_forward(self.peft, ids, mask, n_resp, **kw)
                else:
                    with self.split.upper_only():
                        out = self.peft(inputs_embeds=h_low, attention_mask=mask, position_ids=positions(mask),
                                        use_cache=False, **kw)
        finally:
            if hook is not None:
                hook.remove()
        if want_logprobs:
            logits, logp = response_logprobs(out.logits, ids[:, -n_resp:], self.temperature)
        else:
            logits, logp = response_logits(out.logits, n_resp, self.temperature), None
        h = captured["h"] if want_hidden else None
        if h is not None and h.shape[0] != ids.shape[0]:  # a packed pass: the head read the rows' kept positions as
            h = h.reshape(ids.shape[0], -1, h.shape[-1])   # one sequence (`shared_prefix.packed_forward`)
        h = h[:, -n_resp - 1 : -1] if h is not None else None
        return logits, logp, h

    def _batch_forward(self, model, ids, mask, n_resp: int, **kw):
        """`model` (the PeftModel or its trunk) on a padded batch; the prompt prefix its rows share runs once when
        sharing is on, the batch is long enough to share and fits any sliding window (`shared_prefix.py`)."""
        n_shared = self._n_shared(ids, mask, n_resp)
        if n_shared:
            return shared_forward(model, trunk_of(self.peft), ids, mask, n_shared, self._cache_kw, **kw)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **kw)

    def _n_shared(self, ids, mask, n_resp: int, new_tokens: int = 0) -> int:
        """How many leading tokens a pass over this batch runs once: its rows' common prompt head where sharing is
        on, pays, and the batch (with `new_tokens` still to be sampled) fits any sliding window; else 0."""
        if not self.share_prefix or activation_checkpointing_on(self.peft):  # checkpointed layers drop a cache
            return 0
        return shared_length(ids, mask, n_resp, self._window, new_tokens)

    def _critic_hidden(self, ids, mask, n_resp, h_low):
        trunk = trunk_of(self.peft)
        with active_adapter(self.peft, CRITIC), self.precision():
            if h_low is None:
                h = self._batch_forward(trunk, self._inputs(ids, mask), mask, n_resp).last_hidden_state
            else:
                with self.split.upper_only():
                    h = trunk(inputs_embeds=h_low, attention_mask=mask, position_ids=positions(mask),
                              use_cache=False).last_hidden_state
        return h[:, -n_resp - 1 : -1]

    def forward(self, ids, mask, n_resp: int, h_low=None, training: bool = True):
        """The training pass (`training=False`: the same pass in eval mode, for θ_old when dropout is kept in
        training). ids, mask: [B, P+R] → logits/T [B, R, V], values [B, R], log-probs of ids[:, −R:] [B, R]."""
        with self._mode(training=training):
            logits, logp, h = self._lm(ids, mask, n_resp, h_low, want_hidden=self.critic == "shared")
            if self.critic == "separate":
                h = self._critic_hidden(ids, mask, n_resp, h_low)
        with full_precision(h.device):  # the value head stays fp32 whatever the trunk ran in
            return logits, self.value_head(h.float()).squeeze(-1), logp

    @torch.no_grad()
    def logits(self, ids, mask, n_resp: int, h_low=None, reference: bool = False) -> torch.Tensor:
        """π (or π_ref with `reference`) logits/T at the response states, eval mode. → [B, R, V]"""
        with self._mode(training=False), (adapters_disabled(self.peft) if reference else nullcontext()):
            return self._lm(ids, mask, n_resp, h_low, want_hidden=False, want_logprobs=False)[0]

    @torch.no_grad()
    def lower(self, ids, mask):
        """The frozen-prefix cache: hidden state entering the lowest adapted layer, or None when disabled."""
        if self.split is None:
            return None
        with self._mode(training=False), self.precision():
            return self.split.lower(self._inputs(ids, mask), mask, positions(mask))

    @torch.no_grad()
    def verify_shared_prefix(self) -> str | None:
        """Turn prompt-prefix sharing on where this model computes the same distribution with it: on a batch of
        random tokens whose 5 rows share a head (suffixes of 1–4 tokens, one response cut short), the mean per-token
        KL between the shared and the full pass must be rounding (`sampling_tolerance` of the compute dtype).
        → None when on, else why it stays off. Draws from its own generator: the run's random stream is untouched."""
        recurrent = recurrent_layers(self.peft.get_base_model())
        if recurrent:  # decided by the config alone: no batch to build
            return (f"{type(self.peft.get_base_model()).__name__} has recurrent layers ({', '.join(recurrent)}): their "
                    f"state would run through the masked columns between the shared head and each row's remainder")
        embedding = self.peft.get_base_model().get_input_embeddings()
        vocab = getattr(embedding, "base_layer", embedding).num_embeddings  # under LoRA on the embedding too
        g = torch.Generator().manual_seed(0)
        suffixes = (1, 2, 4, 1, 3)
        head = max(MIN_SHARED_TOKENS, -(-MIN_SAVED_ROWS // (len(suffixes) - 1)))  # a batch that shares
        shared, n_resp = torch.randint(vocab, (head,), generator=g), 3
        rows = [torch.cat([shared, torch.randint(vocab, (k + n_resp,), generator=g)]) for k in suffixes]
        ids, mask = pad_ids([r.tolist() for r in rows], self.pad_id, side="left", device=self.device)
        mask[0, -1] = 0  # a response that ended early
        if self._window is not None and ids.shape[1] >= self._window:
            return (f"the model's sliding window ({self._window} tokens) is shorter than any batch worth sharing "
                    f"(sharing is exact only where no window cuts)")
        try:
            self.share_prefix = True
            shared_pass = self.logits(ids, mask, n_resp).double().log_softmax(-1)
            self.share_prefix = False
            full_pass = self.logits(ids, mask, n_resp).double().log_softmax(-1)
        except Exception as e:  # an architecture whose cache cannot be repeated or attended across
            self.share_prefix = False
            return f"{type(self.peft.get_base_model()).__name__} cannot run it ({type(e).__name__}: {e})"
        kl = rlm.full_kl(full_pass, shared_pass)[mask[:, -n_resp:].bool()].mean()
        if not kl <= sampling_tolerance(self.compute_dtype):
            return (f"{type(self.peft.get_base_model()).__name__} gives another distribution with it (mean per-token "
                    f"KL {float(kl):.3g} against the full pass)")
        self.share_prefix = True
        error = None
        try:  # sampling starts from the prefilled head: what it samples from is the training pass's, to rounding
            with forked_rng(self.device):
                kl, _, _ = self._sampled_vs_training(ids[:, :-n_resp], mask[:, :-n_resp], None, 2)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        if error is not None or not kl <= sampling_tolerance(self.compute_dtype):
            self.share_prefix = False
            return (f"{type(self.peft.get_base_model()).__name__}'s generate() does not sample the training pass's "
                    f"distribution from a prefilled head ({error or f'mean per-token KL {kl:.3g}'})")
        return None

    # -- sampling -----------------------------------------------------------------------------------------------
    def generation_kwargs(self, tokenizer, max_new_tokens, top_p, stop_on_eos) -> dict:
        """Pure ancestral sampling from softmax(z/T): every logits processor a model's generation_config might add
        (top-k 50, repetition penalty, minimum length, …) is switched off, so `generate` samples exactly π. On CPU the
        decoding loop draws tokens without torch.multinomial (`sampling.py`)."""
        loop = cpu_decoder(self.peft, self.cpu_matmul_backend) if self.cpu_sampling else {}
        return dict(**loop, do_sample=True, temperature=self.temperature, top_p=top_p, top_k=0, min_length=0,
                    min_new_tokens=None, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None,
                    suppress_tokens=None, begin_suppress_tokens=None, typical_p=1.0, epsilon_cutoff=0.0,
                    eta_cutoff=0.0, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                    eos_token_id=stop_token_ids(tokenizer, self.peft) if stop_on_eos else None)

    def _sample(self, p_ids, p_mask, generation_kwargs: dict):
        """`generate` on left-padded prompts [B, P] → (its output, the width of the input it was given: the sampled
        tokens start there). Where the passes share the rows' common prompt head, so does sampling: that head is
        prefilled once and generate's prefill runs the rest (`shared_prefix.prefilled_prompts`)."""
        n_shared = self._n_shared(p_ids, p_mask, 0, generation_kwargs["max_new_tokens"])
        ids, mask, cache = p_ids, p_mask, {}
        if n_shared:
            ids, mask, prefilled = prefilled_prompts(trunk_of(self.peft), p_ids, p_mask, n_shared)
            cache = {self._cache_kw: prefilled}
        return self.peft.generate(input_ids=ids, attention_mask=mask, **cache, **generation_kwargs), ids.shape[1]

    def _sampled_vs_training(self, p_ids, p_mask, tokenizer, n_new: int) -> tuple[float, float, int]:
        """Sample `n_new` tokens after the prompts with their per-step distributions (`output_scores`), then run the
        training pass on the result → (mean per-token KL(sampled-from ‖ training pass), max |Δ log p|, tokens the
        sampler gave probability 0)."""
        kw = {**self.generation_kwargs(tokenizer, n_new, 1.0, False), "output_scores": True,
              "return_dict_in_generate": True}
        with eval_mode(self.peft), self.precision():
            g, width = self._sample(p_ids, p_mask, kw)
        new = g.sequences[:, width:]
        scores = torch.stack(g.scores, 1).double().log_softmax(-1)  # what was sampled from, per step
        full_mask = torch.cat([p_mask, torch.ones_like(new)], 1)
        mine = self._checked_pass(torch.cat([p_ids, new], 1), full_mask, new.shape[1]).double().log_softmax(-1)
        finite = torch.isfinite(scores) & torch.isfinite(mine)
        gap = (scores - mine).abs()[finite].max() if finite.any() else torch.tensor(0.0)
        p = scores.exp()
        # a KL is ≥ 0, but two distributions equal up to rounding can sum to −1e-17: report that as 0
        per_token = torch.where(finite, p * (scores - mine), torch.zeros_like(p)).sum(-1).clamp(min=0)
        return float(per_token.mean()), float(gap), int((~torch.isfinite(scores)).sum())

    @torch.no_grad()
    def generate(self, batch, tokenizer, max_new_tokens: int, top_p: float = 1.0, stop_on_eos: bool = True,
                 reference: bool = False) -> Rollout:
        """Sample one response per prompt. batch: list of (prompt, token ids). `reference`: sample from π_ref."""
        device = self.device
        p_ids, p_mask = pad_ids([ids for _, ids in batch], self.pad_id, side="left", device=device)
        t0 = time.perf_counter()
        with eval_mode(self.peft), (adapters_disabled(self.peft) if reference else nullcontext()), self.precision():
            gen, width = self._sample(p_ids, p_mask, self.generation_kwargs(tokenizer, max_new_tokens, top_p,
                                                                             stop_on_eos))
        resp = gen[:, width:]
        gen_seconds = time.perf_counter() - t0
        if resp.shape[1] == 0:
            resp = torch.full((len(batch), 1), self.pad_id, dtype=torch.long, device=device)
        # Response mask from the first EOS (inclusive), never from pad ids: pad == EOS for SmolLM2
        stop = torch.tensor(stop_token_ids(tokenizer, self.peft), dtype=resp.dtype, device=resp.device)
        is_eos = torch.isin(resp, stop) if stop_on_eos else torch.zeros_like(resp, dtype=torch.bool)
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(resp[:, 0], resp.shape[1]))
        resp_mask = (torch.arange(resp.shape[1], device=device)[None] <= first[:, None]).float()
        stopped = is_eos.any(1)
        has_eos = stopped if stop_on_eos else torch.isin(resp, stop).any(1)
        resp = torch.where(resp_mask.bool(), resp, torch.full_like(resp, self.pad_id))
        n = resp_mask.sum(1).long()
        completion_ids = [resp[i, : int(n[i])].tolist() for i in range(len(batch))]
        prompts = [p for p, _ in batch]
        texts = completion_texts(tokenizer, [ids for _, ids in batch], prompts,
                                 [c[:-1] if h else c for c, h in zip(completion_ids, stopped.tolist())])
        columns = {k: [row.columns[k] for row in batch] for k in getattr(batch[0], "columns", {})}
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
        return Rollout(ids=torch.cat([p_ids, resp], 1), mask=torch.cat([p_mask, resp_mask.long()], 1), resp=resp,
                       resp_mask=resp_mask, has_eos=has_eos, lengths=(n - stopped.long()).float(), prompts=prompts,
                       completions=completions, completion_ids=completion_ids, texts=texts, gen_seconds=gen_seconds,
                       columns=columns)

    # -- exact KL -----------------------------------------------------------------------------------------------
    @staticmethod
    def sequence_kl(logits, ref_logits, resp_mask) -> torch.Tensor:
        """Exact KL(π‖π_ref) per sequence: Σ over response states of the full-vocabulary KL, in float64 (the sum of
        many small terms is what the guard compares with δ), EXACT_KL_STATES (16) response states at a time, so the
        float64 temporaries are [16, V], not [B, R, V] nor [R, V] (at 7B scale, R = 256 and a 152k vocabulary, one
        sequence's were 1.6 GB). Each state's KL is computed on its own row, so the blocks change no bit. logits and
        ref_logits: [B, R, V] z = logits/T (or log-probs: any shift per row gives the same result), both normalised
        here the same way in float64 — so equal inputs give a KL of exactly 0. (A float32 log-softmax is not normalised
        to float64 precision, which made KL(π_θ0‖π_ref) read slightly negative; normalising an already normalised
        side again still left ±1e-17.) → [B]"""
        B, R = resp_mask.shape
        out = torch.empty(B, dtype=torch.float64, device=logits.device)
        kl = torch.empty(R, dtype=torch.float64, device=logits.device)
        for b in range(B):
            for r in range(0, R, EXACT_KL_STATES):
                rows = slice(r, r + EXACT_KL_STATES)
                kl[rows] = rlm.full_kl(logits[b, rows].double().log_softmax(-1),
                                     ref_logits[b, rows].double().log_softmax(-1))
            out[b] = (kl * resp_mask[b].double()).sum()
        return out

    def _checked_pass(self, ids, mask, n_resp):
        """What the start-up check compares: the training forward, with gradients as θ_old's first pass runs it
        (exact training), or the eval-mode pass the KL guard measures in when dropout is kept in training."""
        if not self.exact_training:
            return self.logits(ids, mask, n_resp)
        states = [(mod, mod.training) for mod in self.peft.modules()]
        try:
            with torch.enable_grad():
                return self(ids, mask, n_resp)[0].detach()
        finally:
            for mod, t in states:
                mod.training = t

    @torch.no_grad()
    def start_up_checks(self, tokenizer, prompts_ids: list[list[int]], top_p: float,
                        compute_dtype: torch.dtype = torch.float32, position_limit: int | None = None) -> dict:
        """What the guarantees rest on, measured on two real prompts, in the precision training will use:
          init_vs_reference     max |logit| gap, policy at θ₀ against the reference (adapters off);
          train_vs_eval         max |logit| gap, the training pass against the eval-mode pass;
          training_vs_reference KL(training pass at θ₀ ‖ reference), nats per sequence — the KL the guard and the
                                penalty see before any update: zero, since both are the same full forward;
          sampling_vs_training  mean per-token KL(what `generate` sampled from ‖ the training pass): rounding only
                                (KV-cache decoding vs a full forward), bounded by `sampling_tolerance(dtype)`.
        The training pass is this module's forward: under DDP the wrapper adds nothing to it (the precision
        context is inside; accelerate's autocast, when on, wraps this very forward with the same dtype).
        `position_limit`: the model's positions; the sampled tokens stay within them (a learned position table, GPT-2's,
        is indexed past its end otherwise)."""
        batch = [(None, ids) for ids in prompts_ids[:2]]
        ids, mask = pad_ids([b for _, b in batch], self.pad_id, side="left", device=self.device)
        if ids.shape[1] < 2:  # one-token prompts (a word, no BOS): no state to compare; any real token continues them
            ids, mask = torch.cat([ids, ids], 1), torch.cat([mask, mask], 1)
        n = ids.shape[1] - 1
        pol = self.logits(ids, mask, n)
        ref = self.logits(ids, mask, n, reference=True)
        m = mask[:, 1:].bool()
        out = {"compute_dtype": str(compute_dtype).replace("torch.", ""),
               "init_vs_reference": float((pol[m] - ref[m]).abs().max())}
        trained = self._checked_pass(ids, mask, n)
        out["train_vs_eval"] = float((trained[m] - pol[m]).abs().max())
        kl = self.sequence_kl(trained, ref, m.float())
        out["training_vs_reference"] = float(kl.abs().max())
        out["training_vs_reference_tolerance"] = SAME_PASS_KL_TOLERANCE
        n_new = 8 if position_limit is None else min(8, position_limit - ids.shape[1])
        if top_p >= 1.0 and torch.isfinite(pol[m]).all() and n_new >= 1:
            kl, gap, masked = self._sampled_vs_training(ids, mask, tokenizer, n_new)
            out["sampling_vs_training"], out["sampling_vs_training_max_dlogp"] = kl, gap
            out["sampling_vs_training_tolerance"] = sampling_tolerance(compute_dtype)
            out["sampling_masked_tokens"] = masked
        return out
