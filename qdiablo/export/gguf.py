"""The merged model as one GGUF file for llama.cpp and ollama (`qdiablo export --gguf`).

A 4-bit GPTQ group is a GGUF 4-bit block in other words. GGUF's Q4_1 block holds 32 weights as
`w = d·q + m` (fp16 d and m, 4-bit q) and Q4_0 as `w = d·(q − 8)`; a GPTQ group is
`w = s·(q − z)`. So with d = s and m = −s·z, every 32 columns of a group whose size is a multiple
of 32 (or a whole row) are one block, with the same codes: an asymmetric grid writes Q4_1 exactly
up to the fp16 rounding of m, a symmetric one (z = 8) writes Q4_0 bit for bit. `plan_gguf` decides
which applies; the re-quantization itself (MagR + GPTQ on the merged model) is the caller's.
Anything else (other bit widths, act-order) is written as Q8_0 (or F16) from the merged float
weights, and is said not to be exact.

Everything that is not a quantized linear layer is written as llama.cpp's converter writes it:
norms (every 1-D tensor) in F32, token embeddings and output head in F16 (Q8_0 in a Q8_0 file);
a tied head is not written (llama.cpp reuses token_embd). LLaMA's q/k rows are permuted to
llama.cpp's rotary layout (`_rope_permute`; transformers undoes it on load). The tokenizer
(byte-level BPE) and chat template go in the metadata (`tokenizer_metadata`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdiablo.errors import UserError
from quantizers import QuantConfig, QuantLinear

log = logging.getLogger(__name__)

GGUF_DIR = "gguf"
GGUF_TYPES = ("auto", "q8_0", "f16")
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
# model_type -> llama.cpp architecture: the ones whose tensors and metadata are written here.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


@dataclass
class GGUFPlan:
    """Which GGUF type the linear layers get, and whether it equals qdiablo's own weights."""

    qtype: str  # "Q4_0" | "Q4_1" | "Q8_0" | "F16"
    exact: bool  # blocks equal to the re-quantized model's weights (up to the fp16 m)
    reason: str  # one line for the card
    config: QuantConfig | None = None  # the re-quantization, for the exact types

    @property
    def file_name(self) -> str:
        return f"model.{self.qtype}.gguf"


@dataclass
class GGUFStats:
    """What writing measured, for the card."""

    tensors: dict[str, int] = field(default_factory=dict)  # GGUF type -> count
    max_abs_m_rounding: float = 0.0  # max |fp16(−s·z) − (−s·z)| over all Q4_1 blocks
    max_rel_m_rounding: float = 0.0  # the same relative to the block's scale s
    pre_tokenizer: str | None = None
    notes: list[str] = field(default_factory=list)


def _tiles(group_size: int, in_features: int) -> bool:
    """Every group of a row is whole 32-weight blocks (a partial last group included)."""
    if in_features % BLOCK:
        return False
    return group_size == -1 or group_size % BLOCK == 0


def plan_gguf(
    requested: str, config: QuantConfig, shapes: Mapping[str, tuple[int, int]]
) -> GGUFPlan:
    """The GGUF type for `--gguf requested` when the merge is re-quantized with `config` (the
    base's settings): exact Q4_1/Q4_0 when the grid is 4-bit, its groups tile 32-weight blocks
    and no act-order permutes them; otherwise Q8_0 (or F16 when asked) from the float merge.
    `shapes`: the decoder blocks' linear layers, path -> (in_features, out_features)."""
    if requested not in GGUF_TYPES:
        raise UserError(f"--gguf {requested!r}: choose from {', '.join(GGUF_TYPES)}")
    if requested == "f16":
        return GGUFPlan("F16", False, "F16 from the merged float weights (asked: --gguf f16)")
    why = None
    bad = [n for n, (k, _) in shapes.items() if not _tiles(config.group_size, k)]
    if config.bits != 4:
        why = f"the base is {config.bits}-bit; no GGUF block type holds it as it is"
    elif config.desc_act and not config.static_groups:
        why = "act-order (desc_act) permutes the groups; GGUF blocks are contiguous"
    elif bad:
        why = (
            f"group size {config.group_size} does not tile 32-weight blocks in {bad[0]} "
            f"({shapes[bad[0]][0]} inputs)"
        )
    if requested == "auto" and why is None:
        qtype = "Q4_0" if config.sym else "Q4_1"
        grid = "symmetric" if config.sym else "asymmetric"
        return GGUFPlan(
            qtype,
            True,
            f"{qtype}: the merge re-quantized at 4 bits, group size {config.group_size}, "
            f"{grid}, written block for block",
            config,
        )
    reason = "asked: --gguf q8_0" if requested == "q8_0" else why
    return GGUFPlan("Q8_0", False, f"Q8_0 from the merged float weights, not exact ({reason})")


