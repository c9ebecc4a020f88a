"""Run by tests/test_data_parallel.py, once as a single process and once under `accelerate launch` with 2 CPU
processes (recipes/accelerate_configs/cpu_2proc.yaml): PPO or reward training on the same global batch, split
across the processes. Writes what each rank saw and the trained parameters, into OUT_DIR/<mode>/.

    python tests/ddp_worker.py OUT_DIR MODE[,MODE…] GLOBAL_BATCH [BASE_MODEL_DIR (reward)] [4-BIT BASE DIR (ppo_4bit)]

MODE: ppo, reward, monitor, precision, ppo_gc / reward_gc (gradient checkpointing on), ppo_4bit (an NF4 base),
ppo_resume (a run stopped and resumed against the same run straight) or reward_signal (one rank signalled), run
one after another in this process (a launch and the imports cost
~10 s a process on 2 cores; the modes share neither data nor state, and each trainer seeds itself).
`precision` (launched with --mixed_precision bf16): the policy untouched (lr 0) must read KL exactly 0, then the hard
KL guard (lr 0.1) checked against the independent oracle on each rank's own batch; no parameters are saved.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file

from rlhf_ext import PPOConfig, PPOTrainer, RewardEnsembleConfig, RewardEnsembleTrainer
from rlhf_ext.models import activation_checkpointing_on
from rlhf_ext.ppo.policy import PolicyAndValue
from rlhf_ext.testing import tiny_tokenizer

torch.set_num_threads(1)
OUT, MODES, GLOBAL_BATCH = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
tok = tiny_tokenizer()


@atexit.register  # registered first, so it runs last: after the trainers' own exit handlers
def _process_group_at_exit():
    if "RANK" in os.environ:
        import torch.distributed as dist

        (OUT / f"exit_r{os.environ['RANK']}.json").write_text(json.dumps({"initialized": dist.is_initialized()}))


SUBJECTS = "movie book song film food place day night".split()


def precision(out: Path):
    from transformers import TrainerCallback

    from rlhf_ext.testing import tiny_causal_lm
    from tests.kl_oracle import exact_batch_kl

    class Oracle(TrainerCallback):
        def __init__(self):
            self.trainer, self.exact = None, []

        def on_step_end(self, args, state, control, **kw):
            tr = self.trainer
            self.exact.append(exact_batch_kl(tr.policy.peft, tr.rollout, tr.args.temperature,
                                             autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
                                                 tr.args.mixed_precision)))

    # one header for every prompt (as a system prompt would be): the passes after sampling share it (26 tokens,
    # 4 prompts per rank: 78 rows saved per pass)
    head = "write a short review of the movie . write a short review of the book . write a short review of the song ."
    data = Dataset.from_dict({"prompt": [f"{head} write a {a} review of the {s} ."
                                         for a in ("short", "long", "good", "bad") for s in SUBJECTS]})
    info = {}
    for phase, lr in (("still", 0.0), ("guarded", 0.1)):
        args = PPOConfig(str(out / phase), per_device_train_batch_size=4, max_steps=2, learning_rate=lr,
                         num_ppo_epochs=8, max_completion_length=6, kl_controller="hard", kl_target=0.1,
                         init_kl_coef=0.0, use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1000,
                         seed=0, monitor=False, eval_strategy="steps", eval_steps=1, eval_on_start=True)
        oracle = Oracle()
        tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=lambda completion_ids, **kw: [float(len(c)) for c in
                                                                                       completion_ids],
                        args=args, train_dataset=data, processing_class=tok, callbacks=[oracle],
                        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                        # streamed, as `dataset_streaming` gives it: each rank evaluates its share (len() of a stream
                        # raised TypeError under DDP before the set was held in memory)
                        eval_dataset=data.select(range(10)).to_iterable_dataset())
        oracle.trainer = tr
        hist = tr.train()
        info[phase] = {"mixed_precision": args.mixed_precision, "compute_dtype": tr.startup["compute_dtype"],
                       "loss_scale": [h.get("optim/loss_scale") for h in hist],
                       "lora_B": float(sum(p.detach().abs().sum() for n, p in tr.policy.peft.named_parameters()
                                           if "lora_B" in n)),
                       "sharing": tr.startup["shared_prompt_prefix"],
                       "startup_kl": tr.startup["training_vs_reference"], "exact": oracle.exact,
                       **{k: [h[k] for h in hist] for k in ("objective/kl", "kl/before_update", "kl/after_update")},
                       "evals": [h for h in tr.state.log_history if "eval_kl" in h],
                       "heldout": dict(tr.heldout),  # the model card's held-out numbers: every process's prompts
                       # fewer prompts than processes: each samples the whole set on its own stream; the metrics
                       # (which EarlyStoppingCallback reads on every rank) must still be one number everywhere
                       "one_prompt": tr.evaluate(data.select(range(1)))}
    return tr.accelerator.process_index, args.world_size, info, None


def monitor(out: Path):
    # A detector that sees how many samples it is shown: 8 for the whole batch, 4 for one rank's share. It halts
    # above 6 — so it fires only if the monitor observes the global batch, and then on every rank at once.
    from rlhf_ext.plugins.detectors import Detector
    from rlhf_ext.registry import register
    from rlhf_ext.testing import tiny_causal_lm

    @register("detector", "batch_seen")
    class BatchSeen(Detector):
        def statistic(self, obs):
            return float(len(obs.texts))

    data = Dataset.from_dict({"prompt": [f"write a {a} review of the {s} ." for a in ("short", "long", "good", "bad")
                              for s in SUBJECTS]})
    args = PPOConfig(str(out / "run"), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                     max_completion_length=6, kl_controller="fixed", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1000, seed=0, monitor_reference_prompts=8,
                     monitor_detectors=[{"name": "batch_seen", "threshold": 6, "action": "halt", "warmup": 2}])
    local = []

    def length(completion_ids, **kw):  # different on the two ranks' halves: their local means differ
        return [float(len(c)) + (5.0 if "short" in str(p) else 0.0) for c, p in zip(completion_ids, kw["prompts"])]

    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=length, args=args, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        from transformers import TrainerCallback

        class Local(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                ro = tr.rollout
                local.append({"scores": float(ro.scores[ro.valid].sum()), "n": int(ro.valid.sum()),
                              "length": float(ro.lengths.float().mean())})

        tr.add_callback(Local())
        hist = tr.train()
    rank, world = tr.accelerator.process_index, args.world_size
    info = {"iterations": len(hist), "halted_by": tr.monitor.halted_by, "local": local,
            "logged": [{k: h[k] for k in ("objective/scores", "response/length_mean", "monitor/batch_seen")}
                       for h in hist],
            "checkpoints": sorted(p.name for p in (out / "run").glob("checkpoint-*"))}
    return rank, world, info, None


def ppo(out: Path, checkpointing: bool = False, four_bit: bool = False):
    # Greedy responses: the same tokens whichever process (and batch layout) generates them, so one process with
    # the whole batch and two processes with half each can be compared update for update.
    plain = PolicyAndValue.generation_kwargs  # restored below: the modes after this one sample
    PolicyAndValue.generation_kwargs = lambda self, *a, **k: {**plain(self, *a, **k), "do_sample": False}
    pos = set(tok.convert_tokens_to_ids("good great nice love happy wonderful excellent fun best".split()))

    def positive(prompts, completions, completion_ids, **kw):
        scores = [10.0 * sum(t in pos for t in ids) / max(1, len(ids)) for ids in completion_ids]
        for s in scores:  # log_metric as TRL's GRPO offers it: one mean over every process's values
            kw["log_metric"]("custom/positive", s)
        if kw["trainer_state"].is_world_process_zero:  # a name only one rank logs must not hang the others
            kw["log_metric"]("custom/rank0_only", 1.0)
        return scores

    from rlhf_ext.testing import tiny_causal_lm

    data = Dataset.from_dict({"prompt": [f"write a {a} review of the {s} ." for a in ("short", "long", "good", "bad")
                              for s in SUBJECTS]})  # 32 distinct prompts of one token length: no padding differences
    args = PPOConfig(str(out / "run"), per_device_train_batch_size=1, max_steps=3, learning_rate=3e-2,
                     max_completion_length=6, kl_controller="hard", kl_target=0.005, use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1000, seed=0, monitor=False,
                     gradient_checkpointing=checkpointing)
    world = args.world_size
    args.per_device_train_batch_size = GLOBAL_BATCH // world
    if four_bit:  # an NF4 base from a saved folder, each rank quantising its own copy (64 wide: bitsandbytes' block)
        from rlhf_ext.models import load_model

        model = load_model(sys.argv[5], "causal", load_in_4bit=True)
    else:
        model = tiny_causal_lm(tok)
    tr = PPOTrainer(model, reward_funcs=positive, args=args, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    first = [p for p, _ in tr._next_prompts()]
    tr.data_pos = 0
    hist = tr.train()
    params = {n: p.detach().clone().contiguous() for n, p in tr.policy.named_parameters() if p.requires_grad}
    rank = tr.accelerator.process_index
    info = {"world": world, "first_batch": first, "kl_after": [h["kl/after_update"] for h in hist],
            "backtracks": sum(h["kl/backtracks"] + h["kl/restored"] for h in hist),
            "wrapped": type(tr.train_policy).__name__,
            "checkpointing": activation_checkpointing_on(tr.policy.peft.get_base_model()),
            "logged": [[h["custom/positive"], h["custom/rank0_only"]] for h in hist]}
    PolicyAndValue.generation_kwargs = plain
    return rank, world, info, params


def ungraded(out: Path):
    """Rank 0's whole share goes ungraded: the reward function returns None for every sample there (a judge that
    timed out), and so does an audit judge at evaluation, which grades rank 1's samples 10. The global batch still
    has samples to train on, and the audit's mean is over the graded ones."""
    from rlhf_ext.testing import tiny_causal_lm

    rank0 = os.environ.get("RANK", "0") == "0"

    def reward(completion_ids, **kw):
        return [None if rank0 else float(len(c)) for c in completion_ids]

    def judge(completions, **kw):
        return [None if rank0 else 10.0 for _ in completions]

    data = Dataset.from_dict({"prompt": [f"write a {a} review of the {s} ." for a in ("short", "long") for s in SUBJECTS]})
    args = PPOConfig(str(out / "run"), per_device_train_batch_size=4, max_steps=2, learning_rate=3e-2,
                     max_completion_length=6, kl_controller="fixed", use_cpu=True, save_strategy="no",
                     disable_tqdm=True, logging_steps=1000, seed=0, monitor=False)
    tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), audit_funcs=[judge])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped samples' warning
        hist = tr.train()
    info = {"dropped": [h["rewards/dropped_nonfinite"] for h in hist], "eval": tr.evaluate(data.select(range(8)))}
    params = {n: p.detach().clone().contiguous() for n, p in tr.policy.peft.named_parameters() if p.requires_grad}
    return tr.accelerator.process_index, args.world_size, info, params


