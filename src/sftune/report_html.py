"""`sftune inspect CONFIG --html report.html`: the prepared data on one self-contained page.

Statistics, the data doctor's findings with example rows, length histograms per source (inline SVG), and examples
with the trained tokens highlighted as training sees them. Everything is inline (CSS, SVG, no script); a Content
Security Policy in the page forbids the browser to fetch anything, so it opens offline and leaks nothing.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftune.data.doctor_report import FINDINGS, LABELS, detail, trained_shares

TRAINED_BACKGROUND = "#9be9a8"  # the tests look for this colour in a screenshot
CSP = "default-src 'none'; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; background: #fff;
       margin: 0 auto; max-width: 1100px; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 10px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 16px; margin: 18px 0 6px; }
.muted { color: #656d76; } table { border-collapse: collapse; margin: 6px 0 12px; }
td, th { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.ok { background: #dafbe1; color: #116329; font-weight: 600; }
.found { background: #fff1c2; color: #7d4e00; font-weight: 600; }
ul.examples { margin: 2px 0; padding-left: 18px; font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 13px; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; word-break: break-word;
          border: 1px solid #d0d7de; padding: 10px; background: #fbfbfc; }
.tokens .t { background: %s; color: #0b3d16; border-radius: 2px; }
.tokens .u { color: #57606a; }
.legend span { padding: 1px 6px; border-radius: 2px; }
svg text { font: 11px system-ui, sans-serif; fill: #57606a; }
""" % TRAINED_BACKGROUND


@dataclass
class Example:
    """One prepared example: where it comes from and its text in runs, each trained or not."""

    where: str
    runs: list[tuple[str, bool]]
    tokens: int
    trained: int


