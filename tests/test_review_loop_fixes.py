"""The review loop's edge cases: reviewed pairs on an implicit-prompt reward dataset, NaN and lone surrogates in the
queue, NaN audits and scores in the detector, the report and the review order, and the review server's HTTP edges.
(The page's side of these: test_review_browser.py.)"""

import json
import math
import random
import re
import socket
import time
import urllib.request
import warnings

import pytest
import torch
from datasets import Dataset

from rlhf_ext.data import with_extra_preferences
from rlhf_ext.integrity import CorruptFileError
from rlhf_ext.monitor import review
from rlhf_ext.monitor.queue import ReviewQueue
from rlhf_ext.monitor.review import serve
from rlhf_ext.plugins.detectors import Observation
from rlhf_ext.registry import build

from .test_review import TOKEN, call, make_pair, read_lines


def strict_json(text):
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def server_of():
    """serve(output_dir) that is shut down after the test."""
    started = []

    def start(output_dir, **kw):
        server, url = serve(output_dir, **{"token": TOKEN, **kw})
        started.append(server)
        return server, url

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


# -- extra_preferences on a reward dataset in TRL's implicit-prompt format


def reviewed(tmp_path, conversational: bool) -> ReviewQueue:
    """preferences.jsonl as the review page writes it (explicit prompt): one pair, the reference picked."""
    q = ReviewQueue(tmp_path / "run")
    q.add(make_pair("it3-0", "great great great great", "a slow but moving book .",
                    prompt="Human: review the book. Assistant:", conversational=conversational))
    q.decide("it3-0", "reference")
    return q


@pytest.mark.parametrize("conversational", [False, True])
def test_reviewed_pairs_keep_their_prompt_on_an_implicit_prompt_dataset(tmp_path, conversational):
    """A base without a 'prompt' column (chosen/rejected hold the whole exchange, as Anthropic/hh-rlhf): the reviewed
    rows get their prompt put in front of each response — what TRL's reward trainer does with an explicit prompt —
    instead of losing it to the shared-columns rule."""
    q = reviewed(tmp_path, conversational)
    pref = read_lines(q.preferences_path)[0]
    if conversational:
        exchange = [{"role": "user", "content": "Human: review the movie."}]
        base = [{"chosen": exchange + [{"role": "assistant", "content": "fine ."}],
                 "rejected": exchange + [{"role": "assistant", "content": "great great"}]}] * 3
    else:
        base = [{"chosen": "Human: review the movie. Assistant: fine .",
                 "rejected": "Human: review the movie. Assistant: great great"}] * 3
    merged = with_extra_preferences(Dataset.from_list(base), [q.preferences_path])
    assert merged.column_names == ["chosen", "rejected"] and len(merged) == 4
    assert merged.select(range(3)).to_list() == base  # the base rows as they were
    assert merged[3] == {"chosen": pref["prompt"] + pref["chosen"], "rejected": pref["prompt"] + pref["rejected"]}
    if conversational:
        assert [m["role"] for m in merged[3]["chosen"]] == ["user", "assistant"]
    else:
        assert merged[3]["chosen"] == "Human: review the book. Assistant: a slow but moving book ."


def test_an_implicit_prompt_file_converts_an_explicit_base(tmp_path):
    """The other way round: the base has prompts, an extra file has none; the base's prompts go into its responses."""
    f = tmp_path / "implicit.jsonl"
    f.write_text(json.dumps({"chosen": "Q: a? A: yes", "rejected": "Q: a? A: no"}) + "\n")
    base = Dataset.from_list([{"prompt": "Q: b? A:", "chosen": " fine", "rejected": " bad"}])
    merged = with_extra_preferences(base, [f])
    assert merged.to_list() == [{"chosen": "Q: b? A: fine", "rejected": "Q: b? A: bad"},
                                {"chosen": "Q: a? A: yes", "rejected": "Q: a? A: no"}]
    both = with_extra_preferences(base, [reviewed(tmp_path, conversational=False).preferences_path])
    assert both.column_names == ["prompt", "chosen", "rejected"]  # all explicit: the prompts stay a column


