"""Loaders for evaluation files the user already has: LoCoMo JSON and MemoryAgentBench rows.

LoCoMo (`locomo10.json`): a list of samples, each with `conversation` (`speaker_a`, `speaker_b`,
`session_<n>` turn lists of `{speaker, dia_id, text, blip_caption?}` and `session_<n>_date_time`)
and `qa` (`{question, answer, evidence, category}`; adversarial questions have no `answer`).
MemoryAgentBench: rows of `{context, questions, answers, metadata}` as JSON (a list, or an object
of split name -> list) or JSON lines; its Hub files are Parquet, which must be converted first.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

from installer.memory_eval.conversations import Conversation, Dataset, DatasetError, Question, safe_id
from installer.sidecar_client import Message, Role

DEFAULT_CHUNK_CHARS = 4000

# LoCoMo's category ids, as its own evaluation code names them.
LOCOMO_CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}

_SESSION_KEY = re.compile(r"session_(\d+)")

LOCOMO_SYSTEM = (
    "This is a long chat between {a} (the user) and {b} (you), held over several sessions on different "
    "dates. When asked a question about it, answer with only the answer, in a few words."
)
MAB_SYSTEM = (
    "The user gives you a long text in parts and then asks questions about it. "
    "Answer each question with only the answer, as briefly as possible."
)
MAB_CHUNK_PROMPT = "Part {n} of the text to remember:\n\n{chunk}"
MAB_ACK = "I have read part {n}."


def load_locomo(path: Path) -> Dataset:
    """Read a LoCoMo-format JSON file: one conversation per sample, questions without an answer skipped."""
    data = _read_json(path)
    samples = data if isinstance(data, list) else [data]
    conversations: list[Conversation] = []
    skipped = 0
    for index, sample in enumerate(samples):
        where = f"{path}: sample {index}"
        if not isinstance(sample, dict) or not isinstance(sample.get("conversation"), dict):
            raise DatasetError(f"{where} has no 'conversation' object; is this a LoCoMo file?")
        conversation_id = safe_id(str(sample.get("sample_id", f"locomo-{index + 1}")))
        history, system = _locomo_history(sample["conversation"], where)
        questions: list[Question] = []
        for number, qa in enumerate(_list(sample.get("qa", []), f"{where}: 'qa'")):
            if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                raise DatasetError(f"{where}: qa {number} has no 'question' text")
            if qa.get("answer") is None:
                skipped += 1  # adversarial questions carry only a wrong `adversarial_answer`
                continue
            category = qa.get("category")
            kind = LOCOMO_CATEGORIES.get(category, f"category-{category}") if category is not None else "locomo"
            questions.append(Question(f"{conversation_id}-q{number + 1}", qa["question"], (str(qa["answer"]),), kind))
        conversations.append(Conversation(conversation_id, system, history, tuple(questions)))
    return Dataset("locomo", tuple(conversations), source=str(path), skipped_questions=skipped)


def load_memory_agent_bench(path: Path, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Dataset:
    """Read MemoryAgentBench rows: the context is told in parts of at most `chunk_chars`, then the questions."""
    if chunk_chars < 200:
        raise DatasetError("--chunk-chars must be at least 200")
    conversations: list[Conversation] = []
    for index, (split, row) in enumerate(_mab_rows(path)):
        where = f"{path}: row {index}"
        if not isinstance(row, dict) or not isinstance(row.get("context"), str):
            raise DatasetError(f"{where} has no 'context' text; is this a MemoryAgentBench file?")
        questions = _list(row.get("questions"), f"{where}: 'questions'")
        answers = _list(row.get("answers"), f"{where}: 'answers'")
        if len(questions) != len(answers):
            raise DatasetError(f"{where} has {len(questions)} questions but {len(answers)} answer lists")
        metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        source = metadata.get("source") if isinstance(metadata.get("source"), str) else None
        conversation_id = safe_id(f"{source or split or 'mab'}-{index + 1}")
        kinds = _per_question(metadata.get("question_types"), len(questions))
        ids = _per_question(metadata.get("question_ids"), len(questions))
        history: list[Message] = []
        for n, chunk in enumerate(chunk_text(row["context"], chunk_chars), start=1):
            history.append(Message("user", MAB_CHUNK_PROMPT.format(n=n, chunk=chunk)))
            history.append(Message("assistant", MAB_ACK.format(n=n)))
        parsed: list[Question] = []
        for k, (text, gold) in enumerate(zip(questions, answers, strict=True)):
            golds = tuple(str(a) for a in gold) if isinstance(gold, list) else (str(gold),)
            if not isinstance(text, str) or not golds:
                raise DatasetError(f"{where}: question {k} needs text and at least one answer")
            question_id = f"{conversation_id}-{safe_id(ids[k])}" if ids[k] else f"{conversation_id}-q{k + 1}"
            parsed.append(Question(question_id, text, golds, kinds[k] or source or split or "memoryagentbench"))
        conversations.append(Conversation(conversation_id, MAB_SYSTEM, tuple(history), tuple(parsed)))
    return Dataset("memoryagentbench", tuple(conversations), source=str(path), params={"chunk_chars": chunk_chars})


def chunk_text(text: str, limit: int) -> list[str]:
    """Split text into parts of at most `limit` characters, at line breaks where possible."""
    parts: list[str] = []
    current = ""
    for line in text.splitlines():
        pieces = textwrap.wrap(line, limit, replace_whitespace=False) if len(line) > limit else [line]
        for piece in pieces:
            if current and len(current) + 1 + len(piece) > limit:
                parts.append(current)
                current = ""
            current = f"{current}\n{piece}" if current else piece
    if current.strip():
        parts.append(current)
    return [part for part in parts if part.strip()]


def _locomo_history(conversation: dict[str, Any], where: str) -> tuple[tuple[Message, ...], str]:
    speaker_a, speaker_b = conversation.get("speaker_a"), conversation.get("speaker_b")
    if not isinstance(speaker_a, str) or not isinstance(speaker_b, str):
        raise DatasetError(f"{where}: the conversation needs 'speaker_a' and 'speaker_b' names")
    sessions = sorted(
        (int(match.group(1)), key)
        for key in conversation
        if (match := _SESSION_KEY.fullmatch(key)) and isinstance(conversation[key], list)
    )
    if not sessions:
        raise DatasetError(f"{where}: the conversation has no 'session_<n>' turn lists")
    history: list[Message] = []
    for number, key in sessions:
        date = conversation.get(f"{key}_date_time")
        for position, turn in enumerate(conversation[key]):
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
                raise DatasetError(f"{where}: {key} turn {position} has no 'text'")
            speaker = str(turn.get("speaker", speaker_a))
            text = f"{speaker}: {turn['text']}"
            if isinstance(turn.get("blip_caption"), str):
                text += f" [shares a photo: {turn['blip_caption']}]"
            if position == 0:
                text = f"[Session {number}{f', {date}' if date else ''}] {text}"
            role: Role = "assistant" if speaker == speaker_b else "user"
            history.append(Message(role, text))
    return tuple(history), LOCOMO_SYSTEM.format(a=speaker_a, b=speaker_b)


def _mab_rows(path: Path) -> list[tuple[str | None, Any]]:
    if path.suffix.lower() == ".parquet":
        raise DatasetError(
            f"{path} is Parquet; convert it to JSON lines first, e.g. python -c \"import pandas; "
            f"pandas.read_parquet('{path}').to_json('rows.jsonl', orient='records', lines=True)\""
        )
    if path.suffix.lower() == ".jsonl":
        rows: list[tuple[str | None, Any]] = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((None, json.loads(line)))
                except ValueError as exc:
                    raise DatasetError(f"{path}: line {number} is not JSON ({exc})") from None
        return rows
    data = _read_json(path)
    if isinstance(data, list):
        return [(None, row) for row in data]
    if isinstance(data, dict) and "context" in data:
        return [(None, data)]
    if isinstance(data, dict) and all(isinstance(rows, list) for rows in data.values()):
        return [(split, row) for split, rows in data.items() for row in rows]
    raise DatasetError(f"{path}: expected a list of rows, one row, or an object of split name -> rows")


def _per_question(values: Any, count: int) -> list[str | None]:
    # Metadata lists are optional and sometimes shorter than the questions; use them only when they fit.
    if isinstance(values, list) and len(values) == count:
        return [str(v) if v is not None else None for v in values]
    return [None] * count


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DatasetError(f"{where} must be a list")
    return value


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except ValueError as exc:
        raise DatasetError(f"{path} is not JSON ({exc})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} cannot be read ({exc})") from None
