"""The memory A/B harness: scoring and datasets by hand, then the whole run against a real tiny-model sidecar.

Scores on random weights are noise; what is checked is the plumbing: each mode sends what it
claims and the sidecar reports it back, runs repeat exactly, the report has its shape.
"""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import KEY, MODEL, Server, start_server, stop_server
from typer.testing import CliRunner

from common.settings import QmdSettings
from installer.cli import app
from installer.memory_eval.builtin_suite import MAX_FACTS, SuiteSize, builtin_suite
from installer.memory_eval.chart import chart_figure, write_chart
from installer.memory_eval.conversations import (
    Conversation,
    Dataset,
    DatasetError,
    Question,
)
from installer.memory_eval.datasets import load_dataset
from installer.memory_eval.file_formats import (
    chunk_text,
    load_locomo,
    load_memory_agent_bench,
)
from installer.memory_eval.report import build_report, markdown_report, write_reports
from installer.memory_eval.retrieval import LexicalRetriever, QmdRetriever
from installer.memory_eval.runner import (
    MEMORY_NOTE,
    MODES,
    AnswerRecord,
    EvalError,
    RunResult,
    RunSettings,
    parse_modes,
    planned_requests,
    run_eval,
    turn_ends,
)
from installer.memory_eval.scoring import (
    Interval,
    bootstrap_difference,
    bootstrap_mean,
    exact_match,
    key_term_recall,
    score_answer,
    token_f1,
)
from installer.sidecar_client import ChatReply, Message, SidecarClient

ALL_MODES = tuple(MODES.values())
SMALL = SuiteSize(conversations=2, facts=4, distractors=1, sessions=2)


# --------------------------------------------------------------------------- scoring


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The Window.", ["window"]) == 1.0
    assert exact_match("  a  green-tea! ", ["green tea"]) == 1.0
    assert exact_match("window seat", ["window"]) == 0.0
    assert exact_match("aisle", ["window", "Aisle"]) == 1.0


def test_token_f1_is_the_best_overlap_over_gold_answers() -> None:
    # "my cat is miso" vs "miso": 1 common word, precision 1/4, recall 1 -> F1 = 0.4.
    assert token_f1("My cat is Miso", ["Miso"]) == pytest.approx(0.4)
    assert token_f1("nothing here", ["Miso"]) == 0.0
    assert token_f1("black coffee", ["green tea", "black coffee"]) == 1.0
    assert token_f1("", ["Miso"]) == 0.0


def test_key_term_recall_matches_whole_words_and_phrases() -> None:
    assert key_term_recall("I drink green tea daily", ["green tea", "coffee"]) == 0.5
    assert key_term_recall("greenish tea", ["green tea"]) == 0.0
    assert key_term_recall("Lisbon!", ["lisbon"]) == 1.0
    assert key_term_recall("anything", []) == 0.0


def test_score_answer_uses_the_gold_words_when_there_are_no_key_terms() -> None:
    scores = score_answer("She went on 7 May", ["7 May 2023"])
    assert scores["exact_match"] == 0.0
    assert scores["key_term_recall"] == pytest.approx(2 / 3)  # "7" and "may" of 7, may, 2023
    assert score_answer("Porto", ["Lisbon"], key_terms=("Porto",))["key_term_recall"] == 1.0


def test_bootstrap_intervals_on_hand_made_cases() -> None:
    same = bootstrap_difference([1.0, 0.0, 1.0], [1.0, 0.0, 1.0], seed=0, resamples=200)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    constant = bootstrap_difference([1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], seed=0, resamples=200)
    assert (constant.mean, constant.low, constant.high) == (0.5, 0.5, 0.5)
    mixed_a, mixed_b = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], [0.0] * 8
    interval = bootstrap_difference(mixed_a, mixed_b, seed=7, resamples=500)
    assert interval.mean == pytest.approx(5 / 8)
    assert 0.0 <= interval.low < interval.mean < interval.high <= 1.0
    assert bootstrap_difference(mixed_a, mixed_b, seed=7, resamples=500) == interval
    assert bootstrap_mean(mixed_a, seed=7, resamples=500) == interval  # minus a zero baseline: the same draws
    assert bootstrap_mean([0.25] * 5, seed=0, resamples=100) == Interval(0.25, 0.25, 0.25)
    with pytest.raises(ValueError):
        bootstrap_difference([1.0], [1.0, 0.0], seed=0)
    with pytest.raises(ValueError):
        bootstrap_mean([], seed=0)


