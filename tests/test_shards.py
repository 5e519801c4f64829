"""quantizers/shards.py: safetensors read and written a module at a time."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qdiablo import cli
from quantizers.shards import (
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointKeysError,
    ShardedCheckpoint,
    ShardWriter,
    materialize,
)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(100 + i, generator=g) for i in range(6)}  # ~400 bytes each


def test_shards_stay_under_the_limit_and_the_index_lists_every_tensor(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=1000, metadata={"format": "pt"})
    for name, t in tensors().items():
        writer.add(name, t)
    names = writer.finish()
    shards = [n for n in names if n.endswith(".safetensors")]
    assert names[-1] == INDEX_NAME and shards == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary left
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors().values())
    back = {}
    for shard in shards:
        part = load_file(tmp_path / shard)
        assert sum(t.numel() * 4 for t in part.values()) <= 1000
        assert all(index["weight_map"][k] == shard for k in part)
        back.update(part)
    assert back.keys() == tensors().keys() and all(torch.equal(back[k], tensors()[k]) for k in back)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / shards[0]).stat().st_mode & 0o777 == 0o666 & ~umask


def test_one_shard_is_model_safetensors_and_mistakes_are_errors(tmp_path):
    writer = ShardWriter(tmp_path / "one")
    for name, t in tensors().items():
        writer.add(name, t)
    assert writer.finish() == [WEIGHTS_NAME]
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t0", torch.zeros(1))
    with pytest.raises(ValueError, match="no tensors"):
        ShardWriter(tmp_path / "empty").finish()


def test_read_casts_floats_only_and_materialize_keeps_tied_tensors_tied(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_size=300)
    writer.add("emb.weight", torch.arange(12.0).view(3, 4).to(torch.bfloat16))
    writer.add("idx", torch.arange(5))
    writer.finish()
    ckpt = ShardedCheckpoint(tmp_path)
    read = ckpt.read(["emb.weight", "idx"], dtype=torch.float32)
    assert read["emb.weight"].dtype == torch.float32 and read["idx"].dtype == torch.int64
    with torch.device("meta"):
        model = nn.ModuleDict({"emb": nn.Embedding(3, 4), "head": nn.Linear(4, 3, bias=False)})
    model["head"].weight = model["emb"].weight  # tied: the file holds it once
    materialize(model, "", ckpt, dtype=torch.float32)
    assert model["head"].weight is model["emb"].weight
    assert torch.equal(model["emb"].weight, torch.arange(12.0).view(3, 4))
    with torch.device("meta"):
        wrong = nn.ModuleDict({"emb": nn.Embedding(4, 4)})
    with pytest.raises(CheckpointKeysError, match=r"'emb.weight' has shape \[3, 4\]"):
        materialize(wrong, "", ckpt)
    with torch.device("meta"):
        other = nn.ModuleDict({"other": nn.Linear(2, 2)})
    with pytest.raises(CheckpointKeysError, match=r"no tensor other\.weight"):
        materialize(other, "", ckpt)


def test_a_missing_shard_is_one_line_naming_it(tmp_path, capsys):
    from test_quantize_resume import load_benchmark

    model = load_benchmark("synthetic_llama").write_synthetic("tiny", tmp_path / "m", 0, 60_000)
    (tmp_path / "m" / "model-00002-of-00006.safetensors").unlink()
    argv = ["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "q")]
    assert cli.main([*argv, "--method", "rtn", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert (
        "model-00002-of-00006.safetensors (listed in model.safetensors.index.json) is missing"
        in err
    )
    assert model.is_dir()
