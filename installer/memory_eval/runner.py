"""Replays each conversation through the sidecar once per mode, then asks its questions.

Every mode gets the same history, the same questions and the same greedy decoding; only what
the mode names changes (δ on or off, memory hidden in the δ-state, pasted into the prompt, or the
whole history kept in the prompt). Each conversation × mode runs in its own session, driven the
way OpenClaw drives one: one request per user turn carrying the history so far, the dataset's
next message (not the model's reply) continuing it, so that every mode sees the same history.
The questions follow as further turns of the same session, each answer kept in the transcript.
Retrieved memory is pasted as an extra user message after the question, the way OpenClaw adds
its context message, and like OpenClaw's it is not repeated in later turns.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import UserError
from installer.memory_eval.conversations import Conversation, Dataset, Question
from installer.memory_eval.retrieval import Retriever, Snippet
from installer.memory_eval.scoring import score_answer
from installer.sidecar_client import ChatReply, Message, SidecarClient, SidecarError

MemoryRoute = Literal["none", "hidden", "prompt"]

# Replayed turns only need their prompt processed; the reply is discarded.
REPLAY_TOKENS = 1
MEMORY_NOTE = "Memory notes retrieved from earlier in this conversation:"


class EvalError(UserError, ValueError):
    """Evaluation settings that cannot run; the message says which and why."""

    topic = "eval"


@dataclass(frozen=True)
class Mode:
    """One way of asking: δ on or off, where retrieved memory goes, how much history is shown."""

    name: str
    delta: bool
    memory: MemoryRoute
    description: str
    full_history: bool = False


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("base", False, "none", "δ off"),
        Mode("delta", True, "none", "δ on"),
        Mode("delta+memory", True, "hidden", "δ on, retrieved snippets sent as attention_state"),
        Mode("base+memory-in-prompt", False, "prompt", "δ off, the same snippets pasted into the prompt"),
        Mode("base+full-history", False, "none", "δ off, the whole history in the prompt (ignores --history-window)",
             full_history=True),
    )
}
DEFAULT_MODES = ("base", "delta", "delta+memory", "base+memory-in-prompt")


def parse_modes(text: str) -> tuple[Mode, ...]:
    """Modes from a comma-separated list, in the order given, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if unknown or not names:
        raise EvalError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODES)}")
    return tuple(MODES[name] for name in dict.fromkeys(names))


@dataclass(frozen=True)
class RunSettings:
    """How the questions are asked; the same for every mode."""

    modes: tuple[Mode, ...]
    seed: int = 0
    max_tokens: int = 32
    memory_k: int = 4
    history_window: int | None = None

    def validate(self) -> None:
        """Raise EvalError naming the first setting that cannot work."""
        if self.max_tokens < 1:
            raise EvalError("--max-tokens must be at least 1")
        if self.memory_k < 1:
            raise EvalError("--memory-k must be at least 1")
        if self.history_window is not None and self.history_window < 0:
            raise EvalError("--history-window cannot be negative")
        if self.seed < 0:
            raise EvalError("--seed cannot be negative")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in the report."""
        return {
            "modes": [mode.name for mode in self.modes],
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "memory_k": self.memory_k,
            "history_window": self.history_window,
        }


@dataclass(frozen=True)
class TurnRecord:
    """One replayed history turn."""

    conversation: str
    mode: str
    reply: ChatReply


@dataclass(frozen=True)
class AnswerRecord:
    """One question asked in one mode: the memory offered, the answer and its scores."""

    conversation: str
    mode: str
    question: Question
    snippets: tuple[Snippet, ...]
    reply: ChatReply
    scores: dict[str, float]


@dataclass
class RunResult:
    """Everything a run produced, in the order it happened."""

    answers: list[AnswerRecord] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Record a warning once."""
        if message not in self.warnings:
            self.warnings.append(message)


def planned_requests(dataset: Dataset, settings: RunSettings) -> int:
    """How many chat requests a run will send (for a progress bar)."""
    per_mode = sum(len(turn_ends(c.history)) + len(c.questions) for c in dataset.conversations)
    return per_mode * len(settings.modes)


def run_eval(
    client: SidecarClient,
    dataset: Dataset,
    settings: RunSettings,
    retriever_for: Callable[[Conversation], Retriever],
    on_request: Callable[[], None] | None = None,
) -> RunResult:
    """Run every conversation in every mode; sessions are reset afterwards so nothing is left behind."""
    settings.validate()
    result = RunResult()
    run_id = secrets.token_hex(4)
    needs_memory = any(mode.memory != "none" for mode in settings.modes)
    _warm_up(client, f"delta-mem-eval:{run_id}:warm-up", settings)
    for conversation in dataset.conversations:
        memory = _retrieve(conversation, retriever_for(conversation), settings.memory_k, result) if needs_memory else {}
        for mode in settings.modes:
            session_key = f"delta-mem-eval:{run_id}:{conversation.id}:{mode.name}"
            try:
                _replay(client, conversation, mode, settings, session_key, result, on_request)
                _ask(client, conversation, mode, settings, session_key, memory, result, on_request)
            finally:
                with suppress(SidecarError):
                    client.reset_session(session_key)
    _check_headers(result, settings.modes)
    return result


