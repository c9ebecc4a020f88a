"""PPO with a hard KL constraint, reward shaping and reward ensembles on one shared base (rlhf_ext.PPOTrainer).

    accelerate launch recipes/ppo.py --config recipes/configs/ppo_smollm2_sentiment.yaml

Rewards come from `reward_model_path`: an artifact of recipes/reward_modeling.py (attached to the policy's base as
adapters when both use the same base model), or a sequence-classification reward model — a Hub id or the folder
trl.RewardTrainer saved — as TRL's recipes take it. `dataset_name`: Hub id or a folder of `<config>_<split>.jsonl`.
"""

from rlhf_ext import PPOConfig, PPOTrainer
from rlhf_ext.data import resolve_data_path
from rlhf_ext.recipes import (announce_saved, check_model_name, check_plugins, check_report_to, check_resume,
                              check_reward_model_path, data_path, dataset_split, lora_config, model_loading,
                              resume_argument, run, setup_phase, warn_preference_pairs)


def main(script_args, training_args, model_args, config_file=None):
    script_args.dataset_name = data_path(script_args, config_file)
    if training_args.reward_model_path:
        training_args.reward_model_path = resolve_data_path(training_args.reward_model_path, config_file)
    audits = training_args.audit_model_paths = [resolve_data_path(p, config_file)
                                                for p in training_args.audit_model_paths or []] or None
    # before anything loads, each a one-line error: the first run's usual mistakes, then the other named inputs
    check_reward_model_path(training_args.reward_model_path)
    for path in audits or []:  # judges beside the proxy: logged as audit/<name>, watched by proxy_vs_audit
        check_reward_model_path(path, "audit_model_paths")
    check_model_name(model_args.model_name_or_path, training_args.trust_remote_code)
    check_plugins(training_args)
    check_report_to(training_args)
    check_resume(training_args)
    train = dataset_split(script_args, script_args.dataset_train_split)
    warn_preference_pairs(train)
    evaluation = None  # as TRL's recipes: the test split, sampled on eval_strategy's cadence (eval_* metrics)
    if training_args.eval_strategy != "no":
        evaluation = dataset_split(script_args, script_args.dataset_test_split)
    quantization = model_loading(model_args, training_args)  # dtype, revision, attention, 4-bit: as TRL's scripts
    with setup_phase() as setup:  # until the first step, what fails is the input's: one line, exit status 2
        trainer = setup.watch(PPOTrainer(
            model=model_args.model_name_or_path or "smollm2-135m-instruct",
            reward_funcs=[],
            args=training_args,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=lora_config(model_args),
            quantization_config=quantization,
        ))
        trainer.train(resume_from_checkpoint=resume_argument(training_args))  # a folder, or true: the newest
    trainer.save_model(training_args.output_dir)  # with push_to_hub, uploaded too
    announce_saved(trainer, "ppo")
    return trainer


if __name__ == "__main__":
    run(main, PPOConfig)
