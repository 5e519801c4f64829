"""README.md of an export: a model card that records how the model was made and how to load it.

Everything in it is read from the files the pipeline wrote (quantize_config.json, the adapter's
config, train_config.json / train_results.json, eval summary.json), so the card can be checked
against them; what was not recorded is said to be unknown rather than guessed.

The card is a `huggingface_hub.ModelCard` whose YAML header the Hub reads: `base_model` (only
when the base is known by a Hub id), tags, the quantization settings, and `library_name` as the
adapter's method declares it (`peft` for a PEFT adapter; none for DiaBlo, which PEFT cannot load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from qdiablo.adapters.registry import get_adapter

# Local names of models whose Hub id is known (the embedded SmolLM2 GGUF is this model's).
KNOWN_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class CardFacts:
    """What the card reports; each part is None when the export was not given it."""

    base_name: str
    architecture: str
    quantize_config: Mapping[str, Any]
    quant_report: Mapping[str, Any] | None
    adapter_kind: str  # what the folder's adapter_config.json names: "diablo", a PEFT type, ...
    adapter_config: Mapping[str, Any]
    adapter_method: str = ""  # the registered method that reads it (default: adapter_kind)
    train_config: Mapping[str, Any] | None = None
    train_results: Mapping[str, Any] | None = None
    evals: Sequence[tuple[str, Mapping[str, Any]]] = ()
    merged_dtype: str | None = None
    requantized: Mapping[str, Any] | None = None
    serving: Sequence[str] = ()  # the card's lines on marlin/ and gguf/ (export.serving)
    serving_usage: Sequence[str] = ()  # how to serve them
    versions: Mapping[str, str] = field(default_factory=dict)
    notes: Sequence[str] = ()


def _v(x: Any) -> str:
    if x is None:
        return "not recorded"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list | tuple):
        return ", ".join(map(str, x)) or "none"
    return str(x)


def _quantizer_lines(qc: Mapping[str, Any], report: Mapping[str, Any] | None) -> list[str]:
    ours = (qc.get("meta") or {}).get("qdiablo") or {}
    group = qc.get("group_size")
    lines = [
        f"- method: {ours.get('method', 'gptq (settings written by another tool)')}",
        f"- bits: {qc.get('bits')}; group size: {'per channel' if group == -1 else group}",
        f"- act-order (desc_act): {qc.get('desc_act')}; sym: {qc.get('sym')}; "
        f"static groups: {qc.get('static_groups')}; true sequential: {qc.get('true_sequential')}",
        f"- damping: {qc.get('damp_percent')}; checkpoint format: {qc.get('checkpoint_format')}",
    ]
    if ours:
        magr = ours.get("magr")
        lines.append(
            f"- MagR: {'on' if magr else 'off'}"
            + (
                f" (α = {_v(ours.get('resolved_magr_alpha'))}, {ours.get('magr_iters')} "
                f"{ours.get('magr_solver')} iterations)"
                if magr
                else ""
            )
            + f"; scale shrink β = {_v(ours.get('resolved_beta'))}"
            + f"; coordinate-descent sweeps: {ours.get('cd_sweeps')}"
        )
    if report:
        tokens = report.get("calibration_tokens")
        layers = [r.get("rel_error") for r in report.get("layers", [])]
        errors = [e for e in layers if e is not None]
        lines.append(f"- calibration: {tokens:,} tokens" if tokens else "- calibration: none (RTN)")
        if errors:
            lines.append(
                f"- mean relative output error over {len(errors)} layers: "
                f"{sum(errors) / len(errors):.4f}"
            )
    else:
        lines.append("- calibration: not recorded (no quantization_report.json)")
    return lines


def _method(facts: CardFacts):
    """The adapter method the card describes (its lines, title and library come from it)."""
    return get_adapter(facts.adapter_method or facts.adapter_kind)


def _fmt_int(x: Any) -> str | None:
    return f"{x:,}" if isinstance(x, int) else x


def _train_lines(cfg: Mapping[str, Any] | None, res: Mapping[str, Any] | None) -> list[str]:
    if not cfg and not res:
        return ["Not recorded (export without `--train-run`)."]
    cfg, res = cfg or {}, res or {}
    data = res.get("data") or {}
    sources = cfg.get("data") or data.get("sources") or ["the shipped Math10K subset"]
    lines = [
        f"- data: {_v(sources)} (template `{cfg.get('template')}`); "
        f"{_v(data.get('records'))} records, {_v(data.get('examples'))} examples trained on",
    ]
    against = data.get("decontaminated_against", cfg.get("decontaminate"))
    if against:
        dropped = data.get("dropped_per_set") or {}
        detail = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "no matches"
        lines.append(
            f"- decontamination against {_v(against)}: dropped {_v(data.get('dropped'))} "
            f"records ({detail})"
        )
    else:
        lines.append("- decontamination: off")
    lines += [
        f"- epochs: {_v(cfg.get('epochs'))} (done: {_v(res.get('epochs_done'))}); "
        f"optimizer steps: {_v(res.get('global_step'))}",
        f"- learning rate: {_v(res.get('learning_rate', cfg.get('lr')))}, "
        f"{_v(cfg.get('scheduler'))} schedule, warmup {_v(cfg.get('warmup'))}; "
        f"effective batch {_v(cfg.get('batch_size'))}; seed {_v(cfg.get('seed'))}",
        f"- training loss: {_v(res.get('train_loss'))} (first logged "
        f"{_v(res.get('first_logged_loss'))}, last {_v(res.get('last_logged_loss'))})",
    ]
    return lines


def _eval_lines(evals: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    if not evals:
        return ["Not recorded (export without `--eval`)."]
    lines: list[str] = []
    for name, summary in evals:
        settings = summary.get("settings") or {}
        limit = settings.get("limit")
        lines += [
            f"From `{name}` (preset `{settings.get('preset')}`"
            + (f", first {limit} items per set" if limit else ", full test sets")
            + "):",
            "",
            "| task | n | accuracy % | NLL (nats/token) |",
            "|---|---:|---:|---:|",
        ]
        for task, t in (summary.get("tasks") or {}).items():
            acc, nll = t.get("accuracy"), t.get("nll")
            lines.append(
                f"| {task} | {t.get('n', t.get('nll_n', ''))} | "
                f"{'—' if acc is None else f'{acc:.1f}'} | {'—' if nll is None else f'{nll:.4f}'} |"
            )
        mean = summary.get("mean") or {}
        if mean.get("tasks"):
            acc, nll = mean.get("accuracy"), mean.get("nll")
            label = "mean (4 tasks)" if mean.get("complete") else f"mean ({len(mean['tasks'])})"
            lines.append(
                f"| **{label}** |  | {'—' if acc is None else f'{acc:.1f}'} | "
                f"{'—' if nll is None else f'{nll:.4f}'} |"
            )
        lines.append("")
    return lines


def _requant_lines(req: Mapping[str, Any]) -> list[str]:
    qc, change = req["quantize_config"], req["change"]
    ours = (qc.get("meta") or {}).get("qdiablo") or {}
    return [
        "`merged-gptq/` is `merged/` re-quantized (from its float32 weights) with "
        f"{ours.get('method', 'gptq')}, {qc.get('bits')}-bit, group size {qc.get('group_size')}, "
        f"MagR {'on' if ours.get('magr') else 'off'}, calibrated on {req['calibration']}.",
        "",
        "**Re-quantizing changes the outputs**: on "
        f"{change['windows']} calibration windows ({change['tokens']} tokens) the logits moved "
        f"by max {change['max_abs_logit_change']:.4g} and mean "
        f"{change['mean_abs_logit_change']:.4g}"
        f" (max |logit| {change['max_abs_logit']:.4g}); the top-1 token agrees on "
        f"{100 * (change['top1_agreement'] or 0):.1f}% of positions. `base/` + `adapter/` is the "
        "model that was trained and evaluated.",
    ]


def _usage(facts: CardFacts) -> list[str]:
    lines = [
        "```python",
        "from qdiablo.export import load_exported",
        "",
        'model = load_exported("EXPORT_DIR")  # checks manifest.json, then base/ + adapter/',
    ]
    if facts.merged_dtype:
        lines.append('merged = load_exported("EXPORT_DIR", merged=True)  # merged/')
    lines += [
        "```",
        "",
        "`qdiablo eval --model EXPORT_DIR` evaluates base/ + adapter/. The quantized base alone, "
        "with [GPTQModel](https://github.com/ModelCloud/GPTQModel):",
        "",
        "```python",
        "from gptqmodel import GPTQModel",
        "",
        'base = GPTQModel.load("EXPORT_DIR/base")',
        "```",
    ]
    if facts.merged_dtype:
        lines += [
            "",
            f"The merged model ({facts.merged_dtype}), with plain transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("EXPORT_DIR/merged")',
            'tokenizer = AutoTokenizer.from_pretrained("EXPORT_DIR/merged")',
            "```",
        ]
    return lines


def hub_id(name: str) -> str | None:
    """The Hub id `name` stands for, or None (a local folder, or a name that is not a repo id)."""
    name = KNOWN_HUB_IDS.get(name, name)
    if name.count("/") != 1 or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def card_metadata(facts: CardFacts) -> ModelCardData:
    """The card's YAML header. None-valued fields are left out of it."""
    qc = facts.quantize_config
    ours = (qc.get("meta") or {}).get("qdiablo") or {}
    tags = ["qdiablo", facts.adapter_kind, "gptq", f"{qc.get('bits')}-bit", "quantized"]
    if ours.get("magr"):
        tags.append("magr")
    quantization = {
        "quant_method": qc.get("quant_method", "gptq"),
        "method": ours.get("method"),
        "bits": qc.get("bits"),
        "group_size": qc.get("group_size"),
        "sym": qc.get("sym"),
        "desc_act": qc.get("desc_act"),
        "checkpoint_format": qc.get("checkpoint_format"),
        "magr": ours.get("magr"),
    }
    return ModelCardData(
        base_model=hub_id(facts.base_name),
        library_name=_method(facts).library_name,
        pipeline_tag="text-generation",
        tags=tags,
        quantization={k: v for k, v in quantization.items() if v is not None},
    )