def turn_ends(history: Sequence[Message]) -> list[int]:
    """Where OpenClaw would send a request: after each run of user messages."""
    return [
        i + 1
        for i, message in enumerate(history)
        if message.role == "user" and (i + 1 == len(history) or history[i + 1].role != "user")
    ]


def memory_note(snippets: Sequence[Snippet]) -> str:
    """Retrieved snippets as the text of a context message pasted into the prompt."""
    return "\n".join([MEMORY_NOTE, *(f"- {snippet.text}" for snippet in snippets)])


def _warm_up(client: SidecarClient, session_key: str, settings: RunSettings) -> None:
    # The first requests pay one-off costs (kernel compilation, allocations); keep them out of
    # the first mode's timings.
    try:
        for delta in sorted({mode.delta for mode in settings.modes}):
            client.chat([Message("user", "Hello.")], session_key, delta, REPLAY_TOKENS, settings.seed)
    finally:
        with suppress(SidecarError):
            client.reset_session(session_key)


def _shown(history: Sequence[Message], mode: Mode, settings: RunSettings) -> list[Message]:
    window = None if mode.full_history else settings.history_window
    if window is None:
        return list(history)
    return list(history[-window:]) if window else []


def _replay(
    client: SidecarClient,
    conversation: Conversation,
    mode: Mode,
    settings: RunSettings,
    session_key: str,
    result: RunResult,
    on_request: Callable[[], None] | None,
) -> None:
    system = Message("system", conversation.system)
    for end in turn_ends(conversation.history):
        prompt = [system, *_shown(conversation.history[:end], mode, settings)]
        reply = client.chat(prompt, session_key, mode.delta, REPLAY_TOKENS, settings.seed)
        result.turns.append(TurnRecord(conversation.id, mode.name, reply))
        if on_request:
            on_request()


def _ask(
    client: SidecarClient,
    conversation: Conversation,
    mode: Mode,
    settings: RunSettings,
    session_key: str,
    memory: dict[str, tuple[Snippet, ...]],
    result: RunResult,
    on_request: Callable[[], None] | None,
) -> None:
    context = [Message("system", conversation.system), *_shown(conversation.history, mode, settings)]
    transcript: list[Message] = []
    for question in conversation.questions:
        snippets = memory.get(question.id, ()) if mode.memory != "none" else ()
        asked = Message("user", question.text)
        pasted = [Message("user", memory_note(snippets))] if mode.memory == "prompt" and snippets else []
        hidden = (
            [{"text": s.text, "source": s.source, "score": s.score} for s in snippets]
            if mode.memory == "hidden" and snippets
            else None
        )
        prompt = [*context, *transcript, asked, *pasted]
        reply = client.chat(prompt, session_key, mode.delta, settings.max_tokens, settings.seed, hidden)
        transcript += [asked, Message("assistant", reply.text)]
        scores = score_answer(reply.text, question.answers, question.key_terms)
        result.answers.append(AnswerRecord(conversation.id, mode.name, question, snippets, reply, scores))
        if on_request:
            on_request()


def _retrieve(
    conversation: Conversation, retriever: Retriever, k: int, result: RunResult
) -> dict[str, tuple[Snippet, ...]]:
    found: dict[str, tuple[Snippet, ...]] = {}
    failures: list[str] = []
    for question in conversation.questions:
        retrieved = retriever.search(question.text, k)
        found[question.id] = retrieved.snippets
        if retrieved.problem:
            failures.append(retrieved.problem)
    if failures:
        result.warn(
            f"retrieval found nothing for {len(failures)} question(s) of {conversation.id}: {failures[0]}"
        )
    return found


def _check_headers(result: RunResult, modes: Sequence[Mode]) -> None:
    # The A/B is only worth reading if the sidecar did what each mode asked; say so where it did not.
    for mode in modes:
        replies = [t.reply for t in result.turns if t.mode == mode.name]
        replies += [a.reply for a in result.answers if a.mode == mode.name]
        expected = "delta" if mode.delta else "base"
        off = sum(1 for reply in replies if reply.served_mode != expected)
        if off:
            reason = " (the sidecar has no δ-mem adapter loaded)" if mode.delta else ""
            ran = len(replies) - off
            result.warn(f"'{mode.name}' ran as {expected!r} on only {ran} of {len(replies)} requests{reason}")
        added = sum(1 for reply in replies if reply.snippet_source == "qmd" and reply.snippet_count)
        if added and mode.memory != "hidden":
            result.warn(
                f"the sidecar added its own QMD memory to {added} '{mode.name}' request(s) "
                "(it runs with --attention-state-source qmd), so that mode is not memory-free"
            )
        if mode.memory == "hidden":
            cut = [a for a in result.answers if a.mode == mode.name and a.reply.snippet_count != len(a.snippets)]
            if cut:
                warning = cut[0].reply.headers.get("x-delta-attention-state-warning", "no reason given")
                result.warn(
                    f"the sidecar did not take every snippet sent on {len(cut)} '{mode.name}' question(s): {warning}"
                )
