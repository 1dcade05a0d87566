"""The report of a run: one JSON document, a Markdown summary of it and a chart (chart.py)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import atomic_write_json, atomic_write_text
from installer.memory_eval.chart import write_chart
from installer.memory_eval.conversations import Dataset
from installer.memory_eval.runner import MODES, AnswerRecord, RunResult, RunSettings
from installer.memory_eval.scoring import METRICS, bootstrap_difference, bootstrap_mean

REPORT_FORMAT = "delta-mem-mlx-eval/1"
# Each δ mode against the baseline it should beat: δ alone against the plain model, hidden
# memory against the same memory pasted into the prompt, and against the plain model.
COMPARISONS = (("delta", "base"), ("delta+memory", "base+memory-in-prompt"), ("delta+memory", "base"))
BOOTSTRAP_RESAMPLES = 2000
_COLUMNS = (
    "mode", "what it is", "EM", "F1", "key-term recall", "TTFT (s)", "answer time (s)", "prompt tokens", "cached",
    "new tokens",
)


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written; `chart_skipped` says why there is no PNG."""

    json: Path
    markdown: Path
    chart: Path | None
    chart_skipped: str | None


def build_report(
    dataset: Dataset, settings: RunSettings, result: RunResult, server: dict[str, Any], retriever: str
) -> dict[str, Any]:
    """The JSON report: settings, per-mode scores, latency and tokens, paired comparisons, every answer."""
    names = [mode.name for mode in settings.modes]
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "server": server,
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "params": dataset.params,
            "conversations": len(dataset.conversations),
            "questions": dataset.question_count,
            "history_messages": sum(len(c.history) for c in dataset.conversations),
            "skipped_questions": dataset.skipped_questions,
        },
        "settings": {**settings.to_dict(), "retriever": retriever},
        "modes": {name: _mode_summary(name, result, settings.seed) for name in names},
        "comparisons": _comparisons(result, names, settings.seed),
        "warnings": list(result.warnings),
        "answers": [_answer(a) for a in result.answers],
    }


def markdown_report(report: dict[str, Any]) -> str:
    """A readable summary of a JSON report: the mode table, scores by question type, comparisons, warnings."""
    data, cfg, server = report["dataset"], report["settings"], report["server"]
    window = cfg["history_window"]
    shown = "all of it" if window is None else f"the last {window} messages"
    setup = (
        f"Model `{server.get('model')}` at {server.get('url')} (δ-mem adapter: {_adapter(server.get('adapter'))}). "
        f"Greedy decoding, at most {cfg['max_tokens']} new tokens per answer; memory: {cfg['memory_k']} snippets "
        f"per question from `{cfg['retriever']}`; history in the prompt: {shown}."
    )
    lines = [
        f"# δ-mem memory A/B: {data['name']} ({data['conversations']} conversations, {data['questions']} questions)",
        "",
        setup,
        "",
        f"| {' | '.join(_COLUMNS)} |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for name, mode in report["modes"].items():
        scores, latency, tokens = mode["scores"], mode["latency_s"], mode["tokens"]
        lines.append(
            f"| `{name}` | {mode['description']} | {_num(scores['exact_match'])} | {_num(scores['token_f1'])} | "
            f"{_num(scores['key_term_recall'])} | {_num(latency['question_ttft_mean'], 2)} | "
            f"{_num(latency['question_total_mean'], 2)} | {tokens['prompt']} | {tokens['cached']} | "
            f"{tokens['completion']} |"
        )
    kinds = sorted({kind for mode in report["modes"].values() for kind in mode["by_kind"]})
    names = list(report["modes"])
    lines += ["", "Token F1 by question type:", "", f"| type | n | {' | '.join(f'`{n}`' for n in names)} |"]
    lines.append("|---|---|" + "---|" * len(names))
    for kind in kinds:
        counts = [report["modes"][n]["by_kind"].get(kind, {}).get("questions", 0) for n in names]
        cells = [_num(report["modes"][n]["by_kind"].get(kind, {}).get("token_f1")) for n in names]
        lines.append(f"| {kind} | {max(counts)} | {' | '.join(cells)} |")
    if report["comparisons"]:
        lines += ["", "Paired differences (bootstrap, 95 % interval):", "",
                  "| comparison | metric | difference | 95 % interval | ratio |", "|---|---|---|---|---|"]
        for c in report["comparisons"]:
            lines.append(
                f"| `{c['mode']}` − `{c['baseline']}` | {c['metric']} | {c['difference']:+.4f} | "
                f"[{c['ci95_low']:+.4f}, {c['ci95_high']:+.4f}] | {_ratio(c['ratio'])} |"
            )
    if report["warnings"]:
        lines += ["", "Warnings:", "", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], out_dir: Path) -> ReportFiles:
    """Write report.json, report.md and (with matplotlib) report.png into `out_dir`."""
    json_path, md_path, png_path = out_dir / "report.json", out_dir / "report.md", out_dir / "report.png"
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, markdown_report(report))
    skipped = write_chart(report, png_path)
    return ReportFiles(json_path, md_path, None if skipped else png_path, skipped)


