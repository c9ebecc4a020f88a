"""Coming from TRL 1.12's PPO (removed from TRL after 1.12): its PPOTrainer arguments, mapped or explained; and
from GRPO / RLOO, their `reward_processing_classes`.

The README's migration table lists every change a TRL 1.12 script needs; `PPOConfig` accepts TRL 1.12's field names
(`kl_coef`, `cliprange`, `response_length`, `missing_eos_penalty`, `total_episodes`, …) with a FutureWarning, and
`tests/test_trl112_migration.py` runs TRL's own example script changed only as the table says.
"""

from __future__ import annotations


def from_trl112_arguments(reward_funcs, reward_model, ref_model, value_model, data_collator, optimizers) -> list:
    """TRL 1.12 PPOTrainer arguments: `reward_model` joins the rewards; the others name what replaced them."""
    if ref_model is not None:
        raise ValueError("`ref_model` is not used: the reference policy is the policy's own base with every adapter "
                         "disabled (no second copy in memory). Drop `ref_model=`; to start from an SFT checkpoint, pass "
                         "it as `model` (merge an SFT adapter into it first with merge_and_unload()).")
    if value_model is not None:
        raise ValueError("`value_model` is not used: the critic is a value head on the policy's trunk "
                         "(PPOConfig(critic='shared'), default) or its own LoRA adapter on the same base "
                         "(critic='separate'). Drop `value_model=`.")
    if data_collator is not None:
        raise ValueError("`data_collator` is not used: prompts are tokenized (chat template applied as TRL does) and "
                         "padded by the trainer, with attention masks. Drop `data_collator=`.")
    if optimizers is not None and tuple(optimizers) != (None, None):
        raise ValueError("`optimizers` is not supported: the optimizer is built over the trained adapters and the "
                         "value head only. Set `learning_rate`, `optim` and `lr_scheduler_type` in PPOConfig.")
    funcs = [] if reward_funcs is None else (list(reward_funcs) if isinstance(reward_funcs, (list, tuple))
                                             else [reward_funcs])
    return funcs + ([reward_model] if reward_model is not None else [])


def processing_classes_for(reward_processing_classes, n: int) -> list:
    """GRPO's `reward_processing_classes`: one tokenizer (or None) per reward function — used for a
    sequence-classification reward model, which otherwise loads its own —, or one alone for a single function."""
    if reward_processing_classes is None:
        return [None] * n
    given = (list(reward_processing_classes) if isinstance(reward_processing_classes, (list, tuple))
             else [reward_processing_classes])
    if len(given) != n:
        raise ValueError(f"reward_processing_classes has {len(given)} entries for {n} reward function(s): give one per "
                         f"reward function (None where it has its own tokenizer), as GRPOTrainer takes them.")
    return given
