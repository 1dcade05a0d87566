"""A state dir that fails: saves that wrote nothing are errors, a reset never loses newer memory,
and a leftover that cannot be removed does not stop the server.

The app runs in-process on the real engine and tiny model. Failures come from the OS where a test
can cause them as any user, root included (a directory where a file should be), and are injected
where it cannot (a full disk, a file that cannot be unlinked).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import sidecar.sessions.files
from sidecar.engine.engine import Engine
from sidecar.server.app import create_app
from sidecar.sessions.files import load_session_file
from sidecar.sessions.keys import hash_session_key

KEY = "state-faults"
HEADERS = {"X-OpenClaw-Session-Key": KEY}


@pytest.fixture
def engine(engine_factory: Callable[..., Engine]) -> Engine:
    return engine_factory()


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(engine.settings, load_engine=lambda _: engine)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        deadline = time.monotonic() + 30
        while test_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
        yield test_client


def turn(client: TestClient, text: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_completion_tokens": 2}
    response = client.post("/v1/chat/completions", json=body, headers=HEADERS)
    assert response.status_code == 200, response.text


def health(client: TestClient) -> dict[str, Any]:
    response = client.get("/health")
    assert response.status_code == 200
    return response.json()


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sidecar.sessions.files, "atomic_write_bytes", no_space)


def state_file(engine: Engine) -> Path:
    return Path(engine.settings.state_dir) / f"{hash_session_key(KEY)}.delta.session.npz"


def test_a_save_that_wrote_nothing_is_an_error_and_health_says_so(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn(client, "first")
    before = health(client)
    assert before["status"] == "ok" and before["problems"] == []
    assert before["sessions"]["saves"] >= 1 and before["sessions"]["save_failures"] == 0
    disk_full(monkeypatch)
    saved = client.post("/v1/session/save", headers=HEADERS)
    assert saved.status_code == 500, saved.text
    error = saved.json()["error"]
    assert error["code"] == "state_write_failed" and "the disk is full" in error["message"]
    # A turn still answers (memory stays in RAM), and the failure it could not save is counted.
    turn(client, "second")
    during = health(client)
    assert during["status"] == "degraded" and "the disk is full" in during["problems"][0]
    assert during["sessions"]["save_failures"] == 2
    monkeypatch.undo()
    assert client.post("/v1/session/save", headers=HEADERS).json()["saved"] == ["delta"]
    after = health(client)
    assert after["status"] == "ok" and after["problems"] == []


def test_a_save_the_os_refuses_is_an_error(client: TestClient, engine: Engine) -> None:
    turn(client, "first")
    path = state_file(engine)
    path.unlink()
    path.mkdir()  # the file's place is taken: os.replace fails for any user, root included
    saved = client.post("/v1/session/save", headers=HEADERS)
    assert saved.status_code == 500 and saved.json()["error"]["code"] == "state_write_failed"
    assert health(client)["status"] == "degraded"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_reset_that_cannot_remove_the_file_keeps_the_newer_memory(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    turn(client, "first")  # saved to disk: one turn
    disk_full(monkeypatch)
    turn(client, "second")  # in memory only: two turns
    original_unlink = Path.unlink

    def refuse_in_state_dir(self: Path, missing_ok: bool = False) -> None:
        if self.parent == state_file(engine).parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        original_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_in_state_dir)
    reset = client.delete("/v1/session", headers=HEADERS)
    assert reset.status_code == 500 and "was not reset" in reset.json()["error"]["message"]
    stats = client.get("/v1/session", headers=HEADERS)
    assert stats.status_code == 200 and stats.json()["delta"]["turns"] == 2, "the newer state in memory was lost"
    monkeypatch.undo()
    assert client.delete("/v1/session", headers=HEADERS).json()["reset"] is True
    assert client.get("/v1/session", headers=HEADERS).status_code == 404
    assert not state_file(engine).exists()


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_engine(
    engine_factory: Callable[..., Engine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    # A directory where a temporary file was: unlink fails for any user, as for a file the
    # server does not own.
    (state / ".abc.delta.session.npz.x1y2.tmp").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="sidecar.sessions.store"):
        engine = engine_factory()
    assert "cannot remove the leftover temporary file .abc.delta.session.npz.x1y2.tmp" in caplog.text
    assert engine.store.state_dir == state


def test_an_eviction_while_saves_fail_keeps_the_unsaved_history(
    engine_factory: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_factory(max_sessions=1)
    app = create_app(engine.settings, load_engine=lambda _: engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
        turn(client, "first")  # on disk: one turn
        disk_full(monkeypatch)
        turn(client, "second")  # in memory only: two turns
        other = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
        assert client.post("/v1/chat/completions", json=other, headers={"X-OpenClaw-Session-Key": "other"}).is_success
        assert health(client)["sessions"]["unsaved"] == 2
        # The other session evicted this one (one session in memory): its history must not fall back to disk.
        assert engine.store.sessions()[-1].key_hash == hash_session_key("other")
        stats = client.get("/v1/session", headers=HEADERS).json()
        assert stats["delta"]["turns"] == 2, "the turn that could not be saved was lost at eviction"
        turn(client, "third")
        assert client.get("/v1/session", headers=HEADERS).json()["delta"]["turns"] == 3
        monkeypatch.undo()
    # At shutdown the store saved what it could not before.
    assert engine.store.peek(hash_session_key(KEY), True).turns == 3
    assert load_session_file(state_file(engine), engine.store.fingerprint.current).turns == 3
