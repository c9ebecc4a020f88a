"""The review queue and the review server, without a browser (the page itself: test_review_browser.py)."""

import json
import random
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from datasets import Dataset

from rlhf_ext.integrity import CorruptFileError
from rlhf_ext.monitor.queue import ReviewQueue
from rlhf_ext.monitor.review import MAX_BODY, main, serve

from .conftest import FILL, NEG, POS, preference_rows


def make_pair(pid, flagged_text, reference_text, prompt="write a short review of the movie .", conversational=True,
              iteration=3):
    """A queue record as the trainer's monitor writes it."""
    def response(text, kl, eos):
        completion = [{"role": "assistant", "content": text}] if conversational else text
        return {"completion": completion, "text": text, "length": len(text.split()), "eos": eos, "kl": kl,
                "score": 1.5 if kl else 0.2, "rewards": {"member_0": 0.9 if kl else 0.1, "member_1": 0.7},
                "audit": {"gold": -0.5 if kl else 0.4}}

    return {"id": pid, "iteration": iteration, "detectors": ["length_drift"],
            "prompt": [{"role": "user", "content": prompt}] if conversational else prompt + " ",
            "flagged": response(flagged_text, 3.2, False), "reference": response(reference_text, 0.0, True)}


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- ReviewQueue


@pytest.mark.parametrize("conversational", [True, False])
def test_decide_undo_export_round_trip(tmp_path, conversational):
    q = ReviewQueue(tmp_path)
    for i in range(4):
        q.add(make_pair(f"p{i}", f"great great great {i}", f"the movie was fine {i} .", conversational=conversational))
    q.decide("p0", "flagged", reviewer="ann")
    q.decide("p1", "reference")
    q.decide("p2", "both_bad")
    q.decide("p3", "skip")
    assert q.pending() == []
    rows = read_lines(q.preferences_path)
    assert [r["source"]["queue_id"] for r in rows] == ["p0", "p1"]  # both_bad and skip give no row
    p0, p1 = (q.records()[i] for i in (0, 1))
    assert rows[0]["prompt"] == p0["prompt"] and rows[0]["chosen"] == p0["flagged"]["completion"]
    assert rows[0]["rejected"] == p0["reference"]["completion"]
    assert rows[1]["chosen"] == p1["reference"]["completion"] and rows[1]["rejected"] == p1["flagged"]["completion"]
    assert rows[0]["source"]["reviewer"] == "ann" and rows[0]["source"]["decision"] == "flagged"
    if conversational:
        assert rows[0]["chosen"] == [{"role": "assistant", "content": "great great great 0"}]
    else:
        assert rows[0]["prompt"] == "write a short review of the movie . " and rows[0]["chosen"] == "great great great 0"
    assert q.progress() == {"total": 4, "decided": 4, "pending": 0, "preferences": 2}

    q.undo("p0")
    assert [r["id"] for r in q.pending()] == ["p0"]
    assert [r["source"]["queue_id"] for r in read_lines(q.preferences_path)] == ["p1"]
    assert [e["decision"] for e in read_lines(q.decisions_path)] == ["flagged", "reference", "both_bad", "skip", "undo"]
    assert q.progress() == {"total": 4, "decided": 3, "pending": 1, "preferences": 1}


def test_last_decision_is_the_most_recent_in_effect(tmp_path):
    q = ReviewQueue(tmp_path)
    for i in range(3):
        q.add(make_pair(f"p{i}", "a", "b"))
    assert q.last_decision() is None
    q.decide("p0", "flagged")
    q.decide("p1", "skip")
    q.undo("p0")
    q.decide("p0", "reference")  # re-decided after p1: now the last
    assert q.last_decision()["id"] == "p0" and q.last_decision()["decision"] == "reference"
    q.undo("p0")
    assert q.last_decision()["id"] == "p1"


