"""Adapters on one shared base, through PEFT's own bookkeeping: which parameters belong to an adapter, which
train, which adapter is active, and the checks that training really reaches them.

Every trainer decides trainability here, in one place. Parameter names are never matched by substring: PEFT
names embedding LoRA weights `lora_embedding_A.<adapter>` (no trailing dot) and DoRA adds a magnitude vector, so
the adapter's own `adapter_layer_names` are the only reliable list.
"""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager

import torch
from torch import nn

# LoRA pairs (A, B): ΔW = B·A. The gradient of one factor is the other factor times dL/dy, so a factor whose partner
# is non-zero must receive gradient as soon as training reaches the layer. At PEFT's init B = 0 for linears (check B)
# and A = 0 for embeddings (check A); an adapter resumed from training has both non-zero (check both).
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def wrap_with_peft(model, config, adapter_name: str):
    """`peft.get_peft_model`, without the FutureWarning it raises on transformers 5 (PEFT reads the deprecated
    `is_gradient_checkpointing` alias on every wrap): noise a user can do nothing about, printed on every run."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped = get_peft_model(model, config, adapter_name=adapter_name)
    # PEFT injects the LoRA layers into `model` in place: a later trainer handed the same object (a sweep, reward
    # model then PPO on one loaded base) finds them there, inactive under its own adapter (`refuse_loaded_adapters`)
    model._rlhf_ext_injected = True
    return wrapped


def _tuner_modules(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in model.named_modules():
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            yield name, module


def adapter_parameters(model, adapter: str) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to `adapter` (LoRA A/B, embedding LoRA, DoRA magnitudes, modules_to_save copies),
    by full name. Taken from each PEFT layer's `adapter_layer_names`, so new adapter types are covered by PEFT."""
    from operator import attrgetter

    out = {}
    for mname, module in _tuner_modules(model):
        for layer_name in module.adapter_layer_names:
            try:
                holder = attrgetter(layer_name)(module)
            except AttributeError:
                continue
            if adapter not in holder:
                continue
            part = holder[adapter]
            params = [("", part)] if isinstance(part, nn.Parameter) else part.named_parameters()
            for pname, p in params:
                out[".".join(x for x in (mname, layer_name, adapter, pname) if x)] = p
    return out


def adapted_modules(model, adapter: str) -> dict[str, nn.Module]:
    """The PEFT layers (LoRA-wrapped linears/embeddings, modules_to_save wrappers) that hold `adapter`, by name."""
    from operator import attrgetter

    out = {}
    for mname, module in _tuner_modules(model):
        for layer_name in module.adapter_layer_names:
            try:
                if adapter in attrgetter(layer_name)(module):
                    out[mname] = module
            except AttributeError:
                continue
    return out


def set_trainable(model, adapters) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze exactly the parameters of `adapters`. Returns them (optimizer order)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for a in adapters:
        for p in adapter_parameters(model, a).values():
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise ValueError(f"Adapter(s) {list(adapters)} have no parameters on this model; check the PEFT config's "
                         f"target_modules (they matched no module?).")
    return params


@contextmanager
def active_adapter(model, name: str):
    """Run with adapter `name` active, leaving requires_grad as it was.

    Not `trl.trainer.utils.use_adapter`: PEFT's `set_adapter` (which it calls) unfreezes the activated adapter and
    freezes every other one, so after it the critic or a reward member would silently stop training."""
    prev = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.base_model.set_adapter(name)
    # at once, not only on leaving: inside, the activated adapter must stay as frozen as it was (heads_only's LoRA):
    # unfrozen, the forward built a graph through the frozen trunk that the backward then walked for nothing, and a
    # layer under non-reentrant activation checkpointing, recomputed after leaving, saved other tensors (CheckpointError)
    for p, f in flags:
        p.requires_grad_(f)
    try:
        yield
    finally:
        model.base_model.set_adapter(prev)
        for p, f in flags:
            p.requires_grad_(f)


