"""The QMD fallback against a fake `qmd` that records its argv and misbehaves on request."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from fake_commands import command_on_path

from common.settings import QmdSettings
from sidecar.server.qmd import MAX_OUTPUT_BYTES, QmdResult, qmd_argv, qmd_lookup, qmd_query, strip_hunk_header

FAKE_QMD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_QMD_LOG"], "a", encoding="utf-8") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
behaviour = os.environ.get("FAKE_QMD", "ok")
if behaviour == "ok":
    print(json.dumps([
        {{"docid": "#39ae96", "score": 0, "file": "qmd://notes/pets.md", "line": 3, "title": "Pets",
          "snippet": "@@ -2,3 @@ (1 before, 0 after)\\n\\nThe user has a cat named Miso."}},
        {{"docid": "#11aa22", "score": 0.5, "file": "qmd://notes/home.md", "line": 1, "title": "Home",
          "snippet": "The user lives in Lisbon."}},
        {{"docid": "#000000", "score": 0.1, "file": "qmd://x.md", "title": "no snippet"}},
    ]))
elif behaviour == "empty":
    sys.stderr.write("Warning: no embeddings, run qmd embed\\n")
    print("[]")
elif behaviour == "crash":
    sys.stderr.write("progress...\\n" * 1000 + "Error: collection notes not found\\n")
    sys.exit(3)
elif behaviour == "garbage":
    print("Searching... found 2 results")
elif behaviour == "object":
    print(json.dumps({{"results": []}}))
elif behaviour == "megabytes":
    sys.stdout.write("[" + ",".join(['"' + "x" * 1000 + '"'] * 3000) + "]")
"""


@pytest.fixture
def fake_qmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `qmd` on PATH; returns the file where each call's argv is logged as a JSON line."""
    command_on_path(monkeypatch, tmp_path / "bin", "qmd", FAKE_QMD)
    log = tmp_path / "qmd-argv.jsonl"
    monkeypatch.setenv("FAKE_QMD_LOG", str(log))
    return log


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def lookup(settings: QmdSettings, text: str, **kwargs: int) -> QmdResult:
    return asyncio.run(qmd_lookup(settings, text, **kwargs))


def test_success_strips_hunk_headers_and_keeps_sources(fake_qmd: Path) -> None:
    result = lookup(QmdSettings(mode="search", limit=3), "what pet does the user have?")
    assert [item.text for item in result.snippets] == ["The user has a cat named Miso.", "The user lives in Lisbon."]
    assert result.snippets[0].source == "qmd://notes/pets.md" and result.snippets[0].score == 0.0
    assert result.reason == "1 snippet(s) without text skipped"
    assert calls(fake_qmd) == [["search", "--json", "-n", "3", "--", "what pet does the user have?"]]


def test_shell_metacharacters_and_leading_dashes_reach_qmd_literally(fake_qmd: Path) -> None:
    text = "--help; rm -rf ~ && echo $(whoami) `id` | cat > /tmp/x * ' \""
    lookup(QmdSettings(), text)
    argv = calls(fake_qmd)[0]
    assert argv[-1] == text and argv[-2] == "--"


def test_optional_settings_become_flags(fake_qmd: Path) -> None:
    settings = QmdSettings(mode="query", limit=6, collection="notes", index="work", min_score=0.25)
    lookup(settings, "multi\nline\n\tquery")
    assert calls(fake_qmd) == [
        ["query", "--json", "-n", "6", "-c", "notes", "--index", "work", "--min-score", "0.25", "--",
         "multi line query"]
    ]


def test_empty_result(fake_qmd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QMD", "empty")
    result = lookup(QmdSettings(), "anything")
    assert result.snippets == [] and result.reason is None


def test_missing_binary(tmp_path: Path) -> None:
    result = lookup(QmdSettings(bin=str(tmp_path / "no-such-qmd")), "anything")
    assert result.snippets == [] and result.reason is not None and "not found" in result.reason


def test_no_query_skips_qmd(fake_qmd: Path) -> None:
    result = lookup(QmdSettings(), "  \n ")
    assert result.snippets == [] and result.reason == "no user text to search for"
    assert not fake_qmd.exists()


def test_crash_reports_the_exit_status_and_the_end_of_stderr(fake_qmd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QMD", "crash")
    result = lookup(QmdSettings(), "anything")
    assert result.snippets == []
    assert result.reason is not None and "status 3" in result.reason
    assert "collection notes not found" in result.reason and len(result.reason) < 2_100


@pytest.mark.parametrize(("behaviour", "reason"), [("garbage", "not JSON"), ("object", "not a JSON array")])
def test_bad_output(fake_qmd: Path, monkeypatch: pytest.MonkeyPatch, behaviour: str, reason: str) -> None:
    monkeypatch.setenv("FAKE_QMD", behaviour)
    result = lookup(QmdSettings(), "anything")
    assert result.snippets == [] and result.reason is not None and reason in result.reason


def test_megabytes_of_output_are_cut_off(fake_qmd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QMD", "megabytes")
    result = lookup(QmdSettings(), "anything")
    assert result.snippets == []
    assert result.reason == f"qmd printed more than {MAX_OUTPUT_BYTES} bytes"


# A qmd that starts a child, says who they are, then hangs with its output open. A shell script: it
# writes the pids within milliseconds, where a Python one needs a good part of the timeout below on a
# loaded machine.
HANGING_QMD = """#!/bin/sh
sleep 600 &
echo "$$ $!" > "$(dirname "$0")/pids"
printf '['
exec sleep 600
"""


def test_timeout_kills_qmd_and_what_it_started(tmp_path: Path) -> None:
    qmd = tmp_path / "qmd"
    qmd.write_text(HANGING_QMD, encoding="utf-8")
    qmd.chmod(0o755)
    result = lookup(QmdSettings(bin=str(qmd), timeout=2.0), "anything")
    assert result.snippets == [] and result.reason == "qmd timed out after 2 s"
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert _gone_within(pid, 10.0), f"process {pid} survived the timeout"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # killed, waiting for whoever adopted it to reap it
            return True
        time.sleep(0.05)
    return False


def test_argv_and_query_helpers() -> None:
    assert qmd_argv(QmdSettings(bin="/opt/qmd", mode="vsearch", limit=2), "q") == [
        "/opt/qmd", "vsearch", "--json", "-n", "2", "--", "q",
    ]
    assert qmd_query("a\n\nb   c") == "a b c"
    assert len(qmd_query("word " * 2_000)) == 2_000
    assert strip_hunk_header("@@ -2,3 @@ (1 before, 0 after)\n\nThe user has a cat") == "The user has a cat"
    assert strip_hunk_header("no header here") == "no header here"
    assert strip_hunk_header("@@ -1 @@") == ""
