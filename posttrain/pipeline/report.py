"""The run report: one self-contained `report.html` (plots embedded as PNG data) plus the same PNGs under
`report/`, with each stage's metrics over steps per mode and the held-out accuracy table."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.metrics import read_metrics
from posttrain.pipeline.config import PipelineConfig
from posttrain.rewards.tools import TOOL_FAILURES

PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/total/mean",),
    "held-out accuracy": ("eval/accuracy",),
    "training accuracy": ("train/accuracy",),
    "KL to reference": ("actor/kl",),
    "response length (tokens)": ("response/tokens", "eval/response_tokens"),
    "think length (tokens)": ("response/think_tokens",),
    "loss": ("loss",),
    "tool calls and turns per episode": ("tools/calls", "tools/turns", "eval/tools/calls"),
    "tokens per episode: model vs tools": ("tools/model_tokens", "tools/tool_tokens"),
    "tool failures per step": tuple(f"tools/failures/{kind}" for kind in TOOL_FAILURES),
}
"""Panel title → metric keys it plots, each also with its per-mode variants (`<key>_thinking`, ...)."""


def write_report(out: Path, cfg: PipelineConfig, rows: list[dict[str, Any]]) -> Path:
    images = out / "report"
    images.mkdir(exist_ok=True)
    sections = []
    for spec in cfg.stages:
        for metrics_file in sorted((out / spec.name).rglob("metrics.jsonl")):
            run = metrics_file.parent.relative_to(out)
            png = images / f"{'-'.join(run.parts)}.png"
            if plot_metrics(read_metrics(metrics_file), f"{run} ({spec.stage})", png):
                sections.append((str(run), spec.stage, png))
    page = render_html(cfg, rows, sections)
    report = out / "report.html"
    report.write_text(page)
    return report


def series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    """Every metric named `key` or `key_<mode>`, as (steps, values) over the records that have it."""
    found: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for name, value in record.items():
            if any(name == k or name.startswith(f"{k}_") for k in keys) and isinstance(value, int | float):
                steps, values = found.setdefault(name, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return found


def plot_metrics(records: list[dict[str, Any]], title: str, png: Path) -> bool:
    """A grid of the panels that have data; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, s) for name, keys in PANELS.items() if (s := series(records, keys))]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, lines) in zip(axes.flat, panels, strict=False):
        for label, (steps, values) in sorted(lines.items()):
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


def render_html(
    cfg: PipelineConfig, rows: list[dict[str, Any]], sections: Sequence[tuple[str, str, Path]]
) -> str:
    splits = cfg.eval.splits if cfg.eval else []
    head = "".join(f"<th>{html.escape(s)}</th>" for s in ["model", "mode", *splits])
    body = "".join(
        "<tr>"
        + f"<td>{html.escape(r['model'])}</td><td>{r['mode']}</td>"
        + "".join(f"<td>{r[s]:.3f}</td>" for s in splits)
        + "</tr>"
        for r in rows
    )
    table = f"<table><tr>{head}</tr>{body}</table>" if rows else "<p>No evaluation configured.</p>"
    figures = "".join(
        f"<h2>{html.escape(run)} <small>({stage})</small></h2>"
        f'<img alt="{html.escape(run)} metrics" src="data:image/png;base64,{_b64(png)}">'
        for run, stage, png in sections
    )
    config = html.escape(json.dumps(cfg.model_dump(mode="json"), indent=1))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>posttrain pipeline report</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "img{max-width:100%}</style></head><body>"
        f"<h1>posttrain pipeline: {html.escape(cfg.output_dir)}</h1>"
        f"<h2>Held-out exact-match accuracy</h2>{table}{figures}"
        f"<h2>Config</h2><pre>{config}</pre></body></html>"
    )


def _b64(png: Path) -> str:
    return base64.b64encode(png.read_bytes()).decode()
