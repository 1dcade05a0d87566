"""report.png: each mode's token F1 with its 95 % interval and its answer time, one row per mode,
then the paired differences the report computes, each with its interval.

One row per mode (not one point per mode in a score-vs-latency plane) keeps modes with close
scores and latencies apart and their labels readable. Needs matplotlib (the `plot` extra).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_HINT = "pip install 'openclaw-delta-mem-mlx[plot]'"
METRIC = "token_f1"
# Differences whose interval lies above zero, below it, or includes it.
BETTER, WORSE, UNCLEAR = "#2a9d55", "#c8443b", "0.45"
_ROW_INCHES = 0.5


def write_chart(report: dict[str, Any], path: Path) -> str | None:
    """Draw the report's chart into a PNG at `path`; returns why it was skipped, or None."""
    try:
        figure = chart_figure(report)
    except ImportError:
        return f"matplotlib is not installed ({PLOT_HINT})"
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return None


def chart_figure(report: dict[str, Any]) -> Figure:
    """The chart as a matplotlib Figure (no pyplot, no display); raises ImportError without matplotlib."""
    from matplotlib.figure import Figure

    names = list(report["modes"])
    comparisons = [c for c in report["comparisons"] if c["metric"] == METRIC]
    heights = [len(names) + 1.5] + ([len(comparisons) + 1.5] if comparisons else [])
    figure = Figure(figsize=(11, 1.0 + _ROW_INCHES * sum(heights)), layout="constrained")
    grid = figure.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[3, 2])
    scores = figure.add_subplot(grid[0, 0])
    times = figure.add_subplot(grid[0, 1], sharey=scores)
    colors = [f"C{i % 10}" for i in range(len(names))]
    _draw_scores(scores, report["modes"], colors)
    _draw_times(times, report["modes"], colors)
    if comparisons:
        _draw_differences(figure.add_subplot(grid[1, :]), comparisons)
    data = report["dataset"]
    figure.suptitle(
        f"δ-mem A/B on {data['name']}: {data['questions']} questions in {data['conversations']} conversation(s), "
        f"model {report['server'].get('model')}"
    )
    return figure


def _draw_scores(axes: Axes, modes: dict[str, Any], colors: list[str]) -> None:
    axes.set_xlim(-0.02, 1.02)  # F1 is a fraction: a fixed scale keeps charts of different runs comparable
    for row, mode in enumerate(modes.values()):
        mean, interval = mode["scores"][METRIC], mode["scores_ci95"][METRIC]
        if mean is None:
            continue
        low, high = interval
        axes.errorbar(mean, row, xerr=[[mean - low], [high - mean]], fmt="o", color=colors[row], capsize=4)
        _value_label(axes, f"{mean:.3f}  [{low:.3f}, {high:.3f}]", mean, row)
    axes.set_yticks(range(len(modes)), list(modes))
    axes.set_ylim(len(modes) - 0.4, -0.7)  # first mode on top; room above it for its label
    axes.set_xlabel("mean token F1 per question, with its 95 % bootstrap interval")
    axes.grid(True, axis="x", alpha=0.3)


def _draw_times(axes: Axes, modes: dict[str, Any], colors: list[str]) -> None:
    from matplotlib.patches import Patch

    longest = 0.0
    for row, mode in enumerate(modes.values()):
        total, first = mode["latency_s"]["question_total_mean"], mode["latency_s"]["question_ttft_mean"]
        if total is None:
            continue
        axes.barh(row, total, height=0.5, color=colors[row], alpha=0.35)
        axes.barh(row, first, height=0.5, color=colors[row])
        # Milliseconds below 10 s: close modes differ in the third digit.
        label = f"{total * 1000:.0f} ms" if total < 10 else f"{total:.1f} s"
        axes.annotate(label, (total, row), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        longest = max(longest, total)
    axes.set_xlim(0, longest * 1.3 or 1.0)  # room for the value labels
    axes.tick_params(labelleft=False)
    axes.set_xlabel("mean time per question (s)")
    # Above the bars, so that it never covers one.
    axes.legend(
        handles=[Patch(color="0.3", label="to the first token"), Patch(color="0.3", alpha=0.35, label="whole answer")],
        loc="lower left", bbox_to_anchor=(0, 1), ncols=2, frameon=False, fontsize=8,
    )  # fmt: skip
    axes.grid(True, axis="x", alpha=0.3)


def _draw_differences(axes: Axes, comparisons: list[dict[str, Any]]) -> None:
    reach = 1.2 * max([0.05, *(abs(c[end]) for c in comparisons for end in ("ci95_low", "ci95_high"))])
    axes.set_xlim(-reach, reach)  # zero in the middle
    for row, c in enumerate(comparisons):
        mean, low, high = c["difference"], c["ci95_low"], c["ci95_high"]
        color = BETTER if low > 0 else WORSE if high < 0 else UNCLEAR
        axes.errorbar(mean, row, xerr=[[mean - low], [high - mean]], fmt="s", color=color, capsize=4)
        _value_label(axes, f"{mean:+.3f}  [{low:+.3f}, {high:+.3f}]", mean, row)
    axes.axvline(0, color="0.5", linewidth=1, linestyle="--")
    axes.set_yticks(range(len(comparisons)), [f"{c['mode']} − {c['baseline']}" for c in comparisons])
    axes.set_ylim(len(comparisons) - 0.4, -0.7)
    axes.set_title(
        "δ mode − its baseline on the same questions: green above 0, red below, grey includes 0", fontsize=9
    )
    axes.set_xlabel("difference in mean token F1, with its 95 % paired bootstrap interval")
    axes.grid(True, axis="x", alpha=0.3)


def _value_label(axes: Axes, text: str, x: float, row: int) -> None:
    """A value just above its point; near either end of the x axis it grows inwards, to stay in the panel."""
    left, right = axes.get_xlim()
    where = (x - left) / (right - left)
    align = "left" if where < 0.3 else "right" if where > 0.7 else "center"
    axes.annotate(text, (x, row), xytext=(0, 8), textcoords="offset points", ha=align, fontsize=8)