# --------------------------------------------------------------------------- datasets


def test_builtin_suite_is_deterministic_and_answerable_from_its_history() -> None:
    size = SuiteSize(conversations=3, facts=8, distractors=2, sessions=3)
    first, again, other = builtin_suite(size, seed=1), builtin_suite(size, seed=1), builtin_suite(size, seed=2)
    assert first == again and first != other
    assert len(first.conversations) == 3 and first.question_count == 24
    for conversation in first.conversations:
        said = [m.content for m in conversation.history if m.role == "user"]
        assert len(said) == (8 + 4) * 3  # 8 facts told, 2 corrected and 2 second halves; each + 2 fillers
        assert sum(text.startswith("[Session ") for text in said) == 3
        assert [m.role for m in conversation.history[:2]] == ["user", "assistant"]
        kinds = sorted(q.kind for q in conversation.questions)
        assert kinds == sorted(["fact", "correction", "preference", "multi-hop"] * 2)
        for question in conversation.questions:
            answer = question.answers[0]
            told = [i for i, text in enumerate(said) if answer in text]
            assert told, f"{answer!r} is never told"
            if question.kind == "correction":
                # The corrected value comes in a later message that also names the old one.
                correction = said[told[-1]]
                assert any(word in correction for word in ("correction", "moved", "changed", "sold", "gave up",
                                                           "wrong", "doctor", "stopped"))


def test_builtin_suite_sizes_are_checked() -> None:
    with pytest.raises(DatasetError, match="--facts"):
        builtin_suite(SuiteSize(facts=MAX_FACTS + 1), 0)
    with pytest.raises(DatasetError, match="--conversations"):
        builtin_suite(SuiteSize(conversations=0), 0)
    with pytest.raises(DatasetError, match="builtin, locomo:PATH or mab:PATH"):
        load_dataset("squad:x.json", SuiteSize(), 0)


def locomo_sample(sample_id: str = "conv-test") -> dict[str, Any]:
    """A LoCoMo-format sample: two sessions, a photo turn, four kinds of question (one adversarial)."""
    return {
        "sample_id": sample_id,
        "conversation": {
            "speaker_a": "Caroline",
            "speaker_b": "Melanie",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Caroline", "dia_id": "D1:1", "text": "I went to a support group yesterday."},
                {"speaker": "Melanie", "dia_id": "D1:2", "text": "That sounds great! I painted a lake."},
                {"speaker": "Caroline", "dia_id": "D1:3", "text": "I want to study counseling.",
                 "img_url": ["https://example.invalid/x.jpg"], "blip_caption": "a photo of a book"},
            ],
            "session_2_date_time": "1:14 pm on 25 May, 2023",
            "session_2": [
                {"speaker": "Melanie", "dia_id": "D2:1", "text": "I ran a charity race on Saturday."},
                {"speaker": "Caroline", "dia_id": "D2:2", "text": "Well done, Melanie!"},
            ],
        },
        "qa": [
            {"question": "What did Caroline want to study?", "answer": "counseling", "evidence": ["D1:3"],
             "category": 4},
            {"question": "When did Caroline go to the support group?", "answer": "7 May 2023", "evidence": ["D1:1"],
             "category": 2},
            {"question": "What did Melanie paint?", "answer": "a lake", "evidence": ["D1:2"], "category": 1},
            {"question": "What did Melanie study?", "adversarial_answer": "counseling", "evidence": [], "category": 5},
        ],
        "event_summary": {},
        "observation": {},
        "session_summary": {},
    }


