"""The review step with what real runs and real reviewers produce: an empty response, prompts whose content is a
list of parts, two review servers (two reviewers) on one folder, a queue cleared by hand while its decisions stay,
and two detectors picking the same sample in one iteration."""

import json
import threading

import pytest
from datasets import Dataset

from rlhf_ext.data import with_extra_preferences
from rlhf_ext.monitor.queue import ReviewQueue, read_jsonl
from rlhf_ext.monitor.review import ApiError, ReviewServer
from rlhf_ext.reward.preference_data import validate_preference_dataset

from .test_review import make_pair


def test_a_reviewed_pair_against_an_empty_response_trains():
    """The reference (or the policy) stopped at once: "anything beats an empty answer" is a preference to learn, and
    one such row stopped the whole retrain ("'rejected' is empty")."""
    rows = [{"prompt": "p ", "chosen": "a real answer", "rejected": r} for r in ("", " \n", "bad")]
    assert len(validate_preference_dataset(Dataset.from_list(rows))) == 3


def test_content_parts_prompts_are_exported_in_their_form(tmp_path):
    parts = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    q = ReviewQueue(tmp_path)
    pair = make_pair("p0", "great great", "fine")  # the policy writes its response as text content
    pair["prompt"] = [{"role": "user", "content": parts("Review the movie Arrival.")}]
    q.add(pair)
    q.decide("p0", "reference")
    (row,) = q.preference_rows()
    assert row["chosen"] == [{"role": "assistant", "content": parts("fine")}]
    base = Dataset.from_list([{"prompt": [{"role": "user", "content": parts(f"q{i}")}],
                               "chosen": [{"role": "assistant", "content": parts("good")}],
                               "rejected": [{"role": "assistant", "content": parts("bad")}]} for i in range(2)])
    assert len(validate_preference_dataset(with_extra_preferences(base, [q.export_preferences()]))) == 3


