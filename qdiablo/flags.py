"""One source for every flag: argparse flags generated from a dataclass, and YAML converted to
values exactly as the command line converts them.

A dataclass field becomes `--field-name` with the field's `metadata["help"]`, its default and,
where given, `metadata["choices"]` and `metadata["group"]` (the `--help` section). `bool` fields
become `--name/--no-name` (a `bool | None` field defaults to None: decided at run time);
`list[str]` fields take one or more values. Both `TrainConfig` (for
`qdiablo train`) and `quantizers.QuantConfig` (for `qdiablo quantize`) are turned into flags here.

YAML (a `--config` file, or a stage's mapping in `qdiablo run` / `qdiablo compare`) goes through
`config_defaults`: every value passes through the same `type=` the flag uses, on its text, so
`max-steps: 1.5` is refused as `--max-steps 1.5` is, with a one-line error naming the key and
the file, before anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from qdiablo.errors import UserError


def scalar_type(annotation: Any):
    """The argparse `type=` of a field annotation (`int | None` -> int, `list[str]` -> str)."""
    text = str(getattr(annotation, "__name__", annotation))
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    group: str | None = None,
    exclude: frozenset[str] = frozenset(),
) -> None:
    """One flag per field of the dataclass `cls`, with the field's help, default and choices.

    Fields are grouped by `metadata["group"]`, else under `group` (else the parser itself).
    """
    groups: dict[str | None, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        meta = f.metadata
        title = meta.get("group", group)
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        target = groups[title]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": default, "dest": f.name}
        annotation = str(f.type)
        if annotation in ("bool", "bool | None") or f.type is bool:
            # `bool | None`: None (neither flag given) means "decided at run time"
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "list[" in annotation:
            kwargs["nargs"] = "+"
        kwargs["type"] = scalar_type(annotation)
        if "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if default is not None and not isinstance(default, list):
            kwargs["help"] += f" (default: {default})"
        target.add_argument(flag, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, with one-line errors for a missing or malformed file (and where)."""
    import yaml  # deferred: only verbs given --config (and run/compare) read YAML

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


_BOOL_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse.BooleanOptionalAction,
)


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """One YAML scalar through the flag's `type=`, as if it had been typed on the command line."""
    if action.type is None and isinstance(value, str):
        return value
    name = getattr(action.type, "__name__", "str")
    refused = UserError(
        f"{source}: key '{key}' expects {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r}"
    )
    if isinstance(value, bool | list | dict):  # `true` is no number, as `--max-steps true` isn't
        raise refused
    try:
        return (action.type or str)(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise refused from None


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
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        if value is not None and not isinstance(value, list) and many:
            value = [value]  # `tasks: gsm8k` is one task, not five letters
        if isinstance(value, list) and not many:
            raise UserError(f"{source}: key '{key}' takes one value, got a list {value!r}")
        if isinstance(action, _BOOL_ACTIONS):
            if value is None and action.default is None:  # `bool | None`: null means auto
                defaults[dest] = None
                continue
            if not isinstance(value, bool):
                raise UserError(f"{source}: key '{key}' must be true or false, got {value!r}")
            if isinstance(action, argparse._StoreFalseAction):
                value = not value  # `no-foo: true` means foo is off
            elif isinstance(action, argparse.BooleanOptionalAction) and name.startswith("no-"):
                value = not value  # `--foo/--no-foo`: the key `no-foo` negates
        elif value is not None:
            if isinstance(value, list):
                value = [_convert(action, key, v, source) for v in value]
            else:
                value = _convert(action, key, value, source)
        if action.choices is not None and value is not None:
            for v in value if isinstance(value, list) else [value]:
                if v not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    raise UserError(f"{source}: key '{key}' is {v!r}; choose from {choices}")
        action.required = False
        defaults[dest] = value
    return defaults


def add_verb_parser(
    sub: argparse._SubParsersAction | None, name: str, verb: Any
) -> argparse.ArgumentParser:
    """The parser of one verb module (HELP, add_arguments, run) with the `--config` flag every
    verb shares: a subparser of `sub`, or (sub=None) a standalone parser, for the pipeline."""
    if sub is None:
        p = argparse.ArgumentParser(prog=f"qdiablo {name}", description=verb.HELP)
    else:
        p = sub.add_parser(name, help=verb.HELP, description=verb.HELP)
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file whose keys are this command's long flag names; flags override it",
    )
    verb.add_arguments(p)
    p.set_defaults(_run=verb.run)
    return p