def test_torn_last_line_is_skipped(tmp_path):
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "a", "b"))
    q.add(make_pair("p1", "c", "d"))
    with open(q.queue_path, "a") as f:  # a trainer killed mid-write
        f.write(json.dumps(make_pair("p2", "e", "f"))[:40])
    with open(q.decisions_path, "a") as f:
        f.write('{"id": "p0", "decis')
    assert [r["id"] for r in q.records()] == ["p0", "p1"]
    assert [r["id"] for r in q.pending()] == ["p0", "p1"]
    q.decide("p1", "reference")
    assert q.progress() == {"total": 2, "decided": 1, "pending": 1, "preferences": 1}


# -- the HTTP server


@pytest.fixture
def served(tmp_path):
    q = ReviewQueue(tmp_path)
    for i in range(3):
        q.add(make_pair(f"p{i}", f"flagged {i}", f"reference {i}"))
    server, url = serve(tmp_path, reviewer="bob", token=TOKEN)
    yield q, url
    server.shutdown()
    server.server_close()


TOKEN = "test-token"  # the review token the tests' servers use (`serve(..., token=TOKEN)`); `call` sends it


def call(url, path, body=None, headers=None, raw=None):
    """(status, JSON body) of a GET (body None) or a JSON POST, with the review token: TOKEN, or the one in `url`'s
    #token= (the page URL `rlhf-ext review` prints)."""
    url, _, fragment = url.partition("#")
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    hdrs = {"X-Review-Token": fragment.removeprefix("token=") if fragment else TOKEN,
            **({"Content-Type": "application/json"} if data is not None else {})}
    hdrs.update(headers or {})
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=hdrs, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        assert e.headers.get_content_type() == "application/json"
        return e.code, json.loads(e.read())


def test_api_state_decide_undo(served):
    q, url = served
    assert url.startswith("http://127.0.0.1:")
    status, state = call(url, "/api/state")
    assert status == 200
    assert [p["id"] for p in state["pending"]] == ["p0", "p1", "p2"]
    assert state["counts"] == {"total": 3, "decided": 0, "pending": 3, "preferences": 0}
    assert state["last"] is None and state["preferences_path"] == str(q.preferences_path)
    assert state["pending"][0]["flagged"]["rewards"] == {"member_0": 0.9, "member_1": 0.7}

    status, state = call(url, "/api/decide", {"id": "p0", "decision": "reference"})
    assert status == 200 and [p["id"] for p in state["pending"]] == ["p1", "p2"]
    assert state["last"]["id"] == "p0" and state["last"]["reviewer"] == "bob"
    status, state = call(url, "/api/decide", {"id": "p1", "decision": "both_bad"})
    assert state["counts"] == {"total": 3, "decided": 2, "pending": 1, "preferences": 1}
    assert call(url, "/api/decide", {"id": "p1", "decision": "flagged"})[0] == 409  # decided already: undo first

    status, state = call(url, "/api/undo", {})  # the most recent decision: p1
    assert status == 200 and state["undone"] == "p1" and [p["id"] for p in state["pending"]] == ["p1", "p2"]
    status, state = call(url, "/api/undo", {"id": "p0"})
    assert state["undone"] == "p0" and state["pending"][0]["id"] == "p0"  # the undone pair comes back first
    assert call(url, "/api/state?prefer=p2")[1]["pending"][0]["id"] == "p2"
    assert call(url, "/api/undo", {})[0] == 409  # nothing left to undo
    assert [(e["id"], e["decision"]) for e in read_lines(q.decisions_path)] == [
        ("p0", "reference"), ("p1", "both_bad"), ("p1", "undo"), ("p0", "undo")]
    assert read_lines(q.preferences_path) == []


