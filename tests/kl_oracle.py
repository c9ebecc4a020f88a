"""An exact KL(π‖π_ref) computed independently of rlhf_ext's code paths, to test the hard-KL guarantee against.

Per sequence, without padding, attention masks or position ids: the prompt tokens (attention mask 1) followed by
the sampled response (up to and including its EOS), through the model's own forward in eval mode (no dropout);
π_ref is the same model under PEFT's `disable_adapter()` on the whole model. log-softmax of logits/T in float64,
summed over the response states, averaged over sequences. `autocast`: the precision the policy is defined in (a bf16
run's π is its bf16 forward), applied here with torch's own autocast around the plain forward. Every linear computes
torch's own `F.linear` here, also where the trainer sends the frozen base through oneDNN (rlhf_ext/cpu_linear.py).
"""

from __future__ import annotations

import torch

from rlhf_ext.cpu_linear import is_routed


@torch.no_grad()
def exact_batch_kl(peft_model, rollout, temperature: float, autocast: torch.dtype | None = None) -> float:
    states = [(m, m.training) for m in peft_model.modules()]
    routed = {m: m.__dict__.pop("forward") for m in peft_model.modules() if is_routed(m)}  # torch's kernel, not ours
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    peft_model.eval()
    ctx = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    try:
        kls = []
        P = rollout.ids.shape[1] - rollout.R
        for b in range(rollout.ids.shape[0]):
            prompt = rollout.ids[b, :P][rollout.mask[b, :P].bool()]
            resp = torch.tensor(rollout.completion_ids[b], dtype=torch.long, device=prompt.device)
            seq = torch.cat([prompt, resp])[None]
            start = len(prompt) - 1
            with ctx:
                pi_logits = peft_model(input_ids=seq).logits
                with peft_model.disable_adapter():
                    ref_logits = peft_model(input_ids=seq).logits
            pi = (pi_logits[0, start : start + len(resp)].double() / temperature).log_softmax(-1)
            ref = (ref_logits[0, start : start + len(resp)].double() / temperature).log_softmax(-1)
            kls.append(float((pi.exp() * (pi - ref)).sum()))
        return sum(kls) / len(kls)
    finally:
        for m, t in states:
            m.training = t
        for p, f in flags:
            p.requires_grad_(f)
        for m, forward in routed.items():
            m.forward = forward
