"""The trained policy, leaving the trainer: a standard PEFT adapter (or merged weights) with tokenizer and model
card, the value head and critic adapter beside it under `critic/`, and the same folder pushed to the Hub."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..integrity import atomic_folder, save_tensors
from ..hub import card_base_model
from ..models import base_reference, four_bit_layout, loadable_reference
from .policy import CRITIC

# What makes a folder load one way or the other: transformers loads a folder holding both as the merged weights with
# the adapter applied again on top (LoRA counted twice). A save of one kind removes the other kind's files.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
MERGED_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json"]


def save_policy(tr, out, merge: bool = False, card: dict | None = None, critic: bool = True) -> None:
    """Save the policy where `PeftModel.from_pretrained(base, out)` finds it: a standard PEFT adapter at `out` (or,
    with `merge=True`, merged full weights), the tokenizer and a model card. The value head (and the critic adapter)
    go to `out/critic/`, out of the way of loaders. `card`: extra model-card metadata (`hub.with_card_metadata`);
    `critic=False`: the card is for a copy without `critic/` (what push_to_hub uploads by default)."""
    from peft import get_peft_model_state_dict

    from ..hub import with_card_metadata

    peft = tr.policy.peft
    with atomic_folder(out) as tmp:
        if merge:
            if tr.quantized:
                raise ValueError("Cannot merge LoRA into a 4-bit base; save the adapter (merge=False) or reload "
                                 "the base in bf16/fp32, load the adapter and merge there.")
            import copy

            merged = copy.deepcopy(peft)
            _untie_output_embeddings(merged.get_base_model())  # else merging an lm_head LoRA edits the inputs too
            merged.base_model.set_adapter(tr.policy_adapter)
            merged.merge_and_unload(adapter_names=[tr.policy_adapter]).save_pretrained(tmp, safe_serialization=True)
        else:
            cfg = copy_config(peft.peft_config[tr.policy_adapter],
                              loadable_reference(tr.model_name) if tr.model_name else None)
            cfg.save_pretrained(tmp)
            state = get_peft_model_state_dict(peft, adapter_name=tr.policy_adapter)
            save_tensors(state, tmp / "adapter_model.safetensors")
        (tmp / "critic").mkdir()
        save_tensors(tr.policy.value_head.state_dict(), tmp / "critic" / "value_head.safetensors")
        if tr.args.critic == "separate":
            peft.save_pretrained(tmp / "critic", selected_adapters=[CRITIC], safe_serialization=True)
        tr.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(with_card_metadata(model_card(tr, merged=merge, critic=critic), card or {}))
    for pattern in ADAPTER_FILES if merge else MERGED_FILES:  # an earlier save of the other kind into `out`
        for stale in Path(out).glob(pattern):
            stale.unlink()


def push_policy(tr, repo_id: str, critic: bool = False, token=None, revision=None,
                commit_message: str | None = None, merge: bool = False, card: dict | None = None) -> str:
    """Upload what `save_policy` writes to `repo_id` (`merge=True`: the merged weights); `critic=True` also uploads
    `critic/` (value head, critic adapter)."""
    import shutil
    import tempfile

    from ..hub import push_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        save_policy(tr, folder, merge=merge, card=card, critic=critic)
        if not critic:
            shutil.rmtree(folder / "critic")
        return push_folder(folder, repo_id, private=tr.args.hub_private_repo, token=token or tr.args.hub_token,
                           revision=revision, commit_message=commit_message or "Upload PPO policy with rlhf_ext",
                           delete_patterns=ADAPTER_FILES if merge else MERGED_FILES)


def model_card(tr, merged: bool = False, critic: bool = True) -> str:
    from ..hub import framework_versions, yaml_value

    a, last = tr.args, (tr._metrics_history[-1] if tr._metrics_history else {})
    ref, hub_base = base_reference(tr.model_name) if tr.model_name else None, card_base_model(tr.model_name)
    # a card is shared: it names a Hub id or the embedded default, never this machine's (private) folder
    named = hub_base or (ref if ref and not Path(ref).is_absolute() else None)
    base = f"`{named}`" if named else (f"a local folder (`{Path(ref).name}`)" if ref else "unknown")
    final = {k: last[k] for k in ("objective/scores", "objective/kl", "kl/after_update", "response/length_mean",
                                  "response/eos_rate") if k in last}
    final.update({k: v for k, v in last.items() if k.startswith("audit/")})
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in final.items())
    heldout = "\n".join(f"| {k} | {v:.4g} |" for k, v in (tr.heldout or {}).items())
    heldout_at = getattr(tr, "heldout_iteration", None)
    kl = (f"`fixed` (β = {a.init_kl_coef})" if a.kl_controller == "fixed" else
          f"`{a.kl_controller}` (δ = {a.kl_target}, initial β = {a.init_kl_coef})")
    layout = four_bit_layout(tr.policy.peft)  # the quant type, as a reward artifact records it
    base_precision = f"; trained on a 4-bit base ({layout['quant_type'] if layout else 'bitsandbytes'})" \
        if tr.quantized else ""
    usage = (("```python\nfrom transformers import AutoModelForCausalLM\n\n"
              "policy = AutoModelForCausalLM.from_pretrained(\"<this folder or repo id>\")  # LoRA merged in\n```\n\n")
             if merged else
             ("```python\nfrom peft import PeftModel\nfrom rlhf_ext.models import load_model  # hub ids, folders, "
              "rlhf_ext's embedded models\n"
              f"base = load_model(\"{named or '<the base model: folder or Hub id>'}\", \"causal\")\n"
              f"policy = PeftModel.from_pretrained(base, \"<this folder or repo id>\")\n```\n\n"))
    return (f"---\nlibrary_name: {'transformers' if merged else 'peft'}\n"
            + (f"base_model: {yaml_value(hub_base)}\n" if hub_base else "") +  # a Hub id or nothing: the Hub refuses paths
            "pipeline_tag: text-generation\ntags: [rlhf_ext, ppo, trl, rlhf, lora]\n---\n\n"
            f"# PPO policy trained with rlhf_ext\n\n| setting | value |\n|---|---|\n| base model | {base} |\n"
            f"| KL controller | {kl} |\n"
            f"| reward members | {', '.join(tr.rewards.member_names)} |\n| aggregation | `{a.aggregation}` |\n"
            f"| shapers | `{a.shapers}` |\n| iterations | {tr.iteration} × {a.per_device_train_batch_size} prompts |\n"
            f"| compute | {tr.startup.get('compute_dtype', '?')}; CPU matmuls: {tr.startup.get('cpu_matmul', 'torch')}"
            f"{base_precision} |\n\n"
            + (f"Last iteration (train rollouts):\n\n| metric | value |\n|---|---|\n{metrics}\n\n" if metrics else "")
            + ("Held-out evaluation (`evaluate_policy`"
               + (f", iteration {heldout_at}" if heldout_at is not None else "")
               + f"):\n\n| metric | value |\n|---|---|\n{heldout}\n\n" if heldout else "")
            + usage + ("The value head (and a separate critic adapter, if any) is in `critic/`.\n" if critic else
                       "The value head is not included (push_to_hub(critic=True) uploads it in `critic/`).\n")
            + "".join(f"\nLogged to {name}: {url}\n" for name, url in tracker_links()) + framework_versions())


def tracker_links() -> list[tuple[str, str]]:
    """The runs this training is being logged to, as trl's cards link them (Weights & Biases, Trackio, Comet): a
    tracker that is not installed or has no run now gives nothing."""
    from transformers import is_wandb_available
    from trl.trainer.utils import get_comet_experiment_url, get_trackio_space_url

    links = []
    if is_wandb_available():
        import wandb

        if wandb.run is not None and getattr(wandb.run, "url", None):
            links.append(("Weights & Biases", wandb.run.url))
    for name, url in (("Trackio", get_trackio_space_url()), ("Comet", get_comet_experiment_url())):
        if url:
            links.append((name, url))
    return links


def _untie_output_embeddings(hf):
    """Give the LM head its own copy of tied embedding weights (and say so in the config)."""
    cfg = hf.config.get_text_config()
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    head = hf.get_output_embeddings()
    layer = getattr(head, "base_layer", head)
    layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    cfg.tie_word_embeddings = False
    hf.config.tie_word_embeddings = False


def copy_config(cfg, base_model: str):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.base_model_name_or_path = base_model
    cfg.inference_mode = True
    return cfg
