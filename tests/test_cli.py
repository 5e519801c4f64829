"""The CLI skeleton: --config YAML merging, flag precedence, one-line errors."""

import argparse

import pytest

from qdiablo import cli
from qdiablo.errors import UserError


class EchoCommand:
    """A stand-in verb module with the real verb interface, registered for these tests."""

    HELP = "echo its arguments"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--num-blocks", type=int, default=64)
        p.add_argument("--model", required=True)
        p.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4)
        p.add_argument("--magr", action="store_true")
        p.add_argument("--tasks", nargs="+", default=["gsm8k"])

    @staticmethod
    def run(args):
        EchoCommand.seen = args
        if args.model == "boom":
            raise UserError("the model exploded", hint="try another model")
        return 0


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"echo": EchoCommand})
    return EchoCommand


def test_yaml_supplies_flags_and_command_line_overrides(echo, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nnum_blocks: 32\nbits: '3'\nmagr: true\ntasks: [SVAMP, AQuA]\n")
    assert cli.main(["echo", "--config", str(cfg)]) == 0
    a = echo.seen
    assert (a.model, a.num_blocks, a.bits, a.magr, a.tasks) == ("m", 32, 3, True, ["SVAMP", "AQuA"])
    assert cli.main(["echo", "--config", str(cfg), "--num-blocks", "16", "--bits", "2"]) == 0
    assert (echo.seen.num_blocks, echo.seen.bits, echo.seen.model) == (16, 2, "m")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\nblocks: 3\n", "unknown key 'blocks'"),
        ("model: m\nbits: 5\n", "key 'bits' is 5"),
        ("model: m\nmagr: 'yes'\n", "must be true or false"),
        ("- a\n- b\n", "expected a mapping"),
        ("model: [unclosed\n", "malformed YAML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(echo, tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert cli.main(["echo", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "bad.yaml" in err[0] and message in err[0]
    assert err[1].startswith("hint:")


def test_user_error_is_one_line_plus_hint(echo, capsys):
    assert cli.main(["echo", "--model", "boom"]) == 2
    err = capsys.readouterr().err
    assert err == "qdiablo: error: the model exploded\nhint: try another model\n"


def test_missing_config_file(echo, tmp_path, capsys):
    assert cli.main(["echo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--threads", "--recon-steps", "--steps", "--limit"])
def test_demo_refuses_a_count_below_one_before_writing(tmp_path, capsys, flag):
    assert cli.main(["demo", "--output", str(tmp_path / "demo"), flag, "0"]) == 2
    assert f"{flag} 0: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