def test_mixed_formats_name_which_file_is_which(tmp_path):
    text = reviewed(tmp_path / "t", conversational=False).preferences_path
    chat = reviewed(tmp_path / "c", conversational=True).preferences_path
    base = Dataset.from_list([{"chosen": "Q: a? A: yes", "rejected": "Q: a? A: no"}])
    with pytest.raises(ValueError, match=re.escape(f"the training set is text; {text} is text; {chat} is "
                                                   f"conversational")):
        with_extra_preferences(base, [text, chat])
    odd = tmp_path / "odd.jsonl"  # a text prompt with chat-message responses cannot be joined into one exchange
    odd.write_text(json.dumps({"prompt": "Q:", "chosen": [{"role": "assistant", "content": "y"}],
                               "rejected": [{"role": "assistant", "content": "n"}]}) + "\n")
    chat_base = Dataset.from_list([{"chosen": [{"role": "user", "content": "Q"}], "rejected": [{"role": "user",
                                                                                                "content": "R"}]}])
    with pytest.raises(ValueError, match=f"{re.escape(str(odd))} has a text prompt but conversational responses"):
        with_extra_preferences(chat_base, [odd])


# -- NaN and lone surrogates in the queue


def test_nan_in_a_queued_pair_is_written_and_served_as_null(tmp_path, server_of):
    """An audit that returned NaN for one sample: the queue line is standard JSON (null), and a queue written before
    that (NaN tokens) is still served as JSON a browser can parse."""
    q = ReviewQueue(tmp_path)
    bad = make_pair("nan", "long long long", "short")
    bad["flagged"]["audit"] = {"gold": float("nan")}
    bad["flagged"]["kl"] = float("inf")
    q.add(bad)
    line = q.queue_path.read_text().splitlines()[0]
    assert strict_json(line)["flagged"]["audit"] == {"gold": None} and strict_json(line)["flagged"]["kl"] is None
    with open(q.queue_path, "a") as f:  # as the previous version wrote it
        f.write(json.dumps({**bad, "id": "old"}) + "\n")
    assert "NaN" in q.queue_path.read_text().splitlines()[1]
    server, url = server_of(tmp_path)
    req = urllib.request.Request(url + "api/state", headers={"X-Review-Token": TOKEN})
    with urllib.request.urlopen(req, timeout=10) as res:
        state = strict_json(res.read().decode())
    assert [p["id"] for p in state["pending"]] == ["nan", "old"]
    assert [p["flagged"]["audit"]["gold"] for p in state["pending"]] == [None, None]


def test_lone_surrogate_is_replaced_when_queued_and_refused_when_read(tmp_path, server_of):
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "fine", "fine too"))
    with pytest.warns(UserWarning, match=r"'s1': flagged.completion\[0\].content, flagged.text held a lone UTF-16 "
                                         r"surrogate .* queued with U\+FFFD"):
        q.add(make_pair("s1", "half an emoji: \ud83d", "fine"))  # the trainer goes on
    assert q.records()[1]["flagged"]["text"] == "half an emoji: \ufffd"
    q.add(make_pair("e1", "a whole emoji: \U0001F600", "fine"))
    with open(q.queue_path, "a") as f:  # valid pairs written by an ASCII-only writer are fine
        f.write(json.dumps(make_pair("e2", "a whole emoji: \U0001F600", "fine")) + "\n")
    assert [r["flagged"]["text"][-1] for r in q.records()[2:]] == ["\U0001F600"] * 2
    server, url = server_of(tmp_path)
    with open(q.queue_path, "a") as f:  # one line with an escaped lone surrogate (valid JSON, not valid text)
        f.write(json.dumps(make_pair("s2", "half an emoji: \ud83d", "fine")) + "\n")
    message = r'queue\.jsonl: line 5 has a lone UTF-16 surrogate in "flagged.completion\[0\].content"'
    with pytest.raises(CorruptFileError, match=message):
        q.records()
    code, answer = call(url, "/api/state")  # the page names the line to repair, not "Internal error"
    assert code == 500 and re.search(message, answer["error"])
    code, answer = call(url, "/api/decide", {"id": "p0", "decision": "skip"})
    assert code == 500 and re.search(message, answer["error"])
    assert not q.decisions_path.exists()  # refused before it was recorded


