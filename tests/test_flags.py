"""One source for every flag: quantize's flags come from QuantConfig as train's come from
TrainConfig, and YAML values go through the same conversion as command-line flags."""

import dataclasses

import pytest
import yaml

from qdiablo import cli
from qdiablo.commands.quantize import quant_config_from_args
from qdiablo.errors import UserError
from qdiablo.pipeline.run import build_pipeline
from qdiablo.train.config import TrainConfig
from quantizers.config import QuantConfig


def _actions(verb: str) -> dict:
    _, verbs = cli.build_parser()
    return {a.dest: a for a in verbs[verb]._actions if a.option_strings}


@pytest.mark.parametrize("verb, config", [("quantize", QuantConfig), ("train", TrainConfig)])
def test_every_config_field_is_a_flag_with_its_help_and_default(verb, config):
    actions = _actions(verb)
    for f in dataclasses.fields(config):
        action = actions[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert action.default == default, f.name
        assert f.metadata["help"] in action.help, f.name
        if "choices" in f.metadata:
            assert list(action.choices) == list(f.metadata["choices"]), f.name


def test_quantize_defaults_are_quant_configs_defaults_and_old_flags_still_parse():
    base = ["quantize", "--model", "m", "--output", "o"]
    assert quant_config_from_args(cli.parse_args(base)) == QuantConfig()
    args = cli.parse_args(
        [*base, "--sym", "--no-true-sequential", "--magr", "--bits", "3", "--magr-alpha", "1e-4"]
    )
    config = quant_config_from_args(args)
    assert (config.sym, config.true_sequential, config.magr) == (True, False, True)
    assert (config.bits, config.magr_alpha) == (3, 1e-4)
    assert args.calib_samples == 64 and args.calib_dtype == "auto"  # the --calib* flags stay


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-steps: 1.5\n", "key 'max-steps' expects an int, got 1.5"),
        ("max_steps: true\n", "key 'max_steps' expects an int, got True"),
        ("lr: fast\n", "key 'lr' expects a float, got 'fast'"),
        ("num-blocks: [2, 4]\n", "key 'num-blocks' takes one value"),
    ],
)
def test_yaml_values_are_converted_as_flags_are(tmp_path, capsys, text, message):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    assert cli.main(["train", "--config", str(cfg), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and str(cfg) in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything loaded


def test_yaml_numbers_become_what_the_flag_would_make(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 2\nmax-steps: '7'\nwarmup: 10\nmodel: 5\n")
    args = cli.parse_args(["train", "--config", str(cfg)])
    assert (args.epochs, args.max_steps, args.warmup, args.model) == (2.0, 7, 10.0, "5")
    assert isinstance(args.epochs, float) and isinstance(args.max_steps, int)


def test_pipeline_stage_values_are_converted_as_flags_are(tmp_path):
    data = yaml.safe_load(f"output: {tmp_path / 'out'}\nmodel: smollm2\ntrain:\n  max_steps: 1.5\n")
    with pytest.raises(UserError, match=r"c\.yaml \[train\]: key 'max_steps' expects an int"):
        build_pipeline(data, "c.yaml")
    assert not (tmp_path / "out").exists()
