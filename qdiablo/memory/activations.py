"""Activation memory of a training step and of evaluation, per token, for the LLaMA decoder
layout (RMSNorm, attention through SDPA, SwiGLU MLP: LLaMA, Mistral, Qwen2, SmolLM2, ...).

Training: what autograd saves for backward, counted tensor by tensor from the modules' backward
formulas, per token and decoder layer (`tests/test_memory_plan.py` checks the sum against the
bytes autograd actually saves, with `saved_tensors_hooks`, in float32, under bf16 autocast and on
a bf16 base). With p the bytes of the float parameters (the residual stream's dtype) and c those
of the compute dtype (2 under bf16/fp16 autocast, else p):

    each RMSNorm (2)       its input in float32 and 1/rms:            4h + 4
    attention (SDPA)       q, k, v and the output, the logsumexp:      c(2·q + 2·kv) + 4·heads
    SwiGLU MLP             gate, up and silu(gate):                    3·c·i
    DiaBlo inputs          each distinct input once (q, k, v share the normalised hidden state,
                           gate and up the other one): h·p for those, i·c for down's, q·c o's
    dropout masks          one byte per input value of each adapted layer
    LoRA (PEFT)            per adapted layer: its dropped, cast input in·c (+ in for the mask)
                           and A's output r·c

and per token once: the rotary cos/sin (2·head_dim·p) and the loss's log-softmax output in
float32 (4V); the final norm's 4h + 4 is offset by the first block's input norm, which saves
nothing (the embeddings are frozen). Under autocast on float parameters of another dtype, the
cast copy of the output head's weight (V·h·c) is saved too, and of every float linear layer's
for a float base. With gradient checkpointing a layer keeps only its input (h·p) and one layer's
activations come back while its backward runs.

Distillation (`--distill`) replaces the loss phase's transient with the KL's: the teacher's
logits (cV) and float32 tensors over the vocabulary (the student's and the teacher's log-softmax,
kept for backward, their float32 copies and the gradients): `DISTILL_FLOAT32_COPIES`·4V + cV a
token (the LM loss's own transient has ended inside the model's forward by then).

The step's peak adds a transient to what is saved: the loss's (logits in c and their float32
copy in forward, two float32 gradients of the logits in backward: at most max(cV + 4V, 8V) a
token), or, later in backward, the larger of one packed layer dequantized (8 bytes a weight: the
int32 codes and the float32 weight; `quantizers.packing.dequantize_packed` works in place after
that) and a DiaBlo layer's backward (2·c·i a token). `tests/test_memory_plan.py` measures the peak
of a CPU step tensor by tensor against this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qdiablo.memory.shapes import ModelShape

if TYPE_CHECKING:
    from qdiablo.adapters.method import AdapterMethod

# Which tensor an adapted layer reads, by its name in a LLaMA-style block; others count apart.
ATTN_IN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "Wqkv")
ATTN_OUT = ("o_proj", "dense", "out_proj")
MLP_IN = ("gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "dense_h_to_4h")
MLP_MID = ("down_proj", "fc2", "w2", "dense_4h_to_h")
INPUT_BYTES_PER_TOKEN = 3 * 8  # input_ids, labels and attention_mask (int64) in the batch
# float32 vocabulary-sized tensors a token at the KL's peak (measured: 5.4 under bf16, 5.9 fp32)
DISTILL_FLOAT32_COPIES = 6


@dataclass(frozen=True)
class Dtypes:
    """Bytes per value: the float parameters (and residual stream), and the compute dtype."""

    param: int = 4
    compute: int = 4


@dataclass(frozen=True)
class Adapted:
    """One adapted layer: its name (last path component), input and output features."""

    name: str
    in_features: int
    out_features: int


def input_of(name: str) -> str:
    for kind, names in (
        ("attn_in", ATTN_IN),
        ("attn_out", ATTN_OUT),
        ("mlp_in", MLP_IN),
        ("mlp_mid", MLP_MID),
    ):
        if name in names:
            return kind
    return name  # an unknown layer: its own input, counted in the compute dtype


@dataclass(frozen=True)
class TrainActivations:
    """Bytes a training step holds besides the model state, as functions of the tokens."""

    per_layer: int  # saved per token per decoder layer
    shared: int  # saved per token once (rotary tables, log-softmax output)
    logprobs: int  # the part of `shared` freed once the loss's backward ran (4V)
    checkpoint: int  # kept per token per layer under gradient checkpointing (its input)
    loss_transient: int  # per token, the loss's forward/backward transient
    layer_transient: int  # per token, a DiaBlo layer's backward transient
    dequant: int  # one packed layer dequantized (the largest)
    fixed: int  # per step: autocast's saved weight copies
    distill: int = 0  # per token, the distillation loss's tensors (0: the plain LM loss)

    def peak(self, tokens: int, layers: int, checkpointing: bool) -> int:
        """Peak bytes above the model state for a micro-batch of `tokens` tokens."""
        base = tokens * INPUT_BYTES_PER_TOKEN + self.fixed
        late = max(self.dequant, tokens * self.layer_transient)  # in a layer's backward
        # The LM loss's transient is gone (inside the model's forward) when the KL's begins.
        loss_transient = max(self.loss_transient, self.distill)
        if not checkpointing:
            saved = tokens * (layers * self.per_layer + self.shared)
            return base + saved + max(tokens * loss_transient, late - tokens * self.logprobs)
        kept = tokens * layers * self.checkpoint
        loss = tokens * (self.shared + loss_transient)
        layer = tokens * (self.shared - self.logprobs + self.per_layer) + late
        return base + kept + max(loss, layer)


def train_activations(
    shape: ModelShape,
    per_block: list[Adapted],
    dtypes: Dtypes,
    adapter: str | AdapterMethod = "diablo",
    dropout: float = 0.05,
    rank: int = 0,
    largest_packed_weights: int = 0,
    float_linear_weights: int = 0,
    distill: bool = False,
) -> TrainActivations:
    """The per-token terms of the module docstring for this model and adapter (a registered
    name or method: its `activation_bytes_per_layer`); `per_block`: the adapted layers of one
    decoder block; `float_linear_weights`: the weights of the decoder's unpacked linear layers
    (a float base), whose autocast copies are saved."""
    from qdiablo.adapters.registry import get_adapter

    method = get_adapter(adapter) if isinstance(adapter, str) else adapter
    h, i, kv, v = shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab
    q = shape.heads * shape.head_dim
    p, c = dtypes.param, dtypes.compute
    per_layer = 2 * (4 * h + 4) + c * (2 * q + 2 * kv) + 4 * shape.heads + 3 * c * i
    widths = {"attn_in": h * p, "attn_out": q * c, "mlp_in": h * p, "mlp_mid": i * c}
    inputs = {}  # each distinct input of the adapted layers once, with its bytes per token
    for a in per_block:
        key = input_of(a.name)
        inputs[key] = widths[key] if key in widths else c * a.in_features
    per_layer += method.activation_bytes_per_layer(per_block, inputs, dropout, rank, c)
    shared = 2 * shape.head_dim * p + 4 * v
    fixed = 0 if c == p else v * h * c + float_linear_weights * c
    return TrainActivations(
        per_layer=per_layer,
        shared=shared,
        logprobs=4 * v,
        checkpoint=h * p,
        loss_transient=max(v * (c + (4 if c != 4 else 0)), 8 * v),
        layer_transient=2 * c * i,
        dequant=8 * largest_packed_weights,
        fixed=fixed,
        distill=v * (DISTILL_FLOAT32_COPIES * 4 + c) if distill else 0,
    )


@dataclass(frozen=True)
class EvalActivations:
    """Bytes evaluation holds besides the model, for a batch: greedy generation, or the
    reference NLL's teacher-forced forward, whichever is larger, plus dequantizing."""

    kv_cache: int
    prefill: int
    logits: int
    nll: int  # the NLL pass's peak: a layer's tensors (and its dequantization), or the logits
    dequant: int
    held: bool = False  # the dequantized copy is kept for the run (else one layer per call)

    @property
    def generation(self) -> int:
        layer = self.prefill + (0 if self.held else self.dequant)
        return self.kv_cache + max(layer, self.logits)

    @property
    def total(self) -> int:
        return max(self.generation, self.nll) + (self.dequant if self.held else 0)