def test_two_review_servers_on_one_folder_never_both_decide_a_pair(tmp_path):
    """Two reviewers (each a server with its --reviewer name) see the same pending pair: one decision is kept,
    the other answered 409, never both recorded with the later silently replacing the earlier."""
    q = ReviewQueue(tmp_path)
    for i in range(40):
        q.add(make_pair(f"p{i}", f"great {i}", f"fine {i}"))
    servers = [ReviewServer(tmp_path, reviewer=name) for name in ("ann", "bob")]  # two locks, as two processes
    accepted = {"ann": 0, "bob": 0}

    def review(server, decision):
        for i in range(40):
            try:
                server.decide({"id": f"p{i}", "decision": decision})
                accepted[server.reviewer] += 1
            except Exception as e:  # ApiError 409: the other reviewer was first
                assert getattr(e, "status", None) == 409, e

    threads = [threading.Thread(target=review, args=(s, d)) for s, d in zip(servers, ("flagged", "reference"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in servers:
        s.server_close()
    events = [json.loads(x) for x in q.decisions_path.read_text().splitlines()]
    assert sorted(e["id"] for e in events) == sorted(f"p{i}" for i in range(40))
    assert sum(accepted.values()) == 40


def test_a_decision_is_not_inherited_by_a_new_pair_under_its_id(tmp_path):
    q = ReviewQueue(tmp_path)
    q.add(make_pair("it12-length_drift-0", "great great great great", "a fine film ."))
    q.decide("it12-length_drift-0", "flagged")
    q.queue_path.write_text("")  # the queue cleared by hand for a new round; decisions.jsonl kept
    q = ReviewQueue(tmp_path)
    q.add(make_pair("it12-length_drift-0", "terrible spam spam spam", "a thoughtful answer ."))
    assert [r["id"] for r in q.pending()] == ["it12-length_drift-0~2"] and q.preference_rows() == []


def test_a_sample_two_detectors_pick_in_one_iteration_is_queued_once(tmp_path, tok):
    """length_drift and length_correlation (both: the longest samples) fire together: the same pair was queued under
    two ids, judged twice, and held twice (or both ways) in preferences.jsonl."""
    from .test_monitor import eos_prone_model, longer_is_better
    from .test_ppo import make

    tr = make(tmp_path, tok, model=eos_prone_model(tok), reward=longer_is_better, max_steps=3, learning_rate=5e-2,
              max_completion_length=12, monitor_reference_prompts=16, monitor_cooldown=1,
              monitor_detectors=[{"name": "length_correlation", "threshold": 0.0, "action": "queue", "z": 0, "warmup": 1},
                                 {"name": "length_drift", "threshold": 0.01, "action": "queue", "z": 0, "warmup": 1}])
    tr.train()
    records = ReviewQueue(tmp_path / "ppo").records()
    pairs = [json.dumps([r["prompt"], r["flagged"]["completion"], r["reference"]["completion"]]) for r in records]
    assert len(pairs) == len(set(pairs))
    assert any(r["detectors"] == ["length_correlation", "length_drift"] for r in records)


def test_a_reviewers_undo_takes_back_their_own_last_decision(tmp_path):
    """Two reviewers on one folder: ann's Undo (no id) took back bob's later click, and the undo was logged with no
    reviewer; each page's "Last:" line showed the other's decision."""
    q = ReviewQueue(tmp_path)
    for i in range(3):
        q.add(make_pair(f"p{i}", f"great {i}", f"fine {i}"))
    ann, bob = (ReviewServer(tmp_path, reviewer=name) for name in ("ann", "bob"))
    ann.decide({"id": "p0", "decision": "flagged"})
    bob.decide({"id": "p1", "decision": "reference"})
    assert ann.state()["last"]["id"] == "p0" and bob.state()["last"]["id"] == "p1"
    assert ann.undo({})["undone"] == "p0"
    assert set(q.decisions()) == {"p1"}
    assert read_jsonl(q.decisions_path)[-1]["reviewer"] == "ann"
    with pytest.raises(ApiError, match="Nothing to undo by ann") as e:
        ann.undo({})
    assert e.value.status == 409


def test_a_reviewer_preferring_the_empty_response_does_not_stop_the_retrain(tmp_path):
    """The flagged response is spam and the reference stopped at once: "nothing beats this" is a decision the page
    records, and its exported row (a blank chosen) stopped the whole retrain ("'chosen' is empty")."""
    from rlhf_ext.reward.preference_data import add_extra_preferences

    q = ReviewQueue(tmp_path)
    q.add(make_pair("p0", "BUY NOW spam spam spam", ""))
    q.decide("p0", "reference")
    base = Dataset.from_list([{"prompt": [{"role": "user", "content": f"q{i}"}],
                               "chosen": [{"role": "assistant", "content": "good"}],
                               "rejected": [{"role": "assistant", "content": "bad"}]} for i in range(2)])
    assert len(validate_preference_dataset(add_extra_preferences(base, [q.export_preferences()]))) == 3
    blank = base.map(lambda r: {"chosen": [{"role": "assistant", "content": " "}]})  # the user's own data: refused
    with pytest.raises(ValueError, match="'chosen' is empty"):
        validate_preference_dataset(blank)


def test_two_reviewers_on_one_folder_are_shown_different_pairs(tmp_path, monkeypatch):
    """Both servers showed the queue's first pair; the slower reviewer read it for nothing and their click was
    answered 409. Each now skips the pairs the other has on screen; a screen closed or gone stale holds nothing;
    where both showed one pair, the one that showed it first keeps it."""
    import time as clock

    from rlhf_ext.monitor import screens

    q = ReviewQueue(tmp_path)
    for i in range(6):
        q.add(make_pair(f"p{i}", f"great {i}", f"fine {i}"))
    ann, bob = (ReviewServer(tmp_path, reviewer=name) for name in ("ann", "bob"))
    first = lambda server, prefer=None: server.state(prefer)["pending"][0]["id"]  # noqa: E731
    assert (first(ann), first(bob)) == ("p0", "p1")
    assert first(ann, "p0") == "p0" and first(bob, "p1") == "p1"  # each page's polls keep its own pair
    assert bob.decide({"id": "p1", "decision": "flagged"})["pending"][0]["id"] == "p2"  # not ann's p0
    assert ann.decide({"id": "p0", "decision": "reference"})["pending"][0]["id"] == "p3"  # not bob's p2
    state = ann.state("p3")  # bob's pair last (the page is sent the first few), still pending
    assert [r["id"] for r in state["pending"]] == ["p3", "p4", "p5"] and state["counts"]["pending"] == 4
    # bob's tab closed without stopping his server: after STALE_S his pair is free again
    now = clock.time()
    monkeypatch.setattr(screens.time, "time", lambda: now + screens.STALE_S + 1)
    assert [r["id"] for r in ann.state("p3")["pending"]] == ["p3", "p2", "p4"]
    monkeypatch.undo()
    # both showed p4 (two pages asked at once): the later one moves on at its next poll, the earlier keeps it
    ann.screens.showing, bob.screens.showing = None, None
    ann.screens.show("p4", now - 5)
    bob.screens.show("p4", now)
    assert (first(bob, "p4"), first(ann, "p4")) == ("p2", "p4")
    bob.server_close()  # its screen goes with it: ann may be shown p2 now
    assert not list((tmp_path / "review" / "screens").glob(f"{bob.screens.server}*"))
    ann.decide({"id": "p4", "decision": "skip"})
    assert first(ann, "p3") == "p3" and first(ann, "p2") == "p2"
    ann.server_close()
    one = ReviewServer(tmp_path)  # one reviewer: the queue's order, as before
    assert [r["id"] for r in one.state()["pending"]] == ["p2", "p3", "p5"]
    one.server_close()


def test_a_screen_that_went_stale_does_not_take_its_pair_back_from_the_reviewer_reading_it(tmp_path, monkeypatch):
    """Ann's tab hidden for a minute holds nothing (STALE_S), so Bob is shown her pair; when her tab came back, her
    lapsed screen kept its old `since` and won, and Bob's next poll moved him off the pair he was reading."""
    from rlhf_ext.monitor import screens

    q = ReviewQueue(tmp_path)
    for i in range(4):
        q.add(make_pair(f"p{i}", f"great {i}", f"fine {i}"))
    clock = [1000.0]
    monkeypatch.setattr(screens.time, "time", lambda: clock[0])
    ann, bob = (ReviewServer(tmp_path, reviewer=name) for name in ("ann", "bob"))
    first = lambda server, prefer=None: server.state(prefer)["pending"][0]["id"]  # noqa: E731
    assert (first(ann), first(bob)) == ("p0", "p1")
    clock[0] += screens.STALE_S * 2  # ann's page stops asking
    assert bob.decide({"id": "p1", "decision": "skip"})["pending"][0]["id"] == "p0"  # ann's screen holds nothing
    clock[0] += 5
    assert first(ann, "p0") == "p2" and first(bob, "p0") == "p0"  # bob keeps the pair he is reading
    ann.server_close()
    bob.server_close()