def test_proxy_margin_order_shows_the_most_confidently_preferred_flagged_answer_first(tmp_path):
    """`order="proxy_margin"`: pending pairs by score(flagged) − score(reference), widest first, ties in queue order;
    decided pairs drop out and the rest keep that order. The default stays the queue's."""
    q = ReviewQueue(tmp_path)
    margins = {"a": 0.5, "b": 2.0, "c": -1.0, "d": 2.0, "e": 0.0}  # b and d tie: b was queued first
    for pid, m in margins.items():
        pair = make_pair(pid, f"flagged {pid}", f"reference {pid}")
        pair["reference"]["score"] = 0.25
        pair["flagged"]["score"] = 0.25 + m
        q.add(pair)
    assert [r["id"] for r in q.pending()] == ["a", "b", "c", "d", "e"]
    assert [r["id"] for r in q.pending("proxy_margin")] == ["b", "d", "a", "e", "c"]
    server, url = serve(tmp_path, reviewer="bob", order="proxy_margin", token=TOKEN)
    try:
        status, state = call(url, "/api/state")
        assert state["order"] == "proxy_margin" and [p["id"] for p in state["pending"]] == ["b", "d", "a"]
        _, state = call(url, "/api/decide", {"id": "b", "decision": "reference"})
        assert [p["id"] for p in state["pending"]] == ["d", "a", "e"]
        _, state = call(url, "/api/undo", {"id": "b"})
        assert [p["id"] for p in state["pending"]] == ["b", "d", "a"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="review order must be one of queue, proxy_margin; got 'newest'"):
        q.pending("newest")
    with pytest.raises(ValueError, match="review order must be one of"):
        serve(tmp_path, order="newest")


@pytest.mark.parametrize("body,status", [({"id": "p0", "decision": "left"}, 400), ({"decision": "skip"}, 400),
                                         ({"id": "nope", "decision": "skip"}, 404), (["p0"], 400)])
def test_api_rejects_bad_decisions_with_json(served, body, status):
    q, url = served
    code, answer = call(url, "/api/decide", body)
    assert code == status and isinstance(answer["error"], str) and answer["error"]
    assert not q.decisions_path.exists()


def test_api_rejects_bad_requests(served):
    q, url = served
    assert call(url, "/api/decide", raw=b"{not json")[0] == 400
    # valid JSON Python refuses to read (an integer of 5000 digits): was 500 "Internal error"
    code, answer = call(url, "/api/decide", raw=b'{"id": ' + b"1" * 5000 + b', "decision": "flagged"}')
    assert code == 400 and answer["error"].startswith("The request body is not valid JSON")
    for length in ("-1", "1_0", "ten"):  # int() read "1_0" as 10; -1 was "limited to 65536 bytes"
        code, answer = call(url, "/api/decide", raw=b'{"id": "p0", "decision": "skip"}',
                            headers={"Content-Length": length})
        assert code == 411 and "a whole number of bytes" in answer["error"], (length, answer)
    assert call(url, "/api/decide", raw=b"x" * (MAX_BODY + 1))[0] == 413
    code, answer = call(url, "/api/decide", raw=b'{"id": "p0", "decision": "skip"}', headers={"Content-Type": "text/plain"})
    assert code == 415 and "application/json" in answer["error"]
    assert call(url, "/api/nothing", {})[0] == 404
    assert call(url, "/etc/passwd")[0] == 404
    assert call(url, "/../queue.jsonl")[0] == 404
    assert not q.decisions_path.exists()