# -- NaN scores: the review order and the report


def test_proxy_margin_order_puts_an_unknown_margin_last(tmp_path):
    q = ReviewQueue(tmp_path)
    q.dir.mkdir(parents=True)
    margins = {"a": 0.5, "n1": math.nan, "b": 2.0, "c": 1.0, "n2": None, "d": 3.0, "e": -1.0}
    with open(q.queue_path, "w") as f:  # NaN: an older writer's; null: this one's
        for pid, m in margins.items():
            pair = make_pair(pid, "f", "r")
            pair["reference"]["score"] = 0.25
            pair["flagged"]["score"] = None if m is None else 0.25 + m
            f.write(json.dumps(pair) + "\n")
    assert [r["id"] for r in q.pending("proxy_margin")] == ["d", "b", "c", "a", "e", "n1", "n2"]


def test_report_top_samples_put_a_nan_score_last(tmp_path):
    from rlhf_ext.monitor.report import write_report

    mon = tmp_path / "monitor"
    mon.mkdir()
    (mon / "metrics.jsonl").write_text('{"iteration": 1, "objective/scores": 0.1}\n'
                                       '{"iteration": 2, "objective/scores": 0.2}\n')
    scores = [float(i) for i in range(13)] + [math.nan, 100.0]
    (mon / "samples.jsonl").write_text("".join(json.dumps(
        {"iteration": 1 if k < 14 else 2, "prompt": "p", "text": f"scored {s}", "score": s, "length": 3, "eos": True,
         "audit": {}}) + "\n" for k, s in enumerate(scores)))
    page = write_report(tmp_path, top=14).read_text().split("Top-reward")[1]
    shown = re.findall(r"<td class=t>scored ([^<]*)</td>", page)
    assert shown == ["100.0"] + [f"{float(i)}" for i in range(12, -1, -1)]  # the NaN row is the one cut


# -- proxy_vs_audit with an audit that cannot grade every sample


def _obs(iteration, proxy, audit):
    n = len(audit)
    return Observation(iteration=iteration, lengths=torch.full((n,), 10.0), has_eos=torch.ones(n, dtype=torch.bool),
                       texts=["x"] * n, ids=[[1, 2, 3]] * n, scores=torch.full((n,), proxy), norm=torch.zeros(n, 1),
                       valid=torch.ones(n, dtype=torch.bool), audit={"gold": audit}, metrics={}, reference={})


def _first_alarm(ungraded):
    """Iteration of the first alarm on a run whose audit collapses from iteration 7; `ungraded`: {iteration: value}
    put in place of one sample's audit score."""
    rng = random.Random(0)
    d = build("detector", "proxy_vs_audit")
    fired_at = None
    for it in range(1, 21):
        mean = 1.0 if it <= 6 else 1.0 - 0.3 * (it - 6)
        audit = [mean + rng.gauss(0, 0.2) for _ in range(32)]
        if it in ungraded:
            audit[5] = ungraded[it]
        value, fired = d.update(_obs(it, 0.1 * it, audit))
        assert value is None or math.isfinite(value)
        if fired and fired_at is None:
            fired_at = it
    return fired_at, d


