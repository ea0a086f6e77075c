"""The model card (README.md) and loss plot a run leaves in output_dir: what was trained, on what, how, how well.

The card opens with Hub metadata (base model, Hub datasets, library, tags, the base model's license when its own
card states one) and tells the run in its body: data statistics per source, the settings that differ from
sftune's defaults, final train and eval metrics, time and hardware, framework versions, and a snippet that loads
the result and generates with its chat template. It is built from the config, the data statistics and
metrics.jsonl alone; no environment variable, token or key reaches it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sftune.batching import BatchingPlan
from sftune.config import SFTConfig, changed_settings
from sftune.export.save import staged_into

log = logging.getLogger("sftune")

CARD_FILENAME = "README.md"
PLOT_FILENAME = "loss_curve.png"
EXPERT_LOAD_KEYS = ("aux_loss", "expert_load_cv", "expert_load_max")  # logged for Mixture-of-Experts models
MIN_LOGGED_POINTS = 5  # fewer logged losses than this make a poor curve: the plot uses every step's loss instead
METRICS_FILENAME = "metrics.jsonl"
# Settings that say where things are or go rather than how the model was trained: the card shows them elsewhere.
NOT_HYPERPARAMETERS = {"model_name_or_path", "dataset_name", "datasets", "output_dir", "overwrite_output_dir",
                       "run_name", "report_to", "resume_from_checkpoint", "resume_allow_changes"}
NOT_HYPERPARAMETER_GROUPS = {"hub"}
FRAMEWORKS = ("sftune", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers")
HUB_CACHE_FOLDER = re.compile(r"^models--([^/]+?)--([^/]+)$")  # huggingface_hub's cache: models--owner--name


@dataclass
class RunSummary:
    """What the card tells about one run, gathered by run.py after the final save."""

    config: SFTConfig
    output_dir: Path
    data_stats: dict[str, Any]
    history: list[dict[str, Any]]  # used when metrics.jsonl is missing
    train_seconds: float
    run_seconds: float
    plan: BatchingPlan  # how the rows were batched (rows per step, processes)
    repo_id: str | None = None  # where the run is pushed, if it is
    vision: bool = False  # a vision-language model, saved with its processor
    metrics: list[dict[str, Any]] = field(default_factory=list)  # filled from metrics.jsonl by write_model_card
    step_losses: list[dict[str, Any]] = field(default_factory=list)  # the loss of every step this process ran


def write_model_card(summary: RunSummary) -> Path:
    """README.md and the loss plot into output_dir, atomically; a plot that cannot be drawn leaves it out."""
    summary.metrics = read_metrics(summary.output_dir) or list(summary.history)
    with staged_into(summary.output_dir) as stage:
        plotted = plot_loss_curve(summary.metrics, stage / PLOT_FILENAME, summary.config.run_name or
                                  summary.output_dir.resolve().name, summary.step_losses)
        (stage / CARD_FILENAME).write_text(card_text(summary, plotted), encoding="utf-8")
    log.info("wrote the model card %s%s", summary.output_dir / CARD_FILENAME,
             f" and the loss plot {PLOT_FILENAME}" if plotted else "")
    return summary.output_dir / CARD_FILENAME


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl: the whole run, also across a resume (the history holds only this process's part)."""
    path = output_dir / METRICS_FILENAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- the plot


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str,
                    step_losses: list[dict[str, Any]] | None = None) -> bool:
    """Save `loss_figure` as a PNG. False when there is nothing to plot or matplotlib cannot draw (the card then
    goes without it and says so)."""
    try:
        figure = loss_figure(metrics, title, step_losses)
        if figure is None:
            return False
        figure.savefig(path)
        return True
    except Exception as err:  # matplotlib missing or failing: the card is still written
        log.warning("could not draw the loss plot (%s: %s); the model card goes without it", type(err).__name__, err)
        return False