@contextmanager
def adapters_disabled(model):
    """π_ref: every adapter off, on the whole model (embeddings and LM head included), requires_grad untouched.

    Each PEFT layer's own switch (`_disable_adapters`, what its `enable_adapters` sets, without the requires_grad
    changes that come with it) and the model's (`_adapters_disabled`), each put back as it was on leaving. Not PEFT's
    `disable_adapter()`: leaving it re-runs `set_adapter(active)`, which freezes every inactive adapter — the critic
    and each reward member would silently stop training after the first reference pass —, and entering it reads
    every layer's status (`get_model_status`), 15 ms a reference pass at 135M parameters."""
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning or config.is_adaption_prompt:  # no per-layer switch: PEFT swaps the forward
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            with model.disable_adapter():
                yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)
        return
    layers = [(m, m._disable_adapters) for _, m in _tuner_modules(model)]
    was = model._adapters_disabled
    for m, _ in layers:
        m._disable_adapters = True
    model._adapters_disabled = True
    try:
        yield
    finally:
        for m, d in layers:
            m._disable_adapters = d
        model._adapters_disabled = was


@contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode (no dropout, no other train-only behaviour) for passes without a backward —
    sampling, reference, KL measurements, scoring — then each module's mode restored."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in states:
            m.training = t