def q4_blocks(layer: QuantLinear, symmetric: bool) -> tuple[np.ndarray, float, float]:
    """The layer's weight as GGUF Q4_0 (`symmetric`: every zero point is 8) or Q4_1 blocks.

    Returns (bytes [out, in/32 · type_size] uint8, max |m rounding|, max |m rounding| / s).
    Block b of row o takes its group's scale and zero: d = s, m = fp16(−s·z) (Q4_1), and its 32
    codes as they are, packed two per byte: byte j holds code j (low nibble) and code j + 16.
    """
    group = layer.contiguous_group_size()
    if layer.bits != 4 or group is None or not _tiles(group, layer.in_features):
        raise ValueError(f"not a 4-bit layer whose groups tile 32-weight blocks: {layer}")
    out, k = layer.out_features, layer.in_features
    codes = layer.codes().to(torch.uint8).cpu()  # [out, in]
    scales = layer.packed_tensors().scales.cpu()  # fp16 [groups, out]
    zeros = layer.zeros().cpu()  # [groups, out]
    g_of_block = torch.arange(0, k, BLOCK) // group
    d = scales.t()[:, g_of_block].contiguous()  # fp16 [out, blocks]
    z = zeros.t()[:, g_of_block].contiguous()
    nib = codes.view(out, k // BLOCK, 2, BLOCK // 2)
    qs = (nib[:, :, 0] | (nib[:, :, 1] << 4)).numpy()  # [out, blocks, 16]
    d_bytes = d.numpy().view(np.uint8).reshape(out, -1, 2)
    if symmetric:
        if not bool((z == 8).all()):
            raise ValueError(f"a symmetric 4-bit layer has zero points other than 8: {layer}")
        return np.concatenate([d_bytes, qs], axis=-1).reshape(out, -1), 0.0, 0.0
    exact_m = -(d.float() * z.float())  # exact in float32: an 11-bit s times a 4-bit integer
    m = exact_m.half()
    err = (m.float() - exact_m).abs()
    m_bytes = m.numpy().view(np.uint8).reshape(out, -1, 2)
    blocks = np.concatenate([d_bytes, m_bytes, qs], axis=-1).reshape(out, -1)
    return blocks, err.max().item(), (err / d.float()).max().item()


def _rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """HF LLaMA keeps each head's rotary pairs as (i, i + d/2); llama.cpp as (2i, 2i + 1).
    Reorder the rows of a q/k weight (or bias) head by head: row h·d + 2i + j <- h·d + j·d/2 + i.
    Works on float rows and on rows of quantized blocks alike."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for the pre-tokenizer, when it is one whose splitting it reproduces:
    GPT-2's byte-level regex ("gpt-2"), or digits split one by one first ("smollm")."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and [p.get("type") for p in parts] == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    return None


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.*` metadata of a byte-level BPE tokenizer, as llama.cpp reads it: the token
    list (padded to the model's vocabulary with unused `[PAD<i>]` entries), their types, the
    merges, the special token ids, whether BOS/EOS are added, the pre-tokenizer and the chat
    template. Other tokenizer models are refused: llama.cpp would need their scores."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            f"--gguf writes byte-level BPE tokenizers only; this one is {model.get('type')} "
            f"with a {(spec.get('decoder') or {}).get('type')} decoder",
            hint="export without --gguf (merged/ loads in any transformers-based engine)",
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(
            f"the tokenizer has token id {max(vocab.values())} but the model's vocabulary is "
            f"{vocab_size}: they do not belong together"
        )
    tokens: list[str | None] = [None] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    added = tokenizer.added_tokens_decoder
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], kind = f"[PAD{i}]", UNUSED
        elif i in added:
            kind = CONTROL if added[i].special else USER_DEFINED
        else:
            kind = NORMAL
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:  # GGUF cannot store an empty array, and llama.cpp needs the key
        raise UserError("--gguf: the tokenizer has no BPE merges; llama.cpp cannot read it")
    template = tokenizer.chat_template
    probe = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "add_bos": len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
        "add_eos": len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id,
        "chat_template": template if isinstance(template, str) else None,
    }
    for name in ("bos", "eos", "unk", "pad"):
        meta[f"{name}_id"] = getattr(tokenizer, f"{name}_token_id", None)
    return meta


def _write_tokenizer(writer, meta: dict[str, Any]) -> None:
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"] or "default")
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["token_types"])
    writer.add_token_merges(meta["merges"])
    for name, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if meta[f"{name}_id"] is not None:
            add(meta[f"{name}_id"])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])


def _write_hparams(writer, config, name: str, file_type: int) -> None:
    """The llama.* hyperparameters llama.cpp (and transformers' GGUF loader) read."""
    theta = _rope_theta(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _tensors(model: nn.Module) -> dict[str, QuantLinear | torch.Tensor]:
    """Every tensor to write, by HF name: quantized layers as the layer (`<path>.weight`), the
    rest as float tensors; a head tied to the embeddings is left out."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out: dict[str, QuantLinear | torch.Tensor] = {f"{n}.weight": m for n, m in layers.items()}
    seen: dict[int, str] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf != "bias":
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel():  # a tied weight (the output head)
            continue
        seen[ptr] = key
        out[key] = value
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        out.pop("lm_head.weight", None)
    return out


def _float_tensor(value: torch.Tensor, qtype: str):
    """(data, raw GGML type or None) of a float tensor: 1-D in F32, 2-D in F16, or Q8_0 when the
    file is Q8_0 and its rows tile 32-weight blocks."""
    import gguf

    data = value.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None
    q8 = gguf.GGMLQuantizationType.Q8_0
    if qtype == "Q8_0" and data.shape[-1] % BLOCK == 0:
        return gguf.quants.quantize(data, q8), q8
    return data.astype(np.float16), None


def check_gguf_inputs(config, tokenizer) -> dict[str, Any]:
    """What --gguf cannot write, refused before any work: another architecture than LLaMA's, rope
    scaling, no tokenizer or one that is not byte-level BPE. Returns the tokenizer metadata."""
    try:
        import gguf  # noqa: F401  (the demo extra)
    except ImportError as e:
        raise UserError("--gguf needs the gguf package", hint='pip install "qdiablo[demo]"') from e
    if ARCHITECTURES.get(getattr(config, "model_type", None)) is None:
        raise UserError(
            f"--gguf writes LLaMA-architecture models ({', '.join(ARCHITECTURES)}); this one is "
            f"{getattr(config, 'model_type', '?')}",
            hint="export without --gguf; merged/ can be converted with llama.cpp's own converter",
        )
    _rope_theta(config)
    if tokenizer is None:
        raise UserError("--gguf needs the base's tokenizer (base/ has none): GGUF carries it")
    return tokenizer_metadata(tokenizer, config.vocab_size)


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise UserError(f"--gguf: rope scaling {kind!r} is not written; export without --gguf")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None)) or 10000.0)


def write_gguf(model: nn.Module, path: Path, tokenizer, plan: GGUFPlan, name: str) -> GGUFStats:
    """Write `model` (the merge, re-quantized in place for an exact plan) to the GGUF `path`."""
    import gguf  # deferred: the demo extra

    config = model.config
    tok = check_gguf_inputs(config, tokenizer)
    arch = ARCHITECTURES[config.model_type]
    file_types = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "F16": 1}
    stats = GGUFStats()
    stats.pre_tokenizer = tok["pre"]
    if tok["pre"] is None:
        stats.notes.append(
            "the tokenizer's pre-tokenizer is not one llama.cpp names; it will use its default "
            "splitting, which may tokenize some text differently"
        )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, config, name, file_types[plan.qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tok)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for key, value in _tensors(model).items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"--gguf: no llama.cpp name for tensor {key}")
        if isinstance(value, QuantLinear):
            if not plan.exact:
                raise ValueError(f"{key}: a quantized layer in a non-exact GGUF plan")
            data, m_abs, m_rel = q4_blocks(value, symmetric=plan.qtype == "Q4_0")
            raw = getattr(gguf.GGMLQuantizationType, plan.qtype)
            stats.max_abs_m_rounding = max(stats.max_abs_m_rounding, m_abs)
            stats.max_rel_m_rounding = max(stats.max_rel_m_rounding, m_rel)
        else:
            qtype = plan.qtype if plan.qtype in ("Q8_0",) else "F16"
            data, raw = _float_tensor(value, qtype)
        if ".attn_q." in f".{target}":
            data = _rope_permute(data, heads)
        elif ".attn_k." in f".{target}":
            data = _rope_permute(data, kv_heads)
        kind = raw.name if raw is not None else ("F32" if data.dtype == np.float32 else "F16")
        stats.tensors[kind] = stats.tensors.get(kind, 0) + 1
        writer.add_tensor(target, np.ascontiguousarray(data), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.info("wrote %s (%s)", path, ", ".join(f"{n} {k}" for k, n in stats.tensors.items()))
    return stats
