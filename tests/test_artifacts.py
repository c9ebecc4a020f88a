"""What rlhf_ext writes loads anywhere: a standard PEFT adapter, reward artifacts from any directory or the Hub,
the same base recognised however it is named, and a wheel whose CLI works outside the repository."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from datasets import Dataset
from peft import LoraConfig

from rlhf_ext import RewardEnsembleConfig, RewardEnsembleTrainer, load_reward_model
from rlhf_ext.hub import with_card_metadata
from rlhf_ext.models import load_model

from .conftest import preference_rows
from .test_ppo import make, prompts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub's create_repo/upload_folder/snapshot_download, intercepted: uploads land in a local store."""
    import huggingface_hub

    store = tmp_path / "hub"

    def create_repo(self, repo_id, **kw):
        (store / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False, **kw):  # a branch: a copy of main at `repo_id@branch`
        if not (store / f"{repo_id}@{branch}").exists():
            shutil.copytree(store / repo_id, store / f"{repo_id}@{branch}")

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, revision=None, delete_patterns=None, **kw):
        """As the Hub: files are added or replaced, never removed, except those matching `delete_patterns` (relative
        to `path_in_repo`); an unknown revision is refused."""
        import fnmatch

        repo = store / (f"{repo_id}@{revision}" if revision and revision != "main" else repo_id)
        if not repo.is_dir():
            raise ValueError(f"Invalid rev id: {revision}")
        into = repo / (path_in_repo or "")
        for old in [p for p in into.rglob("*") if p.is_file()] if into.is_dir() else []:
            if any(fnmatch.fnmatch(str(old.relative_to(into)), pat) for pat in delete_patterns or []):
                old.unlink()
        shutil.copytree(folder_path, into, dirs_exist_ok=True)
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    def snapshot_download(repo_id, **kw):
        if not (store / repo_id).is_dir():
            raise FileNotFoundError(repo_id)
        return str(store / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return store


def _reward(tmp_path, tiny_path, tok, base=None):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=3,
                                per_device_train_batch_size=8, report_to="none", save_strategy="no", use_cpu=True,
                                disable_tqdm=True, normalization_samples=16, hub_model_id="someone/rm")
    tr = RewardEnsembleTrainer(base or tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    return tr


def test_reward_ensemble_round_trips_through_the_hub(tmp_path, tiny_path, tok, fake_hub):
    tr = _reward(tmp_path, tiny_path, tok)
    url = tr.push_to_hub()
    assert "someone/rm" in url
    staged = fake_hub / "someone" / "rm"
    assert {"rlhf_ext_reward.json", "heads.safetensors", "manifest.json", "README.md"} <= {p.name for p in staged.iterdir()}
    assert "load_reward_model" in (staged / "README.md").read_text()
    rows = Dataset.from_list(preference_rows(4, 7))
    local = tmp_path / "local"
    tr.save_model(str(local))
    want = load_reward_model(local).score_texts(rows["prompt"], rows["chosen"])
    got = load_reward_model("someone/rm").score_texts(rows["prompt"], rows["chosen"])
    assert torch.allclose(want, got, atol=1e-6)
    with pytest.raises(OSError, match="Could not fetch 'someone/missing'"):
        load_reward_model("someone/missing")


def test_reward_push_to_hub_in_the_config_uploads_as_trainer_does(tmp_path, tiny_path, tok, fake_hub, monkeypatch):
    """`push_to_hub=True`: at each checkpoint the artifact goes up (before: transformers' file names were copied —
    no heads, no adapters, a pickled training_args.bin and TRL's generic card: a repo that did not load), and
    `save_model()` uploads as `Trainer.save_model` does. Each checkpoint carries the normalisation of its own
    weights (before: the first checkpoint's, for every later one). `push_to_hub(tags=..., dataset_name=...)` puts
    them in the card; a keyword it does not take is refused."""
    import json

    import huggingface_hub

    commits, real = [], huggingface_hub.HfApi.upload_folder

    def counting(self, repo_id, folder_path, **kw):
        commits.append(kw.get("commit_message"))
        return real(self, repo_id, folder_path, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", counting)
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=2,
                                per_device_train_batch_size=8, report_to="none", save_strategy="steps", save_steps=1,
                                use_cpu=True, disable_tqdm=True, normalization_samples=16, learning_rate=0.05,
                                push_to_hub=True, hub_model_id="someone/rm-live")
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(32, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    assert commits == ["Training in progress, step 1", "Training in progress, step 2"]
    staged = fake_hub / "someone" / "rm-live"
    assert {"rlhf_ext_reward.json", "heads.safetensors", "manifest.json"} <= {p.name for p in staged.iterdir()}
    assert not list(staged.rglob("*.bin")) and "library_name: rlhf_ext" in (staged / "README.md").read_text()
    norm = [json.loads((tmp_path / "rm" / f"checkpoint-{i}" / "rlhf_ext_reward.json").read_text())["normalization"]
            for i in (1, 2)]
    assert norm[0]["mean"] != norm[1]["mean"]
    assert norm[1]["mean"] == pytest.approx(tr.normalization["mean"], abs=1e-6)  # recomputed after train(): same weights
    rows = Dataset.from_list(preference_rows(4, 7))
    want = load_reward_model(tmp_path / "rm" / "checkpoint-2").score_texts(rows["prompt"], rows["chosen"])
    assert torch.allclose(load_reward_model("someone/rm-live").score_texts(rows["prompt"], rows["chosen"]), want)
    tr.save_model(str(tmp_path / "final"))
    assert commits[-1] == "Model save"
    tr.push_to_hub(repo_id="someone/rm-card", tags=["extra-tag"], dataset_name="me/prefs", license="apache-2.0")
    front = (fake_hub / "someone" / "rm-card" / "README.md").read_text().split("---")[1]
    assert "extra-tag" in front and "reward-model" in front and "datasets: [me/prefs]" in front
    assert "license: apache-2.0" in front
    with pytest.raises(TypeError, match="unexpected keyword argument.*'datset_name'.*dataset_name"):
        tr.push_to_hub(datset_name="me/prefs")


def test_policy_round_trips_through_the_hub_with_a_model_card(tmp_path, tok, tiny_path, fake_hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tr = make(tmp_path, tok, model=load_model(tiny_path, "causal"), max_steps=2, kl_controller="hard", kl_target=1.0,
              hub_model_id="someone/policy")
    tr.model_name = tiny_path
    tr.train()
    tr.evaluate_policy(Dataset.from_dict({"prompt": ["write a short review of the movie ."] * 4}))
    tr.push_to_hub()
    staged = fake_hub / "someone" / "policy"
    card = (staged / "README.md").read_text()
    assert "δ = 1.0" in card and "Held-out evaluation" in card and "PeftModel.from_pretrained" in card
    assert f"| compute | float32; CPU matmuls: {tr.startup['cpu_matmul']} |" in card  # which kernels trained it
    assert not (staged / "critic").exists()  # the critic only with critic=True
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = tr.policy.logits(ids, torch.ones_like(ids), 4) * tr.args.temperature
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(staged)).eval()
        got = loaded(input_ids=ids).logits[:, :-1]
        direct = AutoModelForCausalLM.from_pretrained(str(staged)).eval()  # transformers' own PEFT integration
        got2 = direct(input_ids=ids).logits[:, :-1]
    assert torch.allclose(want, got, atol=1e-5) and torch.allclose(want, got2, atol=1e-5)
    tr.push_to_hub(repo_id="someone/policy-critic", critic=True)
    assert (fake_hub / "someone" / "policy-critic" / "critic" / "value_head.safetensors").is_file()
    # the model card's keywords, as Trainer.push_to_hub takes them (they were dropped silently)
    tr.push_to_hub(repo_id="someone/policy-card", tags=["my-tag"], dataset_name="me/prompts", model_name="My policy")
    card = (fake_hub / "someone" / "policy-card" / "README.md").read_text()
    front = card.split("---")[1]
    assert "my-tag" in front and "ppo" in front and "datasets: [me/prompts]" in front and "\n# My policy\n" in card
    with pytest.raises(TypeError, match="unexpected keyword argument.*'tag'"):
        tr.push_to_hub(repo_id="someone/policy-card", tag="x")


def test_ppo_recognises_the_reward_models_base_however_named(tmp_path, tiny_path, tok, monkeypatch):
    """Reward model trained from a relative path in one directory; PPO loads the base by its absolute path from
    another: the members still become adapters on the policy's base (no second model copy)."""
    monkeypatch.chdir(Path(tiny_path).parent)
    tr = _reward(tmp_path, tiny_path, tok, base=os.path.relpath(tiny_path))
    tr.save_model(str(tmp_path / "rm"))
    monkeypatch.chdir(tmp_path)
    policy_base = load_model(str(Path(tiny_path).resolve()), "causal")
    n_base = sum(p.numel() for p in policy_base.parameters())
    ppo = make(tmp_path, tok, reward=[str(tmp_path / "rm")], model=policy_base, max_steps=1)
    assert sum(p.numel() for p in ppo.model.parameters()) < 1.5 * n_base
    assert ppo.rewards.members[0].owns_base is False


def test_wheel_installs_and_its_cli_works_from_another_directory(tmp_path):
    """Build the wheel, install it (no deps: they come from this venv) into a fresh venv, run the CLI elsewhere."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True)
    wheel = next(dist.glob("rlhf_ext-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "deps.pth").write_text(deps + "\n")  # dependencies only; the editable rlhf_ext's .pth is not read here
    # --force-reinstall: an older pip sees the editable install through deps.pth and skips the wheel
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--force-reinstall", "-q", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "rlhf-ext")

    def run(*cmd):
        r = subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    where = run(py, "-c", "import rlhf_ext, rlhf_ext.data as d, rlhf_ext.recipes as r; print(rlhf_ext.__file__); "
                          "print(d.SHIPPED); print(r.config_path('ppo_smollm2_sentiment'))").split()
    assert all(str(venv) in w for w in where), where
    # every subpackage of the source tree is in the wheel (this venv's editable install would otherwise serve a
    # missing one from the repository, and the CLI would work here and nowhere else)
    # — and the trainers' command-line help, from the same process (each import of the ML stack is ~10 s here)
    subpackages = sorted("rlhf_ext." + p.parent.name for p in (ROOT / "rlhf_ext").glob("*/__init__.py"))
    found, ppo_help, reward_help, by_name = run(py, "-c", f"""
import contextlib, importlib, io
from rlhf_ext.cli import main
print(*[importlib.import_module(m).__file__ for m in {subpackages!r}])
for command in ("ppo", "reward"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main([command, "--help"])
    print(repr(buf.getvalue()))
err = io.StringIO()  # a shipped config by name, from a folder without recipes/: found, read, its mistake named
with contextlib.redirect_stderr(err):
    try:
        main(["ppo", "--config", "ppo_smollm2_sentiment", "--kl_targt", "1"])
    except SystemExit as stop:
        print(repr((stop.code, err.getvalue())))
""").splitlines()
    assert all(str(venv) in f for f in found.split()), found
    assert "--kl_target" in ppo_help and "--ensemble_size" in reward_help and "--kl_target" not in reward_help
    assert ast.literal_eval(by_name) == (2, "rlhf-ext ppo: error: PPOConfig has no such field(s): `kl_targt` (the command line; did you "
                                "mean `kl_target`?). `--help` lists every field.\n")
    assert Path(where[1], "sentiment", "prompts_train.jsonl").is_file() and Path(where[2]).is_file()
    assert "commands:" in run(cli, "--help")
    # `--help` starts fast because it loads no ML library (what it imports, not a timing: that flakes on a busy CI)
    loaded = run(py, "-c", "import contextlib, io, sys\nfrom rlhf_ext.cli import main\n"
                           "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
                           "print(sorted({'torch', 'transformers', 'trl', 'peft'} & set(sys.modules)))")
    assert loaded.strip() == "[]", f"`rlhf-ext --help` imported {loaded.strip()}"
    plugins = run(cli, "plugins")
    assert "kl_controller" in plugins and "detector" in plugins
    assert "peak" in run(cli, "plan", "--model", "gpt2", "--batch", "8")  # the plan package and its shipped shapes


def test_saved_policy_names_the_embedded_base_by_hub_id_and_is_world_readable(tmp_path, monkeypatch):
    """The adapter_config records `HuggingFaceTB/SmolLM2-135M-Instruct`, not this machine's conversion cache, so the
    folder loads anywhere; every file is written with the same permissions (heads and weights were 0600)."""
    import json
    import os

    from datasets import Dataset

    from rlhf_ext import PPOConfig, PPOTrainer

    monkeypatch.setenv("RLHF_EXT_TINY_MODELS", "1")
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        tr = PPOTrainer("smollm2-135m-instruct", reward_funcs=lambda completions, **k: [0.0] * len(completions),
                        args=PPOConfig(str(tmp_path / "ppo"), per_device_train_batch_size=4, max_steps=1,
                                       max_completion_length=4, use_cpu=True, save_strategy="no", monitor=False),
                        train_dataset=Dataset.from_dict({"prompt": ["hello there ."] * 4}))
        tr.save_model(str(tmp_path / "policy"))
    finally:
        os.umask(old)
    cfg = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    modes = {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in (tmp_path / "policy").rglob("*")
             if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes


def test_push_to_hub_in_the_config_uploads_as_trainer_does(tmp_path, tok, fake_hub, monkeypatch):
    """`push_to_hub=True` (hub_strategy every_save, transformers' default): the policy is uploaded at every
    checkpoint and by save_model(), as `Trainer` does (before: only an explicit push_to_hub() call uploaded). An
    upload that fails warns and the run goes on: its checkpoint is on disk."""
    import huggingface_hub

    commits, real = [], huggingface_hub.HfApi.upload_folder

    def counting(self, repo_id, folder_path, **kw):
        commits.append(kw.get("commit_message"))
        return real(self, repo_id, folder_path, **kw)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", counting)
    tr = make(tmp_path / "a", tok, max_steps=2, push_to_hub=True, hub_model_id="someone/live", save_strategy="steps",
              save_steps=1)
    tr.train()
    assert commits == ["Training in progress, iteration 1", "Training in progress, iteration 2"]
    assert (fake_hub / "someone" / "live" / "adapter_model.safetensors").is_file()
    tr.save_model(str(tmp_path / "final"))
    assert commits[-1] == "Model save"

    def down(self, repo_id, folder_path, **kw):
        raise OSError("the Hub is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", down)
    tr = make(tmp_path / "b", tok, max_steps=2, push_to_hub=True, hub_model_id="someone/down", save_strategy="steps",
              save_steps=1)
    with pytest.warns(UserWarning, match=r"Uploading iteration 1 to the Hub failed .*checkpoint-1 holds the checkpoint"):
        assert len(tr.train()) == 2
    assert sorted(p.name for p in (tmp_path / "b" / "ppo").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    end = make(tmp_path / "c", tok, max_steps=2, push_to_hub=True, hub_model_id="someone/end", hub_strategy="end",
               save_strategy="steps", save_steps=1)
    commits.clear()
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", counting)
    end.train()
    assert commits == []  # hub_strategy='end': only save_model() / push_to_hub() upload


def test_save_model_merged_with_push_to_hub_uploads_the_merged_weights(tmp_path, tok, tiny_path, fake_hub):
    """`save_model(merge=True)` with `push_to_hub=True` uploads what it saved — merged weights that load with plain
    transformers, and a card that says how — not the adapter (before: the adapter went up whatever was saved)."""
    from transformers import AutoModelForCausalLM

    tr = make(tmp_path, tok, model=load_model(tiny_path, "causal"), max_steps=1, push_to_hub=True,
              hub_model_id="someone/merged", save_strategy="no", learning_rate=0.05)
    tr.model_name = tiny_path
    tr.train()
    tr.save_model(str(tmp_path / "merged"), merge=True)
    staged = fake_hub / "someone" / "merged"
    assert (staged / "model.safetensors").is_file() and not (staged / "adapter_model.safetensors").exists()
    card = (staged / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "PeftModel" not in card
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = tr.policy.logits(ids, torch.ones_like(ids), 4) * tr.args.temperature
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(input_ids=ids).logits[:, :-1]
        got = AutoModelForCausalLM.from_pretrained(str(staged))(input_ids=ids).logits[:, :-1]
    assert (want - base).abs().max() > 1e-3  # the policy moved: the merged upload is not the base
    assert torch.allclose(want, got, atol=1e-4)


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategy_checkpoint_uploads_checkpoints_to_resume_from(tmp_path, tok, fake_hub, strategy):
    """As transformers does: hub_strategy="checkpoint" also uploads the latest checkpoint as `last-checkpoint/`, and
    "all_checkpoints" every checkpoint under its own name (before: the policy only) — and a run resumes from the
    uploaded folder."""
    tr = make(tmp_path / "a", tok, max_steps=2, push_to_hub=True, hub_model_id="someone/ck", hub_strategy=strategy,
              save_strategy="steps", save_steps=1)
    first = tr.train()
    staged = fake_hub / "someone" / "ck"
    local = tmp_path / "a" / "ppo"
    assert (staged / "adapter_model.safetensors").is_file()  # the policy, as with every_save
    names = ["last-checkpoint"] if strategy == "checkpoint" else ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in staged.iterdir() if p.is_dir() and p.name != "critic") == names
    pushed = staged / names[-1]
    assert sorted(p.name for p in pushed.rglob("*")) == sorted(p.name for p in (local / "checkpoint-2").rglob("*"))
    resumed = make(tmp_path / "b", tok, max_steps=3, save_strategy="no")
    hist = resumed.train(resume_from_checkpoint=str(pushed))
    assert resumed.iteration == 3 and len(hist) == 3
    assert [h["loss/policy"] for h in hist[:2]] == [h["loss/policy"] for h in first]  # 1-2 came from the upload


def _logits(folder_or_model, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder_or_model)) if isinstance(folder_or_model, (str, Path)) \
        else folder_or_model
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[:, :-1]


def test_a_merged_save_over_an_adapter_loads_the_trained_policy_not_lora_twice(tmp_path, tok, tiny_path, fake_hub):
    """Checkpoint uploads put the adapter in the repo; save_model(merge=True) then added the merged weights beside
    it, and transformers loaded that folder as the merged model with the adapter applied again (LoRA counted twice:
    logits 0.16 off). The same locally, saving both kinds into one folder. Each save now removes the other kind."""
    tr = make(tmp_path, tok, model=load_model(tiny_path, "causal"), max_steps=2, push_to_hub=True,
              hub_model_id="someone/both", save_strategy="steps", save_steps=1, learning_rate=0.05)
    tr.model_name = tiny_path
    tr.train()
    staged = fake_hub / "someone" / "both"
    assert (staged / "adapter_model.safetensors").is_file()  # what the checkpoints uploaded
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = tr.policy.logits(ids, torch.ones_like(ids), 4) * tr.args.temperature
    assert (want - _logits(tiny_path, ids)).abs().max() > 1e-2  # LoRA moved the policy: counted twice would show
    tr.save_model(str(tmp_path / "out"))
    tr.save_model(str(tmp_path / "out"), merge=True)  # the repo and a local folder, both after an adapter save
    for folder in (staged, tmp_path / "out"):
        assert not (folder / "adapter_config.json").exists() and (folder / "model.safetensors").is_file()
        assert torch.allclose(_logits(folder, ids), want, atol=1e-4), folder
    tr.save_model(str(tmp_path / "out"))  # and back: an adapter save over a merged one
    for folder in (staged, tmp_path / "out"):
        assert not (folder / "model.safetensors").exists() and not (folder / "config.json").exists()
        assert torch.allclose(_logits(folder, ids), want, atol=1e-4), folder


def test_hub_revision_is_where_every_upload_goes(tmp_path, tiny_path, tok, fake_hub):
    """transformers' `hub_revision`: Trainer pushes the model, its checkpoints and save_model() to that branch. PPO
    ignored it (everything on main); the reward trainer sent only save_model() there, its checkpoints and
    push_to_hub() to main — one run split over two branches."""
    tr = make(tmp_path / "ppo", tok, max_steps=1, push_to_hub=True, hub_model_id="someone/p", hub_revision="dev",
              hub_strategy="checkpoint", save_strategy="steps", save_steps=1)
    tr.train()
    tr.push_to_hub()
    assert sorted(p.name for p in (fake_hub / "someone" / "p").iterdir()) == []  # main untouched
    dev = fake_hub / "someone" / "p@dev"
    assert (dev / "adapter_model.safetensors").is_file() and (dev / "last-checkpoint" / "ppo_state.json").is_file()

    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, ensemble_mode="adapters", max_steps=2,
                                per_device_train_batch_size=8, report_to="none", save_strategy="steps", save_steps=1,
                                use_cpu=True, disable_tqdm=True, normalization_samples=16, push_to_hub=True,
                                hub_model_id="someone/r", hub_revision="dev", hub_strategy="checkpoint")
    rm = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(16, 0)),
                               processing_class=tok, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rm.train()
    rm.push_to_hub()
    assert sorted(p.name for p in (fake_hub / "someone" / "r").iterdir()) == []
    assert (fake_hub / "someone" / "r@dev" / "last-checkpoint").is_dir()
    assert load_reward_model(str(fake_hub / "someone" / "r@dev")).score_texts(["a"], ["b"]).shape == (1, 2)


def _front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---")[1])


def test_model_cards_name_hub_ids_only(tmp_path, tiny_path, tok, monkeypatch):
    """The Hub refuses a commit whose card's `base_model` or `datasets` is not a repository: the cards held a local
    folder's path, the embedded default's short name, 'unknown' / 'None' for a model passed as an object, and the
    recipe's resolved data folder; `dataset_tags` went to `tags` (transformers puts it in `datasets`)."""
    from rlhf_ext import PPOConfig, PPOTrainer

    tr = make(tmp_path / "a", tok, max_steps=1)  # a model object: no name
    tr.create_model_card(dataset_tags="stanfordnlp/imdb", dataset_name=str(tmp_path), finetuned_from=str(tmp_path))
    front = _front_matter((tmp_path / "a" / "ppo" / "README.md").read_text())
    assert "base_model" not in front and front["datasets"] == ["stanfordnlp/imdb"]
    assert "stanfordnlp/imdb" not in front["tags"]
    tr.model_name = tiny_path  # a local folder
    tr.save_model(str(tmp_path / "local"))
    assert "base_model" not in _front_matter((tmp_path / "local" / "README.md").read_text())
    tr.create_model_card(finetuned_from="someone/base")  # a Hub id given by the user is kept
    assert _front_matter((tmp_path / "a" / "ppo" / "README.md").read_text())["base_model"] == "someone/base"

    monkeypatch.setenv("RLHF_EXT_TINY_MODELS", "1")
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path / "cache"))
    emb = PPOTrainer("smollm2-135m-instruct", reward_funcs=lambda completions, **k: [0.0] * len(completions),
                     args=PPOConfig(str(tmp_path / "emb"), per_device_train_batch_size=4, max_steps=1,
                                    max_completion_length=4, use_cpu=True, save_strategy="no", monitor=False),
                     train_dataset=Dataset.from_dict({"prompt": ["hello there ."] * 4}))
    emb.save_model(str(tmp_path / "emb_policy"))
    card = _front_matter((tmp_path / "emb_policy" / "README.md").read_text())
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    rm = _reward(tmp_path, tiny_path, tok)  # a local folder
    rm.save_model(str(tmp_path / "rm_out"))
    assert "base_model" not in _front_matter((tmp_path / "rm_out" / "README.md").read_text())


# What the model cards state, checked against what ran: the pushed policy card named a `critic/` folder the upload
# leaves out; a `fixed` controller's card gave a δ it never reads; a 4-bit base went unmentioned; held-out numbers
# did not say which iteration they measured; the reward card's snippet scored plain text with a chat-trained model;
# TRL's card in a reward run's output_dir loaded the artifact with `pipeline()`; and card metadata was written as
# bare YAML, so a tag such as TRL's `trackio:<url>` broke the front matter.

def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_card_metadata_is_quoted_yaml():
    card = "---\nlibrary_name: rlhf_ext\ntags: [rlhf_ext, reward-model]\n---\n\n# T\n"
    tags = ["trackio:https://huggingface.co/spaces/u/t?project=p", "yes", "1.0", "#x", "a: b"]
    front = _front(with_card_metadata(card, {"tags": tags, "license": "apache-2.0", "language": ["en", "fr"],
                                             "dataset_name": "me/prompts"}))
    assert front["tags"] == ["rlhf_ext", "reward-model", *tags]
    assert front["license"] == "apache-2.0" and front["language"] == ["en", "fr"] and front["datasets"] == ["me/prompts"]


def test_policy_card_says_what_the_upload_holds(tmp_path, tok, fake_hub):
    tr = make(tmp_path, tok, max_steps=2, kl_controller="fixed", hub_model_id="someone/policy")
    tr.train()
    tr.evaluate_policy(prompts(4))
    tr.save_model(str(tmp_path / "policy"))
    saved = (tmp_path / "policy" / "README.md").read_text()
    assert "is in `critic/`" in saved and (tmp_path / "policy" / "critic").is_dir()
    assert "| KL controller | `fixed` (β = 0.01) |" in saved and "δ" not in saved
    assert "Held-out evaluation (`evaluate_policy`, iteration 2)" in saved
    import peft
    import trl

    # TRL's cards give the versions the artifact was saved with; PEFT's the pipeline a policy serves
    assert f"- TRL: {trl.__version__}\n" in saved and f"- PEFT: {peft.__version__}\n" in saved
    assert _front(saved)["pipeline_tag"] == "text-generation"
    tr.push_to_hub()
    staged = fake_hub / "someone" / "policy"
    assert not (staged / "critic").exists() and "is in `critic/`" not in (staged / "README.md").read_text()


def test_reward_cards_snippet_and_output_dir_card(tmp_path, tiny_path, tok):
    args = RewardEnsembleConfig(str(tmp_path / "rm"), ensemble_size=2, max_steps=1, per_device_train_batch_size=8,
                                report_to="none", save_strategy="steps", save_steps=1, eval_strategy="steps",
                                eval_steps=1, use_cpu=True, disable_tqdm=True, normalization_samples=8)
    tr = RewardEnsembleTrainer(tiny_path, args=args, train_dataset=Dataset.from_list(preference_rows(8, 0)),
                               eval_dataset=Dataset.from_list(preference_rows(8, 1)), processing_class=tok,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tr.train()
    in_output_dir = (tmp_path / "rm" / "README.md").read_text()  # written at the checkpoint
    assert "library_name: rlhf_ext" in in_output_dir and "pipeline(" not in in_output_dir
    tr.save_model(str(tmp_path / "art"))
    card = (tmp_path / "art" / "README.md").read_text()
    assert '"role": "user"' in card  # it trained on chat messages: the snippet gives them
    assert f"- Transformers: {transformers.__version__}\n" in card
    assert "eval_accuracy" in card and "eval_runtime" not in card and "Evaluation (step 1)" in card
    training = json.loads((tmp_path / "art" / "rlhf_ext_reward.json").read_text())["training"]
    assert (training["epochs"], training["steps"]) == (tr.state.epoch, 1)  # what ran, not num_train_epochs' 3


def test_only_the_main_process_saves_and_uploads_the_policy(tmp_path, tok, fake_hub, monkeypatch):
    # Under DDP the recipe calls save_model on every rank, as transformers' scripts do: only the main process may
    # write (two ranks renaming the same folder raced) or upload (one commit, not one per rank).
    tr = make(tmp_path, tok, max_steps=1, hub_model_id="someone/policy")
    tr.train()
    with monkeypatch.context() as m:  # a second rank
        m.setattr(type(tr.args), "should_save", property(lambda self: False))
        m.setattr(tr, "is_world_process_zero", lambda: False)
        tr.save_model(str(tmp_path / "policy"))
        assert tr.push_to_hub() == ""
    assert not (tmp_path / "policy").exists() and not (fake_hub / "someone" / "policy").exists()
    tr.save_model(str(tmp_path / "policy"))  # the main process: both happen
    tr.push_to_hub()
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
    assert (fake_hub / "someone" / "policy" / "adapter_model.safetensors").is_file()
