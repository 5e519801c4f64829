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
packed_intact = None
if config.base in ("gptq", "rtn"):  # every packed byte, gathered, against the file
    from safetensors.torch import load_file

    from quantizers import QuantLinear
    from quantizers.quant_linear import PACKED_NAMES, as_packed_dtype

    saved = load_file(os.path.join(config.model, "model.safetensors"))
    packed_intact = True
    for name, m in result.model.named_modules():
        if isinstance(m, QuantLinear):
            key = name.removeprefix("model.").removeprefix("base_model.model.")
            key = key.replace(".base_layer", "")
            for p in PACKED_NAMES:
                full = m._parameters[p].detach().full_tensor()
                want = saved[f"{key}.{p}"]
                got = as_packed_dtype(p, full)
                packed_intact &= torch.equal(got.view(torch.uint8), want.view(torch.uint8))
probe = {
    "packed_base_bytes": packed_base_bytes(result.model),
    "sharded": type(next(p for p in result.model.parameters())).__name__ == "DTensor",
    "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    "packed_intact": packed_intact,
}
if rank == 0:
    torch.save(gathered, os.path.join(config.output, "gathered.pt"))
with open(os.path.join(config.output, f"fsdp_probe_{rank}.json"), "w") as f:
    json.dump(probe, f)