def zero_dropout(model: nn.Module) -> nn.Module:
    """Switch dropout off for good, in any mode: every nn.Dropout (LoRA's included) gets p = 0, and every float
    attribute named like a dropout rate (Llama's `attention_dropout`, OPT's `dropout`, …) and config field is set to
    0. Training passes then compute exactly what eval-mode passes compute (checked at start-up by the PPO trainer),
    while staying in train mode so gradient checkpointing, which transformers gates on `training`, still works —
    and recomputes the same function in the backward pass.

    A router with jitter (Mixtral's `jitter_noise`, Phi-3.5-MoE's `router_jitter_noise`, whose router also draws its
    experts by Gumbel sampling in training) is held in eval mode instead: its rate can be more than noise (Phi-3.5-MoE
    thresholds with it in eval too), but eval mode is what every other pass computes. Gradients still flow."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        rates = [(name, value) for name, value in vars(m).items() if isinstance(value, float) and value > 0]
        for name, _ in rates:
            if "dropout" in name.lower():
                setattr(m, name, 0.0)
        if any("jitter" in name.lower() for name, _ in rates):
            _hold_in_eval(m)
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            for name, value in cfg.to_dict().items():
                if "dropout" in name.lower() and isinstance(value, float) and value > 0:
                    setattr(cfg, name, 0.0)
    return model


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _hold_in_eval(module: nn.Module) -> None:
    """`module` and its children in eval mode, whatever `model.train()` later asks (a method bound to the module:
    a deep copy keeps it, bound to the copy)."""
    module.train = types.MethodType(_eval_only, module)
    module.train()


def first_step_grad_params(model, adapters) -> dict[str, nn.Parameter]:
    """The parameters of `adapters` that must have a non-zero gradient after the first backward pass: each LoRA
    factor whose partner factor is non-zero."""
    out = {}
    for a in adapters:
        params = adapter_parameters(model, a)
        for n, p in params.items():
            for x, y in _PAIRS:
                for mine, other in ((x, y), (y, x)):
                    if f".{mine}.{a}" in f"{n}." and p.requires_grad:
                        partner = params.get(n.replace(f".{mine}.{a}", f".{other}.{a}"))
                        if partner is not None and bool(torch.any(partner != 0)):
                            out[n] = p
    return out


REACH_TRIES = 8  # optimizer steps an all-zero gradient may be a zero signal before it is taken for a broken graph


def check_gradients_reached(params: dict[str, nn.Parameter], trainer: str, quantized: bool = False,
                            final: bool = True, reached: frozenset = frozenset(), steps: int = 1) -> bool:
    """Raise if some adapter matrix got no gradient at the first optimizer step (training would silently do
    nothing there). Call between backward and optimizer.step. Returns whether it decided: with `final=False`, a
    step where the matrices not reached all have a gradient of exact zeros (the graph intact, the signal zero: a
    first batch nobody earned a reward on, with a zero-initialised value head every advantage and return is 0) is
    left undecided — check again at the next step (`REACH_TRIES`). No gradient at all (None) is decided at once.

    `reached`: matrices that had a non-zero gradient at an earlier step (`GradientReachCheck`), `steps`: the steps
    looked at so far (for the message).

    Biases are left out: a score head's bias cancels in Bradley–Terry's r_chosen − r_rejected, so its gradient is
    exactly 0 with the graph intact, and a detached graph shows in the weights anyway."""
    params = {n: p for n, p in params.items() if not _is_bias(n, p)}
    dead = [n for n, p in params.items() if n not in reached and (p.grad is None or not torch.any(p.grad != 0))]
    if not dead:
        return True
    if not final and all(params[n].grad is not None for n in dead):
        return False
    cause = ("a 4-bit base whose layers have no backward kernel (bitsandbytes' CPU inference layout: "
             "rlhf_ext.models.keep_4bit_trainable(model) keeps the trainable layout)" if quantized else
             "a detached graph (gradient checkpointing with use_reentrant=True and no input gradients, or a custom "
             "forward under torch.no_grad), or a loss that is exactly zero there (PPO advantages whitened over a "
             "single response token)")
    raise RuntimeError(
        f"{trainer}: {len(dead)} of {len(params)} adapter matrices received no gradient "
        f"{'at the first optimizer step' if steps <= 1 else f'in the first {steps} optimizer steps'}, so they would "
        f"never train: {', '.join(dead[:6])}{' …' if len(dead) > 6 else ''}. Likely cause: "
        f"{cause}. If these modules are deliberately outside the loss, drop them from the LoRA target_modules."
    )


class GradientReachCheck:
    """`check_gradients_reached` for one trainer, called at each optimizer step until it has decided (a step of
    all-zero gradients leaves it undecided, `REACH_TRIES` times at most). A matrix counts as reached once it has had a
    non-zero gradient at any of these steps: one whose gradient is zero at a later step (PPO's value clip saturated,
    its advantages whitened to 0) is not a detached graph.

    `signal=False` says the step's whole gradient was exactly zero — value head and every trained parameter: a batch
    with no learning signal (nobody earned a reward and a zero-initialised critic already predicts that, or every
    sample dropped). Such a step tells nothing about the graph and is not counted, unless a matrix got no gradient
    at all (None), which is decided at once."""

    def __init__(self, params: dict[str, nn.Parameter], trainer: str, quantized: bool = False,
                 gated: dict[str, nn.Parameter] | None = None):
        self.params, self.trainer, self.quantized = params, trainer, quantized
        self.tries, self.reached, self._done = 0, set(), False
        # `gated`: matrices whose gradient comes through one path that may carry none with the graph intact (a
        # separate critic's adapter, through the value head: its weight 0, or every value token clipped); checked
        # on their own, only at the steps the caller says that path carried a signal (`gated_signal`)
        self.gated = GradientReachCheck(gated, trainer, quantized) if gated else None

    @property
    def done(self) -> bool:
        return self._done and (self.gated is None or self.gated.done)

    @done.setter
    def done(self, value: bool) -> None:
        self._done = value
        if self.gated is not None:
            self.gated.done = value

    def __call__(self, signal: bool = True, gated_signal: bool = True) -> None:
        if self.gated is not None and gated_signal and not self.gated.done:
            self.gated(signal)
        if self._done:
            return
        if not signal and all(p.grad is not None for p in self.params.values()):
            return  # (every gradient is 0: nothing reached either)
        grads = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        nonzero = torch.stack([g.ne(0).any() for _, g in grads]).tolist() if grads else []  # one device sync
        self.reached |= {n for (n, _), hit in zip(grads, nonzero) if hit}
        self.tries += 1
        self._done = check_gradients_reached(self.params, self.trainer, self.quantized,
                                             final=self.tries >= REACH_TRIES, reached=frozenset(self.reached),
                                             steps=self.tries)


def _is_bias(name: str, param: nn.Parameter) -> bool:
    return name.rsplit(".", 1)[-1] == "bias" and param.dim() == 1