def write_html_report(path: Path, stats: dict[str, Any], summary: list[str], examples: list[Example],
                      title: str) -> Path:
    """Write the page to `path` atomically (a temporary file, then a rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render_page(stats, summary, examples, title), encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_page(stats: dict[str, Any], summary: list[str], examples: list[Example], title: str) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">sftune inspect, {time.strftime("%Y-%m-%d %H:%M")}: the data as training will see it.</p>',
        _statistics(stats, summary), _doctor(stats), _sources(stats), _examples(examples),
        "</body></html>",
    ]
    return "\n".join(parts)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _statistics(stats: dict[str, Any], summary: list[str]) -> str:
    rows = [
        ("training rows", f"{stats['rows']:,}"), ("eval rows", f"{stats['eval_rows']:,}"),
        ("documents", f"{stats['documents']:,}"), ("tokens", f"{stats['tokens']:,}"),
        ("trained tokens", f"{stats['trained_tokens']:,} ({100 * stats['trained_fraction']:.1f}%)"),
        ("rows truncated", f"{stats['rows_truncated']:,}"),
        ("rows dropped", ", ".join(f"{n:,} {r.replace('_', ' ')}" for r, n in stats["rows_dropped"].items()) or "0"),
        ("document length (tokens)", ", ".join(f"{k} {v:,}" for k, v in stats["length_percentiles"].items())),
    ]
    if stats.get("packing"):
        rows.append(("packing", f"{stats['packing']['strategy']}, {100 * stats['packing']['efficiency']:.1f}% full"))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return (f"<h2>Statistics</h2><table>{table}</table>"
            f"<details><summary>As <code>sftune inspect</code> prints it</summary><pre>{_e(chr(10).join(summary))}"
            "</pre></details>")


def _doctor(stats: dict[str, Any]) -> str:
    report = stats.get("doctor")
    if not report:
        return "<h2>Data doctor</h2><p>Not run for this data.</p>"
    checked = report["rows_checked"]
    rows = []
    for name in FINDINGS:
        count = report[name]
        badge = f'<td class="n {"found" if count else "ok"}">{count:,}</td>'
        examples = "".join(f"<li>{_e(x)}</li>" for x in report["examples"][name])
        explained = _e(detail(report, name)) if count else ""
        rows.append(f"<tr><th>{_e(LABELS[name])}</th>{badge}<td>{explained}"
                    + (f'<ul class="examples">{examples}</ul>' if examples else "") + "</td></tr>")
    extra = []
    if report.get("eval_duplicates"):
        extra.append(f"<p>{report['eval_duplicates']:,} eval rows repeat an earlier eval row.</p>")
    if report.get("dedupe"):
        dedupe = report["dedupe"]
        extra.append(f"<p><b>dedupe: {_e(dedupe['mode'])}</b> removed {dedupe['train_removed']:,} training rows and "
                     f"{dedupe['eval_removed']:,} eval rows.</p>")
    else:
        extra.append('<p class="muted">Nothing was removed: set <code>dedupe: exact</code> or <code>near</code> '
                     "to remove duplicates.</p>")
    return (f"<h2>Data doctor</h2><p>{checked['train']:,} training rows and {checked['eval']:,} eval rows checked.</p>"
            f"<table><tr><th>check</th><th>rows</th><th>what and where</th></tr>{''.join(rows)}</table>"
            + "".join(extra))


def _sources(stats: dict[str, Any]) -> str:
    report = stats.get("doctor")
    if not report:
        return ""
    parts = ["<h2>Sources</h2>"]
    for source, (_, share) in zip(report["sources"], trained_shares(stats)):
        if not source["rows"]:  # an eval-only source
            continue
        parts.append(f"<h3>{_e(source['name'])}</h3><p>{source['rows']:,} training rows, "
                     f"{100 * share:.1f}% of the trained tokens {_share_bar(share)}</p>")
        if source["lengths"]:
            lengths = source["lengths"]
            parts.append(f"<p>tokens per row: min {lengths['min']:,}, median {lengths['p50']:,}, "
                         f"p99 {lengths['p99']:,}, max {lengths['max']:,}</p>")
            parts.append(_histogram(source["histogram"], source["name"]))
        for key, examples, label in (("truncated", "truncated_examples", "truncated to max_length"),
                                     ("long_rows", "long_examples", "far longer than the median"),
                                     ("short_rows", "short_examples", "far shorter than the median")):
            if source[key]:
                items = "".join(f"<li>{_e(x)}</li>" for x in source[examples])
                parts.append(f'<p>{source[key]:,} rows {label}:</p><ul class="examples">{items}</ul>')
    return "".join(parts)


def _share_bar(share: float) -> str:
    width = max(0.0, min(share, 1.0)) * 120
    return (f'<svg width="124" height="12" role="img" aria-label="{100 * share:.1f}%">'
            '<rect x="0" y="1" width="122" height="10" fill="#eaeef2"/>'
            f'<rect x="0" y="1" width="{width:.1f}" height="10" fill="#2da44e"/></svg>')


def _histogram(histogram: dict[str, list[int]], name: str) -> str:
    """Bars of row counts per length bin, with the axes labelled."""
    counts, edges = histogram["counts"], histogram["edges"]
    width, height, left, bottom = 640, 180, 48, 28
    plot_w, plot_h = width - left - 10, height - bottom - 10
    top = max(counts) if counts else 0
    bar = plot_w / max(len(counts), 1)
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / top if top else 0
        x, y = left + i * bar, 10 + plot_h - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}" fill="#54aeff">'
                    f"<title>{edges[i]:,}-{edges[i + 1]:,} tokens: {count:,} rows</title></rect>")
    axis = (f'<line x1="{left}" y1="{10 + plot_h}" x2="{width - 10}" y2="{10 + plot_h}" stroke="#8c959f"/>'
            f'<text x="{left}" y="{height - 10}">{edges[0]:,}</text>'
            f'<text x="{width - 10}" y="{height - 10}" text-anchor="end">{edges[-1]:,} tokens</text>'
            f'<text x="{left - 6}" y="16" text-anchor="end">{top:,}</text>'
            f'<text x="{left - 6}" y="{10 + plot_h}" text-anchor="end">0</text>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="lengths of {_e(name)}">'
            f"{''.join(bars)}{axis}</svg>")


def _examples(examples: list[Example]) -> str:
    if not examples:
        return ""
    parts = ['<h2>Examples</h2><p class="legend"><span class="t" style="background:'
             f'{TRAINED_BACKGROUND}">trained tokens</span> carry loss; <span class="u">grey text</span> '
             "is context only.</p>"]
    for number, example in enumerate(examples, start=1):
        runs = "".join(f'<span class="{"t" if trained else "u"}">{_e(text)}</span>' for text, trained in example.runs)
        parts.append(f"<h3>Example {number}: {_e(example.where)}</h3>"
                     f'<p class="muted">{example.tokens:,} tokens, {example.trained:,} trained</p>'
                     f'<div class="tokens">{runs}</div>')
    return "".join(parts)
