"""`rlhf-ext` command line. Each command imports what it needs when it runs, so `rlhf-ext --help` starts fast.

    rlhf-ext demo | reward | ppo | review | report | plan | plugins | convert
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

COMMANDS = {
    "demo": "the end-to-end job on the embedded model: reward ensemble → PPO → held-out report",
    "reward": "run the reward-modelling recipe (pass --config FILE; --help for every option)",
    "ppo": "run the PPO recipe (pass --config FILE; --help for every option)",
    "review": "open the review page for OUTPUT_DIR/review (flagged samples → preference pairs)",
    "report": "write OUTPUT_DIR/report/index.html: curves, alarms and top samples of a PPO run",
    "plan": "print a GPU memory plan for a model (reads its config only)",
    "plugins": "list registered plugins",
    "convert": "convert the embedded model (or a .gguf) to safetensors once",
}


def _recipe(name: str, rest) -> int:
    import runpy

    from . import recipes

    script, command = recipes.recipe_path(name), f"rlhf-ext {name.split('_')[0]}"
    if not rest:  # every option could come from the command line, but nobody means to run with none of them
        print(f"usage: {command} --config FILE.yaml [--option value ...]\n"
              f"The recipe needs a configuration: a YAML such as the ones in recipes/configs/ (see "
              f"`{command} --help` for every option).", file=sys.stderr)
        return 2
    sys.argv, recipes.PROGRAM = [str(script), *rest], command  # its usage line and errors name the command typed
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        recipes.PROGRAM = None
    return 0


def _plugins(rest) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ext plugins", description="List every plugin point and the names "
                                 "registered under it (built-ins, and third-party ones once requested by name: entry-"
                                 "point group rlhf_ext.plugins, names <point>.<name>). A config chooses them by name, "
                                 "e.g. kl_controller: hard, aggregation: uwo, shapers: [linear].")
    ap.parse_args(rest)
    from .registry import POINTS, available

    for point in POINTS:
        print(f"{point:15s} {', '.join(available(point)) or '-'}")
    return 0


def _convert(rest) -> int:
    ap = argparse.ArgumentParser(prog="rlhf-ext convert", description=COMMANDS["convert"])
    ap.add_argument("model", nargs="?", default=None, help="a .gguf file or the embedded default's name "
                    "(default: smollm2-135m-instruct); prints the converted safetensors folder")
    args = ap.parse_args(rest)
    from .models import DEFAULT_MODEL, EMBEDDED_MODELS, resolve_model_path

    model = args.model or DEFAULT_MODEL
    # resolve_model_path passes folders, Hub ids and other files through unchanged: printed back, they read as
    # converted when nothing was
    if model.lower() not in EMBEDDED_MODELS and not model.endswith(".gguf"):
        ap.error(f"{model} is not a .gguf file or an embedded model: convert turns a GGUF file (or "
                 f"{', '.join(EMBEDDED_MODELS)}) into a safetensors folder. A folder or Hub id needs no conversion: "
                 f"pass it to the trainers as it is.")
    try:
        print(resolve_model_path(model))
    except FileNotFoundError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    except (ValueError, struct.error) as e:  # transformers' GGUF reader: wrong magic bytes, or a file cut short
        ap.exit(2, f"{ap.prog}: error: {model} could not be read as a GGUF model ({e}); pass a "
                   f"complete .gguf file as llama.cpp writes it, or {DEFAULT_MODEL}.\n")
    return 0


def _lazy(module: str, func: str = "main"):
    def run(rest):
        import importlib

        return getattr(importlib.import_module(module, __package__), func)(rest)

    return run


HANDLERS = {
    "demo": _lazy(".demo"),
    "reward": lambda rest: _recipe("reward_modeling", rest),
    "ppo": lambda rest: _recipe("ppo", rest),
    "review": _lazy(".monitor.review"),
    "report": _lazy(".monitor.report"),
    "plan": _lazy(".plan.cli"),
    "plugins": _plugins,
    "convert": _convert,
}


def main(argv=None) -> int:
    """Run one command; returns its exit status (0 on success). A command's own return value is never passed to
    `sys.exit` as such: `demo` returns its summary, which would print to stderr and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="rlhf-ext", description="PPO-based RLHF on current TRL, safe against reward hacking.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="commands:\n" + "\n".join(f"  {k:9s} {v}" for k, v in COMMANDS.items()))
    ap.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0 if argv else 2
    args = ap.parse_args(argv[:1])
    try:
        rc = HANDLERS[args.command](argv[1:])
    except BrokenPipeError:  # `rlhf-ext plan … | head`: the reader stopped early, which is not a failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