def ppo_resume(out: Path):
    """Sampled PPO (each process draws from its own random stream), 4 iterations straight, and the same run stopped
    after iteration 2 (its checkpoint saved) then resumed in a fresh trainer for the last 2: the resumed run must end
    where the straight one does, on every rank."""
    from transformers import TrainerCallback

    from rlhf_ext.testing import tiny_causal_lm

    pos = set(tok.convert_tokens_to_ids("good great nice love happy wonderful excellent fun best".split()))

    def positive(completion_ids, **kw):
        return [10.0 * sum(t in pos for t in ids) / max(1, len(ids)) for ids in completion_ids]

    class StopAt(TrainerCallback):  # a run stopped after iteration 2, as a SIGTERM or a killed job would leave it
        def __init__(self, at):
            self.at = at

        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = self.at is not None and state.global_step >= self.at

    data = Dataset.from_dict({"prompt": [f"write a {a} review of the {s} ." for a in ("short", "long", "good", "bad")
                              for s in SUBJECTS]})

    def run(folder, stop_at=None, resume=None):
        args = PPOConfig(str(out / folder), per_device_train_batch_size=4, max_steps=4, learning_rate=3e-2,
                         max_completion_length=6, kl_controller="lagrangian", kl_target=0.5, use_cpu=True,
                         save_strategy="steps", save_steps=2, disable_tqdm=True, logging_steps=1000, seed=0,
                         monitor=False, shapers=[{"name": "debias"}])
        tr = PPOTrainer(tiny_causal_lm(tok), reward_funcs=positive, args=args, train_dataset=data, processing_class=tok,
                        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), callbacks=[StopAt(stop_at)])
        return tr, tr.train(resume_from_checkpoint=resume)

    whole, hist = run("whole")
    run("half", stop_at=2)
    rank = whole.accelerator.process_index
    torch.manual_seed(123 + rank)  # another process state before the resume: the checkpoint must restore each rank's
    resumed, hist_resumed = run("half", resume=True)
    keys = ("loss/policy", "objective/scores", "objective/beta")
    info = {"whole": [[h[k] for k in keys] for h in hist], "resumed": [[h[k] for k in keys] for h in hist_resumed],
            "resumed_iterations": resumed.iteration}
    params = {f"{name}.{n}": p.detach().clone().contiguous() for name, tr in (("whole", whole), ("resumed", resumed))
              for n, p in tr.policy.named_parameters() if p.requires_grad}
    return rank, whole.args.world_size, info, params


