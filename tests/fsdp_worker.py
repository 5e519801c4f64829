"""Run under `accelerate launch --config_file examples/fsdp2.yaml` by test_fsdp.py: trains with
qdiablo's real entry point, then records what only the sharded processes can see (the gathered
adapter, each rank's resident packed-base bytes) in <output>/fsdp_probe_<rank>.json."""

import json
import os
import sys

import torch

from qdiablo.train import TrainConfig, train
from qdiablo.train.fsdp import gather_trainable, packed_base_bytes

config = TrainConfig(**json.loads(sys.argv[1]))
result = train(config)
gathered = gather_trainable(result.model)
rank = int(os.environ.get("RANK", "0"))
probe = {
    "packed_base_bytes": packed_base_bytes(result.model),
    "sharded": type(next(p for p in result.model.parameters())).__name__ == "DTensor",
    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
}
if rank == 0:
    torch.save(gathered, os.path.join(config.output, "gathered.pt"))
with open(os.path.join(config.output, f"fsdp_probe_{rank}.json"), "w") as f:
    json.dump(probe, f)