def test_wrong_host_is_rejected(served):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own name as Host."""
    q, url = served
    port = url.rsplit(":", 1)[1].strip("/")
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "localhost"):
        code, answer = call(url, "/api/state", headers={"Host": host})
        assert code == 403 and "Host" in answer["error"]
        assert call(url, "/api/decide", {"id": "p0", "decision": "skip"}, headers={"Host": host})[0] == 403
    assert call(url, "/api/state", headers={"Host": f"localhost:{port}"})[0] == 200
    assert not q.decisions_path.exists()


def test_foreign_origin_post_is_rejected(served):
    q, url = served
    port = url.rsplit(":", 1)[1].strip("/")
    for origin in ("http://evil.example", f"http://localhost:{port}", "null", f"https://127.0.0.1:{port}"):
        code, answer = call(url, "/api/decide", {"id": "p0", "decision": "skip"}, headers={"Origin": origin})
        assert code == 403 and origin in answer["error"]
    assert not q.decisions_path.exists()
    assert call(url, "/api/decide", {"id": "p0", "decision": "skip"}, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200


def test_api_needs_the_token(tmp_path):
    """Any user of the machine can connect to 127.0.0.1: without the server's token (a random one unless given) the
    API neither shows the queue nor records or undoes a decision; the page itself carries no secret."""
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "a", "b"))
    server, url = serve(tmp_path)
    try:
        assert len(server.token) >= 32 and server.page_url == f"{url}#token={server.token}"
        for token in (None, "", "wrong", TOKEN):
            headers = {} if token is None else {"X-Review-Token": token}
            for path, body in (("/api/state", None), ("/api/decide", {"id": "p0", "decision": "flagged"}),
                               ("/api/undo", {})):
                req = urllib.request.Request(url.rstrip("/") + path, headers={**headers, "Content-Type": "application/json"},
                                             data=None if body is None else json.dumps(body).encode())
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=10)
                assert e.value.code == 403 and "token" in json.loads(e.value.read())["error"]
        assert not q.decisions_path.exists()
        with urllib.request.urlopen(url, timeout=10) as res:
            assert res.status == 200 and server.token not in res.read().decode()
        ok = urllib.request.Request(url + "api/state", headers={"X-Review-Token": server.token})
        with urllib.request.urlopen(ok, timeout=10) as res:
            assert json.loads(res.read())["counts"]["pending"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_page_and_static_files(served):
    _, url = served
    with urllib.request.urlopen(url, timeout=10) as res:
        html = res.read().decode()
        assert res.headers.get_content_type() == "text/html"
        assert "script-src 'self'" in res.headers["Content-Security-Policy"]
    assert '<script src="/review.js"' in html and "http" not in html.replace("http-equiv", "")  # nothing from elsewhere
    for path in ("/review.js", "/review.css"):
        with urllib.request.urlopen(url + path.lstrip("/"), timeout=10) as res:
            assert res.status == 200 and res.read()
    js = (urllib.request.urlopen(url + "review.js", timeout=10)).read().decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js  # samples only ever go in as textContent


# -- damaged files: refused with the file and line, never skipped (a skipped line was a dropped decision)


def test_damaged_queue_line_loses_no_decided_preference(tmp_path):
    """preferences.jsonl is rewritten from what is read: a damaged middle line used to be skipped, and the next
    decision rewrote the file without that pair's preference."""
    q = ReviewQueue(tmp_path)
    for i in range(3):
        q.add(make_pair(f"p{i}", f"flagged {i}", f"reference {i}"))
    q.decide("p0", "reference")
    q.decide("p1", "reference")
    lines = q.queue_path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"id": "p1"', '"id": "p1')  # one quote lost in a hand edit
    q.queue_path.write_text("".join(lines))
    decided = q.decisions_path.read_bytes()
    for act in (lambda: q.decide("p2", "flagged"), lambda: q.undo("p0"), q.progress, q.pending, q.export_preferences):
        with pytest.raises(CorruptFileError, match=r"queue\.jsonl: line 2 is not valid JSON at column \d+"):
            act()
    assert [r["source"]["queue_id"] for r in read_lines(q.preferences_path)] == ["p0", "p1"]
    assert q.decisions_path.read_bytes() == decided  # the refused click was not logged either
    lines[1] = lines[1].replace('"id": "p1', '"id": "p1"')  # repaired: everything is there
    q.queue_path.write_text("".join(lines))
    q.decide("p2", "flagged")
    assert [r["source"]["queue_id"] for r in read_lines(q.preferences_path)] == ["p0", "p1", "p2"]