def model_card(facts: CardFacts) -> str:
    """The README.md text of an export: the YAML metadata, then the body."""
    card = ModelCard(f"---\n{card_metadata(facts).to_yaml()}\n---\n\n{_body(facts)}")
    return str(card)


def _body(facts: CardFacts) -> str:
    parts = ["base/ (quantized, GPTQ layout)", "adapter/"]
    if facts.merged_dtype:
        parts.append(f"merged/ ({facts.merged_dtype})")
    if facts.requantized:
        parts.append("merged-gptq/")
    if facts.serving:
        parts.append("serving folders (below)")
    lines = [
        f"# {facts.base_name}: {facts.quantize_config.get('bits')}-bit base + "
        f"{_method(facts).card_title(facts.adapter_kind)} adapter",
        "",
        f"Exported by qdiablo: {', '.join(parts)}. `manifest.json` holds every file's sha256.",
        "",
        "## Base model",
        "",
        f"- name: {facts.base_name}",
        f"- architecture: {facts.architecture}",
        "",
        "## Quantization",
        "",
        *_quantizer_lines(facts.quantize_config, facts.quant_report),
        "",
        "## Adapter",
        "",
        *_method(facts).card_lines(facts.adapter_kind, facts.adapter_config),
        "",
        "## Training",
        "",
        *_train_lines(facts.train_config, facts.train_results),
        "",
        "## Evaluation (Math10K protocol)",
        "",
        *_eval_lines(facts.evals),
    ]
    if facts.merged_dtype:
        lines += [
            "",
            "## Merged model",
            "",
            f"`merged/` holds W + Dᵀ for each adapted layer, with W the dequantized base weight "
            f"the adapter was trained against (not the original weights), in {facts.merged_dtype}"
            "; the other layers are the dequantized base.",
        ]
        if facts.requantized:
            lines += ["", *_requant_lines(facts.requantized)]
    if facts.serving:
        lines += ["", "## Serving", "", *facts.serving]
    if facts.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in facts.notes)]
    lines += [
        "",
        "## How to load",
        "",
        *_usage(facts),
        "",
        *facts.serving_usage,
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in facts.versions.items()),
    ]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
