"""`delta-mem-mlx eval`: the memory A/B harness against a running sidecar (see installer/memory_eval)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from common.health import base_url
from common.settings import QmdSettings, SidecarSettings, load_settings
from installer.commands.options import RootOption, examples, resolve_root
from installer.commands.serve import API_KEY_ENV
from installer.errors import cli_errors
from installer.memory_eval.builtin_suite import SuiteSize
from installer.memory_eval.conversations import Conversation, DatasetError
from installer.memory_eval.datasets import load_dataset
from installer.memory_eval.file_formats import DEFAULT_CHUNK_CHARS
from installer.memory_eval.history_export import write_histories
from installer.memory_eval.report import build_report, markdown_report, write_reports
from installer.memory_eval.retrieval import LexicalRetriever, QmdRetriever, Retriever
from installer.memory_eval.runner import (
    DEFAULT_MODES,
    EvalError,
    RunSettings,
    parse_modes,
    planned_requests,
    run_eval,
)
from installer.sidecar_client import SidecarClient

RETRIEVERS = ("lexical", "qmd")


@cli_errors
def eval_command(
    url: Annotated[
        str | None,
        typer.Option("--url", help="The sidecar's URL. Default: the installed sidecar's.", show_default=False),
    ] = None,
    root: RootOption = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar=API_KEY_ENV, help="The sidecar's API key. Default: the installed one.",
            show_default=False,
        ),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="Model id to ask for. Default: the one served.", show_default=False)
    ] = None,
    modes: Annotated[
        str,
        typer.Option(
            "--modes",
            help="Comma-separated: base, delta, delta+memory, base+memory-in-prompt, base+full-history.",
        ),
    ] = ",".join(DEFAULT_MODES),
    dataset: Annotated[
        str, typer.Option("--dataset", help="builtin, locomo:PATH (LoCoMo JSON) or mab:PATH (MemoryAgentBench rows).")
    ] = "builtin",
    conversations: Annotated[int, typer.Option("--conversations", help="Built-in suite: conversations.")] = 4,
    facts: Annotated[int, typer.Option("--facts", help="Built-in suite: facts (questions) per conversation.")] = 8,
    distractors: Annotated[int, typer.Option("--distractors", help="Built-in suite: filler turns per fact.")] = 2,
    sessions: Annotated[int, typer.Option("--sessions", help="Built-in suite: sessions per conversation.")] = 3,
    chunk_chars: Annotated[
        int, typer.Option("--chunk-chars", help="MemoryAgentBench: characters of context per turn.")
    ] = DEFAULT_CHUNK_CHARS,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Use only the first N conversations.", show_default=False)
    ] = None,
    max_questions: Annotated[
        int | None, typer.Option("--max-questions", help="At most N questions per conversation.", show_default=False)
    ] = None,
    history_window: Annotated[
        int | None,
        typer.Option(
            "--history-window",
            help="Keep only the last N history messages in the prompt (default: all; 0: none, like a new session).",
            show_default=False,
        ),
    ] = None,
    memory_k: Annotated[int, typer.Option("--memory-k", help="Memory snippets retrieved per question.")] = 4,
    retriever: Annotated[str, typer.Option("--retriever", help="lexical (BM25 over the history) or qmd.")] = "lexical",
    qmd_collection: Annotated[
        str | None,
        typer.Option(
            "--qmd-collection",
            help="QMD collection to search; '{conversation}' is replaced by the conversation id.",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="New tokens per answer.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the suite, decoding and the bootstrap.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for the report. Default: ./delta-mem-eval-<time>.", show_default=False),
    ] = None,
) -> None:
    """Does δ-mem help? Ask the same questions in several modes and compare scores and latency.

    Each conversation is replayed turn by turn through its own sidecar session per mode (as OpenClaw
    drives one), then its questions are asked: greedy decoding, the same questions and history for
    every mode. Writes report.json, report.md, report.png (with the 'plot' extra) and each
    conversation's history into --out, and prints the Markdown table.
    """
    if retriever not in RETRIEVERS:
        raise EvalError(f"--retriever must be one of {', '.join(RETRIEVERS)}")
    run = RunSettings(parse_modes(modes), seed, max_tokens, memory_k, history_window)
    run.validate()
    size = SuiteSize(conversations, facts, distractors, sessions)
    data = load_dataset(dataset, size, seed, chunk_chars).limited(limit, max_questions)
    if data.question_count == 0:
        raise DatasetError(f"{dataset} has no questions to ask")
    # A root's key goes only to that root's sidecar, never to a --url given without --root.
    settings: SidecarSettings | None = None
    if url is None or root is not None:
        settings = load_settings(resolve_root(root))
        target = url or base_url(settings)
    else:
        target = url
    key = api_key or (settings.api_key if settings else None)
    client = SidecarClient(target, key, model=model_id or "")
    health = client.get_json("/health")
    if not model_id:
        client.model = str(health.get("model") or client.served_model())
    retriever_for = _retriever_factory(retriever, settings.qmd if settings else QmdSettings(), qmd_collection)
    out_dir = (out or Path(f"delta-mem-eval-{time.strftime('%Y%m%d-%H%M%S')}")).absolute()
    write_histories(data, out_dir)
    total = planned_requests(data, run)
    typer.echo(
        f"Asking {data.question_count} questions in {len(run.modes)} modes ({total} requests) "
        f"at {target}, model {client.model}.",
        err=True,
    )
    with _progress(total) as on_request:
        result = run_eval(client, data, run, retriever_for, on_request)
    server = {"url": target, "model": client.model, "adapter": health.get("adapter"), "backend": health.get("backend")}
    report = build_report(data, run, result, server, retriever)
    files = write_reports(report, out_dir)
    typer.echo(markdown_report(report))
    typer.echo(f"Wrote {files.json}, {files.markdown}" + (f" and {files.chart}" if files.chart else ""))
    if files.chart_skipped:
        typer.echo(f"report.png skipped: {files.chart_skipped}")


def _retriever_factory(
    name: str, qmd: QmdSettings, collection: str | None
) -> Callable[[Conversation], Retriever]:
    if name == "lexical":
        return LexicalRetriever
    qmd = dataclasses.replace(qmd, collection=collection) if collection else qmd
    return lambda conversation: QmdRetriever(qmd, conversation)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[], None] | None]:
    # A bar is for a person watching; logs and pipes get only the start line and the report.
    if not sys.stderr.isatty():
        yield None
        return
    with typer.progressbar(length=total, label="eval", file=sys.stderr) as bar:
        yield lambda: bar.update(1)


def register(app: typer.Typer) -> None:
    """Add the `eval` command."""
    app.command(
        "eval",
        epilog=examples(
            "delta-mem-mlx eval",
            "delta-mem-mlx eval --conversations 8 --facts 12 --out ./eval-qwen3",
            "delta-mem-mlx eval --modes base,delta --dataset locomo:./locomo10.json --limit 2 --max-questions 40",
            "delta-mem-mlx eval --dataset mab:./Accurate_Retrieval.jsonl --history-window 8 --modes "
            "base,delta+memory,base+memory-in-prompt,base+full-history",
            "delta-mem-mlx eval --url http://127.0.0.1:8765 --api-key KEY --retriever qmd "
            "--qmd-collection 'eval-{conversation}'",
        ),
    )(eval_command)
