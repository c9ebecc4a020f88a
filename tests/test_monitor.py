"""The reward-hacking monitor: detectors fire on a hacking run and stay quiet on a mitigated one; queue sends
pairs to review; halt stops with a checkpoint that resumes."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from rlhf_ext.monitor.queue import ReviewQueue
from rlhf_ext.plugins.detectors import Observation
from rlhf_ext.registry import build

from .test_ppo import make


def longer_is_better(prompts, completions, completion_ids, **kw):
    """A length-biased proxy: pays for tokens, and most for never stopping."""
    return [0.5 * len(ids) for ids in completion_ids]


def eos_prone_model(tok):
    """A tiny model whose reference answers end after ~4 tokens: room for a length-hacking policy to drift."""
    from rlhf_ext.testing import tiny_causal_lm

    m = tiny_causal_lm(tok)
    with torch.no_grad():
        w = m.model.norm.weight
        m.lm_head.weight[tok.eos_token_id] = 3.2 * w / w.norm()
    return m


def gold(prompts, completions, completion_ids, **kw):
    return [1.0 - 0.1 * len(ids) for ids in completion_ids]  # what the user wanted: short answers


def _obs(lengths, eos, scores=None, norm=None, audit=None, metrics=None, reference=None):
    n = len(lengths)
    return Observation(iteration=1, lengths=torch.tensor(lengths, dtype=torch.float), has_eos=torch.tensor(eos),
                       texts=["x"] * n, ids=[[1, 2, 3]] * n,
                       scores=torch.tensor(scores if scores is not None else [0.0] * n),
                       norm=torch.tensor(norm if norm is not None else [[0.0]] * n), valid=torch.ones(n, dtype=torch.bool),
                       audit=audit or {}, metrics=metrics or {}, reference=reference or {})


def test_detectors_on_hand_made_observations():
    ref = {"length": 10.0, "eos": 0.9}
    d = build("detector", "length_drift", smoothing=0.0, warmup=1)
    assert d.update(_obs([12, 12], [True, True], reference=ref)) == (pytest.approx(1.2), False)
    assert d.update(_obs([20, 20], [True, True], reference=ref))[1]
    # a cap under 1.5× the reference length (48 vs 33 tokens): answers pinned at the cap still fire, at 0.9 × cap
    capped = build("detector", "length_drift", smoothing=0.0, warmup=1)
    assert capped.update(_obs([42, 42], [True, True], reference={"length": 33.0, "cap": 48}))[1] is False
    assert capped.update(_obs([48, 47], [False, False], reference={"length": 33.0, "cap": 48}))[1]
    assert "1.31" in capped.describe()
    roomy = build("detector", "length_drift", smoothing=0.0, warmup=1)  # a roomy cap keeps the configured threshold
    assert not roomy.update(_obs([14, 14], [True, True], reference={"length": 10.0, "cap": 200}))[1]
    # reference near the cap: two answers at the cap are within its noise (47 ± 3 tokens) …
    near = {"length": 47.0, "length_sd": 3.0, "n": 64, "cap": 48}
    full = build("detector", "length_drift", smoothing=0.0, warmup=1)
    assert not full.update(_obs([48, 48], [True, True], reference=near))[1]
    # … but a reference above cap / 1.1 (44 of 48 tokens: the old 1.1× floor was out of reach) still shows drift:
    # 64 answers pinned at the cap, half-way from 44 to 48 and 3 standard errors past the reference
    high = {"length": 44.0, "length_sd": 4.0, "n": 64, "cap": 48}
    pinned = build("detector", "length_drift", smoothing=0.0, warmup=1)
    assert not pinned.update(_obs([45] * 64, [True] * 64, reference=high))[1]
    assert pinned.update(_obs([48] * 64, [False] * 64, reference=high))[1]
    assert build("detector", "length_drift").update(_obs([48], [False], reference={**high, "length": 48.0}))[0] is None
    with pytest.raises(ValueError, match="cap_fraction"):
        build("detector", "length_drift", cap_fraction=0.0)
    e = build("detector", "eos_collapse", smoothing=0.0, warmup=1)
    assert e.update(_obs([5, 5], [False, False], reference=ref))[1] and e.suspicious(_obs([5, 9], [True, False]), 1) == [1]
    # by default the drift detectors judge a trend, not one batch: an outlying first batch (the reference policy
    # itself, on a batch of long-answer prompts) stays quiet; a sustained drift fires from the third iteration
    ref48 = {"length": 31.7, "eos": 0.72, "cap": 48}
    for make_det, batches in (("length_drift", [([46.5] * 2, [True, False]), ([41.6] * 2, [True, True]),
                                                ([24.5] * 2, [True, True])]),
                              ("eos_collapse", [([46.5] * 2, [False, False]), ([30] * 2, [True, True]),
                                                ([30] * 2, [True, True])])):
        quiet = build("detector", make_det)
        assert not any(quiet.update(_obs(ln, eo, reference=ref48))[1] for ln, eo in batches), make_det
    drift = build("detector", "length_drift")
    assert [drift.update(_obs([47, 48], [False, False], reference=ref48))[1] for _ in range(3)] == [False, False, True]
    r = build("detector", "repetition", smoothing=0.0)
    loop = _obs([24], [False])
    loop.ids = [[5, 6, 7, 8] * 6]
    assert r.update(loop)[1]
    # relative to the reference: a task whose reference answers repeat as much (lists, code) does not alarm
    listy = build("detector", "repetition", smoothing=0.0)
    loop.reference = {"repetition_4": 0.8, "repetition_4_sd": 0.1, "n": 64}  # 21 4-grams, 4 distinct: 17/21 repeat
    assert listy.update(loop) == (pytest.approx(17 / 21 - 0.8), False)
    # a few low-EOS batches are noise when the reference ends a quarter of its answers; a long collapse is not
    e = build("detector", "eos_collapse")
    low = {"eos": 0.25, "n": 64}
    assert not any(e.update(_obs([5] * 8, [False] * 8, reference=low))[1] for _ in range(4))
    e = build("detector", "eos_collapse")
    assert [e.update(_obs([5] * 64, [False] * 64, reference=low))[1] for _ in range(3)] == [False, False, True]
    # reward ∝ length: fires on 16 samples; on 4, r = 1 is within 3 standard errors (≈ 1/√3 each) of no correlation
    c = build("detector", "length_correlation", smoothing=0.0)
    assert c.update(_obs(list(range(16)), [True] * 16, scores=[float(i) for i in range(16)]))[1]
    assert build("detector", "length_correlation", smoothing=0.0).update(
        _obs([1, 2, 3, 4], [True] * 4, scores=[1.0, 2.0, 3.0, 4.0])) == (pytest.approx(1.0), False)
    # proxy up, audit down by 1.5 per-sample standard deviations: fires once the recent window is full
    p = build("detector", "proxy_vs_audit", window=2)
    fired = [p.update(_obs([1] * 4, [True] * 4, scores=[s] * 4, audit={"gold": [-s - 1, -s + 1] * 2}))[1]
             for s in (0.0, 0.0, 1.5, 3.0)]
    assert fired == [False, False, False, True] and p.value > 3
    # the same rise with a flat audit, or the audit falling while the proxy falls too, stays at 0
    for proxy, audit in (((0.0, 0.0, 1.5, 3.0), (0.0,) * 4), ((0.0, 0.0, -1.5, -3.0), (0.0, 0.0, -1.5, -3.0))):
        q = build("detector", "proxy_vs_audit", window=2)
        assert [q.update(_obs([1] * 4, [True] * 4, scores=[s] * 4, audit={"gold": [a - 1, a + 1] * 2}))[0]
                for s, a in zip(proxy, audit)] == [0.0] * 4
    k = build("detector", "kl_backtracking", window=2)  # judged on full windows: one early backtrack is not a trend
    assert [k.update(_obs([1], [True], metrics={"kl/backtracks": 2}))[1] for _ in range(2)] == [False, True]
    with pytest.raises(ValueError, match="action must be one of"):
        build("detector", "length_drift", action="email")


def test_length_alarm_fires_on_a_hacking_run_and_queues_pairs(tmp_path, tok):
    tr = make(tmp_path, tok, model=eos_prone_model(tok), reward=longer_is_better, max_steps=8, learning_rate=5e-2,
              max_completion_length=12, monitor_detectors=[{"name": "length_drift", "threshold": 1.3}, "eos_collapse",
                                 {"name": "proxy_vs_audit", "window": 3}], monitor_cooldown=1)
    tr.audit_funcs = {"gold": gold}
    hist = tr.train()
    assert tr.monitor.reference["length"] > 0
    alarms = [h["monitor/length_drift_alarm"] for h in hist]
    assert any(alarms), [round(h.get("monitor/length_drift", 0), 2) for h in hist]
    first = alarms.index(1) + 1
    out = tmp_path / "ppo"
    fired = [json.loads(x) for x in (out / "monitor" / "alarms.jsonl").read_text().splitlines()]
    assert {"length_drift"} <= {a["detector"] for a in fired} and min(a["iteration"] for a in fired) <= first
    queue = ReviewQueue(out).records()
    assert queue and all(r["flagged"]["length"] >= r["reference"]["length"] for r in queue if "length_drift" in r["detectors"])
    rec = queue[0]
    assert {"completion", "text", "length", "eos", "kl", "score", "rewards", "audit"} <= set(rec["flagged"])
    assert rec["reference"]["kl"] == 0.0 and rec["flagged"]["kl"] > 0
    assert len((out / "monitor" / "metrics.jsonl").read_text().splitlines()) == 8
    assert (out / "monitor" / "run.json").is_file() and (out / "monitor" / "samples.jsonl").is_file()


def test_reference_is_measured_on_a_seeded_sample_spread_over_the_prompts(tmp_path, tok):
    """Not the first batch: with prompts of different kinds, one batch's mean length reflects its mix, and drift
    judged against it fired before the policy had moved (seen with mixed one-line and open prompts)."""
    tr = make(tmp_path, tok, model=eos_prone_model(tok), max_steps=1, per_device_train_batch_size=4,
              max_completion_length=12, monitor_reference_prompts=20)
    seen, lengths, eos = [], [], []
    generate = tr.policy.generate

    def recording(batch, *a, **kw):
        g = generate(batch, *a, **kw)
        if kw.get("reference"):
            seen.extend(id(p) for p in batch)
            lengths.extend(g.lengths.float().tolist())
            eos.extend(g.has_eos.float().tolist())
        return g

    tr.policy.generate = recording
    state = torch.get_rng_state()
    tr.monitor._measure_reference()
    assert torch.equal(torch.get_rng_state(), state)  # the training run's random stream is untouched
    where = sorted(i for i, p in enumerate(tr.prompts) if id(p) in set(seen))
    assert len(seen) == len(set(seen)) == 20 and len(where) == 20
    assert max(where) >= len(tr.prompts) // 2 and where != list(range(20))  # spread, not the first rows
    ref = tr.monitor.reference
    assert ref["n"] == 20 and ref["length"] == pytest.approx(sum(lengths) / 20) and ref["eos"] == pytest.approx(sum(eos) / 20)
    again = dict(ref)
    seen.clear()
    tr.monitor._measure_reference()
    assert tr.monitor.reference == again  # seeded: a resumed run judges drift against the same reference
    with pytest.raises(ValueError, match="monitor_reference_prompts must be >= 1"):
        make(tmp_path, tok, monitor_reference_prompts=0)


def test_mitigated_run_stays_quiet(tmp_path, tok):
    """Same reward, but a length penalty that outweighs it: the policy does not drift, no length alarm."""
    tr = make(tmp_path, tok, model=eos_prone_model(tok), reward=longer_is_better, max_steps=8, learning_rate=5e-2,
              max_completion_length=12, shapers=[{"name": "linear", "alpha": 2.0}], monitor_detectors=[{"name": "length_drift", "threshold": 1.3}])
    hist = tr.train()
    assert not any(h["monitor/length_drift_alarm"] for h in hist), [h["monitor/length_drift"] for h in hist]


def test_a_halt_at_a_save_step_saves_once_with_every_process_alike(tmp_path, tok):
    """Under DDP the checkpoint save is a collective (each process's state gathered, a barrier): the halt used to save
    on the main process inside the monitor, clearing should_save there only, so the other processes entered one more
    save than the main one and the run hung. Now the halt only sets the flags (the same everywhere) and the loop saves;
    a process that does not write (rank > 0) takes exactly the main process's path."""
    kw = dict(reward=longer_is_better, max_steps=8, learning_rate=5e-2, max_completion_length=12, save_strategy="steps",
              save_steps=1, monitor_detectors=[{"name": "length_drift", "threshold": 1.3, "action": "halt"}])
    paths = []
    for writes in (True, False):
        tr = make(tmp_path / str(writes), tok, model=eos_prone_model(tok), **kw)
        if not writes:  # what a process other than the main one sees
            tr.monitor.__class__ = type("OtherRank", (type(tr.monitor),), {"writes": property(lambda self: False)})
        calls, save = [], tr._save_and_rotate
        tr._save_and_rotate = lambda push, save=save, tr=tr, calls=calls: (calls.append(tr.iteration), save(push))[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.train()
        # the main process says it, once: every process repeated the warning under DDP
        assert sum("monitor halted training" in str(w.message) for w in caught) == int(writes)
        paths.append(calls)
    assert paths[0] == paths[1] == list(range(1, len(paths[0]) + 1))  # each iteration saved once, the halt's too


def test_a_detector_s_first_firing_is_said_once_on_the_console_by_the_main_process(tmp_path, tok, capsys):
    """The alarm flag sits among the iteration's fifty logged numbers, and a "queue" firing sent samples to review
    with nothing on the console: the first firing of each detector is one line naming the review command; later
    firings are not repeated there (alarms.jsonl has them all), and a process other than the main one says nothing."""
    kw = dict(reward=longer_is_better, max_steps=8, learning_rate=5e-2, max_completion_length=12,
              monitor_detectors=[{"name": "length_drift", "threshold": 1.3, "action": "queue"}])
    for writes in (True, False):
        tr = make(tmp_path / str(writes), tok, model=eos_prone_model(tok), **kw)
        if not writes:
            tr.monitor.__class__ = type("OtherRank", (type(tr.monitor),), {"writes": property(lambda self: False)})
        hist = tr.train()
        err = capsys.readouterr().err
        assert sum(h["monitor/length_drift_alarm"] for h in hist) >= 2  # fired more than once …
        said = [line for line in err.splitlines() if line.startswith("Reward-hacking monitor: length_drift")]
        if not writes:
            assert said == [], err
            continue
        assert len(said) == 1, err  # … and said once
        out = tmp_path / str(writes) / "ppo"
        assert f"rlhf-ext review {out}" in said[0] and "later firings of length_drift are logged" in said[0].lower()
        assert ReviewQueue(out).progress()["pending"] > 0  # what the line points at is there


def test_halt_saves_a_checkpoint_that_resumes(tmp_path, tok):
    kw = dict(reward=longer_is_better, max_steps=8, learning_rate=5e-2, max_completion_length=12,
              monitor_detectors=[{"name": "length_drift", "threshold": 1.3, "action": "halt"},
                                 {"name": "repetition", "action": "log"}])
    tr = make(tmp_path, tok, model=eos_prone_model(tok), **kw)
    with pytest.warns(UserWarning, match="monitor halted training.*length_drift.*resume_from_checkpoint=True"):
        hist = tr.train()
    assert len(hist) < 8 and tr.monitor.halted_by == "length_drift"
    ckpt = tmp_path / "ppo" / f"checkpoint-{len(hist)}"
    assert (ckpt / "manifest.json").is_file()
    state = json.loads((ckpt / "ppo_state.json").read_text())
    assert state["monitor"]["detectors"]["length_drift"]["value"] > 1.3
    # the detectors after the halting one saw the iteration before the checkpoint was written: it resumes exactly
    later = {d.name: d.state_dict() for d in tr.monitor.detectors}
    assert state["monitor"]["detectors"]["repetition"]["seen"] == later["repetition"]["seen"] == len(hist)
    assert state["metrics_unlogged"][-1][0] == len(hist) and "monitor/repetition" in state["metrics_unlogged"][-1][1]
    kw["monitor_detectors"] = [{"name": "length_drift", "threshold": 1.3, "action": "log"}]  # the user's decision
    resumed = make(tmp_path, tok, model=eos_prone_model(tok), **kw)
    hist2 = resumed.train(resume_from_checkpoint=True)
    assert len(hist2) == 8 and resumed.monitor.reference == tr.monitor.reference


def test_run_report(tmp_path, tok, capsys):
    from rlhf_ext.cli import main as cli

    # an alarm in every iteration, whatever this run's samples do (the guard-activity fraction, ≥ 0, against −1):
    # the report's alarm section is what is checked; whether a hacking run raises one is test_length_alarm_…'s job
    tr = make(tmp_path, tok, model=eos_prone_model(tok), reward=longer_is_better, max_steps=6, learning_rate=5e-2,
              max_completion_length=12, kl_controller="hard", kl_target=2.0,
              monitor_detectors=[{"name": "length_drift", "threshold": 1.3},
                                 {"name": "kl_backtracking", "threshold": -1.0, "window": 1}])
    tr.train()
    assert cli(["report", str(tmp_path / "ppo")]) == 0
    out = tmp_path / "ppo" / "report"
    page = (out / "index.html").read_text()
    for name in ("rewards", "kl", "length", "disagreement"):
        assert (out / f"{name}.png").stat().st_size > 5000
    assert page.count("data:image/png;base64,") == 4 and "Top-reward samples" in page and "kl_backtracking" in page
    assert "<script" not in page.lower()  # sample text is escaped, never markup
    with pytest.raises(SystemExit) as stop:  # not a run's folder: one line and argparse's status, no traceback
        cli(["report", str(tmp_path)])
    assert stop.value.code == 2 and "monitor/metrics.jsonl does not exist" in capsys.readouterr().err


def test_resume_keeps_monitor_logs_exact(tmp_path, tok):
    """Killed after iteration 3 with a checkpoint at 2: the resumed run redoes iteration 3, and the monitor's logs
    hold each iteration once."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 3

    kw = dict(model=None, reward=longer_is_better, max_steps=5, max_completion_length=12, save_strategy="steps",
              save_steps=2, monitor_detectors=["length_drift"])
    make(tmp_path, tok, **{**kw, "model": eos_prone_model(tok)}, callbacks=[StopAt()]).train()
    out = tmp_path / "ppo"
    its = [json.loads(x)["iteration"] for x in (out / "monitor" / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3]
    make(tmp_path, tok, **{**kw, "model": eos_prone_model(tok)}).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    its = [json.loads(x)["iteration"] for x in (out / "monitor" / "metrics.jsonl").read_text().splitlines()]
    assert its == [1, 2, 3, 4, 5]


def _monitor_logs(folder, iterations: int) -> dict:
    """The three monitor logs of a run of `iterations` iterations, as the monitor writes them (about 2 kB of
    metrics.jsonl per iteration, as a real run's ~60 metrics), alarms.jsonl ending in a torn line."""
    from rlhf_ext.monitor.queue import TORN

    row = {f"metric/{k}": 0.123456789 * k for k in range(60)}
    logs = {"metrics.jsonl": [json.dumps({"iteration": i, **row}) for i in range(1, iterations + 1)],
            "samples.jsonl": [json.dumps({"iteration": i, "text": "the movie was good ." * 8})
                              for i in range(1, iterations + 1) for _ in range(3)],
            "alarms.jsonl": [json.dumps({"iteration": i, "detector": "length_drift"}) for i in range(1, iterations, 7)]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in logs.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    with open(folder / "alarms.jsonl", "ab") as f:  # a writer killed mid-line, then ended by the next append
        f.write(b'{"iteration": 5, "detec' + TORN + b"\n" + lines[-1].encode() + b"\n" + b'{"iteration": 99')
    return logs


def test_resume_cuts_a_long_runs_monitor_logs_back_one_line_at_a_time(tmp_path):
    """A resumed run cuts the monitor's logs back to its checkpoint. A long run's logs are large (metrics.jsonl
    1.6 kB per iteration: 160 MB at 100k iterations): they were read whole into Python dicts and written back, a
    transient of several times their size at every resume (35 MB at 4000 iterations, ~0.9 GB at 100k), and rewritten
    even when nothing followed the checkpoint. Now one line is held at a time and a log with nothing to remove is
    left as it is."""
    import tracemalloc

    from rlhf_ext.integrity import CorruptFileError
    from rlhf_ext.monitor.monitor import RewardHackingMonitor

    mon = object.__new__(RewardHackingMonitor)  # _truncate_logs reads nothing else of the monitor
    mon.dir = tmp_path / "monitor"
    logs = _monitor_logs(mon.dir, 3000)
    metrics = mon.dir / "metrics.jsonl"
    size, inode = metrics.stat().st_size, metrics.stat().st_ino
    assert size > 4_000_000

    tracemalloc.start()
    try:
        mon._truncate_logs(3000)  # resumed from the newest checkpoint: nothing was logged after it
        untouched_peak = tracemalloc.get_traced_memory()[1]
        same_file = metrics.stat().st_ino == inode  # left in place, not rewritten
        tracemalloc.reset_peak()
        mon._truncate_logs(2500)  # killed 500 iterations after its last checkpoint
        cut_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same_file
    assert untouched_peak < size / 20 and cut_peak < size / 20, (untouched_peak, cut_peak, size)
    for name, lines in logs.items():  # the lines up to the checkpoint, byte for byte; torn lines gone
        kept = [x for x in lines if json.loads(x)["iteration"] <= 2500]
        assert (mon.dir / name).read_text() == "".join(x + "\n" for x in kept), name

    # untouched: the same file (not a rewritten copy) when nothing follows the checkpoint
    before = {name: (mon.dir / name).stat().st_ino for name in logs}
    mon._truncate_logs(2500)
    assert {name: (mon.dir / name).stat().st_ino for name in logs} == before

    # a damaged line inside a log is still refused by name, the file as it was
    text = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(text[:10]) + "{not json\n" + "".join(text[10:]))
    damaged = metrics.read_bytes()
    with pytest.raises(CorruptFileError, match=r"metrics.jsonl: line 11 is not valid JSON"):
        mon._truncate_logs(100)
    assert metrics.read_bytes() == damaged and not list(mon.dir.glob("*.tmp"))


def test_progress_bars_show_on_the_main_process_only_and_obey_disable_tqdm():
    from types import SimpleNamespace

    from rlhf_ext.progress import progress

    def trainer(disable_tqdm, main):
        return SimpleNamespace(args=SimpleNamespace(disable_tqdm=disable_tqdm), is_world_process_zero=lambda: main)

    assert not progress(trainer(False, True), range(3)).disable
    assert progress(trainer(True, True), range(3)).disable
    assert progress(trainer(False, False), range(3)).disable  # N processes would draw N bars over each other
    assert list(progress(trainer(True, False), range(3))) == [0, 1, 2]


def _monitor_dir(tmp_path, **files):
    """A run's monitor/ folder by hand: two iterations, one alarm, one sample; `files` replaces a file's text."""
    mon = tmp_path / "run" / "monitor"
    mon.mkdir(parents=True)
    sample = {"iteration": 1, "prompt": "user: hi", "text": "hello there", "score": 0.5, "length": 2, "eos": True,
              "audit": {}}
    text = {"run.json": json.dumps({"kl_controller": "hard", "kl_target": 2.0}),
            "metrics.jsonl": "".join(json.dumps({"iteration": i, "objective/scores": 0.1 * i, "objective/kl": 0.2})
                                     + "\n" for i in (1, 2)),
            "alarms.jsonl": json.dumps({"iteration": 2, "detector": "length_drift", "value": 1.6, "threshold": 1.5,
                                        "action": "queue"}) + "\n",
            "samples.jsonl": json.dumps(sample) + "\n"}
    for name, content in {**text, **files}.items():
        (mon / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return mon.parent


_SAMPLE = '{"iteration": 1, "prompt": "p", "score": 0.5, "length": 2, "eos": true}\n'


@pytest.mark.parametrize("files,message", [
    ({"run.json": '{"kl_controller": "hard",\n'}, r"monitor/run\.json: not valid JSON"),
    ({"metrics.jsonl": b'{"iteration": 1}\n{"iteration": 2, "note": "caf\xe9"}\n{"iteration": 3}\n'},
     r"monitor/metrics\.jsonl: line 2 is not UTF-8 text"),
    ({"metrics.jsonl": '{"iteration": 1}\n{"iteration": 2,\n{"iteration": 3}\n'},
     r"monitor/metrics\.jsonl: line 2 is not valid JSON"),
    ({"metrics.jsonl": '{"iteration": 1}\n{"objective/kl": 0.1}\n'}, r'metrics\.jsonl: line 2 has no "iteration"'),
    ({"samples.jsonl": _SAMPLE}, r'monitor/samples\.jsonl: line 1 has no "text"'),
    ({"alarms.jsonl": '{"iteration": 2, "detector": "length_drift", "value": 1.6, "action": "queue"}\n'},
     r'monitor/alarms\.jsonl: line 1 has no "threshold"'),
    ({"metrics.jsonl": ""}, r"monitor/metrics\.jsonl holds no iteration yet"),
])
def test_report_on_damaged_monitor_files_exits_2_naming_file_and_line(tmp_path, capsys, files, message):
    from rlhf_ext.cli import main as cli

    run = _monitor_dir(tmp_path, **files)
    with pytest.raises(SystemExit) as stop:
        cli(["report", str(run)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and re.search(message, err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "report").exists()  # no empty or partial report


def test_report_skips_a_torn_last_line(tmp_path):
    """A trainer killed (or still writing) mid-line: the report is written from the complete lines."""
    from rlhf_ext.monitor.report import load_run, write_report

    run = _monitor_dir(tmp_path, **{"metrics.jsonl": '{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3, "obj'})
    assert [m["iteration"] for m in load_run(run)["metrics"]] == [1, 2]
    assert "hello there" in write_report(run).read_text()


def test_proxy_vs_audit_restarts_its_baseline_when_a_resumed_run_watches_another_judge():
    """The baseline is one judge's per-sample sums; a resumed run whose first judge is another (an
    `audit_model_paths` entry added in front of audit_funcs, or the YAML's judge replaced) compared that judge's
    scores with it: a judge on another scale read as the audit collapsing, and the alarm fired on a flat run."""
    saved = build("detector", "proxy_vs_audit", window=2)
    for _ in range(2):
        saved.update(_obs([1] * 4, [True] * 4, scores=[0.0] * 4, audit={"gold": [1.0, 3.0] * 2}))
    resumed = build("detector", "proxy_vs_audit", window=2)
    resumed.load_state_dict(saved.state_dict())
    with pytest.warns(UserWarning, match="baseline is judge 'gold''s and this run's first judge is 'rm'"):
        values = [resumed.update(_obs([1] * 4, [True] * 4, scores=[0.1] * 4, audit={"rm": [-1.0, 1.0] * 2}))[0]
                  for _ in range(4)]
    assert values == [0.0] * 4 and resumed.watching == "rm"
