"""The statistics of `qdiablo compare` against independent computations."""

from __future__ import annotations

import json
import math

import pytest

from qdiablo.errors import UserError
from qdiablo.pipeline.stats import discordant_pairs, mcnemar_exact, mean_interval, wilson_interval


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out from its definition (Wilson 1927)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (10, 20), (20, 20), (7, 254), (1, 1)])
def test_wilson_matches_the_closed_form(k, n):
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert (lo == 0.0) == (k == 0) and (hi == 1.0) == (k == n)


def test_wilson_textbook_value_and_edges():
    # Textbook: 81 of 263, z = 1.959964 -> (0.2553, 0.3662) (Newcombe 1998, method 3 style).
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wide = wilson_interval(5, 20, confidence=0.99)
    narrow = wilson_interval(5, 20, confidence=0.95)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_mean_interval_brackets_the_mean():
    counts = [(3, 20), (0, 20), (10, 20), (5, 20)]
    lo, hi = mean_interval(counts)
    mean = sum(k / n for k, n in counts) / 4
    z = 1.959963984540054
    adjusted = [((k + 1.920729) / (n + 3.841459), n + 3.841459) for k, n in counts]
    se = math.sqrt(sum(p * (1 - p) / n for p, n in adjusted)) / 4
    assert (lo, hi) == pytest.approx((mean - z * se, mean + z * se), abs=1e-6)
    zero_lo, zero_hi = mean_interval([(0, 10), (0, 10)])
    assert zero_lo == 0.0 and 0.0 < zero_hi < 0.3  # not collapsed to a point at 0/n
    assert mean_interval([]) == (0.0, 1.0)


def test_mcnemar_on_a_hand_counted_example():
    # Ten items; baseline right on 0,1,2,3,7; reference right on 2,3,4,5,6,7,8.
    baseline = {("t", i): i in {0, 1, 2, 3, 7} for i in range(10)}
    reference = {("t", i): i in {2, 3, 4, 5, 6, 7, 8} for i in range(10)}
    reference[("u", 0)] = True  # not scored by the baseline: ignored
    b, c, n = discordant_pairs(baseline, reference)
    assert (b, c, n) == (2, 4, 10)  # b: items 0, 1; c: items 4, 5, 6, 8
    # Exact two-sided: P = 2·P(X ≤ 2), X ~ Bin(6, 1/2) = 2·(1 + 6 + 15)/64 = 0.6875.
    assert mcnemar_exact(b, c) == pytest.approx(0.6875, abs=1e-12)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024, abs=1e-12)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0


# --------------------------------------------------------------------------------------------
# The grid and `qdiablo compare` end to end
# --------------------------------------------------------------------------------------------


def grid_config(tmp_path, tiny_model_dir, math_file, **extra) -> dict:
    return {
        "output": str(tmp_path / "cmp"),
        "model": str(tiny_model_dir),
        "bits": [4],
        "budgets": ["matched"],
        "quantize": {
            "group_size": 32,
            "calib": str(math_file),
            "calib_samples": 4,
            "calib_seq_len": 32,
            "calib_dtype": "float32",
            "magr_iters": 5,
        },
        "train": {
            "data": str(math_file),
            "decontaminate": "none",
            "num_blocks": 4,
            "rank": 4,
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 256,
            "save_steps": 0,
            "progress": False,
        },
        "eval": {
            "tasks": ["SVAMP", "AQuA"],
            "limit": 3,
            "max_new_tokens": 3,
            "batch_size": 3,
            "no_progress": True,
        },
        **extra,
    }


def test_grid_shares_identical_stages(tmp_path, tiny_model_dir, math_file):
    from qdiablo.pipeline.compare import build_grid

    data = grid_config(tmp_path, tiny_model_dir, math_file, bits=[2, 4], budgets=None)
    grid = build_grid(data, "c.yaml")
    names = sorted({(c.bits, c.method.name) for c in grid.cells})
    assert names == [
        (2, "GPTQ-LoRA"),
        (2, "MagR-DiaBlo"),
        (2, "NF2-LoRA"),
        (4, "GPTQ-LoRA"),
        (4, "MagR-DiaBlo"),
        (4, "QLoRA"),
    ]
    assert len(grid.cells) == 12  # 2 bits x 3 methods x 2 budgets
    bases = {c.base.key for c in grid.cells if c.base}
    assert len(bases) == 4  # GPTQ and MagR+GPTQ, per bits: shared by the budgets
    for c in grid.cells:
        if c.base:
            ns = c.base.namespace()
            assert ns.bits == c.bits and ns.magr == (c.method.name == "MagR-DiaBlo")
            assert ns.output == str(c.base.output) and c.base.output.parent.name == "bases"
        t = c.train.namespace()
        if c.method.name == "MagR-DiaBlo":
            assert (t.adapter, t.num_blocks, t.base) == ("diablo", 4, "gptq")
        elif c.budget == "matched":
            assert (t.adapter, t.num_blocks, t.match_params) == ("lora", 4, True)
        else:
            assert (t.adapter, t.rank, t.match_params) == ("lora", 4, False)
        if c.method.name in ("QLoRA", "NF2-LoRA"):
            assert c.base is None and c.eval.namespace().quant == t.base
    diablo = {c.train.key for c in grid.cells if c.method.name == "MagR-DiaBlo"}
    assert len(diablo) == 2  # one per bits: the same run under both budgets
    lora = {c.train.key for c in grid.cells if c.method.name == "GPTQ-LoRA"}
    assert len(lora) == 4

    data["methods"] = [{"name": "QLoRA", "skip": True}, {"name": "x", "train": {"rank": 3}}]
    with pytest.raises(UserError, match="method x"):
        build_grid(data, "c.yaml")
    data["methods"] = [{"name": "RTN-DiaBlo", "quantize": {"method": "rtn"}, "train": {}}]
    grid = build_grid(data, "c.yaml")
    assert "RTN-DiaBlo" in {c.method.name for c in grid.cells}
    data["eval"]["limt"] = 3
    with pytest.raises(UserError, match=r"\[method .*\]: unknown key 'limt'"):
        build_grid(data, "c.yaml")


