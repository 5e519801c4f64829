"""The `qdiablo` command: one verb per module in `qdiablo/commands/`.

Adding a verb: write `qdiablo/commands/<verb>.py` with `HELP`, `add_arguments(parser)` and
`run(args)`, then import it here and add it to `COMMANDS` below. Every verb gets
`--config FILE.yaml` for free: the file's keys are the verb's long flag names (`num-blocks` or
`num_blocks`), and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any

from qdiablo.commands import compare, demo, export, plan, quantize, run, train
from qdiablo.commands import eval as evaluate
from qdiablo.errors import UserError
from qdiablo.faults import as_user_error
from qdiablo.flags import add_verb_parser, config_defaults, load_yaml

# The pipeline order: model -> quantize -> train -> eval -> export; then the planner. Each module
# keeps its heavy imports (torch, transformers) inside `run`, so `qdiablo --help` stays fast.
COMMANDS: dict[str, Any] = {
    "demo": demo,
    "quantize": quantize,
    "train": train,
    "eval": evaluate,
    "export": export,
    "run": run,
    "compare": compare,
    "plan": plan,
}

log = logging.getLogger("qdiablo")


def available_commands() -> dict[str, Any]:
    """The verb modules, by name."""
    return dict(COMMANDS)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each verb's subparser."""
    parser = argparse.ArgumentParser(
        prog="qdiablo",
        description="Quantization-aware fine-tuning: MagR + GPTQ/RTN bases, DiaBlo adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verbs = {}
    for name, module in available_commands().items():
        verbs[name] = add_verb_parser(sub, name, module)
    return parser, verbs


def _find_config(argv: list[str], verbs: dict) -> tuple[str | None, str | None]:
    """The verb and the --config value in argv, found before parsing, so that the file can
    supply flags that argparse would otherwise call missing."""
    verb = next((a for a in argv if a in verbs), None)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return verb, argv[i + 1]
        if a.startswith("--config="):
            return verb, a.split("=", 1)[1]
    return verb, None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser, verbs = build_parser()
    verb, config = _find_config(argv, verbs)
    from_file: dict[str, str] = {}
    if verb is not None and config is not None:
        defaults = config_defaults(verbs[verb], load_yaml(config), str(config))
        verbs[verb].set_defaults(**defaults)
        given = {
            a.dest
            for a in verbs[verb]._actions
            for opt in a.option_strings
            if any(x == opt or x.startswith(opt + "=") for x in argv)
        }
        from_file = {dest: str(config) for dest in defaults if dest not in given}
    args = parser.parse_args(argv)
    args._from_file = from_file  # dest -> the YAML file its value came from
    return args


def _name_the_source(message: str, args: argparse.Namespace | None) -> str:
    """`--max-steps 0: ...` becomes `FILE: key 'max-steps' 0: ...` when the value came from
    the YAML file, so that the error points where the user must edit."""
    m = re.match(r"--([a-z0-9][a-z0-9-]*)\b", message)
    sources = getattr(args, "_from_file", None) or {}
    if m and m.group(1).replace("-", "_") in sources:
        return f"{sources[m.group(1).replace('-', '_')]}: key '{m.group(1)}'{message[m.end() :]}"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("QDIABLO_DEBUG") == "1"
    args = None
    try:
        args = parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args._run(args) or 0)
    except Exception as e:
        # A user's mistake or the machine's state (a full disk, a read-only folder): one line
        # and a hint. Anything else is a bug and keeps its traceback.
        error = e if isinstance(e, UserError) else as_user_error(e, getattr(args, "output", None))
        if error is None or debug:
            raise
        hint = (
            getattr(error, "hint", None)
            or "run with --help for the options, or set QDIABLO_DEBUG=1 for a traceback"
        )
        print(f"qdiablo: error: {_name_the_source(str(error), args)}", file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdiablo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