def test_locomo_file_is_read_as_turns_with_dates_and_typed_questions(tmp_path: Path) -> None:
    path = tmp_path / "locomo.json"
    path.write_text(json.dumps([locomo_sample()]), encoding="utf-8")
    dataset = load_locomo(path)
    assert dataset.name == "locomo" and dataset.skipped_questions == 1
    (conversation,) = dataset.conversations
    assert conversation.id == "conv-test"
    assert [m.role for m in conversation.history] == ["user", "assistant", "user", "assistant", "user"]
    assert conversation.history[0].content == (
        "[Session 1, 1:56 pm on 8 May, 2023] Caroline: I went to a support group yesterday."
    )
    assert conversation.history[2].content.endswith("[shares a photo: a photo of a book]")
    assert conversation.history[3].content.startswith("[Session 2, 1:14 pm on 25 May, 2023] Melanie:")
    assert "Caroline (the user) and Melanie (you)" in conversation.system
    assert [(q.kind, q.answers) for q in conversation.questions] == [
        ("single-hop", ("counseling",)), ("temporal", ("7 May 2023",)), ("multi-hop", ("a lake",))
    ]
    path.write_text(json.dumps([{"qa": []}]), encoding="utf-8")
    with pytest.raises(DatasetError, match="no 'conversation' object"):
        load_locomo(path)


def mab_row(context: str, source: str = "ruler_qa") -> dict[str, Any]:
    return {
        "context": context,
        "questions": ["Who founded the lighthouse?", "Which colour is the door?"],
        "answers": [["Ada Stone", "Ada"], ["red"]],
        "metadata": {"source": source, "question_types": ["single", "detail"], "question_ids": ["a1", None]},
    }


MAB_CONTEXT = (
    "The lighthouse on the north cape was founded by Ada Stone in 1881.\n\n"
    "Its keeper's house has a red door and a small garden.\n"
    "Fishing boats from three villages steer by its light.\n"
    "Ships pass it every night on the way to the harbour."
)


def test_memory_agent_bench_rows_in_json_lines_and_by_split(tmp_path: Path) -> None:
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps(mab_row(MAB_CONTEXT)) + "\n\n", encoding="utf-8")
    dataset = load_memory_agent_bench(jsonl, chunk_chars=200)
    (conversation,) = dataset.conversations
    assert conversation.id == "ruler_qa-1"
    parts = [m.content for m in conversation.history if m.role == "user"]
    assert len(parts) == 2 and parts[0].startswith("Part 1 of the text to remember:")
    assert "Ada Stone" in parts[0] and "harbour" in parts[1]
    assert [(q.id, q.kind, q.answers) for q in conversation.questions] == [
        ("ruler_qa-1-a1", "single", ("Ada Stone", "Ada")), ("ruler_qa-1-q2", "detail", ("red",))
    ]
    by_split = tmp_path / "splits.json"
    row = mab_row(MAB_CONTEXT)
    del row["metadata"]
    by_split.write_text(json.dumps({"Accurate_Retrieval": [row], "Conflict_Resolution": [row]}), encoding="utf-8")
    split_set = load_memory_agent_bench(by_split)
    assert [c.id for c in split_set.conversations] == ["Accurate_Retrieval-1", "Conflict_Resolution-2"]
    assert {q.kind for q in split_set.conversations[1].questions} == {"Conflict_Resolution"}


def test_memory_agent_bench_bad_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="Parquet; convert it to JSON lines"):
        load_memory_agent_bench(tmp_path / "Accurate_Retrieval.parquet")
    broken = tmp_path / "broken.json"
    row = mab_row(MAB_CONTEXT)
    row["answers"] = [["only one"]]
    broken.write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(DatasetError, match="2 questions but 1 answer lists"):
        load_memory_agent_bench(broken)
    with pytest.raises(DatasetError, match="does not exist"):
        load_memory_agent_bench(tmp_path / "missing.jsonl")


