"""The data doctor's report (doctor.py) in words: for `sftune inspect`, the training log and the model card.

Every function takes the prepared data's stats, whose "doctor" entry is the report (None when it was not made)."""

from __future__ import annotations

import logging
from typing import Any

from sftune.data.doctor import LENGTH_FACTOR

FINDINGS = {  # count key -> the rows it counts
    "exact_duplicates": "training rows repeating an earlier row once whitespace is ignored",
    "near_duplicates": "training rows nearly repeating an earlier row",
    "train_eval_overlap": "eval rows repeating a training row, exactly or nearly",
    "empty_replies": "training rows with an empty or whitespace-only assistant reply",
    "repetitive_replies": "training rows with a reply stuck in a loop",
}
LABELS = {"exact_duplicates": "exact duplicates", "near_duplicates": "near duplicates",
          "train_eval_overlap": "train/eval overlap", "empty_replies": "empty replies",
          "repetitive_replies": "repetitive replies"}


def near_rule(report: dict[str, Any]) -> str:
    return f"the same text up to case, whitespace and punctuation, or {_similarity(report)}"


def _similarity(report: dict[str, Any]) -> str:
    rule = report["near_rule"]
    return f"similarity >= {rule['threshold']} ({rule['method']})"


def loop_rule(report: dict[str, Any]) -> str:
    rule = report["loop_rule"]
    return (f"a run of up to {rule['max_period_words']} words repeated back to back at least {rule['min_repeats']} "
            f"times, over {rule['min_words']}+ words")


def detail(report: dict[str, Any], name: str) -> str:
    """What one finding's count means, with its breakdown."""
    if name == "near_duplicates":
        return (f"{report['near_same_text']:,} the same up to case, whitespace and punctuation, "
                f"{report['near_similar']:,} with {_similarity(report)}")
    if name == "train_eval_overlap":
        near = report["train_eval_overlap"] - report["overlap_exact"]
        return f"{report['overlap_exact']:,} exact, {near:,} near"
    if name == "repetitive_replies":
        return loop_rule(report)
    if name == "exact_duplicates" and report.get("most_repeated"):
        top = report["most_repeated"]
        return f"the most repeated, {top['row']}, appears {top['times']:,} times"
    return ""


def trained_shares(stats: dict[str, Any]) -> list[tuple[str, float]]:
    """(source, share of the trained tokens after mixing) for each source, in the order of the report's sources."""
    sources = stats.get("sources") or []
    total = sum(s.get("trained_tokens", 0) for s in sources)
    return [(s["name"], s.get("trained_tokens", 0) / total if total else 0.0) for s in sources]


def inspect_lines(stats: dict[str, Any]) -> list[str]:
    """The report as `sftune inspect` prints it."""
    report = stats.get("doctor")
    if not report:
        return []
    checked = report["rows_checked"]
    lines = [f"data doctor: {checked['train']:,} training rows" + (f", {checked['eval']:,} eval rows" if checked["eval"]
                                                                   else "")]
    for name in FINDINGS:
        count = report[name]
        extra = detail(report, name) if count else ""
        lines.append(f"  {LABELS[name]}: {count:,}" + (f" ({extra})" if extra else ""))
        lines += [f"    e.g. {example}" for example in report["examples"][name]]
    if report.get("eval_duplicates"):
        lines.append(f"  eval duplicates: {report['eval_duplicates']:,} eval rows repeat an earlier eval row")
    if report.get("dedupe"):
        lines.append(_dedupe_text(report["dedupe"]))
    for source, (_, share) in zip(report["sources"], trained_shares(stats)):
        if not source["rows"]:  # an eval-only source
            continue
        lines.append(f"  source {source['name']}: {source['rows']:,} rows, {100 * share:.1f}% of the trained tokens")
        if source["lengths"]:
            lengths = source["lengths"]
            lines.append(f"    tokens per row: min {lengths['min']:,}, median {lengths['p50']:,}, "
                         f"p99 {lengths['p99']:,}, max {lengths['max']:,}")
        for key, examples, label in (("truncated", "truncated_examples", "truncated to max_length"),
                                     ("long_rows", "long_examples", f"over {LENGTH_FACTOR}x the median length"),
                                     ("short_rows", "short_examples", f"under 1/{LENGTH_FACTOR} of the median length")):
            if source[key]:
                lines.append(f"    {source[key]:,} rows {label}, e.g. {'; '.join(source[examples])}")
    return lines


def summary(stats: dict[str, Any]) -> str:
    """One line for the training log."""
    report = stats["doctor"]
    counts = ", ".join(f"{LABELS[name]} {report[name]:,}" for name in FINDINGS)
    found = any(report[name] for name in FINDINGS)
    return (f"{report['rows_checked']['train']:,} training rows: {counts}"
            + (" (`sftune inspect` names the rows)" if found else ""))


def warnings(stats: dict[str, Any]) -> list[str]:
    """One line per finding, with an example row, for the training log."""
    report = stats["doctor"]
    lines = [f"{LABELS[name]}: {report[name]:,} ({FINDINGS[name]}), e.g. {report['examples'][name][0]}"
             for name in FINDINGS if report[name] and report["examples"][name]]
    if report.get("dedupe"):
        lines.append(_dedupe_text(report["dedupe"]).strip())
    return lines


def log_findings(stats: dict[str, Any], log: logging.Logger) -> None:
    """The findings in the run's log: a summary line, then a warning with an example per finding."""
    if stats.get("doctor"):
        log.info("data doctor: %s", summary(stats))
        for line in warnings(stats):
            log.warning("data doctor: %s", line)


def card_lines(stats: dict[str, Any]) -> list[str]:
    """Markdown bullets for the model card's data section."""
    report = stats.get("doctor")
    if not report:
        return []
    counts = ", ".join(f"{LABELS[name]} {report[name]:,}" for name in FINDINGS)
    lines = [f"- Data checks (sftune's data doctor, on {report['rows_checked']['train']:,} training rows): {counts} "
             f"(near: {near_rule(report)})"]
    if report.get("dedupe"):
        lines.append(f"- {_dedupe_text(report['dedupe']).strip()}")
    shares = trained_shares(stats)
    if len(shares) > 1:
        lines.append("- Trained tokens by source: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares))
    return lines


def _dedupe_text(dedupe: dict[str, Any]) -> str:
    return (f"  dedupe: {dedupe['mode']} removed {dedupe['train_removed']:,} training rows and "
            f"{dedupe['eval_removed']:,} eval rows")
