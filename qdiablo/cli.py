"""The `qdiablo` command: one verb per module in `qdiablo/commands/`.

Adding a verb: write `qdiablo/commands/<verb>.py` with `HELP`, `add_arguments(parser)` and
`run(args)`, then add its name to `COMMANDS` below. Every verb gets `--config FILE.yaml` for free:
the file's keys are the verb's long flag names (`num-blocks` or `num_blocks`), and flags given on
the command line override it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError

# The pipeline order: model -> quantize -> train -> eval -> export.
COMMANDS = ["demo", "quantize", "train", "eval", "export", "run", "compare"]

log = logging.getLogger("qdiablo")


def _command_module(name: str):
    return importlib.import_module(f"qdiablo.commands.{name.replace('-', '_')}")


def available_commands() -> dict[str, Any]:
    """COMMANDS whose module is installed, by name: a verb merged from another branch plugs in
    by its name alone, and a missing one leaves the others working."""
    modules = {}
    for name in COMMANDS:
        try:
            modules[name] = _command_module(name)
        except ModuleNotFoundError as e:
            if e.name != f"qdiablo.commands.{name.replace('-', '_')}":
                raise
    return modules


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
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="YAML file whose keys are this command's long flag names; flags override it",
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        verbs[name] = p
    return parser, verbs


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, with one-line errors for a missing or malformed file (and where)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{file}: malformed YAML{where}: {problem}") from e
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a mapping, got {type(data).__name__}")
    return data


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Read a YAML config and check each key against the parser's long flags."""
    return config_defaults(parser, load_yaml(path), str(path))


def config_defaults(
    parser: argparse.ArgumentParser, data: dict[str, Any], source: str
) -> dict[str, Any]:
    """Check a mapping of long flag names (`num-blocks` or `num_blocks`) to values against the
    parser and convert it to parser defaults; `source` names the mapping in errors."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    flags = {
        s.lstrip("-"): a.dest
        for a in parser._actions
        for s in a.option_strings
        if s.startswith("--")
    }
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("_", "-")
        dest = flags.get(name)
        if dest is None or dest in ("config", "help"):
            known = ", ".join(sorted(k for k in flags if k not in ("config", "help")))
            raise UserError(f"{source}: unknown key '{key}'", hint=f"known keys: {known}")
        action = actions[dest]
        if (
            value is not None
            and not isinstance(value, list)
            and (action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction))
        ):
            value = [value]  # `tasks: gsm8k` is one task, not five letters
        if isinstance(
            action,
            argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction,
        ):
            if not isinstance(value, bool):
                raise UserError(f"{source}: key '{key}' must be true or false, got {value!r}")
            if isinstance(action, argparse._StoreFalseAction):
                value = not value  # `no-foo: true` means foo is off
            elif isinstance(action, argparse.BooleanOptionalAction) and name.startswith("no-"):
                value = not value  # `--foo/--no-foo`: the key `no-foo` negates
        elif value is not None and action.type is not None:
            items = value if isinstance(value, list) else [value]
            try:
                items = [action.type(v) if isinstance(v, str) else v for v in items]
            except (TypeError, ValueError) as e:
                raise UserError(f"{source}: key '{key}': {e}") from e
            value = items if isinstance(value, list) else items[0]
        if action.choices is not None and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if v not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    raise UserError(f"{source}: key '{key}' is {v!r}; choose from {choices}")
        action.required = False
        defaults[dest] = value
    return defaults


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
    if verb is not None and config is not None:
        verbs[verb].set_defaults(**_config_defaults(verbs[verb], config))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("QDIABLO_DEBUG") == "1"
    try:
        args = parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        return int(args._run(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:
        if debug:
            raise
        hint = (
            getattr(e, "hint", None)
            or "run with --help for the options, or set QDIABLO_DEBUG=1 for a traceback"
        )
        print(f"qdiablo: error: {e}", file=sys.stderr)
        print(f"hint: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdiablo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
