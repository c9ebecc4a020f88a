import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from rlhf_ext.testing import save_tiny_model, tiny_tokenizer  # noqa: E402

# Random tiny models produce denormal floats, which make CPU matmuls ~40x slower on this hardware.
# Tiny matmuls also lose to thread hand-offs: one thread is faster here.
torch.set_flush_denormal(True)
torch.set_num_threads(1)

POS = "good great nice love happy wonderful excellent fun best".split()
NEG = "bad awful terrible hate sad boring worst poor".split()
FILL = "the movie was it and very so".split()


def benchmark_module(name: str):
    """Import a script of benchmarks/ (which imports its siblings as top-level modules) without leaving that folder
    on sys.path."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def preference_rows(n, seed, conversational=True, margin=False):
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        p = f"write a short review of the {r.choice(['movie', 'book', 'song', 'film'])} ."
        c = " ".join(r.choice(FILL) for _ in range(r.randint(1, 3))) + " " + r.choice(POS) + " ."
        rj = " ".join(r.choice(FILL) for _ in range(r.randint(1, 3))) + " " + r.choice(NEG) + " ."
        if conversational:
            row = {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                   "rejected": [{"role": "assistant", "content": rj}]}
        else:
            row = {"prompt": p + " ", "chosen": c, "rejected": rj}
        if margin:
            row["margin"] = 0.5
        rows.append(row)
    return rows


# `make test` hands whole files to the workers (--dist loadfile) in collection order (--no-loadscope-reorder; xdist's
# default order, most tests first, starts the few-test files that take minutes last). Longest first, the many short
# files then even out the end (the usual longest-processing-time rule); README's Quick start has the timings.
LONG_FILES = ("test_recipes", "test_data_parallel", "test_deepspeed_cpu", "test_overoptimization_quick", "test_plan", "test_readme",
              "test_artifacts", "test_gpu_check", "test_demo")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, tok):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tok)


# 4-bit tests: on CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights at the first no-grad forward in eval
# mode, which needs in_features ≥ the 64-element quantisation block; hidden 32 would crash there.
FOUR_BIT_HIDDEN = 64


@pytest.fixture(scope="session")
def tiny4_path(tmp_path_factory, tok):
    return save_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", tok, hidden_size=FOUR_BIT_HIDDEN)


@pytest.fixture
def pref_data():
    return Dataset.from_list(preference_rows(192, 0)), Dataset.from_list(preference_rows(64, 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)



def _freeze_survivors():
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_finish(session):
    """Hand the objects that live the whole session — the modules collection imported (torch, transformers, peft,
    trl), the test functions and their parameters — to the permanent generation (gc.freeze): every
    Trainer.train() calls gc.collect() (accelerate's free_memory), which otherwise walks those ~500k objects
    each time (0.2 s here; a third of tests/test_architectures.py's time)."""
    _freeze_survivors()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Again after each test file, once its module fixtures are gone: what it imported (a model's modeling code)
    stays for the session; its garbage is collected first, so nothing is frozen that could be freed."""
    yield
    if nextitem is None or nextitem.module is not item.module:
        _freeze_survivors()


def rlhf_ext_in_this_process(argv, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """`rlhf-ext <argv>` run from `cwd` as the console script runs it (`rlhf_ext.cli.main`, whose status it exits
    with), but in this process: (status, stderr). For refusals that come before training, where a new process would
    only add the ~7 s of importing torch, transformers and PEFT again; tests/test_cli.py and the tests named
    `…through_the_console_script` run the installed script itself."""
    import sys

    from rlhf_ext.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the recipe commands set sys.argv: put back after the test
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's errors, as the console script would have exited
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return status, capsys.readouterr().err