def test_damaged_decision_line_is_refused_not_skipped(tmp_path):
    q = ReviewQueue(tmp_path)
    for i in range(3):
        q.add(make_pair(f"p{i}", "a", "b"))
    q.decide("p0", "flagged")
    q.decide("p1", "reference")
    q.decide("p2", "skip")
    lines = q.decisions_path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    q.decisions_path.write_text("".join(lines))
    with pytest.raises(CorruptFileError, match=r"decisions\.jsonl: line 2 is not valid JSON"):
        q.progress()  # was {"total": 3, "decided": 2, "pending": 1}: p1's decision silently gone
    with pytest.raises(CorruptFileError, match=r"decisions\.jsonl: line 2 is not valid JSON"):
        q.undo("p2")
    assert q.decisions_path.read_text() == "".join(lines)


def test_torn_line_stays_skipped_after_the_next_append_ends_it(tmp_path):
    """A killed writer's half line, ended by the next append, is still skipped (and kept in the file); a complete
    record that only lost its newline (an editor) is still read."""
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "a", "b"))
    torn = json.dumps(make_pair("p1", "c", "d"))[:40]
    with open(q.queue_path, "a") as f:
        f.write(torn)
    q.add(make_pair("p2", "e", "f"))
    q.decide("p2", "flagged")
    with open(q.decisions_path, "a") as f:
        f.write('{"id": "p0", "decis')
    q.decide("p0", "reference")
    assert [r["id"] for r in q.records()] == ["p0", "p2"] and torn in q.queue_path.read_text()
    assert q.progress() == {"total": 2, "decided": 2, "pending": 0, "preferences": 2}
    q.queue_path.write_text(q.queue_path.read_text() + json.dumps(make_pair("p3", "g", "h")))  # no newline
    q.add(make_pair("p4", "i", "j"))
    assert [r["id"] for r in q.records()] == ["p0", "p2", "p3", "p4"]


def _write_queue(tmp_path, second: bytes) -> ReviewQueue:
    q = ReviewQueue(tmp_path)
    q.dir.mkdir(parents=True)
    q.queue_path.write_bytes((json.dumps(make_pair("p0", "a", "b")) + "\n").encode() + second + b"\n"
                             + (json.dumps(make_pair("p2", "e", "f")) + "\n").encode())
    return q


