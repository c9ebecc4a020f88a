"""The human-in-the-loop variants: PPO with the monitor queueing pairs, a simulated reviewer labelling them through
the review server, the proxy retrained with the reviewed pairs, PPO resumed with it.

A round: PPO runs until the review queue holds `per_round` pending pairs (or as many labels as the budget has left;
with a `pool`, at least that many, of which the reviewer's order picks the ones it labels);
the run checkpoints *at that iteration* and stops; the reviewer labels them (`reviewer.py`); the reward model the run
used is fine-tuned on the variant's proxy data plus every pair reviewed so far, weighted (`tasks.FINETUNE`; with
`retrain: scratch` the proxy is trained again from scratch as it was first, the pairs added once); PPO resumes from
that checkpoint with the new reward model. Resuming at the alarm, not before it, keeps the sample
budget the same as every other variant's and keeps the policy the reviewer judged: the new reward model is asked to
pull back the policy it was shown. Rounds stop when the label budget is spent. The record gains `loop`: labels used,
decisions flipped, and per round the iteration, labels and wall-clock seconds of review + retraining.
"""

from __future__ import annotations

import json
import time

from .reviewer import SimulatedReviewer
from .runners import Run
from .tasks import retrain_rm, rm_dir

# --quick: a detector that fires every iteration, so the wiring (queue → reviewer → retrain → resume) is what runs,
# whatever a tiny random model does. The guard-activity fraction is defined every iteration, ≥ 0 > −1, with no noise
# gate; its suspicious samples are the highest-reward ones. (length_correlation, used before, needs lengths that
# vary: a tiny model that never samples EOS gives r = 0, which its gate does not pass.)
QUICK_DETECTORS = [{"name": "kl_backtracking", "threshold": -1.0, "window": 1, "action": "queue"}]


class LoopRun(Run):
    def _execute_ppo(self):
        from transformers import TrainerCallback

        loop, st = self.spec["loop"], self.st
        if self.args.quick:  # 3 iterations of 8 samples: two rounds of 4 labels (from 6 pending with a pool)
            loop = {**loop, "per_round": 4, "budget": 8, **({"pool": 6} if "pool" in loop else {})}
        rec = self.record.setdefault("loop", {"labels": 0, "flipped": 0, "rounds": []})
        reviewer = SimulatedReviewer(self.dir, loop["error"], self.seed, loop["order"], flips=loop.get("flips", "random"),
                                     decided=rec["labels"])
        run = self
        self._finish_interrupted_round(rec, reviewer, loop)

        class StopForReview(TrainerCallback):
            """After the monitor has queued (it runs first): enough pending pairs → checkpoint here and stop."""

            stopped = False

            def on_step_end(self, args, state, control, **kw):
                left = loop["budget"] - rec["labels"]
                need = min(loop["per_round"], left)
                pending = len(tr.monitor.queue.pending())
                # with a pool, the reviewer's order picks `need` of at least `pool` pending pairs
                if left > 0 and pending >= max(need, loop.get("pool", 0)) and tr.iteration < st["iterations"]:
                    tr.save_checkpoint(str(run.dir / "checkpoint"))
                    run.save()
                    control.should_training_stop = self.stopped = True

        while True:
            reward = str(self.dir / rec["rounds"][-1]["rm"]) if rec["rounds"] else None
            extra = {"monitor_detectors": QUICK_DETECTORS} if self.args.quick else {}
            if loop.get("queue_on") and not self.args.quick:  # every built-in detector, these switched to "queue"
                from rlhf_ext.plugins.detectors import DEFAULT_DETECTORS

                extra = {"monitor_detectors": [{"name": d, **({"action": "queue"} if d in loop["queue_on"] else {})}
                                               for d in DEFAULT_DETECTORS]}
            tr, tok, gold, vader, proxy, heldout, transfer = self._ppo_trainer(
                reward, monitor_max_queue=st["batch"], monitor_cooldown=1, **extra)
            tr.add_callback(self._eval_callback(tr, tok, gold, vader, proxy, heldout, transfer))
            stop = StopForReview()
            tr.add_callback(stop)
            self._train(tr, tok, gold, vader, proxy, heldout, transfer)
            if not stop.stopped:
                break
            self._round(rec, reviewer, loop, tr.iteration)
        self._finish()

    def _round(self, rec, reviewer, loop, iteration, given=0, **note):
        """One round after PPO stopped for review: label the round's share (of which `given` were labelled before a
        kill), fine-tune or retrain the reward model on every reviewed pair, record the round."""
        from rlhf_ext.monitor.queue import ReviewQueue

        t0, before = time.perf_counter(), reviewer.flipped
        flipped = reviewer.replay(given)
        labels = given + reviewer.review(min(loop["per_round"], loop["budget"] - rec["labels"]) - given)
        flipped += reviewer.flipped - before
        name = f"rm_round{len(rec['rounds']) + 1}"
        init = None
        if loop.get("retrain", "scratch") == "finetune":  # from the reward model this run used until now
            init = self.dir / rec["rounds"][-1]["rm"] if rec["rounds"] else rm_dir(self.args) / self.spec["rm"]
        retrain_rm(self.args, self.spec["rm"], self.dir / name, [str(ReviewQueue(self.dir).preferences_path)], init)
        rec["labels"] += labels
        rec["flipped"] += flipped
        rec["rounds"].append({"iteration": iteration, "labels": labels, "rm": name,
                              "seconds": time.perf_counter() - t0, **note})
        print(f"[{self.name} s{self.seed}] round {len(rec['rounds'])} at iteration {iteration}: {labels} "
              f"labels ({rec['labels']} of {loop['budget']}), reward model retrained", flush=True)
        self.save()

    def _finish_interrupted_round(self, rec, reviewer, loop):
        """A process killed during a round's review or before the end of its retrain left decisions the record does
        not count: finish that round (its seconds then lack what the killed process spent) before PPO resumes from
        the round's checkpoint (else PPO would go on with the old reward model and the next round would spend
        labels the budget already spent)."""
        from rlhf_ext.monitor.queue import ReviewQueue

        given = len(ReviewQueue(self.dir).decisions()) - rec["labels"]
        if given > 0:
            iteration = json.loads((self.dir / "checkpoint" / "ppo_state.json").read_text())["iteration"]
            self._round(rec, reviewer, loop, iteration, given, resumed=True)