def reward(out: Path, checkpointing: bool = False):
    rows = []
    for i in range(64):
        s = SUBJECTS[i % 8]
        rows.append({"prompt": f"write a short review of the {s} . ", "chosen": f"the {s} was good .",
                     "rejected": f"the {s} was bad and boring ."})
    base = sys.argv[4]  # written once by the test: two ranks saving the same folder would race
    args = RewardEnsembleConfig(str(out / "rm"), per_device_train_batch_size=1, max_steps=6, learning_rate=1e-2,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                normalization_samples=8, logging_steps=100, gradient_checkpointing=checkpointing)
    world = args.world_size
    args.per_device_train_batch_size = GLOBAL_BATCH // world
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
    info = {"world": world, "pairs": seen, "wrapped": type(tr.model_wrapped).__name__,
            "checkpointing": ens.is_activation_checkpointing}
    return rank, world, info, params


def reward_signal(out: Path):
    """SIGTERM to rank 1 alone during step 2 (save_strategy 'no'): both ranks end step 2, save checkpoint-2 and stop."""
    import signal

    from transformers import TrainerCallback

    rows = [{"prompt": f"write a short review of the {s} . ", "chosen": f"the {s} was good .",
             "rejected": f"the {s} was bad and boring ."} for s in SUBJECTS * 4]
    args = RewardEnsembleConfig(str(out / "rm"), per_device_train_batch_size=2, max_steps=5, learning_rate=1e-2,
                                report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                                normalization_samples=8, logging_steps=100)
    tr = RewardEnsembleTrainer(sys.argv[4], args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    class SignalRank1(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and tr.accelerator.process_index == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    tr.add_callback(SignalRank1())
    try:
        tr.train()
        raised = None
    except (SystemExit, KeyboardInterrupt) as e:
        raised = type(e).__name__
    tr.accelerator.wait_for_everyone()
    info = {"raised": raised, "step": tr.state.global_step,
            "checkpoints": sorted(p.name for p in (out / "rm").glob("checkpoint-*"))}
    return tr.accelerator.process_index, args.world_size, info, None


for mode in MODES:
    (OUT / mode).mkdir(parents=True, exist_ok=True)
    run = {"precision": precision, "monitor": monitor, "ppo": ppo, "reward": reward,  # *_gc: with checkpointing
           "ppo_gc": lambda out: ppo(out, True), "reward_gc": lambda out: reward(out, True),
           "ppo_4bit": lambda out: ppo(out, four_bit=True), "ppo_resume": ppo_resume, "ungraded": ungraded,
           "reward_signal": reward_signal}[mode]
    rank, world, info, params = run(OUT / mode)
    if params is not None:
        save_file(params, str(OUT / mode / f"params_w{world}_r{rank}.safetensors"))
    (OUT / mode / f"info_w{world}_r{rank}.json").write_text(json.dumps(info))
