"""Results files of ``sdrpn eval``: merging runs, the summary table, the accuracy/throughput plot.

A results file holds one benchmark and any number of methods::

    {"benchmark": "textvqa", "metric": "VQA accuracy", "num_samples": 5000, "data": ..., "split": ...,
     "prompts": {...},
     "methods": {"baseline": {...summary...}, "sdrpn": {...}},
     "comparison": {"sdrpn": {"score_delta": 0.126, "throughput_ratio": 0.62, "visual_tokens_ratio": 1.4}}}

Methods evaluated in separate runs with the same ``--out`` accumulate in one file, so the
comparison with the baseline appears as soon as both have been run.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import UserError

BASELINE = "baseline"


def comparison(methods: dict[str, dict]) -> dict[str, dict]:
    """Each method against the baseline: score difference, throughput and visual-token ratios."""
    if BASELINE not in methods:
        return {}
    base = methods[BASELINE]
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {name: {"score_delta": summary["score"] - base["score"],
                   "throughput_ratio": ratio(summary["samples_per_s"], base["samples_per_s"]),
                   "visual_tokens_ratio": ratio(summary["mean_visual_tokens"], base["mean_visual_tokens"])}
            for name, summary in methods.items() if name != BASELINE}


def read_results(path: Path) -> dict:
    """A results file written by ``sdrpn eval``; anything else is a :class:`UserError`."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such results file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a results file of sdrpn eval (not valid JSON: {exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict) or "benchmark" not in results:
        raise UserError(f"{path}: not a results file of sdrpn eval (expected 'benchmark' and 'methods')")
    return results


def update_results(path: Path, header: dict, summaries: dict[str, dict]) -> dict:
    """Add ``summaries`` (method -> summary) to the results file at ``path`` and rewrite it.

    ``header`` describes the benchmark run (benchmark, metric, data, split, num_samples, prompts);
    an existing file must describe the same run, else the user chose the wrong ``--out``.
    """
    path = Path(path)
    results = {**header, "methods": {}}
    if path.exists():
        previous = read_results(path)
        keys = ("benchmark", "data", "split", "num_samples")
        if any(previous.get(key) != header.get(key) for key in keys):
            old = ", ".join(f"{key}={previous.get(key)}" for key in keys)
            raise UserError(f"{path} holds results of another run ({old}); pass another --out")
        results["methods"] = previous["methods"]
    results["methods"].update(summaries)
    results["comparison"] = comparison(results["methods"])
    temporary = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return results


def format_table(results: dict) -> str:
    """The summary table of a results file, as text."""
    methods, compared = results["methods"], results.get("comparison", {})
    skipped = f" ({results['skipped']} records skipped)" if results.get("skipped") else ""
    head = f"{results['benchmark']}: {results['num_samples']} questions{skipped}, metric {results['metric']}"
    rows = [("method", "score", "Δ baseline", "samples/s", "× baseline", "visual tokens", "with RoI")]
    order = sorted(methods, key=lambda name: (name != BASELINE, name))
    for name in order:
        summary, delta = methods[name], compared.get(name, {})
        rows.append((
            name,
            f"{100 * summary['score']:.2f}",
            f"{100 * delta['score_delta']:+.2f}" if delta else "",
            f"{summary['samples_per_s']:.3g}",
            f"{delta['throughput_ratio']:.2f}x" if delta.get("throughput_ratio") else "",
            f"{summary['mean_visual_tokens']:.0f}",
            f"{100 * summary['with_roi']:.0f}%",
        ))
    subsets = sorted({s for summary in methods.values() for s in summary.get("subsets", {})})
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(row, widths))) for row in rows]
    if subsets:
        lines.append("per subset: " + "; ".join(
            f"{name} " + ", ".join(f"{s} {100 * methods[name]['subsets'][s]:.2f}"
                                   for s in subsets if s in methods[name].get("subsets", {}))
            for name in order))
    return "\n".join(lines)


def _model_name(summary: dict) -> str:
    """The model a method was evaluated with: its checkpoint folder's name ("" when not recorded)."""
    model = summary.get("settings", {}).get("model")
    return Path(model).name if model else ""


def panel_title(benchmark: str, rows: Sequence[dict]) -> str:
    """``textvqa · llava-1.5-7b-hf``: the benchmark and the model(s) of its points."""
    models = list(dict.fromkeys(row["model"] for row in rows if row["model"]))
    return " · ".join([benchmark, *models])


def point_label(row: dict) -> str:
    """What a point says beside it: the visual tokens per question the method read."""
    return f"{row['mean_visual_tokens']:.0f} visual tokens"


def plot(result_files: Sequence[Path], out: Path) -> Path:
    """Draw accuracy against throughput for every method of ``result_files`` into ``out`` (PNG),
    one panel per benchmark titled with it and the model, each point labelled with its visual
    tokens, and write the plotted numbers to ``out`` with a ``.csv`` suffix.

    Returns the path of the CSV file.
    """
    if not result_files:
        raise UserError("--plot needs at least one results file (sdrpn eval --plot out.png results.json ...)")
    if Path(out).suffix.lower() != ".png":
        raise UserError(f"--plot {out}: the plot is written as PNG; name it *.png")
    rows = []
    for path in result_files:
        results = read_results(path)
        for name, summary in results["methods"].items():
            default_ratio = 1.0 if name == BASELINE else None
            ratio = results.get("comparison", {}).get(name, {}).get("throughput_ratio", default_ratio)
            rows.append({"benchmark": results["benchmark"], "method": name, "metric": results["metric"],
                         "score": summary["score"], "samples_per_s": summary["samples_per_s"],
                         "throughput_vs_baseline": ratio, "mean_visual_tokens": summary["mean_visual_tokens"],
                         "num_samples": summary["num_samples"], "file": str(path), "model": _model_name(summary)})
    if not rows:
        raise UserError(f"{', '.join(map(str, result_files))}: no methods to plot")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None

    benchmarks = list(dict.fromkeys(row["benchmark"] for row in rows))
    several_files = len({row["file"] for row in rows}) > len(benchmarks)
    figure, axes = plt.subplots(1, len(benchmarks), figsize=(5.5 * len(benchmarks), 4.5), squeeze=False)
    for axis, benchmark in zip(axes[0], benchmarks):
        panel = [row for row in rows if row["benchmark"] == benchmark]
        for row in panel:
            label = row["method"] + (f" ({Path(row['file']).stem})" if several_files else "")
            point = (row["samples_per_s"], 100 * row["score"])
            axis.scatter(*point, s=60, zorder=3, label=label)
            axis.annotate(point_label(row), point, textcoords="offset points", xytext=(6, 6), fontsize=7)
        axis.set_title(panel_title(benchmark, panel))
        axis.set_xlabel("throughput (samples/s)")
        axis.set_ylabel(f"{rows[[r['benchmark'] for r in rows].index(benchmark)]['metric']} (%)")
        axis.grid(True, alpha=0.3)
        axis.margins(0.25)
        axis.legend(fontsize=8, loc="best")  # a legend, because nearby points' labels would overlap
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)

    table = Path(out).with_suffix(".csv")
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table
