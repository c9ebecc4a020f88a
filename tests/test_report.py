"""`rlhf-ext report` as a reader sees it: the sample table shows what a policy hides (invisible characters, line
breaks, text too long to fit) and every sample, and a short run still draws its charts."""

from __future__ import annotations

import json
import re

from rlhf_ext.monitor.report import write_report


def _run(tmp_path, samples, metrics=None, run=None):
    mon = tmp_path / "run" / "monitor"
    mon.mkdir(parents=True)
    (mon / "run.json").write_text(json.dumps(run or {"kl_controller": "hard", "kl_target": 2.0,
                                                     "reference": {"length": 5.0}}))
    (mon / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics or [
        {"iteration": 1, "objective/scores": 0.5, "objective/kl": 0.1, "response/length_mean": 6.0}]))
    (mon / "alarms.jsonl").write_text("")
    (mon / "samples.jsonl").write_text("".join(json.dumps({"iteration": 1, "score": 1.0, "length": 3, "eos": True,
                                                           "audit": {}, **s}) + "\n" for s in samples))
    return tmp_path / "run"


def test_the_sample_table_marks_hidden_text_and_keeps_line_breaks(tmp_path):
    """The review page marks invisible characters; the report showed "Great answer" with a hidden instruction and a
    right-to-left override inside, unmarked; line breaks collapsed and a long unbroken answer made the page wider
    than the window."""
    hidden = "Great\u200b\u200b answer\U000E0049\U000E0047 \u202eevil"
    page = write_report(_run(tmp_path, [{"prompt": "p </td><script>alert(1)</script>", "text": hidden},
                                        {"prompt": "q", "text": "1. apple\n2. pear"}])).read_text()
    assert "⟨2 invisible: U+200B⟩" in page and "⟨2 invisible: U+E0049 U+E0047⟩" in page
    assert "⟨1 invisible: U+202E⟩" in page and "\u202e" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert "1. apple\n2. pear" in page
    assert re.search(r"td\.p,td\.t\{white-space:pre-wrap;overflow-wrap:anywhere\}", page)


def test_a_collapsed_policy_answering_several_prompts_alike_shows_each_sample(tmp_path):
    """Rows were merged on (iteration, text): three prompts given one answer became one row, the lowest-scored."""
    samples = [{"prompt": f"prompt {i}", "text": "same answer", "score": s} for i, s in enumerate((9.0, 8.0, 7.0))]
    page = write_report(_run(tmp_path, samples)).read_text()
    assert page.count("same answer") == 3 and "9.000" in page


def test_a_one_iteration_run_draws_its_points_and_a_null_reference_is_read(tmp_path, monkeypatch):
    """A one-point line draws nothing: a 1-iteration run's report had four empty charts. A run.json with
    "reference": null stopped the report with a traceback."""
    import matplotlib.axes

    drawn, real = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: drawn.append((len(a[0]) if a else 0, kw.get("marker"))) or real(self, *a, **kw))
    write_report(_run(tmp_path, [{"prompt": "p", "text": "t"}],
                      run={"kl_controller": "hard", "kl_target": 2.0, "reference": None}))
    single = [marker for n, marker in drawn if n == 1]
    assert single and all(marker for marker in single)


def test_alarms_are_summarised_per_detector_and_a_fixed_beta_shows_no_bound(tmp_path):
    """A detector firing at every iteration made one row each (1,552 rows, a 39,000-px page, for a long run); the
    summary showed δ under a fixed β, which bounds nothing."""
    run = _run(tmp_path, [{"prompt": "p", "text": "t"}], run={"kl_controller": "fixed", "kl_target": 4.0})
    fired = [{"iteration": i, "detector": "length_drift", "value": 1.0 + i / 10, "threshold": 1.5, "action": "log"}
             for i in range(5, 300)]
    fired += [{"iteration": 7, "detector": "eos_collapse", "value": 0.2, "threshold": 0.5, "action": "log",
               "direction": "below"}, {"iteration": 9, "detector": "eos_collapse", "value": 0.1, "threshold": 0.5,
                                       "action": "log", "direction": "below"}]
    (run / "monitor" / "alarms.jsonl").write_text("".join(json.dumps(a) + "\n" for a in fired))
    page = write_report(run).read_text()
    assert "<tr><td>length_drift</td><td>295</td><td>5</td><td>299</td><td>30.9</td></tr>" in page
    assert "<tr><td>eos_collapse</td><td>2</td><td>7</td><td>9</td><td>0.1</td></tr>" in page
    assert "<details><summary>every firing (297)</summary>" in page
    assert "<th>δ</th><td>none (a fixed β)</td>" in page


def test_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib reads text between two `$` as mathtext: a detector or audit function named `p$\\notacommand$` made
    the legend raise, and no report was written at all."""
    name = "p$\\notacommand$"
    run = _run(tmp_path, [{"prompt": "p", "text": "t"}], metrics=[
        {"iteration": i, "objective/scores": 0.1 * i, f"audit/{name}": 0.1 * i, f"monitor/{name}": 1.0}
        for i in (1, 2)])
    (run / "monitor" / "alarms.jsonl").write_text(json.dumps({"iteration": 2, "detector": name, "value": 2.0,
                                                              "threshold": 1.0, "action": "log"}) + "\n")
    page = write_report(run).read_text()
    assert "notacommand" in page  # the alarm table names it