def loss_figure(metrics: list[dict[str, Any]], title: str, step_losses: list[dict[str, Any]] | None = None) -> Any:
    """Train loss, eval loss (when evaluated) and the learning rate on a second axis; None with no loss logged.
    A Mixture-of-Experts run gets a second panel: its balancing loss and expert load.

    With fewer than MIN_LOGGED_POINTS logged train losses (a short run, or logging_steps longer than the run), the
    loss of every step is drawn instead, if there are more of those: a curve, not one dot.
    """
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and _finite(m["loss"])]
    rates = [(m["step"], m["learning_rate"]) for m in metrics if "learning_rate" in m]
    label = "train loss"
    every_step = [m for m in step_losses or [] if _finite(m.get("loss"))]
    if len(train) < MIN_LOGGED_POINTS and len(every_step) > len(train):
        train = [(m["step"], m["loss"]) for m in every_step]
        rates = [(m["step"], m["learning_rate"]) for m in every_step]
        label = "train loss (every step)"
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m and _finite(m["eval_loss"])]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure  # no pyplot: nothing global changes in the caller's session

    expert_load = [m for m in metrics if "aux_loss" in m or "eval_aux_loss" in m]
    figure = Figure(figsize=(8, 7 if expert_load else 4.5), dpi=100, layout="constrained")
    if expert_load:  # Mixture-of-Experts: the balancing loss and the expert load under the loss
        axes, load_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
        _expert_load_panel(load_axes, expert_load)
    else:
        axes = figure.subplots()
    marker = "o" if len(train) <= 30 else None
    lines = []
    if train:
        lines += axes.plot(*zip(*train), color="tab:blue", marker=marker, markersize=3, label=label)
    if evals:
        lines += axes.plot(*zip(*evals), color="tab:orange", marker="o", markersize=4, label="eval loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if rates:
        rate_axes = axes.twinx()
        lines += rate_axes.plot(*zip(*rates), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        rate_axes.set_ylabel("learning rate", color="tab:gray")
        rate_axes.tick_params(axis="y", colors="tab:gray")
        rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        rate_axes.set_ylim(bottom=0)
    axes.legend(lines, [line.get_label() for line in lines], loc="upper right", framealpha=0.9)
    axes.set_title(title)
    return figure


def _expert_load_panel(axes: Any, metrics: list[dict[str, Any]]) -> None:
    """aux_loss (train and eval) on the left axis, expert_load_cv on the right: a router collapsing onto a few
    experts shows as both rising."""
    aux = [(m["step"], m["aux_loss"]) for m in metrics if _finite(m.get("aux_loss"))]
    evals = [(m["step"], m["eval_aux_loss"]) for m in metrics if _finite(m.get("eval_aux_loss"))]
    spread = [(m["step"], m["expert_load_cv"]) for m in metrics if _finite(m.get("expert_load_cv"))]
    lines = []
    if aux:
        lines += axes.plot(*zip(*aux), color="tab:purple", marker="o" if len(aux) <= 30 else None, markersize=3,
                           label="aux (balancing) loss")
    if evals:
        lines += axes.plot(*zip(*evals), color="tab:red", marker="o", markersize=4, label="eval aux loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("aux loss")
    axes.grid(alpha=0.3)
    if spread:
        spread_axes = axes.twinx()
        lines += spread_axes.plot(*zip(*spread), color="tab:green", linestyle="--", linewidth=1,
                                  label="expert load CV")
        spread_axes.set_ylabel("tokens per expert: CV", color="tab:green")
        spread_axes.set_ylim(bottom=0)
    if lines:
        axes.legend(lines, [line.get_label() for line in lines], loc="upper right", framealpha=0.9)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------- the card


def card_text(summary: RunSummary, plotted: bool) -> str:
    config, stats = summary.config, summary.data_stats
    adapter = _adapter_settings(summary.output_dir) if config.use_peft else None
    base = hub_model_id(config.model_name_or_path)
    metadata_yaml = card_metadata(config, base, config.use_peft, summary.vision)
    title = summary.repo_id.split("/")[-1] if summary.repo_id else summary.output_dir.resolve().name
    parts = [f"---\n{metadata_yaml}---\n", f"# {title}\n", _introduction(config, base, adapter, stats)]
    if plotted:
        parts.append(f"![Training loss and learning rate]({PLOT_FILENAME})\n")
    elif any("loss" in m or "eval_loss" in m for m in summary.metrics):
        parts.append("(No loss plot: matplotlib could not draw it, see the run's log; the values are in "
                     f"`{METRICS_FILENAME}`.)\n")
    parts += [
        _quick_start(summary, config.use_peft, base),
        _data_section(config, stats),
        _settings_section(config, summary.plan),
        _results_section(summary.metrics),
        _compute_section(summary),
        _versions_section(),
    ]
    return "\n".join(parts)


def card_metadata(config: SFTConfig, base: str | None, is_adapter: bool, vision: bool) -> str:
    from huggingface_hub import ModelCardData

    licence = base_model_license(config, base)
    tags = ["sftune", "sft"] + (["lora"] if is_adapter else [])
    data = ModelCardData(
        base_model=base, datasets=hub_datasets(config) or None, library_name="peft" if is_adapter else "transformers",
        license=licence.get("license"), license_name=licence.get("license_name"),
        license_link=licence.get("license_link"), tags=tags,
        pipeline_tag="image-text-to-text" if vision else "text-generation",
    )
    return data.to_yaml() + "\n"


def hub_model_id(name: str | None) -> str | None:
    """The Hub id of the base model: the name itself when it is not a local path, the id a huggingface_hub cache
    folder stands for, else None (a local model has no Hub page to link)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if not path.exists():
        return name if not name.startswith((".", "/", "~")) else None
    for part in reversed(path.resolve().parts):
        match = HUB_CACHE_FOLDER.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def hub_datasets(config: SFTConfig) -> list[str]:
    """The training datasets that are Hub ids (local files and folders are described in the body only)."""
    paths = [entry["path"] for entry in config.datasets] if config.datasets else [config.dataset_name]
    return [p for p in dict.fromkeys(paths) if p and not Path(p).expanduser().exists()
            and not p.startswith((".", "/", "~"))]


def base_model_license(config: SFTConfig, base: str | None) -> dict[str, str]:
    """license (and license_name / license_link for 'other') from the base model's own card front matter: the local
    folder's README.md, else the Hub's (from the cache when offline). Empty when unknown: never guessed."""
    from huggingface_hub.repocard import metadata_load

    readme = Path(config.model_name_or_path or "").expanduser() / CARD_FILENAME
    found: dict[str, Any] | None = None
    try:
        if readme.is_file():
            found = metadata_load(readme)
        elif base is not None:
            from huggingface_hub import hf_hub_download

            found = metadata_load(hf_hub_download(base, CARD_FILENAME, revision=config.model_revision))
    except Exception:  # no card, no network, no such repository: the license stays unknown
        found = None
    found = found or {}
    return {key: str(found[key]) for key in ("license", "license_name", "license_link") if found.get(key)}


def _adapter_settings(output_dir: Path) -> dict[str, Any]:
    """The saved adapter's settings (rank, alpha, targets), as peft wrote them."""
    path = output_dir / "adapter_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _model_label(config: SFTConfig, base: str | None) -> str:
    if base is not None:
        return f"[{base}](https://huggingface.co/{base})"
    name = Path(config.model_name_or_path or "?").name
    return f"`{name}` (a local model{', from the GGUF file ' + config.gguf_file if config.gguf_file else ''})"


def _introduction(config: SFTConfig, base: str | None, adapter: dict[str, Any] | None, stats: dict) -> str:
    if adapter is not None:
        kind = "DoRA" if adapter.get("use_dora") else "rsLoRA" if adapter.get("use_rslora") else "LoRA"
        quantized = (" on a 4-bit base (QLoRA)" if config.load_in_4bit
                     else " on an 8-bit base" if config.load_in_8bit else "")
        parameters = adapter.get("target_parameters")  # an MoE model's fused expert weights
        on = _targets(adapter.get("target_modules")) + (f" and the parameters {_targets(parameters)}"
                                                         if parameters else "")
        how = (f"a {kind} adapter (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
               f"{on}){quantized} for {_model_label(config, base)}")
    else:
        how = f"{_model_label(config, base)}, fine-tuned in full"
    data = ""
    if stats.get("documents"):
        data = (f" on {stats['documents']:,} documents ({stats['tokens']:,} tokens, "
                f"{100 * stats.get('trained_fraction', 0):.1f}% of them trained)")
    return f"This is {how}{data}, trained with sftune (supervised fine-tuning).\n"


def _targets(targets: Any) -> str:
    if isinstance(targets, str):
        return f"`{targets}`"
    names = sorted(targets or [])
    return ", ".join(f"`{n}`" for n in names) if len(names) <= 8 else f"{len(names)} modules"


# The quick start's first line for a run not pushed when it was trained: model_id = '<output_dir>'
LOCAL_MODEL_ID = re.compile(r"^model_id = ('[^'\n]*')$", re.M)


def card_for_repo(card: str, repo_id: str) -> str:
    """The card as pushed to `repo_id` by `sftune push`: its quick start loads the model from the Hub."""
    return LOCAL_MODEL_ID.sub(lambda match: f"model_id = {repo_id!r}  # or the local folder {match.group(1)}",
                              card, count=1)


def _quick_start(summary: RunSummary, is_adapter: bool, base: str | None) -> str:
    where = summary.repo_id or str(summary.output_dir)
    note = f"  # or the local folder {str(summary.output_dir)!r}" if summary.repo_id else ""
    if summary.vision:
        loader, load_tokenizer = "AutoModelForImageTextToText", "AutoProcessor"
    else:
        loader, load_tokenizer = "AutoModelForCausalLM", "AutoTokenizer"
    if is_adapter:
        imports = f"from peft import AutoPeftModelFor{'CausalLM' if not summary.vision else 'ImageTextToText'}\n" \
                  f"from transformers import {load_tokenizer}, GenerationConfig\n"
        load = (f"model = AutoPeftModelFor{'CausalLM' if not summary.vision else 'ImageTextToText'}"
                ".from_pretrained(model_id)  # the base model named in adapter_config.json, with the adapter\n"
                "model.generation_config = GenerationConfig.from_pretrained(model_id)  # stop at the end of turn\n")
        if base is None:
            load = ("# The base model was a local folder: adapter_config.json names it by its local path.\n" + load)
    else:
        imports = f"from transformers import {loader}, {load_tokenizer}\n"
        load = f"model = {loader}.from_pretrained(model_id)\n"
    code = (
        f"{imports}\n"
        f"model_id = {where!r}{note}\n"
        f"tokenizer = {load_tokenizer}.from_pretrained(model_id)\n"
        f"{load}\n"
        'messages = [{"role": "user", "content": "Hello! Who are you?"}]\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)\n"
        "output = model.generate(**inputs, max_new_tokens=128)\n"
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n'
    )
    chat = f"sftune chat {where}" if not summary.repo_id else f"sftune chat {summary.output_dir}"
    return (f"## Quick start\n\n```python\n{code}```\n\nOr talk to it in a terminal: `{chat}` "
            "(add `--prompt \"...\"` for one answer).\n")


def _data_section(config: SFTConfig, stats: dict[str, Any]) -> str:
    if not stats:
        return "## Training data\n\nNo data statistics were recorded.\n"
    lines = ["## Training data\n"]
    sources = stats.get("sources") or []
    if sources:
        lines += ["| source | format | rows read | training documents | eval documents | tokens |",
                  "|---|---|---:|---:|---:|---:|"]
        for source in sources:
            documents = source.get("mixed_documents", source.get("train_documents", 0))
            lines.append(f"| {_source_label(source.get('name'))} | {source.get('format', '?')} | "
                         f"{source.get('rows_read', 0):,} | {documents:,} | {source.get('eval_documents', 0):,} | "
                         f"{source.get('tokens', 0):,} |")
        lines.append("")
    facts = [
        f"- Training rows: {stats.get('rows', 0):,} ({stats.get('documents', 0):,} documents), "
        f"{stats.get('tokens', 0):,} tokens, of which {stats.get('trained_tokens', 0):,} trained "
        f"({100 * stats.get('trained_fraction', 0):.1f}%)",
    ]
    percentiles = stats.get("length_percentiles")
    if percentiles:
        facts.append("- Document length in tokens: median {p50:,}, 90th percentile {p90:,}, longest {max:,}".format(
            **{k: percentiles.get(k, 0) for k in ("p50", "p90", "max")}))
    facts.append(f"- Longest sequence (max_length): {config.max_length or 'no limit'}; "
                 f"{stats.get('rows_truncated', 0):,} rows truncated ({config.truncation_mode})")
    dropped = stats.get("rows_dropped") or {}
    if dropped:
        facts.append("- Rows dropped: " + ", ".join(f"{n:,} {reason.replace('_', ' ')}"
                                                    for reason, n in dropped.items()))
    packing = stats.get("packing")
    if packing:
        facts.append(f"- Packed ({packing.get('strategy')}) into rows of {packing.get('length')} tokens, "
                     f"{100 * packing.get('efficiency', 0):.1f}% full")
    if stats.get("eval_rows"):
        facts.append(f"- Evaluation: {stats['eval_rows']:,} rows, {stats.get('eval_tokens', 0):,} tokens")
    facts.append(f"- Loss on: {_loss_scope(config, stats)}")
    if stats.get("rows_checked"):
        failed = {name: c for name, c in (stats.get("template_checks") or {}).items() if c.get("rows")}
        if failed:
            facts.append("- Template checks: " + "; ".join(f"{c['rows']:,} rows failed `{name}`"
                                                            for name, c in failed.items())
                         + f" (of {stats['rows_checked']:,} checked)")
        else:
            facts.append(f"- Template checks: passed on all {stats['rows_checked']:,} rows "
                         f"({stats.get('turns_checked', 0):,} assistant turns)")
    return "\n".join(lines + facts + _data_checks(stats)) + "\n"


def _data_checks(stats: dict[str, Any]) -> list[str]:
    """The data doctor's counts (duplicates, train/eval overlap, empty and repetitive replies)."""
    from sftune.data.doctor_report import card_lines

    return card_lines(stats)


def _source_label(name: str | None) -> str:
    if not name:
        return "?"
    if name in ("train_dataset", "eval_dataset"):
        return f"`{name}` (passed to train())"
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return f"`{path.name}` (local)"
    return f"[{name}](https://huggingface.co/datasets/{name})"


def _loss_scope(config: SFTConfig, stats: dict[str, Any]) -> str:
    """What config.loss_mask trained, told for the formats of every source in the mixture."""
    formats = sorted({source.get("format", "text") for source in stats.get("sources") or []}) \
        or [stats.get("format", "text")]
    if config.loss_mask == "last_assistant":
        return "the last assistant turn of each conversation"
    if config.loss_mask == "assistant":
        return "assistant turns"
    if config.loss_mask == "completion" and "prompt_completion" in formats:
        others = [f for f in formats if f != "prompt_completion"]
        return "completions" + (f" (every token of the {', '.join(others)} rows)" if others else "")
    return f"every token ({', '.join(formats)} rows)"


def _settings_section(config: SFTConfig, plan: BatchingPlan) -> str:
    from sftune.precision import describe_config

    groups = {f.name: f.metadata.get("group") for f in dataclasses.fields(SFTConfig)}
    changed = [(name, value) for name, value in changed_settings(config)
               if name not in NOT_HYPERPARAMETERS and groups[name] not in NOT_HYPERPARAMETER_GROUPS]
    lines = [
        "## Training settings\n",
        f"{plan.describe_step().replace(' per step', ' per optimizer step')}, {plan.describe_layout()}, learning "
        f"rate {config.learning_rate:g} ({config.lr_scheduler_type} schedule), {describe_config(config)}. Settings "
        "that differ from sftune's defaults:\n",
    ]
    if changed:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| `{name}` | `{_value_text(value)}` |" for name, value in changed]
    else:
        lines.append("None: every setting is sftune's default.")
    lines.append("\nThe complete settings are in `sftune_config.yaml`; `sftune train sftune_config.yaml` repeats "
                 "the run.")
    return "\n".join(lines) + "\n"


def _value_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")


def _results_section(metrics: list[dict[str, Any]]) -> str:
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    if not train and not evals:
        return "## Results\n\nNo metrics were logged.\n"
    lines = ["## Results\n", "| metric | first | final |", "|---|---:|---:|"]
    if train:
        first, last = train[0], train[-1]
        lines.append(f"| train loss (step {first['step']} / {last['step']}) | {_number(first['loss'])} | "
                     f"{_number(last['loss'])} |")
        for key in ("mean_token_accuracy", "entropy", *EXPERT_LOAD_KEYS):
            if key in last:
                lines.append(f"| train {key.replace('_', ' ')} | {_number(first.get(key))} | {_number(last[key])} |")
    if evals:
        first, last = evals[0], evals[-1]
        for key in sorted(k for k in last if k.startswith("eval_")):
            lines.append(f"| {key} (step {first['step']} / {last['step']}) | {_number(first.get(key))} | "
                         f"{_number(last[key])} |")
    lines += _best_model_lines(metrics)
    if train:
        last = train[-1]
        extra = [f"{last['num_tokens']:,} tokens trained" if "num_tokens" in last else None,
                 f"{last['tokens_per_second']:,.0f} tokens per second at the end"
                 if "tokens_per_second" in last else None,
                 f"peak memory {last['peak_memory_mb']:,.0f} MB" if "peak_memory_mb" in last else None]
        lines.append("\n" + "; ".join(e for e in extra if e) + ". Every logged value is in `metrics.jsonl`.")
    return "\n".join(lines) + "\n"


def _best_model_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """Which model was saved when load_best_model_at_end chose it (training/best_model.py writes the line)."""
    chosen = [m for m in metrics if "best_model_step" in m]
    if not chosen:
        return []
    line = chosen[-1]
    step, key, value = line["best_model_step"], line["best_metric"], _number(line["best_metric_value"])
    if step == line["step"]:
        return [f"\nThe saved model is the final one (step {step}), also the best by {key} ({value}); "
                "load_best_model_at_end was on."]
    return [f"\nThe saved model is the best checkpoint by {key}: **step {step}** ({key} {value}), loaded at the "
            f"end (load_best_model_at_end); training ran to step {line['step']}."]


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    tiny_or_huge = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6)
    if isinstance(value, float) and (not math.isfinite(value) or tiny_or_huge):
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def _compute_section(summary: RunSummary) -> str:
    processes = summary.plan.num_processes
    return (
        "## Compute\n\n"
        f"- Time: {_duration(summary.train_seconds)} in the training loop, {_duration(summary.run_seconds)} "
        "for the whole run (loading, data preparation, training, saving)\n"
        f"- Hardware: {hardware_description()}; {processes} training process{'es' if processes != 1 else ''}\n"
    )


def hardware_description() -> str:
    """The accelerators visible to the main process (name and count), and the CPU."""
    import torch

    parts = []
    if torch.cuda.is_available():
        names = Counter(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        parts.append(", ".join(f"{count} x {name}" for name, count in names.items()))
    parts.append(f"CPU {_cpu_name()} ({os.cpu_count()} cores)")
    return ", ".join(parts)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _duration(seconds: float) -> str:
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours} h {minute} min" if hours else f"{minute} min {second} s"


def _versions_section() -> str:
    versions = [f"Python {platform.python_version()}"]
    for package in FRAMEWORKS:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return "## Framework versions\n\n" + ", ".join(versions) + "\n"

