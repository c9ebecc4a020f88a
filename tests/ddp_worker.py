"""Run by tests/test_data_parallel.py, once as a single process and once under `accelerate launch` with 2 CPU
processes (recipes/accelerate_configs/cpu_2proc.yaml): PPO or reward training on the same global batch, split
across the processes. Writes what each rank saw and the trained parameters.

    python tests/ddp_worker.py OUT_DIR {ppo|reward} GLOBAL_BATCH [BASE_MODEL_DIR (reward)]
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.ppo.policy import PolicyAndValue
from rlhf_ext.testing import tiny_tokenizer

torch.set_num_threads(1)
out, mode, global_batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tok = tiny_tokenizer()
SUBJECTS = "movie book song film food place day night".split()

if mode == "ppo":
    # Greedy responses: the same tokens whichever process (and batch layout) generates them, so one process with
    # the whole batch and two processes with half each can be compared update for update.
    plain = PolicyAndValue.generation_kwargs
    PolicyAndValue.generation_kwargs = lambda self, *a, **k: {**plain(self, *a, **k), "do_sample": False}
    pos = set(tok.convert_tokens_to_ids("good great nice love happy wonderful excellent fun best".split()))

    def positive(prompts, completions, completion_ids, **kw):
        return [10.0 * sum(t in pos for t in ids) / max(1, len(ids)) for ids in completion_ids]

    from rlhf_ext.testing import tiny_causal_lm

    data = Dataset.from_dict({"prompt": [f"write a {a} review of the {s} ." for a in ("short", "long", "good", "bad")
                              for s in SUBJECTS]})  # 32 distinct prompts of one token length: no padding differences
    args = PPOConfig(str(out / "run"), per_device_train_batch_size=0, max_steps=3, learning_rate=3e-2,
                     max_completion_length=6, kl_controller="hard", kl_target=0.005, use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1000, seed=0, monitor=False)
    world = args.world_size
    args.per_device_train_batch_size = global_batch // world
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=positive, args=args, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    first = [p for p, _ in tr._next_prompts()]
    tr.data_pos = 0
    hist = tr.train()
    params = {n: p.detach().clone().contiguous() for n, p in tr.policy.named_parameters() if p.requires_grad}
    rank = tr.accelerator.process_index
    info = {"world": world, "first_batch": first, "kl_after": [h["kl/after_update"] for h in hist],
            "backtracks": sum(h["kl/backtracks"] + h["kl/restored"] for h in hist),
            "wrapped": type(tr.train_policy).__name__}
else:
    rows = []
    for i in range(64):
        s = SUBJECTS[i % 8]
        rows.append({"prompt": f"write a short review of the {s} . ", "chosen": f"the {s} was good .",
                     "rejected": f"the {s} was bad and boring ."})
    base = sys.argv[4]  # written once by the test: two ranks saving the same folder would race
    args = RewardEnsembleConfig(str(out / "rm"), per_device_train_batch_size=1, max_steps=6, learning_rate=1e-2,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                normalization_samples=8, logging_steps=100)
    world = args.world_size
    args.per_device_train_batch_size = global_batch // world
    tr = RewardEnsembleTrainer(base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    seen = []
    orig = tr.compute_loss

    def compute_loss(model, inputs, *a, **k):
        seen.extend(inputs["pair_id"].tolist())
        return orig(model, inputs, *a, **k)

    tr.compute_loss = compute_loss
    tr.train()
    ens = tr.accelerator.unwrap_model(tr.model)
    params = {n: p.detach().clone().contiguous() for n, p in ens.named_parameters() if p.requires_grad}
    rank = tr.accelerator.process_index
    info = {"world": world, "pairs": seen, "wrapped": type(tr.model_wrapped).__name__}

save_file(params, str(out / f"params_w{world}_r{rank}.safetensors"))
(out / f"info_w{world}_r{rank}.json").write_text(json.dumps(info))
