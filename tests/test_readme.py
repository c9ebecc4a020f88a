"""The README's Python blocks run as written, in order, in a fresh folder (they build on each other: the PPO block
uses the reward artifact the first one saves). `RLHF_EXT_TINY_MODELS=1` stands a tiny random model of the same
architecture and chat format in for the embedded SmolLM2, so the blocks take seconds; nothing else is changed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 2
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "RLHF_EXT_TINY_MODELS": "1", "RLHF_EXT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "outputs/rm/manifest.json").is_file()
    assert (tmp_path / "outputs/policy/adapter_config.json").is_file()