def test_proxy_vs_audit_leaves_ungraded_samples_out():
    """One NaN (or None, TRL's "not applicable") in the baseline window made every later statistic NaN: the detector
    went silent for the run. Left out, counted, reported once, it fires as it would have."""
    clean, _ = _first_alarm({})
    assert clean is not None
    with pytest.warns(UserWarning, match=r"Audit 'gold' returned no number \(None, NaN or ±inf\) for 1 of 32 "
                                         r"samples at iteration 2") as w:
        fired_at, d = _first_alarm({2: math.nan, 3: None, 9: math.nan})
    assert fired_at == clean and d.dropped == 3
    assert len([x for x in w if "returned no number" in str(x.message)]) == 1  # once, not every iteration
    assert d.state_dict()["dropped"] == 3 and all(math.isfinite(x) for b in d.batches for x in b)
    # a checkpoint saved before: its NaN batch is dropped, not kept to silence the resumed run
    resumed = build("detector", "proxy_vs_audit")
    resumed.load_state_dict({**d.state_dict(), "batches": [[0.1, math.nan, math.nan, 32]] + d.batches})
    assert resumed.batches == d.batches
    # an ungraded sample is not the most suspicious one
    obs = _obs(1, 0.0, [0.0, math.nan, -1.0, None])
    obs.scores = torch.tensor([1.0, 5.0, 1.0, 9.0])
    assert d.suspicious(obs, 2) == [2, 0]


def test_proxy_vs_audit_skips_an_iteration_with_no_graded_sample():
    d = build("detector", "proxy_vs_audit", window=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert d.update(_obs(1, 0.0, [None, math.nan])) == (None, False)
    assert d.batches == [] and d.dropped == 2


# -- the server's HTTP edges


def _raw(port, request: bytes, timeout=5.0, close_write=False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _post(port, body: bytes, length=None) -> bytes:
    return (b"POST /api/decide HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\nConnection: close"
            b"\r\nX-Review-Token: %s\r\nContent-Length: %d\r\n\r\n"
            % (port, TOKEN.encode(), len(body) if length is None else length) + body)


def test_http_edges(tmp_path, server_of, monkeypatch, capsys):
    monkeypatch.setattr(review.Handler, "timeout", 0.5)  # SOCKET_TIMEOUT, shortened for the test
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "a", "b"))
    server, url = server_of(tmp_path)
    port = server.port
    # nested past the parser's stack: a 400 that says so, not "Internal error: maximum recursion depth exceeded"
    answer = _raw(port, _post(port, b"[" * 5000))
    assert answer.startswith(b"HTTP/1.0 400") and b"nested too deeply" in answer
    # a body shorter than its Content-Length: answered once the socket timeout passes, not a thread hung forever
    start = time.monotonic()
    answer = _raw(port, _post(port, b"{}", length=100), timeout=10)
    assert answer.startswith(b"HTTP/1.0 408") and b"Content-Length says 100 bytes" in answer
    assert time.monotonic() - start < 5
    answer = _raw(port, _post(port, b"{}", length=100), close_write=True)  # the client gave up: its side is closed
    assert answer.startswith(b"HTTP/1.0 400") and b"ended after 2 of the 100 bytes" in answer
    # HEAD: the GET's status and headers, no body
    head = _raw(port, b"HEAD /api/state HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Review-Token: %s\r\nConnection: close\r\n\r\n"
                % (port, TOKEN.encode()))
    status, _, body = head.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.0 200") and b"application/json" in status and body == b""
    # an idle keep-alive connection closed by the timeout stays out of the terminal
    with socket.create_connection(("127.0.0.1", port)) as s:
        assert s.recv(1) == b""  # closed by the server after 0.5 s
    assert not q.decisions_path.exists()
    # a client gone mid-reply: no traceback either; a real error still gets one
    for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
        try:
            raise error
        except OSError:
            server.handle_error(None, ("127.0.0.1", 1))
    try:
        raise KeyError("a real bug")
    except KeyError:
        server.handle_error(None, ("127.0.0.1", 1))
    err = capsys.readouterr().err
    assert "Broken pipe" not in err and "reset" not in err and "Request timed out" not in err
    assert err.count("Traceback") == 1 and "a real bug" in err