def _mode_summary(name: str, result: RunResult, seed: int) -> dict[str, Any]:
    answers = [a for a in result.answers if a.mode == name]
    turns = [t.reply for t in result.turns if t.mode == name]
    replies = turns + [a.reply for a in answers]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({a.question.kind for a in answers}):
        subset = [a for a in answers if a.question.kind == kind]
        by_kind[kind] = {"questions": len(subset), **_scores(subset)}
    return {
        "description": MODES[name].description,
        "questions": len(answers),
        "scores": _scores(answers),
        "scores_ci95": {metric: _interval([a.scores[metric] for a in answers], seed) for metric in METRICS},
        "by_kind": by_kind,
        "latency_s": {
            "question_ttft_mean": _mean([a.reply.ttft_s for a in answers]),
            "question_ttft_p50": _percentile([a.reply.ttft_s for a in answers], 50),
            "question_ttft_p95": _percentile([a.reply.ttft_s for a in answers], 95),
            "question_total_mean": _mean([a.reply.total_s for a in answers]),
            "turn_ttft_mean": _mean([r.ttft_s for r in turns]),
        },
        "tokens": {
            "requests": len(replies),
            "prompt": sum(r.prompt_tokens for r in replies),
            "cached": sum(r.cached_tokens for r in replies),
            "completion": sum(r.completion_tokens for r in replies),
            "question_prompt_mean": _mean([float(a.reply.prompt_tokens) for a in answers]),
            "question_completion_mean": _mean([float(a.reply.completion_tokens) for a in answers]),
        },
        "served_as": dict(Counter(r.served_mode or "unknown" for r in replies)),
        "memory_snippets": {
            "offered": sum(len(a.snippets) for a in answers),
            "taken_by_sidecar": sum(a.reply.snippet_count for a in answers),
        },
    }


def _comparisons(result: RunResult, names: Sequence[str], seed: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for mode, baseline in COMPARISONS:
        if mode not in names or baseline not in names:
            continue
        ours = {(a.conversation, a.question.id): a for a in result.answers if a.mode == mode}
        theirs = {(a.conversation, a.question.id): a for a in result.answers if a.mode == baseline}
        keys = [key for key in ours if key in theirs]
        if not keys:
            continue
        for metric in METRICS:
            a = [ours[k].scores[metric] for k in keys]
            b = [theirs[k].scores[metric] for k in keys]
            interval = bootstrap_difference(a, b, seed=seed, resamples=BOOTSTRAP_RESAMPLES)
            mean_b = sum(b) / len(b)
            out.append({
                "mode": mode,
                "baseline": baseline,
                "metric": metric,
                "questions": len(keys),
                "difference": round(interval.mean, 4),
                "ci95_low": round(interval.low, 4),
                "ci95_high": round(interval.high, 4),
                "ratio": round((sum(a) / len(a)) / mean_b, 4) if mean_b > 0 else None,
            })
    return out


def _answer(record: AnswerRecord) -> dict[str, Any]:
    reply = record.reply
    return {
        "conversation": record.conversation,
        "mode": record.mode,
        "question_id": record.question.id,
        "kind": record.question.kind,
        "question": record.question.text,
        "gold": list(record.question.answers),
        "answer": reply.text,
        "scores": {k: round(v, 4) for k, v in record.scores.items()},
        "snippets": [{"text": s.text, "source": s.source, "score": s.score} for s in record.snippets],
        "served_mode": reply.served_mode,
        "sidecar_snippet_count": reply.snippet_count,
        "sidecar_snippet_source": reply.snippet_source,
        "ttft_s": round(reply.ttft_s, 4),
        "total_s": round(reply.total_s, 4),
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": reply.cached_tokens,
        "completion_tokens": reply.completion_tokens,
        "finish_reason": reply.finish_reason,
    }


def _scores(answers: Sequence[AnswerRecord]) -> dict[str, float | None]:
    return {metric: _mean([a.scores[metric] for a in answers]) for metric in METRICS}


def _interval(values: Sequence[float], seed: int) -> list[float] | None:
    # The 95 % bootstrap interval of the mean, as [low, high].
    if not values:
        return None
    interval = bootstrap_mean(values, seed=seed, resamples=BOOTSTRAP_RESAMPLES)
    return [round(interval.low, 4), round(interval.high, 4)]


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    # Nearest rank: the smallest value with at least q % of the values at or below it.
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 4)


def _adapter(adapter: Any) -> str:
    if not adapter:
        return "none"
    if isinstance(adapter, dict):
        return f"{adapter.get('variant', '?')}, rank {adapter.get('rank', '?')}, {adapter.get('layers', '?')} layers"
    return str(adapter)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"