@pytest.mark.slow  # every cell of a small grid through quantize, train and eval: ~50 s
def test_compare_end_to_end(tmp_path, tiny_model_dir, math_file):
    pytest.importorskip("bitsandbytes")  # QLoRA's base
    pytest.importorskip("peft")
    import yaml

    from qdiablo import cli

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid_config(tmp_path, tiny_model_dir, math_file)))
    assert cli.main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    results = json.loads((out / "compare.json").read_text())
    rows = results["rows"]
    assert [(r["bits"], r["budget"], r["method"]) for r in rows] == [
        (4, "matched", "QLoRA"),
        (4, "matched", "GPTQ-LoRA"),
        (4, "matched", "MagR-DiaBlo"),
    ]
    assert len(list((out / "bases").iterdir())) == 2
    for r in rows:
        assert set(r["tasks"]) == {"SVAMP", "AQuA"}
        for t in r["tasks"].values():
            assert t["n"] == 3 and 0 <= t["ci95"][0] <= t["accuracy"] <= t["ci95"][1] <= 1
        assert 0 <= r["mean"]["ci95"][0] <= r["mean"]["ci95"][1] <= 1
        assert r["trainable_parameters"] > 0 and r["nll"] > 0
        if r["method"] == "MagR-DiaBlo":
            assert r["mcnemar"] is None and r["adapter"] == "diablo"
        else:
            m = r["mcnemar"]
            assert m["versus"] == "MagR-DiaBlo" and m["items"] == 6
            assert 0.0 <= m["p_value"] <= 1.0 and m["b"] + m["c"] <= 6
            assert r["adapter"] == "lora"
    # LoRA at the matched rank trains about as many parameters as DiaBlo N=4.
    counts = {r["method"]: r["trainable_parameters"] for r in rows}
    assert abs(counts["GPTQ-LoRA"] - counts["MagR-DiaBlo"]) / counts["MagR-DiaBlo"] < 0.1
    md = (out / "compare.md").read_text()
    assert md.count("| 4 | matched |") == 3 and "McNemar" in md and "model: `" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a re-run skips every stage: 2 bases, 3 trainings, 3 evaluations, markers untouched
    done = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert len(done) == 2 + 3 + 3 and not any(name.endswith(".started.json") for name in done)
    assert cli.main(["compare", str(config)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == done
    assert json.loads((out / "compare.json").read_text())["rows"] == rows


def test_grid_with_seeds_shares_the_bases_and_reports_the_spread(
    tmp_path, tiny_model_dir, math_file
):
    from qdiablo.pipeline.compare import build_grid
    from qdiablo.pipeline.report import seed_spread

    data = grid_config(tmp_path, tiny_model_dir, math_file, seeds=[7, 8])
    data["methods"] = [{"name": "QLoRA", "skip": True}, {"name": "MagR-DiaBlo+recon+scales"}]
    grid = build_grid(data, "c.yaml")
    cells = {(c.method.name, c.seed): c for c in grid.cells}
    assert sorted(cells) == [
        ("GPTQ-LoRA", 7), ("GPTQ-LoRA (seed 8)", 8), ("MagR-DiaBlo", 7),
        ("MagR-DiaBlo (seed 8)", 8), ("MagR-DiaBlo+recon+scales", 7),
        ("MagR-DiaBlo+recon+scales (seed 8)", 8),
    ]  # fmt: skip
    for name in ("GPTQ-LoRA", "MagR-DiaBlo", "MagR-DiaBlo+recon+scales"):
        first, second = cells[(name, 7)], cells[(f"{name} (seed 8)", 8)]
        assert first.base.key == second.base.key  # the seeds train on the same base
        assert first.train.key != second.train.key
        assert (first.train.namespace().seed, second.train.namespace().seed) == (7, 8)
    assert [c.method.reference for c in grid.cells].count(True) == 1
    scales = cells[("MagR-DiaBlo+recon+scales", 7)]
    assert scales.train.namespace().train_scales and scales.base.namespace().reconstruct
    with pytest.raises(UserError, match="'seeds' must be a list"):
        build_grid({**data, "seeds": 42}, "c.yaml")
    data["methods"].append({"name": "GPTQ-LoRA", "seeds": [9]})  # a method's own seeds
    lora = [c for c in build_grid(data, "c.yaml").cells if c.method.name.startswith("GPTQ-LoRA")]
    assert [(c.method.name, c.seed) for c in lora] == [("GPTQ-LoRA", 9)]

    def row(seed, nlls):
        tasks = {t: {"nll": v} for t, v in zip(("SVAMP", "AQuA"), nlls)}
        name = "M" if seed == 1 else f"M (seed {seed})"
        return {"bits": 2, "budget": "matched", "group": "M", "method": name, "seed": seed,
                "nll": sum(nlls) / 2, "tasks": tasks}  # fmt: skip

    lines = seed_spread([row(1, [2.0, 3.0]), row(2, [2.1, 2.95])])
    assert lines[-1] == "| 2 | matched | M | 1, 2 | 2.5125 | 0.0250 | 0.1000 |"
    assert seed_spread([{**row(1, [1.0, 1.0]), "seed": None}]) == []