def _without(record, key):
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize("second,message", [
    (b'{"id": "p1", "prompt": ', 'line 2 is not valid JSON at column 24: Expecting value'),
    (b'{"id": "p1", "prompt": "caf\xe9"}', "line 2 is not UTF-8 text"),
    (json.dumps(_without(make_pair("p1", "c", "d"), "id")).encode(), 'line 2 has no "id"'),
    (json.dumps({**make_pair("p1", "c", "d"), "id": 7}).encode(), 'line 2 has "id": 7, which should be a string'),
    (b"[1, 2, 3]", r"line 2 is \[1, 2, 3\], not a JSON object"),
    (json.dumps({**make_pair("p1", "c", "d"), "flagged": {"text": "c"}}).encode(),
     'line 2 has no "flagged.completion"'),
    (json.dumps(make_pair("p0", "c", "d")).encode(), "lines 1 and 2 have the same id 'p0'"),
    # JSON Python will not read (a plain ValueError, not JSONDecodeError): a traceback, exit 1
    (b'{"id": "p1", "n": ' + b"7" * 4301 + b"}", r"line 2 is not readable JSON \(Exceeds the limit"),
])
def test_bad_queue_line_is_a_one_line_error_naming_file_and_line(tmp_path, capsys, second, message):
    q = _write_queue(tmp_path, second)
    with pytest.raises(CorruptFileError, match=r"queue\.jsonl: " + message):
        q.records()
    with pytest.raises(CorruptFileError, match=message):
        serve(tmp_path)
    assert main([str(tmp_path), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(q.queue_path) in err and "Traceback" not in err
    assert re.search(message, err)


@pytest.mark.parametrize("line,message", [
    ({"decision": "flagged", "time": "t"}, 'line 1 has no "id"'),
    ({"id": "p0", "decision": "maybe"}, "line 1 has \"decision\": 'maybe', which should be one of flagged"),
    ("[]", r"line 1 is \[\], not a JSON object"),
])
def test_bad_decision_line_is_a_one_line_error(tmp_path, capsys, line, message):
    q = _write_queue(tmp_path, json.dumps(make_pair("p1", "c", "d")).encode())
    q.decisions_path.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(CorruptFileError, match=r"decisions\.jsonl: " + message):
        q.decide("p1", "flagged")
    assert main([str(tmp_path), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err) and "Traceback" not in err


def test_proxy_margin_order_names_the_pair_without_a_score(tmp_path, capsys):
    q = _write_queue(tmp_path, json.dumps({**make_pair("p1", "c", "d"), "flagged": {"completion": "c"}}).encode())
    assert [r["id"] for r in q.pending()] == ["p0", "p1", "p2"]  # the queue's order needs no score
    message = r'queue\.jsonl: line 2: its "flagged" has no "score" \(the proxy_margin order sorts by it\)'
    with pytest.raises(CorruptFileError, match=message):
        q.pending("proxy_margin")
    with pytest.raises(CorruptFileError, match=message):  # refused before a port is opened, not HTTP 500 in the page
        serve(tmp_path, order="proxy_margin")
    assert main([str(tmp_path), "--no-browser", "--order", "proxy_margin"]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("port", ["99999", "-1", "eighty"])
def test_cli_port_out_of_range_is_a_usage_error(tmp_path, capsys, port):
    ReviewQueue(tmp_path).add(make_pair("p0", "a", "b"))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--no-browser", f"--port={port}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --port" in err and "0 to 65535" in err and "Traceback" not in err


def test_file_damaged_while_the_page_is_open(served):
    """The page shows which line to repair (not "Internal error"), and a click is refused before it is logged."""
    q, url = served
    assert call(url, "/api/decide", {"id": "p0", "decision": "flagged"})[0] == 200
    with open(q.queue_path, "a") as f:
        f.write("[]\n")
    code, answer = call(url, "/api/state")
    assert code == 500 and answer["error"].startswith(f"{q.queue_path}: line 4 is [], not a JSON object")
    code, answer = call(url, "/api/decide", {"id": "p1", "decision": "flagged"})
    assert code == 500 and "line 4" in answer["error"]
    assert [e["id"] for e in read_lines(q.decisions_path)] == ["p0"]
    assert [r["source"]["queue_id"] for r in read_lines(q.preferences_path)] == ["p0"]


def test_add_gives_a_repeated_id_a_new_one(tmp_path):
    """A resumed run repeats the iterations after its checkpoint and may queue the same ids again; the reader
    refuses an id used twice, so the writer never writes one."""
    q = ReviewQueue(tmp_path)
    q.add(make_pair("it3-length_drift-0", "a", "b"))
    q.add(make_pair("it3-length_drift-0", "c", "d"))
    q.add(make_pair("it3-length_drift-0", "e", "f"))
    assert [r["id"] for r in q.records()] == ["it3-length_drift-0", "it3-length_drift-0~2", "it3-length_drift-0~3"]
    # an exact resume samples the very same pair again: queued once, or the reviewer judges it twice and
    # preferences.jsonl counts it double
    q.add(make_pair("it3-length_drift-0", "c", "d"))
    q.add({**make_pair("it3-length_drift-0", "a", "b"), "audit": {"gold": float("nan")}})  # differs: audit added
    assert [r["id"] for r in q.records()] == ["it3-length_drift-0", "it3-length_drift-0~2", "it3-length_drift-0~3",
                                              "it3-length_drift-0~4"]
    q.add({**make_pair("it3-length_drift-0", "a", "b"), "audit": {"gold": float("nan")}})  # the same, NaN as null
    assert len(q.records()) == 4
    with pytest.raises(ValueError, match='A review record has no "reference.completion"'):
        q.add({**make_pair("p9", "a", "b"), "reference": {"text": "b"}})
    with open(q.queue_path, "a") as f:
        f.write("not json\n")
    with pytest.warns(UserWarning, match=r"line 5 is not valid JSON.*queued after it all the same"):
        q.add(make_pair("p5", "g", "h"))  # a training run goes on; the page names the line to repair
    assert q.queue_path.read_text().splitlines()[-1].startswith('{"created"')


def test_cli_without_queue_says_how_it_gets_filled(tmp_path, capsys):
    assert main([str(tmp_path), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert "queue.jsonl" in err and "monitor" in err
    with pytest.raises(FileNotFoundError, match="monitor"):
        serve(tmp_path)


def test_cli_serves_until_ctrl_c(tmp_path):
    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "a", "b"))
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_ext.cli", "review", str(tmp_path), "--no-browser",
                             "--reviewer", "cli", "--order", "proxy_margin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        url = lines[1].split("Review page: ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and "proxy_margin first" in lines[0]
        assert call(url, "/api/state")[1]["order"] == "proxy_margin"
        assert call(url, "/api/decide", {"id": "p0", "decision": "flagged"})[1]["counts"]["preferences"] == 1
        proc.send_signal(signal.SIGTERM)  # (SIGINT too; a background shell may have set it to "ignore")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Stopped. 1 of 1 pairs reviewed; 1 preference pairs" in out and "Traceback" not in err
    assert read_lines(q.preferences_path)[0]["source"]["reviewer"] == "cli"


# -- the preferences train the next reward model


def hacked_pairs(n, seed):
    """(id, flagged, reference) in the reviewed pattern: an honest mixed answer ("... boring but fine .") beats a
    padded run of praise. The original data always prefers praise over criticism, so a reward model trained on it
    alone gets these backwards: the hack a reviewer is there to catch."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        fill = " ".join(r.choice(FILL) for _ in range(r.randint(1, 3)))
        praise = " ".join([r.choice(POS)] * r.randint(3, 5))
        out.append((f"h{seed}-{i}", f"{fill} {praise} .", f"{fill} {r.choice(NEG)} but fine ."))
    return out


def test_reviewed_preferences_teach_the_reward_model(tmp_path, tiny_path, tok):
    from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer
    from rlhf_ext.data import with_extra_preferences

    q = ReviewQueue(tmp_path / "run")
    for pid, flagged, reference in hacked_pairs(72, seed=0):
        q.add(make_pair(pid, flagged, reference, prompt="write a short review of the film ."))
    for i, pair in enumerate(q.records()):  # the reviewer prefers the reference; every 9th pair gives no row
        q.decide(pair["id"], ("both_bad", "skip")[i // 9 % 2] if i % 9 == 0 else "reference")
    assert len(read_lines(q.preferences_path)) == 64

    original = Dataset.from_list(preference_rows(128, 0))
    heldout = {"reviewed": Dataset.from_list([  # the same pattern, pairs the reward model never saw
        {"prompt": [{"role": "user", "content": "write a short review of the film ."}],
         "chosen": [{"role": "assistant", "content": reference}], "rejected": [{"role": "assistant", "content": flagged}]}
        for _, flagged, reference in hacked_pairs(32, seed=1)]),
        "original": Dataset.from_list(preference_rows(64, 1))}

    def accuracy(train, name):
        args = RewardEnsembleConfig(str(tmp_path / name), num_train_epochs=5, per_device_train_batch_size=16,
                                    learning_rate=5e-3, report_to="none", save_strategy="no", eval_strategy="no",
                                    use_cpu=True, disable_tqdm=True, logging_steps=1000, normalization_samples=32)
        tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=train, processing_class=tok)
        tr.train()
        return {k: tr.evaluate(d)["eval_accuracy_ensemble"] for k, d in heldout.items()}

    without = accuracy(original, "rm_without")
    with_review = accuracy(with_extra_preferences(original, [q.preferences_path]), "rm_with")
    assert without["reviewed"] <= 0.25, "trained on the original data alone, the reward model should favour the praise"
    assert with_review["reviewed"] >= 0.9
    assert with_review["original"] >= 0.9 and without["original"] >= 0.9  # the original task is kept


def test_a_restarted_server_repairs_preferences_left_stale_by_a_kill(tmp_path):
    """Killed between recording the last decision (decisions.jsonl, fsync'd) and rewriting preferences.jsonl: with
    nothing left pending no later click rewrites it, so the server rewrites it when it starts."""
    q = ReviewQueue(tmp_path)
    for i in range(2):
        q.add(make_pair(f"p{i}", f"flagged {i}", f"reference {i}"))
    q.decide("p0", "flagged")
    stale = q.preferences_path.read_text()
    q.decide("p1", "reference")
    q.preferences_path.write_text(stale)  # what the kill left: p1's decision recorded, its row not written
    server, _ = serve(tmp_path)
    try:
        rows = read_lines(q.preferences_path)
        assert [r["source"]["queue_id"] for r in rows] == ["p0", "p1"]
        assert rows[1]["source"]["decision"] == "reference"
    finally:
        server.shutdown(), server.server_close()


def test_adding_to_a_long_queue_reads_it_once_and_still_queues_each_pair_once(tmp_path, monkeypatch):
    """`add` read and checked the whole queue for every pair (a second per add at 8000 pairs): the ids are now kept
    while the file is as this queue's own adds left it — read again when anything else wrote to it, or on resume."""
    q = ReviewQueue(tmp_path)
    reads = []
    real = ReviewQueue.records
    monkeypatch.setattr(ReviewQueue, "records", lambda self: reads.append(1) or real(self))
    for i in range(40):
        q.add(make_pair(f"p{i}", f"great {i}", f"fine {i}"))
    assert len(reads) == 1
    q.add(make_pair("p3", "great 3", "fine 3"))  # an id taken, the same pair (a resume samples it again): kept once
    q.add(make_pair("p4", "other text", "fine 4"))  # an id taken by another pair: a new id
    with open(q.queue_path, "a") as f:  # another writer (a hand repair) appends: read again before the next add
        f.write(json.dumps({"created": 0, **make_pair("p50", "x", "y")}) + "\n")
    q.add(make_pair("p50", "x", "y"))
    resumed = ReviewQueue(tmp_path)  # a resumed run's queue reads what is there
    resumed.add(make_pair("p7", "great 7", "fine 7"))
    ids = [r["id"] for r in real(q)]
    assert ids == [f"p{i}" for i in range(40)] + ["p4~2", "p50"]


def test_the_browser_is_opened_through_a_private_redirect_file_in_the_review_folder(tmp_path, monkeypatch):
    """The token stays off the browser's command line (`ps`); the file is this user's only, beside the queue (a snap
    browser cannot read /tmp), and gone if opening fails."""
    import stat

    import rlhf_ext.monitor.review as review

    opened = []
    monkeypatch.setattr(review.webbrowser, "open", lambda uri: opened.append(uri) or True)
    url = "http://127.0.0.1:1234/#token=abc_DEF-123"
    path = review._open_browser(url, tmp_path)
    assert opened == [path.as_uri()] and path.parent == tmp_path and "token" not in opened[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and f'content="0;url={url}"' in path.read_text()

    def fails(uri):
        raise RuntimeError("no browser")

    monkeypatch.setattr(review.webbrowser, "open", fails)
    with pytest.raises(RuntimeError):
        review._open_browser(url, tmp_path)
    assert sorted(tmp_path.iterdir()) == [path]