def test_chunk_text_keeps_every_word_and_the_limit() -> None:
    text = "\n".join(["short line"] * 30 + ["x" * 50 + " " + "y" * 700])
    chunks = chunk_text(text, 250)
    assert all(len(chunk) <= 250 for chunk in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


# --------------------------------------------------------------------------- retrieval


def small_conversation() -> Conversation:
    history = (
        Message("user", "My cousin lives in Porto."),
        Message("assistant", "Noted."),
        Message("user", "I live in Lisbon."),
        Message("assistant", "Noted."),
        Message("user", "The weather was grey today."),
        Message("user", "My cousin lives in Porto."),  # a repeat: retrieved once
    )
    return Conversation("c1", "system", history, (Question("c1-q1", "Which city do I live in?", ("Lisbon",), "fact"),))


def test_lexical_retriever_ranks_by_bm25_and_leaves_out_non_matches() -> None:
    retriever = LexicalRetriever(small_conversation())
    found = retriever.search("Where do I live? Which city?", k=4)
    assert [s.source for s in found.snippets] == ["c1#2", "c1#0"]  # the shorter message first
    assert found.snippets[0].score >= found.snippets[1].score > 0
    assert [s.text for s in retriever.search("Lisbon", k=1).snippets] == ["I live in Lisbon."]
    assert retriever.search("bananas", k=3).snippets == ()


def test_qmd_retriever_names_the_collection_per_conversation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "argv.jsonl"
    script = tmp_path / "qmd"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print(json.dumps([{'docid': '#1', 'score': 0.5, 'file': 'qmd://eval-c1/conversation.md', 'line': 3,"
        " 'title': 'c1', 'snippet': '@@ -2,3 @@ (1 before, 0 after)\\nI live in Lisbon.'}]))\n",
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    settings = QmdSettings(bin=str(script), mode="search", collection="eval-{conversation}")
    found = QmdRetriever(settings, small_conversation()).search("Which city do I live in?", k=2)
    assert [(s.text, s.source, s.score) for s in found.snippets] == [
        ("I live in Lisbon.", "qmd://eval-c1/conversation.md", 0.5)
    ]
    argv = json.loads(log.read_text())
    assert argv == ["search", "--json", "-n", "2", "-c", "eval-c1", "--", "Which city do I live in?"]
    missing = QmdRetriever(QmdSettings(bin=str(tmp_path / "no-qmd")), small_conversation()).search("x", k=2)
    assert missing.snippets == () and missing.problem and "not found" in missing.problem


# --------------------------------------------------------------------------- runner without a server


@dataclass
class ScriptedClient:
    """Stands in for SidecarClient: answers every request the same way, with chosen headers."""

    served_mode: str
    snippet_source: str = "none"
    snippet_count: int = 0

    def chat(self, messages: Sequence[Message], session_key: str, delta: bool, max_tokens: int, seed: int,
             attention_state: list[dict[str, Any]] | None = None) -> ChatReply:
        count = len(attention_state) if attention_state else self.snippet_count
        source = "request" if attention_state else self.snippet_source
        headers = {"x-delta-mode": self.served_mode, "x-delta-attention-state-count": str(count),
                   "x-delta-attention-state-source": source}
        return ChatReply("Lisbon", 0.01, 0.02, 10, 1, 0, "stop", headers)

    def reset_session(self, session_key: str) -> None:
        pass


def test_runner_warns_when_the_sidecar_did_not_do_what_a_mode_asked() -> None:
    dataset = Dataset("t", (small_conversation(),))
    settings = RunSettings(parse_modes("base,delta,delta+memory"))
    plain = run_eval(ScriptedClient("base"), dataset, settings, LexicalRetriever)  # type: ignore[arg-type]
    assert any("'delta' ran as 'delta' on only 0 of 4 requests" in w for w in plain.warnings)
    assert any("no δ-mem adapter" in w for w in plain.warnings)
    assert not any("'base'" in w for w in plain.warnings)
    qmd_client = ScriptedClient("delta", "qmd", 2)
    qmd = run_eval(qmd_client, dataset, RunSettings(parse_modes("delta")), LexicalRetriever)  # type: ignore[arg-type]
    assert any("added its own QMD memory to 4 'delta' request(s)" in w for w in qmd.warnings)


def test_modes_and_settings_are_checked() -> None:
    assert [m.name for m in parse_modes("delta, base,delta")] == ["delta", "base"]
    with pytest.raises(EvalError, match="unknown mode.*delta-plus"):
        parse_modes("base,delta-plus")
    with pytest.raises(EvalError, match="--history-window"):
        RunSettings(ALL_MODES, history_window=-1).validate()
    history = [Message("user", "a"), Message("user", "b"), Message("assistant", "c"), Message("user", "d")]
    assert turn_ends(history) == [2, 4]


# --------------------------------------------------------------------------- against a real sidecar


@dataclass
class Call:
    messages: list[Message]
    session_key: str
    delta: bool
    max_tokens: int
    attention_state: list[dict[str, Any]] | None
    reply: ChatReply


class RecordingClient(SidecarClient):
    """The real client, keeping every request it sent and the reply."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[Call] = []
        self.resets: list[str] = []
        self.progress_ticks = 0

    def tick(self) -> None:
        self.progress_ticks += 1

    def chat(self, messages: Sequence[Message], session_key: str, delta: bool, max_tokens: int, seed: int,
             attention_state: list[dict[str, Any]] | None = None) -> ChatReply:
        reply = super().chat(messages, session_key, delta, max_tokens, seed, attention_state)
        self.calls.append(Call(list(messages), session_key, delta, max_tokens, attention_state, reply))
        return reply

    def reset_session(self, session_key: str) -> None:
        super().reset_session(session_key)
        self.resets.append(session_key)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("eval"))
    yield running
    if running.process.poll() is None:
        stop_server(running)


WINDOW = 4
RUN = RunSettings(ALL_MODES, seed=3, max_tokens=6, memory_k=2, history_window=WINDOW)


@pytest.fixture(scope="module")
def runs(server: Server) -> tuple[tuple[RecordingClient, RunResult], tuple[RecordingClient, RunResult]]:
    """The built-in suite in every mode, run twice."""
    dataset = builtin_suite(SMALL, seed=5)
    out = []
    for _ in range(2):
        client = RecordingClient(server.base_url, KEY, MODEL)
        out.append((client, run_eval(client, dataset, RUN, LexicalRetriever, on_request=client.tick)))
    return out[0], out[1]


def test_two_runs_send_the_same_prompts_and_get_the_same_answers(runs: Any) -> None:
    (first_client, first), (second_client, second) = runs

    def answers(result: RunResult) -> list[tuple[str, str, str, str, dict[str, float]]]:
        return [(a.conversation, a.mode, a.question.id, a.reply.text, a.scores) for a in result.answers]

    assert answers(first) == answers(second)
    assert len(first.answers) == SMALL.conversations * SMALL.facts * len(ALL_MODES)
    assert [c.messages for c in first_client.calls] == [c.messages for c in second_client.calls]
    assert [c.reply.prompt_tokens for c in first_client.calls] == [c.reply.prompt_tokens for c in second_client.calls]
    assert {c.session_key for c in first_client.calls}.isdisjoint({c.session_key for c in second_client.calls})
    assert first.warnings == []


def test_each_mode_sends_what_it_claims_and_the_sidecar_reports_it_back(runs: Any) -> None:
    (client, result), _ = runs
    dataset = builtin_suite(SMALL, seed=5)
    # One warm-up request per δ setting, then every planned request.
    assert len(client.calls) == 2 + planned_requests(dataset, RUN)
    assert client.progress_ticks == planned_requests(dataset, RUN)
    memory_checked = 0
    for call in client.calls:
        mode = MODES[call.session_key.rsplit(":", 1)[1]] if not call.session_key.endswith("warm-up") else None
        if mode is None:
            continue
        assert call.delta == mode.delta
        assert call.reply.served_mode == ("delta" if mode.delta else "base")
        last = call.messages[-1].content
        is_question = call.max_tokens == RUN.max_tokens
        if mode.memory == "hidden" and is_question and call.attention_state:
            assert call.reply.snippet_count == len(call.attention_state) <= RUN.memory_k
            assert call.reply.snippet_source == "request"
            assert MEMORY_NOTE not in last
            memory_checked += 1
        elif mode.memory == "prompt" and is_question and last.startswith(MEMORY_NOTE):
            assert call.attention_state is None and call.reply.snippet_count == 0
            assert call.messages[-2].role == "user"  # the question, then the context message
            memory_checked += 1
        else:
            assert call.attention_state is None and MEMORY_NOTE not in last
            assert call.reply.snippet_count == 0 and call.reply.snippet_source == "none"
    assert memory_checked >= SMALL.conversations * SMALL.facts  # most questions find some memory
    for answer in result.answers:
        if answer.mode in ("delta+memory", "base+memory-in-prompt") and answer.snippets:
            call = next(c for c in client.calls if c.reply is answer.reply)
            sent = [s["text"] for s in call.attention_state or []] or call.messages[-1].content.split("\n")[1:]
            assert [s.removeprefix("- ") for s in sent] == [s.text for s in answer.snippets]


def test_history_window_and_full_history_shape_the_prompt(runs: Any) -> None:
    (client, _), _ = runs
    conversation = builtin_suite(SMALL, seed=5).conversations[0]
    first_question = conversation.questions[0].text

    def question_prompt(mode: str) -> list[Message]:
        return next(c.messages for c in client.calls
                    if c.session_key.endswith(f"{conversation.id}:{mode}") and c.messages[-1].content == first_question)

    replayed = [c.messages for c in client.calls if c.session_key.endswith(f"{conversation.id}:base")
                and c.max_tokens == 1]
    assert [len(prompt) - 1 for prompt in replayed[:3]] == [1, 3, WINDOW]  # the system prompt, then the window
    assert replayed[1][1:] == list(conversation.history[:3])
    windowed, full = question_prompt("base"), question_prompt("base+full-history")
    assert windowed[0] == Message("system", conversation.system)
    assert windowed[1:] == [*conversation.history[-WINDOW:], Message("user", first_question)]
    assert full[1:] == [*conversation.history, Message("user", first_question)]
    # Later questions keep the earlier questions and the model's answers, as a chat would.
    last = next(c for c in reversed(client.calls) if c.session_key.endswith(f"{conversation.id}:delta"))
    asked = [m.content for m in last.messages if m.content in {q.text for q in conversation.questions}]
    assert asked == [q.text for q in conversation.questions]


def test_sessions_are_unique_per_conversation_and_mode_and_reset_afterwards(server: Server, runs: Any) -> None:
    (client, _), _ = runs
    used = {c.session_key for c in client.calls}
    assert len(used) == SMALL.conversations * len(ALL_MODES) + 1  # + the warm-up session
    assert used == set(client.resets)
    for key in sorted(used)[:3]:
        answer = httpx.get(f"{server.base_url}/v1/session",
                           headers={"Authorization": f"Bearer {KEY}", "X-OpenClaw-Session-Key": key})
        assert answer.status_code == 404


def test_report_json_markdown_and_chart_skip(runs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (_, result), _ = runs
    dataset = builtin_suite(SMALL, seed=5)
    server_info = {"url": "http://127.0.0.1:1", "model": MODEL, "adapter": {"variant": "TSW", "rank": 8, "layers": 2}}
    report = build_report(dataset, RUN, result, server_info, "lexical")
    assert set(report) == {"format", "created", "server", "dataset", "settings", "modes", "comparisons", "warnings",
                           "answers"}
    assert list(report["modes"]) == [m.name for m in ALL_MODES]
    for name, mode in report["modes"].items():
        assert mode["questions"] == SMALL.conversations * SMALL.facts
        assert set(mode["scores"]) == {"exact_match", "token_f1", "key_term_recall"}
        assert set(mode["by_kind"]) == {"fact", "correction", "preference", "multi-hop"}
        assert mode["served_as"] == {("delta" if MODES[name].delta else "base"): mode["tokens"]["requests"]}
        assert mode["latency_s"]["question_ttft_mean"] <= mode["latency_s"]["question_total_mean"]
        assert mode["tokens"]["cached"] > 0  # turn-by-turn replay reuses the session's cache
    assert report["modes"]["delta+memory"]["memory_snippets"]["taken_by_sidecar"] > 0
    pairs = {(c["mode"], c["baseline"], c["metric"]) for c in report["comparisons"]}
    assert ("delta", "base", "token_f1") in pairs and ("delta+memory", "base+memory-in-prompt", "exact_match") in pairs
    assert all(c["ci95_low"] <= c["difference"] <= c["ci95_high"] for c in report["comparisons"])
    for mode in report["modes"].values():
        for metric, (low, high) in mode["scores_ci95"].items():
            assert 0.0 <= low <= mode["scores"][metric] <= high <= 1.0
    assert len(report["answers"]) == len(result.answers)
    markdown = markdown_report(report)
    assert "| mode | what it is | EM | F1 |" in markdown and "TSW, rank 8, 2 layers" in markdown
    assert all(f"| `{m.name}` |" in markdown for m in ALL_MODES)
    assert "| multi-hop |" in markdown and "`delta` − `base`" in markdown
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when the 'plot' extra is not installed
    files = write_reports(report, tmp_path)
    assert json.loads(files.json.read_text(encoding="utf-8"))["answers"] == report["answers"]
    assert files.markdown.read_text(encoding="utf-8") == markdown
    assert files.chart is None and not (tmp_path / "report.png").exists()
    assert files.chart_skipped is not None and "matplotlib is not installed" in files.chart_skipped


def test_chart_is_a_png(runs: Any, tmp_path: Path) -> None:
    (_, result), _ = runs
    report = build_report(builtin_suite(SMALL, seed=5), RUN, result, {"model": MODEL}, "lexical")
    assert write_chart(report, tmp_path / "chart.png") is None
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def close_modes() -> tuple[Dataset, RunSettings, RunResult]:
    """Four modes with nearly the same answer times, two with the same scores, two at either end of the scale."""
    questions = tuple(Question(f"q{i}", f"Question {i}?", ("yes",), "fact") for i in range(8))
    settings = RunSettings(parse_modes("base,delta,delta+memory,base+memory-in-prompt"))
    result = RunResult()
    for shift, mode in enumerate(settings.modes):
        for i, question in enumerate(questions):
            f1 = {"delta+memory": 1.0, "base+memory-in-prompt": 0.0}.get(mode.name, [0.5, 0.0, 1.0, 0.5][i % 4])
            reply = ChatReply("yes", 0.040 + 0.001 * shift, 0.100 + 0.001 * shift, 10, 1, 0, "stop", {})
            scores = {"exact_match": float(f1 == 1.0), "token_f1": f1, "key_term_recall": f1}
            result.answers.append(AnswerRecord("c1", mode.name, question, (), reply, scores))
    return Dataset("close", (Conversation("c1", "system", (), questions),)), settings, result


def test_chart_gives_each_mode_a_row_with_its_interval_and_keeps_every_label_apart() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dataset, settings, result = close_modes()
    report = build_report(dataset, settings, result, {"model": MODEL}, "lexical")
    figure = chart_figure(report)
    scores, times, differences = figure.axes
    assert [label.get_text() for label in scores.get_yticklabels()] == list(report["modes"])
    for row, mode in enumerate(report["modes"].values()):
        (segment,) = scores.containers[row].lines[2][0].get_segments()  # the interval's horizontal bar
        assert segment[:, 0].tolist() == pytest.approx(mode["scores_ci95"]["token_f1"])
        assert segment[:, 1].tolist() == [row, row]
        assert times.patches[2 * row].get_width() == mode["latency_s"]["question_total_mean"]
    compared = [c for c in report["comparisons"] if c["metric"] == "token_f1"]
    assert [label.get_text() for label in differences.get_yticklabels()] == [
        f"{c['mode']} − {c['baseline']}" for c in compared
    ]
    for row, c in enumerate(compared):
        (segment,) = differences.containers[row].lines[2][0].get_segments()
        assert segment[:, 0].tolist() == pytest.approx([c["ci95_low"], c["ci95_high"]])
    # Every label, value and legend entry is drawn where no other one is.
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for axes in figure.axes for t in [*axes.get_yticklabels(), *axes.texts] if t.get_text()]
    texts += [t for axes in figure.axes if axes.get_legend() for t in axes.get_legend().get_texts()]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    overlapping = [(a, b) for i, (a, box) in enumerate(boxes) for b, other in boxes[i + 1 :] if box.overlaps(other)]
    assert len(boxes) >= 2 * len(report["modes"]) + 2 * len(compared)
    assert overlapping == []
    for axes in figure.axes:  # values stay inside their panel, also at either end of the scale
        panel, labels = axes.get_window_extent(renderer), [(t, t.get_window_extent(renderer)) for t in axes.texts]
        assert [t.get_text() for t, box in labels if not panel.x0 <= box.x0 < box.x1 <= panel.x1] == []


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["eval", *args])


@pytest.mark.parametrize("matplotlib", ["installed", "missing"])
def test_cli_runs_a_locomo_file_and_writes_the_report(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matplotlib: str
) -> None:
    if matplotlib == "missing":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when the 'plot' extra is not installed
    path = tmp_path / "locomo10.json"
    path.write_text(json.dumps([locomo_sample("conv-1"), locomo_sample("conv-2")]), encoding="utf-8")
    out = tmp_path / "out"
    result = invoke("--url", server.base_url, "--api-key", KEY, "--dataset", f"locomo:{path}", "--limit", "1",
                    "--modes", "base,delta,delta+memory", "--max-tokens", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "| `delta+memory` |" in result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["dataset"]["name"] == "locomo" and report["dataset"]["conversations"] == 1
    assert report["dataset"]["skipped_questions"] == 2  # one adversarial question per sample
    assert report["server"]["model"] == MODEL and report["server"]["adapter"]["variant"] == "TSW"
    assert {a["kind"] for a in report["answers"]} == {"single-hop", "temporal", "multi-hop"}
    assert (out / "report.md").exists()
    if matplotlib == "installed":
        assert f"and {out / 'report.png'}" in result.output and "skipped" not in result.output
        assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    else:
        assert "report.png skipped: matplotlib is not installed (pip install" in result.output
        assert not (out / "report.png").exists()
    assert "Caroline: I went to a support group" in (out / "history" / "conv-1" / "conversation.md").read_text()


def test_cli_runs_a_memory_agent_bench_file(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(mab_row(MAB_CONTEXT)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = invoke("--url", server.base_url, "--api-key", KEY, "--dataset", f"mab:{path}", "--chunk-chars", "200",
                    "--modes", "base,base+memory-in-prompt", "--max-tokens", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["dataset"]["name"] == "memoryagentbench" and report["dataset"]["questions"] == 2
    assert report["settings"]["modes"] == ["base", "base+memory-in-prompt"]
    assert [c["mode"] for c in report["comparisons"]] == []  # no δ mode, nothing to compare


def test_cli_failures_are_one_clear_line(server: Server, tmp_path: Path) -> None:
    unreachable = invoke("--url", "http://127.0.0.1:9", "--out", str(tmp_path / "a"))
    assert unreachable.exit_code == 1
    assert "cannot reach the sidecar at http://127.0.0.1:9" in unreachable.output
    wrong_key = invoke("--url", server.base_url, "--api-key", "wrong", "--out", str(tmp_path / "b"))
    assert wrong_key.exit_code == 1 and "HTTP 401" in wrong_key.output and "--api-key" in wrong_key.output
    no_questions = invoke("--url", server.base_url, "--api-key", KEY, "--limit", "0")
    assert no_questions.exit_code == 1 and "dataset: --limit must be at least 1" in no_questions.output
    bad_mode = invoke("--url", server.base_url, "--modes", "base,turbo")
    assert bad_mode.exit_code == 1 and "eval: unknown mode(s) turbo" in bad_mode.output
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(json.dumps(mab_row("A long line of words about lighthouses.\n" * 600)) + "\n", encoding="utf-8")
    overflow = invoke("--url", server.base_url, "--api-key", KEY, "--dataset", f"mab:{too_long}",
                      "--modes", "base", "--out", str(tmp_path / "c"))
    assert overflow.exit_code == 1
    assert "context window" in overflow.output and "--history-window" in overflow.output
    for line in (unreachable.output, wrong_key.output, bad_mode.output, overflow.output):
        assert line.count("Error:") == 1 and "Traceback" not in line


def test_cli_without_url_uses_the_installed_sidecar_settings(server: Server, tmp_path: Path) -> None:
    from common.settings import SidecarSettings, save_settings

    port = int(server.base_url.rsplit(":", 1)[1])
    root = tmp_path / "root"
    save_settings(root, SidecarSettings(model_path=str(tmp_path), model_id=MODEL, port=port, api_key=KEY))
    result = invoke("--root", str(root), "--conversations", "1", "--facts", "1", "--distractors", "0",
                    "--modes", "delta", "--max-tokens", "2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"at {server.base_url}, model {MODEL}" in result.output
    missing = invoke("--root", str(tmp_path / "nowhere"))
    assert missing.exit_code == 1 and "install-sidecar" in missing.output
