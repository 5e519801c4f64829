"""`qdiablo eval` end to end on a tiny saved model: bases, adapters, errors, YAML config."""

import json

import pytest
import torch

from eval.math10k import resolve_tasks
from eval.nll import aggregate, reference_nll
from qdiablo import cli
from qdiablo.adapters.loading import load_adapter
from qdiablo.kinds import BASE_KINDS, QUANT_FLAG_KINDS
from qdiablo.models import load_base, load_model

ARGS = ["--max-new-tokens", "3", "--limit", "2", "--batch-size", "2", "--no-progress"]


def run_eval(tmp_path, *extra, name="out"):
    out = tmp_path / name
    rc = cli.main(["eval", *ARGS, "--output", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else None
    return rc, summary


def direct_nll(model, tokenizer, task="SVAMP", limit=2):
    (t,) = resolve_tasks([task])
    items = reference_nll(model, tokenizer, t.records[:limit], template="alpaca", progress=False)
    return aggregate(items)["nll"]


def test_eval_fp_base_writes_results(tiny_model_dir, tmp_path, capsys, tokenizer):
    rc, summary = run_eval(tmp_path, "--model", str(tiny_model_dir), "--tasks", "SVAMP", "AQuA")
    assert rc == 0
    out = capsys.readouterr().out
    assert "| SVAMP | 2 |" in out and "| AQuA | 2 |" in out
    assert set(summary["tasks"]) == {"SVAMP", "AQuA"}
    assert summary["model"]["base"] == str(tiny_model_dir)
    assert (
        summary["settings"]["template"] == "alpaca" and summary["settings"]["max_new_tokens"] == 3
    )
    expected = direct_nll(load_model(str(tiny_model_dir)), tokenizer)
    assert summary["tasks"]["SVAMP"]["nll"] == pytest.approx(expected, rel=1e-6)
    for f in ("run.json", "SVAMP.jsonl", "SVAMP.nll.jsonl", "AQuA.jsonl", "results.md"):
        assert (tmp_path / "out" / f).is_file()


def _diablo_adapter(tiny_model_dir, path, seed=0):
    from qdiablo import DiaBloConfig, get_diablo_model

    model = get_diablo_model(load_model(str(tiny_model_dir)), DiaBloConfig(num_blocks=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.diablo_layers():
            layer.blocks.normal_(0, 0.05)
    model.save_pretrained(path)
    return model


def test_eval_with_diablo_adapter_plain_and_merged(tiny_model_dir, tmp_path, tokenizer):
    adapter = tmp_path / "adapter"
    wrapped = _diablo_adapter(tiny_model_dir, adapter)
    base_nll = direct_nll(load_model(str(tiny_model_dir)), tokenizer)
    expected = direct_nll(wrapped, tokenizer)
    assert abs(expected - base_nll) > 1e-3  # the adapter changes the model
    retrained = direct_nll(
        _diablo_adapter(tiny_model_dir, tmp_path / "retrained", seed=1), tokenizer
    )
    common = ["--model", str(tiny_model_dir), "--tasks", "SVAMP", "--adapter", str(adapter)]
    rc, summary = run_eval(tmp_path, *common, "--nll-only")
    assert rc == 0
    assert summary["model"]["adapter_kind"] == "diablo"
    assert summary["tasks"]["SVAMP"]["nll"] == pytest.approx(expected, rel=1e-6)
    assert "accuracy" not in summary["tasks"]["SVAMP"]
    # A retrained adapter in the same folder does not resume the old adapter's results.
    _diablo_adapter(tiny_model_dir, adapter, seed=1)
    assert cli.main(["eval", *ARGS, "--output", str(tmp_path / "out"), *common, "--nll-only"]) == 2
    rc, merged = run_eval(tmp_path, *common, "--merge-adapter", name="merged")
    assert rc == 0 and merged["model"]["merged"]
    assert merged["tasks"]["SVAMP"]["nll"] == pytest.approx(retrained, rel=1e-5)


def test_eval_with_lora_adapter(tiny_model_dir, tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    adapter = tmp_path / "lora"
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(str(tiny_model_dir)), config)
    peft_model.save_pretrained(adapter)
    expected = direct_nll(peft_model, tokenizer)
    assert abs(expected - direct_nll(load_model(str(tiny_model_dir)), tokenizer)) > 1e-4
    rc, summary = run_eval(
        tmp_path, "--model", str(tiny_model_dir), "--tasks", "SVAMP", "--adapter", str(adapter)
    )
    assert rc == 0 and summary["model"]["adapter_kind"] == "lora"
    assert summary["tasks"]["SVAMP"]["nll"] == pytest.approx(expected, rel=1e-6)


def test_nf4_base_loads_with_bitsandbytes_and_evaluates(tiny_model_dir, tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    model = load_base(str(tiny_model_dir), "nf4")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    fp = direct_nll(load_model(str(tiny_model_dir)), tokenizer)
    nf4 = direct_nll(model, tokenizer)
    assert nf4 != fp and abs(nf4 - fp) < 0.5  # quantized, and close
    rc, summary = run_eval(
        tmp_path, "--model", str(tiny_model_dir), "--quant", "nf4", "--tasks", "SVAMP"
    )
    assert rc == 0 and summary["tasks"]["SVAMP"]["nll"] == pytest.approx(nf4, rel=1e-5)


def test_quantized_folder_loads_packed_and_evaluates(tiny_model_dir, tmp_path, tokenizer):
    from quantizers import QuantConfig, QuantLinear, quantize_model, save_quantized

    model = quantize_model(
        load_model(str(tiny_model_dir)), None, QuantConfig(method="rtn", bits=4, group_size=32)
    )
    expected = direct_nll(model, tokenizer)
    folder = save_quantized(model, tmp_path / "q4", tokenizer)
    loaded = load_base(str(folder))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert direct_nll(loaded, tokenizer) == pytest.approx(expected, rel=1e-6)
    rc, summary = run_eval(tmp_path, "--model", str(folder), "--tasks", "SVAMP")
    assert rc == 0 and summary["tasks"]["SVAMP"]["nll"] == pytest.approx(expected, rel=1e-6)
    assert summary["settings"]["dequant_cache"] is True  # auto: a tiny copy fits
    # without the whole-model copy (dequantized per call): the very same responses and NLL
    rc, off = run_eval(
        tmp_path, "--model", str(folder), "--tasks", "SVAMP", "--dequant-cache", "off", name="off"
    )
    assert rc == 0 and off["settings"]["dequant_cache"] is False
    assert off["tasks"]["SVAMP"]["nll"] == summary["tasks"]["SVAMP"]["nll"]
    rows = [(tmp_path / n / "SVAMP.jsonl").read_text() for n in ("out", "off")]
    assert rows[0] == rows[1]
    with pytest.raises(ValueError, match="already quantized"):
        load_base(str(folder), "nf4")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'"),
        (["--tasks", "missing/test.json"], "test file not found"),
        (["--adapter", "/nonexistent/adapter"], "adapter folder not found"),
        (["--no-nll", "--nll-only"], "exclude each other"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_user_errors_are_one_line(tiny_model_dir, tmp_path, capsys, extra, message):
    rc = cli.main(
        ["eval", "--model", str(tiny_model_dir), *ARGS, "--output", str(tmp_path), *extra]
    )
    err = capsys.readouterr().err.splitlines()
    i = next(i for i, line in enumerate(err) if line.startswith("qdiablo: error:"))
    assert rc == 2 and message in err[i] and err[i + 1].startswith("hint:")


def test_bad_test_file_names_file_and_record(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "answer": "1"}, {"instruction": "r"}]))
    rc = cli.main(["eval", "--model", str(tiny_model_dir), "--task-file", str(bad), *ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.json: record 1: missing field 'answer'" in err


def test_yaml_config_and_custom_task_file(tiny_model_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        '{"instruction": "1+1?", "answer": "2"}\n{"instruction": "2+2?", "answer": "4"}\n'
    )
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\ntask_file: [{data}]\npreset: chat\nmax-new-tokens: 2\n"
        f"no_progress: true\noutput: {tmp_path / 'o'}\n"
    )
    assert cli.main(["eval", "--config", str(cfg)]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert list(summary["tasks"]) == ["mine"] and summary["tasks"]["mine"]["group"] == "custom"
    assert summary["settings"]["template"] == "chat"
    row = json.loads((tmp_path / "o" / "mine.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("<|im_start|>user\n")


def test_quant_and_base_flags_map_onto_the_loaders_kinds():
    """eval's --quant and train's --base are two spellings of the one loader vocabulary."""
    _, verbs = cli.build_parser()
    flags = {
        a.dest: a
        for v in ("eval", "train")
        for a in verbs[v]._actions
        if a.dest in ("quant", "base")
    }
    assert tuple(flags["quant"].choices) == tuple(QUANT_FLAG_KINDS)
    assert set(QUANT_FLAG_KINDS.values()) <= set(BASE_KINDS)
    assert set(flags["base"].choices) == set(BASE_KINDS) - {"auto"}


def test_load_adapter_rejects_unknown_folders(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a DiaBlo adapter"):
        load_adapter(None, tmp_path)
