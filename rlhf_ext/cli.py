"""`rlhf-ext` command line: demo, recipes and plugin listing."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="rlhf-ext", description="PPO-based RLHF on current TRL.")
    ap.add_argument("command", choices=["demo", "reward", "ppo", "plugins", "convert"],
                    help="demo: the end-to-end job; reward/ppo: run a recipe (pass --config FILE); "
                         "plugins: list registered plugins; convert: convert the embedded model once")
    args, rest = ap.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "demo":
        from .demo import main as demo

        demo(rest)
    elif args.command in ("reward", "ppo"):
        script = RECIPES / ("reward_modeling.py" if args.command == "reward" else "ppo.py")
        sys.argv = [str(script), *rest]
        runpy.run_path(str(script), run_name="__main__")
    elif args.command == "plugins":
        import rlhf_ext  # noqa: F401
        from .registry import POINTS, available

        for point in POINTS:
            print(f"{point:15s} {', '.join(available(point)) or '-'}")
    elif args.command == "convert":
        from .models import DEFAULT_MODEL, resolve_model_path

        print(resolve_model_path(rest[0] if rest else DEFAULT_MODEL))


if __name__ == "__main__":
    main()
