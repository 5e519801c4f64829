"""Merging an adapter into its quantized base, and re-quantizing the merged model, one decoder
block at a time.

W_merged = W + Dᵀ with W the *dequantized* base weight the blocks were trained against, never
the original fp16 weight (docs/diablo.md §5). Layers without an adapter are dequantized as they
are, so the merged model is a plain Hugging Face model that any tool loads. Merging back into
integers means re-quantizing (MagR + GPTQ on calibration data), which changes the outputs: the
change is measured and reported, never hidden.

merged/ and merged-gptq/ never hold the merged model whole: `write_merged` dequantizes and merges
one block (on the device), hands its tensors to a `ShardWriter` and moves on, so the host holds
the packed model, one block and one shard (docs/scale.md); `requantize_merged` quantizes a model
on the meta device whose blocks are merged again from the packed ones when `quantize_model` asks
for them. The serving folders (marlin/, gguf/) are still written from the whole merged model
(`merge_into_dense`, `requantize`).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdiablo.adapters.method import AdapterMethod
from qdiablo.adapters.registry import method_of, methods
from qdiablo.errors import UserError
from qdiablo.health import require_finite
from qdiablo.streamed import meta_model
from quantizers import QuantLinear, quantize_model
from quantizers.calibration import find_decoder_blocks
from quantizers.fileio import release_host_memory
from quantizers.lazy import streamed_logits
from quantizers.shards import DEFAULT_SHARD_BYTES, ShardWriter

log = logging.getLogger(__name__)

SHARD_BYTES = DEFAULT_SHARD_BYTES  # merged/'s shards: 5 GB, as transformers wrote them until v5


def mergeable_names() -> str:
    """The registered methods that merge into a dense weight, for messages."""
    return ", ".join(m.name for m in methods() if m.mergeable)


def mergeable_method(model: nn.Module) -> AdapterMethod:
    """The adapter method of `model`, which must be one that merges (`merged_layer`)."""
    method = method_of(model)
    if not method.mergeable:
        raise UserError(
            f"--merged needs an adapter that merges into the weights ({mergeable_names()}); "
            f"this one is {type(model).__name__}",
            hint=f"export a {method.title} adapter without --merged",
        )
    return method


@torch.no_grad()
def dense_state(
    module: nn.Module,
    dtype: torch.dtype,
    method: AdapterMethod,
    skip: str | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """The plain state dict `module` has once merged: an adapted layer as one weight
    (`method.merged_layer`: DiaBlo's W + Dᵀ computed in float32, cast once), a packed layer
    dequantized, every other tensor cast to `dtype`. Submodules under `skip` (the decoder
    blocks) are left out; a tensor shared by two names (a tied head) is listed once, under its
    first name, as `save_pretrained` stores it."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    done: list[str] = []  # merged or dequantized modules: their insides are not walked
    for name, m in module.named_modules():
        if (skip and (name == skip or name.startswith(skip + "."))) or any(
            name.startswith(d + ".") for d in done
        ):
            continue
        key = f"{prefix}{name}." if name else prefix
        merged = method.merged_layer(m, dtype)
        if merged is not None or isinstance(m, QuantLinear):
            if merged is not None:
                weight, bias = merged.weight, merged.bias
            else:
                weight = m.dequantize_weight(torch.float32).to(dtype)
                bias = m.bias
            out[key + "weight"] = weight.detach()
            if bias is not None:
                out[key + "bias"] = bias.detach().to(dtype)
            done.append(name)
            continue
        tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for leaf, t in tensors:
            if leaf in m._non_persistent_buffers_set or id(t) in seen:
                continue
            seen.add(id(t))
            out[key + leaf] = t.detach().to(dtype)
    return out


def merge_into_dense(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fold an adapter into its base and return the whole plain model in `dtype` (no packed
    layers): what the serving folders (marlin/, gguf/) are written from. merged/ and
    merged-gptq/ never need it whole (`write_merged`, `requantize_merged`).

    `model` is an adapter model that merges (DiaBlo) on a quantized base (as load_exported
    returns it); it is consumed. W + Dᵀ is computed in float32 and cast once, layer by layer."""
    dense = mergeable_method(model).merge_and_unload(model, dtype)
    for name, module in list(dense.named_modules()):
        if isinstance(module, QuantLinear):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight.data = module.dequantize_weight(torch.float32).to(dtype).contiguous()
            if module.bias is not None:
                lin.bias.data = module.bias.detach().to(dtype).clone()
            dense.set_submodule(name, lin)
    dense.to(dtype)
    # It is no longer a GPTQ model: a config that says so would send transformers to GPTQModel.
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    if "quant_config" in dense.__dict__:
        del dense.__dict__["quant_config"]
    for p in dense.parameters():
        p.requires_grad_(False)
    return dense.eval()


def requantize(
    model: nn.Module, calib: list[Tensor], config: Any, probe_windows: int = 4
) -> dict[str, Any]:
    """Quantize a whole merged float model in place with `config` (a QuantConfig) and return
    the measured change of the logits on the first `probe_windows` calibration windows."""
    windows = [w.unsqueeze(0) for batch in calib for w in batch][:probe_windows]
    with torch.no_grad():
        before = torch.cat([model(input_ids=w).logits.float() for w in windows])
    _warn_requantizing(config)
    quantize_model(model, calib, config)
    with torch.no_grad():
        after = torch.cat([model(input_ids=w).logits.float() for w in windows])
    return _change(before, after)


def _warn_requantizing(config: Any) -> None:
    log.warning(
        "re-quantizing the merged model (%s, %d-bit, group size %d%s%s): this changes its outputs",
        config.method,
        config.bits,
        config.group_size,
        ", MagR" if config.magr else "",
        ", block-wise reconstruction" if config.reconstruct else "",
    )


def _merged_config(base: nn.Module, dtype: torch.dtype):
    """The base's config as a plain model's: no quantization_config (it is no longer a GPTQ
    model, and one that says so would send transformers to GPTQModel)."""
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(base).__name__]
    config.dtype = dtype
    return config


OVERFLOW_HINT = "W + Dᵀ overflows this dtype: use --merged-dtype float32 or bfloat16"


def write_merged(
    model: nn.Module,
    folder: Path,
    dtype: torch.dtype,
    tokenizer=None,
    device: torch.device | str = "cpu",
    max_shard_size: int | None = None,
) -> None:
    """Write the adapter model merged (see the module docstring) as a plain HF folder in `dtype`:
    safetensors shards of at most `max_shard_size` bytes (default SHARD_BYTES) written as the
    blocks are merged, config.json recording `dtype`."""
    method = mergeable_method(model)
    base = method.base_model(model)
    prefix, blocks = find_decoder_blocks(base)
    device = torch.device(device)
    # Not safetensors.torch.save_model: merged/ is written a block at a time into shards, never
    # as one model in memory; dense_state lists a tied tensor once, as save_model would.
    writer = ShardWriter(folder, max_shard_size or SHARD_BYTES, metadata={"format": "pt"})
    for name, t in dense_state(base, dtype, method, skip=prefix).items():
        writer.add(name, t)
    for i, block in enumerate(blocks):
        block.to(device)
        state = dense_state(block, dtype, method, prefix=f"{prefix}.{i}.")
        where = f"the merged model ({str(dtype).removeprefix('torch.')})"
        require_finite(state.items(), where, OVERFLOW_HINT)
        for name, t in state.items():
            writer.add(name, t)
        block.to("cpu")
        release_host_memory()
    writer.finish()
    config = _merged_config(base, dtype)
    config.save_pretrained(folder)
    # save_pretrained records the model's own dtype; from_pretrained's "auto" reads it.
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(base, "generation_config", None)
    if generation is not None and base.can_generate():
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def merged_skeleton(model: nn.Module):
    """The merged model in float32 on the meta device, with (i, device) → block i merged: its
    embeddings, norms and head real (shared with the packed base when that is float32)."""
    method = mergeable_method(model)
    base = method.base_model(model)
    prefix, blocks = find_decoder_blocks(base)
    skeleton = meta_model(_merged_config(base, torch.float32), torch.float32)
    state = dense_state(base, torch.float32, method, skip=prefix)
    skeleton.load_state_dict(state, strict=False, assign=True)
    skeleton.tie_weights()
    skeleton.eval()
    meta_blocks = list(find_decoder_blocks(skeleton)[1])  # as built: replaced once quantized
    for p in skeleton.parameters():
        p.requires_grad_(False)

    def load_block(i: int, device: torch.device | str = "cpu") -> nn.Module:
        packed = blocks[i].to(device)
        block = copy.deepcopy(meta_blocks[i])
        state = dense_state(packed, torch.float32, method)
        block.load_state_dict(state, strict=True, assign=True)
        packed.to("cpu")
        return block.to(device)

    return skeleton, load_block


def requantize_merged(
    model: nn.Module,
    calib: list[Tensor],
    config: Any,
    device: torch.device | str = "cpu",
    calib_dtype: torch.dtype | None = None,
    probe_windows: int = 4,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the merged model with `config` (a QuantConfig), block by block from the packed
    base, and return it with the measured change of the logits on the first `probe_windows`
    calibration windows (both models run one block at a time on `device`)."""
    device = torch.device(device)
    dense, load_dense = merged_skeleton(model)
    windows = torch.cat([w.unsqueeze(0) for batch in calib for w in batch][:probe_windows])
    before = streamed_logits(dense, load_dense, windows, device).float()
    _warn_requantizing(config)
    quantize_model(
        dense,
        calib,
        config,
        device=device,
        calib_dtype=calib_dtype,
        load_block=load_dense,
        act_dtype="calib" if device.type == "cuda" else None,
    )
    packed = list(find_decoder_blocks(dense)[1])  # the blocks themselves, not the list
    after = streamed_logits(
        dense,
        lambda i, dev: packed[i].to(dev),
        windows,
        device,
        unload=lambda i, block: block.to("cpu"),
    ).float()
    return dense, _change(before, after)


def _change(before: Tensor, after: Tensor) -> dict[str, Any]:
    """How far re-quantizing moved the logits [windows, tokens, vocab]."""
    diffs = (after - before).abs()
    scale = before.abs().max().item()
    tokens = before.shape[0] * before.shape[1]
    agree = int((after.argmax(-1) == before.argmax(-1)).sum())
    change = {
        "windows": before.shape[0],
        "tokens": tokens,
        "max_abs_logit_change": diffs.max().item(),
        "mean_abs_logit_change": diffs.mean().item(),
        "max_abs_logit": scale,
        "top1_agreement": agree / tokens if tokens else None,
    }
    log.warning(
        "re-quantization changed the logits by max %.4g, mean %.4g (max |logit| %.4g; top-1 "
        "agreement %.1f%%) on %d calibration windows",
        change["max_abs_logit_change"],
        change["mean_abs_logit_change"],
        scale,
        100 * (change["top1_agreement"] or 0),
        before.shape[0],
    )
    return change
