"""Bradley–Terry reward modelling with ensembles (rlhf_ext.RewardEnsembleTrainer).

    accelerate launch recipes/reward_modeling.py --config recipes/configs/reward_smollm2_sentiment.yaml

Any TRL `ModelConfig` field works as in TRL's scripts (`load_in_4bit`, `bnb_4bit_quant_type`, `attn_implementation`,
`model_revision`, `use_peft`, `lora_r`, `lora_target_modules`, …; `load_in_8bit` is refused) as do all
`RewardEnsembleConfig` fields (`ensemble_size`, `ensemble_mode`, `length_decorrelation_coef`, …).
`dataset_name` may be a Hub id or a local folder holding `<dataset_config>_<split>.jsonl` files.
"""

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.recipes import (announce_saved, check_extra_preferences, check_model_name, check_report_to, check_resume,
                              data_path, dataset_split, lora_config, model_loading, resume_argument, run, setup_phase)


def main(script_args, training_args, model_args, config_file=None):
    script_args.dataset_name = data_path(script_args, config_file)
    # before anything loads, each a one-line error
    check_model_name(model_args.model_name_or_path, training_args.trust_remote_code)
    check_extra_preferences(training_args.extra_preferences)
    check_report_to(training_args)
    check_resume(training_args)
    train = dataset_split(script_args, script_args.dataset_train_split)
    # held-out pairs, where the dataset has them: accuracy, calibration, reward-length correlation after training
    # (required when eval_strategy asks for evaluations: transformers' "you didn't pass an eval_dataset" named no split)
    test = dataset_split(script_args, script_args.dataset_test_split, optional=training_args.eval_strategy == "no")
    quantization = model_loading(model_args, training_args)  # dtype, revision, attention, 4-bit: as TRL's scripts
    with setup_phase() as setup:  # until the first step, what fails is the input's: one line, exit status 2
        trainer = setup.watch(RewardEnsembleTrainer(
            model_args.model_name_or_path or "smollm2-135m-instruct",
            args=training_args,
            train_dataset=train,
            eval_dataset=test,
            peft_config=lora_config(model_args),
            quantization_config=quantization,
        ))
        trainer.train(resume_from_checkpoint=resume_argument(training_args))  # a folder, or true: the newest
    if test is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    announce_saved(trainer, "reward")
    return trainer


if __name__ == "__main__":
    run(main, RewardEnsembleConfig)
