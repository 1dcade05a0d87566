"""The sidecar's log cannot grow without bound: repeats are rate-limited, files are rotated in place."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sidecar.server.log_output
from sidecar.server.log_output import RepeatLimiter

CAP = 20_000
LINES = 2_000  # about 200 kB of log: ten times the cap


def record(message: str, *args: object, level: int = logging.WARNING, name: str = "sidecar.test") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def test_repeats_are_limited_per_kind_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(sidecar.server.log_output.time, "monotonic", lambda: now[0])
    limiter = RepeatLimiter(burst=5, window_s=60)
    passed = [limiter.filter(record("closed connection %d", i)) for i in range(1000)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    assert limiter.filter(record("another kind of warning"))
    assert all(limiter.filter(record("routine line %d", i, level=logging.INFO)) for i in range(100))
    now[0] += 61
    late = record("closed connection %d", 1000)
    assert limiter.filter(late)
    assert late.getMessage() == "closed connection 1000 (995 more like this in the last 60 s were not logged)"
    assert sum(limiter.filter(record("closed connection %d", i)) for i in range(10)) == 4  # 5 in this window
    assert limiter.take_dropped() == ["6 more like 'closed connection 1000' were not logged"]
    assert limiter.take_dropped() == []


def test_logs_are_rotated_in_place_while_supervised(tmp_path: Path) -> None:
    """stdout and stderr opened for appending by a supervisor (here: this test, like the keeper) stay
    under the cap; the supervisor's own writes on the same files land after each truncation."""
    logs = tmp_path / "logs"
    logs.mkdir()
    out_log, err_log = logs / "sidecar.out.log", logs / "sidecar.err.log"
    child = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        from sidecar.server.log_output import configure_logging
        configure_logging("info", (Path({str(out_log)!r}), Path({str(err_log)!r})), {CAP})
        log = logging.getLogger("sidecar.test")
        for i in range({LINES}):
            log.info("line %05d %s", i, "x" * 60)
            if i % 10 == 0:
                print("stdout line", i, "y" * 200, flush=True)
        log.info("last line")
    """)
    with out_log.open("ab") as out, err_log.open("ab") as err:
        subprocess.run([sys.executable, "-c", child], stdout=out, stderr=err, check=True, timeout=120)
        err.write(b"the keeper writes after the sidecar exited\n")
    text = err_log.read_bytes()
    assert len(text) <= CAP + 200 and b"\0" not in text
    assert b"last line" in text and text.endswith(b"the keeper writes after the sidecar exited\n")
    assert b"(log rotated at " in text
    backup = logs / "sidecar.err.log.1"
    assert backup.exists() and len(backup.read_bytes()) <= CAP + 200
    assert out_log.stat().st_size <= CAP + 300 and (logs / "sidecar.out.log.1").exists()
    assert sorted(p.name for p in logs.iterdir()) == [
        "sidecar.err.log", "sidecar.err.log.1", "sidecar.out.log", "sidecar.out.log.1"
    ]


def test_a_descriptor_that_is_not_the_supervised_file_is_left_alone(tmp_path: Path) -> None:
    elsewhere = tmp_path / "terminal.log"
    with elsewhere.open("ab") as handle:
        cap = sidecar.server.log_output.OutputCap.of(handle.fileno(), tmp_path / "sidecar.err.log", CAP)
    assert cap is None


def test_on_a_full_disk_the_log_is_emptied_without_a_partial_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sidecar.err.log"

    def copy_until_the_disk_fills(source: Path, target: Path) -> None:
        Path(target).write_bytes(b"half a copy")
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(sidecar.server.log_output.shutil, "copyfile", copy_until_the_disk_fills)
    with path.open("ab") as handle:
        handle.write(b"x" * (CAP + 1))
        handle.flush()
        cap = sidecar.server.log_output.OutputCap.of(handle.fileno(), path, CAP)
        assert cap is not None
        cap.check()
    assert path.read_bytes().startswith(b"(log rotated at ") and path.stat().st_size < 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidecar.err.log"]
