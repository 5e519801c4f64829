"""`qdiablo run`: the whole pipeline on a tiny saved model, its markers, skips and re-runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qdiablo import cli
from qdiablo.errors import UserError
from qdiablo.pipeline.run import build_pipeline, run_pipeline


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "tiny.json"
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": "", "answer": str(2 * i)}
        for i in range(1, 4)
    ]
    path.write_text(json.dumps(rows))
    return path


def pipeline_config(tmp_path, tiny_model_dir, math_file, task_file, **changes) -> Path:
    config = {
        "output": str(tmp_path / "out"),
        "model": str(tiny_model_dir),
        "quantize": {
            "method": "gptq",
            "bits": 4,
            "group_size": 32,
            "calib": str(math_file),
            "calib_samples": 4,
            "calib_seq_len": 32,
            "calib-dtype": "float32",
        },
        "train": {
            "data": [str(math_file)],
            "decontaminate": "none",
            "num_blocks": 4,
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 256,
            "save_steps": 1,
            "progress": False,
        },
        "eval": {
            "task_file": str(task_file),
            "limit": 2,
            "max_new_tokens": 3,
            "batch_size": 2,
            "no_progress": True,
        },
    }
    config["export"] = {"merged": True}
    for stage, values in changes.items():
        config[stage] = values if values is None else {**config.get(stage, {}), **values}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "stages").glob("*.json")}


def run(config: Path, *extra: str) -> int:
    return cli.main(["run", str(config), *extra])


def statuses(outcomes) -> dict[str, str]:
    """What run_pipeline did to each stage: "ran", "resumed" or "skipped"."""
    return {o.stage.key: o.status for o in outcomes}


def test_run_end_to_end_then_skip_rerun_and_resume(
    tmp_path, tiny_model_dir, math_file, task_file, capsys
):
    config = pipeline_config(tmp_path, tiny_model_dir, math_file, task_file)
    out = tmp_path / "out"
    stages = ["quantize", "train", "eval", "export"]

    assert run(config) == 0
    first = markers(out)
    assert sorted(first) == sorted(stages)
    assert (out / "quantized" / "quantize_config.json").is_file()
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "train" / "train_results.json").read_text())["base"] == "gptq"
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["model"]["base"] == str(out / "quantized")
    assert summary["model"]["adapter"] == str(out / "train" / "adapter")
    assert summary["tasks"]["tiny"]["n"] == 2
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest and (out / "export" / "merged" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "stage" in printed and "wall s" in printed and "eval scores:" in printed
    assert first["train"]["inputs"] == {"quantize": first["quantize"]["run_id"]}
    assert len(first["quantize"]["hash"]) == 64

    # 1. Nothing changed: every stage is skipped, the markers are untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert statuses(run_pipeline(config)) == dict.fromkeys(stages, "skipped")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == mtimes
    assert markers(out) == first

    # 2. A train key changed: train, eval (and export) re-run; quantize does not.
    config = pipeline_config(tmp_path, tiny_model_dir, math_file, task_file, train={"seed": 7})
    assert statuses(run_pipeline(config)) == {
        "quantize": "skipped",
        **dict.fromkeys(stages[1:], "ran"),
    }
    second = markers(out)
    assert second["quantize"] == first["quantize"]
    for s in stages[1:]:
        assert second[s]["run_id"] != first[s]["run_id"], s
    assert second["train"]["hash"] != first["train"]["hash"]
    assert second["eval"]["hash"] != first["eval"]["hash"]  # its input's identity changed
    assert json.loads((out / "train" / "train_config.json").read_text())["seed"] == 7

    # 3. An interrupted eval (started, no marker): it re-runs, resuming its finished items;
    #    the stages before it are skipped.
    (out / "stages" / "eval.json").unlink()
    (out / "stages" / "eval.started.json").write_text(
        json.dumps({"hash": second["eval"]["hash"], "inputs": second["eval"]["inputs"]})
    )
    done = statuses(run_pipeline(config))
    assert done == {"quantize": "skipped", "train": "skipped", "eval": "resumed", "export": "ran"}
    third = markers(out)
    assert third["eval"]["run_id"] != second["eval"]["run_id"]
    assert third["eval"]["status"] == "resumed"
    assert third["train"] == second["train"]
    assert not (out / "stages" / "eval.started.json").exists()

    # 4. An interrupted train with a checkpoint resumes from it (--resume auto).
    (out / "stages" / "train.json").unlink()
    (out / "stages" / "train.started.json").write_text(
        json.dumps({"hash": third["train"]["hash"], "inputs": third["train"]["inputs"]})
    )
    assert statuses(run_pipeline(config))["train"] == "resumed"
    fourth = markers(out)
    assert fourth["train"]["status"] == "resumed"
    assert fourth["eval"]["run_id"] != third["eval"]["run_id"]  # downstream follows
    assert fourth["eval"]["status"] == "ran"

    # 5. --force quantize re-runs everything.
    assert statuses(run_pipeline(config, force=["quantize"])) == dict.fromkeys(stages, "ran")
    fifth = markers(out)
    assert all(fifth[s]["run_id"] != fourth[s]["run_id"] for s in stages)


def test_run_refuses_bad_keys_before_anything_runs(
    tmp_path, tiny_model_dir, math_file, task_file, capsys
):
    out = tmp_path / "out"
    config = pipeline_config(tmp_path, tiny_model_dir, math_file, task_file, eval={"limt": 2})
    assert run(config) == 2
    err = capsys.readouterr().err
    assert "[eval]: unknown key 'limt'" in err and "hint: known keys:" in err and "limit" in err
    assert not out.exists()  # quantize and train did not run

    config = pipeline_config(tmp_path, tiny_model_dir, math_file, task_file, train={"output": "x"})
    assert run(config) == 2
    err = capsys.readouterr().err
    assert "[train]: 'output' is set by the pipeline" in err
    assert not out.exists()

    config = pipeline_config(tmp_path, tiny_model_dir, math_file, task_file, train={"base": "nf4"})
    with pytest.raises(UserError, match="'base' is set by the pipeline"):
        build_pipeline(yaml.safe_load(config.read_text()), "c.yaml")

    data = yaml.safe_load(config.read_text())
    data["exprot"] = {}
    with pytest.raises(UserError, match="unknown key 'exprot'"):
        build_pipeline(data, "c.yaml")

    config = pipeline_config(
        tmp_path, tiny_model_dir, math_file, task_file, quantize={"bits": "two"}
    )
    with pytest.raises(UserError, match=r"\[quantize\]: key 'bits'"):
        build_pipeline(yaml.safe_load(config.read_text()), "c.yaml")
    assert not out.exists()


def test_run_without_quantize_trains_on_the_nf_base_and_evaluates_it(tmp_path, tiny_model_dir):
    data = {
        "output": str(tmp_path / "out"),
        "model": str(tiny_model_dir),
        "quantize": None,
        "train": {"base": "nf2", "adapter": "lora", "rank": 2, "max_steps": 1},
        "eval": {"tasks": "SVAMP", "limit": 1},
    }
    _root, stages = build_pipeline(data, "c.yaml")
    assert [s.key for s in stages] == ["train", "eval"]
    train, ev = stages
    assert train.namespace().model == str(tiny_model_dir) and train.namespace().base == "nf2"
    assert ev.namespace().quant == "nf2" and ev.namespace().tasks == ["SVAMP"]
    assert ev.deps == [train]
    data["export"] = {}
    with pytest.raises(UserError, match="export needs a quantize and a train stage"):
        build_pipeline(data, "c.yaml")


def test_run_refuses_to_remove_a_folder_it_did_not_make(
    tmp_path, tiny_model_dir, math_file, task_file, capsys
):
    config = pipeline_config(
        tmp_path, tiny_model_dir, math_file, task_file, train=None, eval=None, export=None
    )
    stray = tmp_path / "out" / "quantized"
    stray.mkdir(parents=True)
    (stray / "precious.txt").write_text("mine")
    assert run(config) == 2
    assert "did not write (quantized)" in capsys.readouterr().err
    assert (stray / "precious.txt").read_text() == "mine"


def test_run_root_keeps_user_files_and_overwrite_removes_only_its_own(
    tmp_path, tiny_model_dir, math_file, task_file, capsys
):
    config = pipeline_config(
        tmp_path, tiny_model_dir, math_file, task_file, train=None, eval=None, export=None
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run(config) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert run(config, "--overwrite") == 0
    assert (out / "quantized" / "model.safetensors").is_file()
    first = (out / "stages" / "quantize.json").read_text()
    assert run(config, "--overwrite") == 0  # afresh: the stage ran again, notes.txt stayed
    assert (out / "stages" / "quantize.json").read_text() != first
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / ".qdiablo-run.json").read_text())["complete"] is True


def test_identity_follows_input_file_content_not_only_its_path(tmp_path, tiny_model_dir):
    data_file = tmp_path / "d.jsonl"
    data_file.write_text('{"instruction": "q", "input": "", "output": "a", "answer": "1"}\n')
    data = {"output": str(tmp_path / "o"), "model": str(tiny_model_dir), "train": {}}
    data["train"] = {"data": str(data_file), "max_steps": 1}
    before = build_pipeline(data, "c.yaml")[1][0].identity
    assert build_pipeline(data, "c.yaml")[1][0].identity == before
    data["train"]["logging_steps"] = 3  # neutral: does not change what the stage produces
    assert build_pipeline(data, "c.yaml")[1][0].identity == before
    data_file.write_text('{"instruction": "q", "input": "", "output": "b", "answer": "2"}\n')
    assert build_pipeline(data, "c.yaml")[1][0].identity != before


def test_eval_nf2_base_is_the_training_nf2_base(tiny_model_dir):
    """`qdiablo eval --quant nf2` (what the pipeline evaluates NF2-LoRA on) sees the very weights
    `qdiablo train --base nf2` trained against."""
    import torch

    from qdiablo.models import load_base
    from qdiablo.train.bases import load_training_base

    evaluated = load_base(str(tiny_model_dir), "nf2")
    trained = load_training_base("nf2", str(tiny_model_dir), device="cpu").model
    plain = load_base(str(tiny_model_dir))
    q = dict(evaluated.named_parameters())
    p = dict(plain.named_parameters())
    for name, t in trained.named_parameters():
        assert torch.equal(q[name], t), name
    w = q["model.layers.0.mlp.up_proj.weight"].reshape(-1, 64)
    assert all(len(row.unique()) <= 4 for row in w)  # 4 NF2 levels per block of 64
    assert not torch.equal(w, p["model.layers.0.mlp.up_proj.weight"].reshape(-1, 64))


def test_isolated_stages_record_their_own_peak_rss_and_repeat_bit_for_bit(
    tmp_path, tiny_model_dir, math_file, task_file
):
    """The demo's mode: each stage in its own process with a fixed thread count. Two runs give
    byte-identical weights, and each marker holds the stage process's peak RSS."""
    from qdiablo.pipeline.stages import Runner, summary_table

    weights = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = pipeline_config(
            tmp_path / name,
            tiny_model_dir,
            math_file,
            task_file,
            train=None,
            eval=None,
            export=None,
        )
        root, stages = build_pipeline(yaml.safe_load(config.read_text()), str(config))
        device = "cpu" if name == "b" else None  # the flag reaches the stage's own command
        outcomes = Runner(root, isolate=True, threads=1, device=device).run(stages)
        given = yaml.safe_load((root / "stages" / "quantize.args.yaml").read_text())
        assert given.get("device") == device
        marker = markers(root)["quantize"]
        assert marker["peak_rss_of"] == "stage process" and marker["threads"] == 1
        # A Python process that imported torch and transformers holds well over 50 MiB; the
        # parent's own figure would not come from wait4's rusage of the child.
        assert marker["peak_rss_mib"] > 50
        # the child's own CPU time (importing torch alone takes a good fraction of a second),
        # never more than its wall time allows with one thread beside the start-up's helpers
        assert 0.3 < marker["cpu_seconds"] < 4 * marker["wall_seconds"]
        assert outcomes[0].peak_rss_mib == marker["peak_rss_mib"]
        assert f"{marker['peak_rss_mib']:.0f}" in summary_table(outcomes)
        weights.append(
            b"".join(p.read_bytes() for p in sorted(root.glob("quantized/*.safetensors")))
        )
    assert weights[0] and weights[0] == weights[1]


def test_device_reaches_every_stage_that_takes_one(tmp_path, tiny_model_dir, math_file, task_file):
    """`qdiablo run --device` (or the config's `device`) goes to quantize, train and eval; a
    stage's own `device` key wins; where a stage runs is not part of its identity."""
    from qdiablo.pipeline.stages import Runner

    config = pipeline_config(
        tmp_path, tiny_model_dir, math_file, task_file, train={"device": "cpu"}
    )
    data = yaml.safe_load(config.read_text())
    root, stages = build_pipeline(data, str(config))
    runner = Runner(root, device="cuda")
    by_verb = {s.verb: s for s in stages}
    assert runner._device_args(by_verb["quantize"]) == {"device": "cuda"}
    assert runner._device_args(by_verb["eval"]) == {"device": "cuda"}
    merged = {**runner._device_args(by_verb["train"]), **by_verb["train"].args}
    assert merged["device"] == "cpu"
    _, again = build_pipeline({**data, "device": "cuda"}, str(config))
    assert [s.identity for s in stages] == [s.identity for s in again]
    with pytest.raises(UserError, match="unknown key 'devices'"):
        build_pipeline({**data, "devices": "cpu"}, str(config))