def _forward(shape: ModelShape, c: int, rows: int, tokens: int) -> int:
    """One layer's transient tensors for `rows` sequences of `tokens` tokens without autograd
    (MLP and attention tensors in the compute dtype), and the attention mask, a byte a pair."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    q = shape.heads * shape.head_dim
    return rows * tokens * c * (3 * i + 2 * h + q + 2 * kv) + rows * tokens * tokens


def eval_activations(
    shape: ModelShape,
    dtypes: Dtypes,
    batch: int,
    prompt: int,
    new_tokens: int,
    dequant: int,
    reference: int = 0,
    held: bool = False,
) -> EvalActivations:
    """Greedy generation of `new_tokens` after a `prompt`-token prompt, `batch` rows at a time:
    the KV cache of every layer (keys and values in the compute dtype), the prefill's transient
    (`_forward`), the last position's logits; and the reference NLL of a `reference`-token
    response: a forward over prompt and response, then the logits of the response positions and
    the float64 cross-entropy of 256 positions at a time. `dequant`: what dequantizing costs: the
    whole-model copy, `held` for the run, or one layer's, while that layer runs."""
    c, v = dtypes.compute, shape.vocab
    length = prompt + new_tokens
    kv_cache = 2 * shape.layers * shape.kv_dim * c * batch * length
    prefill = _forward(shape, c, batch, prompt)
    logits = batch * v * (c + 4)
    nll = 0
    if reference:  # a layer's tensors, then (after the last layer) the logits and cross-entropy
        layer = _forward(shape, c, batch, prompt + reference) + (0 if held else dequant)
        nll = max(layer, batch * (reference + 1) * v * c + 2 * 256 * v * 8)
    return EvalActivations(kv_cache, prefill, logits, nll, dequant, held)
