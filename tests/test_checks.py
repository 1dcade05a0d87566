"""Doctor checks: each one's ok/warn/fail verdict, and the `doctor` command's table, JSON and exit code."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.ports import free_port
from installer.checks import (
    GIB,
    check_disk,
    check_memory,
    check_platform,
    check_port,
    check_python,
    check_qmd,
    check_root,
    existing_ancestor,
    failures,
    run_checks,
)
from installer.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("system", "machine", "state"),
    [
        ("Darwin", "arm64", "ok"),
        ("Darwin", "x86_64", "fail"),
        ("Linux", "x86_64", "warn"),
        ("Windows", "AMD64", "fail"),
    ],
)
def test_platform(system: str, machine: str, state: str) -> None:
    check = check_platform(system, machine)
    assert check.state == state
    if system == "Linux":
        assert "development" in check.detail and "CPU" in check.detail


def test_python_version() -> None:
    assert check_python((3, 11, 0)).state == "ok"
    assert check_python((3, 10, 12)).state == "fail"


def test_memory_against_the_preset_minimum() -> None:
    assert check_memory(16, total_bytes=int(15.8 * GIB)).state == "ok"  # a "16 GB" Mac
    low = check_memory(16, total_bytes=8 * GIB)
    assert low.state == "fail" and "--preset smoke" in low.detail


def test_disk_against_the_download(tmp_path: Path) -> None:
    assert check_disk(tmp_path / "root", 1024).state == "ok"
    assert check_disk(tmp_path / "root", 10**18).state == "fail"
    assert "not known" in check_disk(tmp_path, None).detail


def test_port_free_taken_and_taken_by_this_root() -> None:
    port = free_port()
    assert check_port("127.0.0.1", port).state == "ok"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        busy = check_port("127.0.0.1", taken)
        assert busy.state == "fail" and "--port" in busy.detail
        assert check_port("127.0.0.1", taken, held_by_this_root=True).state == "ok"


def test_root_writable_and_not(tmp_path: Path) -> None:
    assert check_root(tmp_path).state == "ok"
    future = check_root(tmp_path / "a" / "b")
    assert future.state == "ok" and "will be created" in future.detail
    assert not (tmp_path / "a").exists(), "the check must not create anything"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert check_root(a_file).state == "fail"
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert check_root(locked / "root").state == "fail"


def test_qmd_found_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "qmd"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert check_qmd("qmd").state == "ok"
    missing = check_qmd("qmd-missing")
    assert missing.state == "fail" and "@tobilu/qmd" in missing.detail


def test_run_checks_includes_qmd_only_when_asked(tmp_path: Path) -> None:
    names = [c.name for c in run_checks(tmp_path, min_memory_gb=0.1, host="127.0.0.1", port=free_port())]
    assert names == ["platform", "python", "mlx", "memory", "root", "disk", "port"]
    with_qmd = run_checks(
        tmp_path, min_memory_gb=0.1, host="127.0.0.1", port=free_port(), qmd_bin="qmd-missing"
    )
    assert with_qmd[-1].name == "qmd" and failures(with_qmd) == [with_qmd[-1]]


def test_existing_ancestor(tmp_path: Path) -> None:
    assert existing_ancestor(tmp_path / "x" / "y") == tmp_path


def test_doctor_json_and_exit_code(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ok = runner.invoke(
        app, ["doctor", "--root", str(root), "--preset", "smoke", "--port", str(free_port()), "--json"]
    )
    report = json.loads(ok.output)
    states = {c["name"]: c["state"] for c in report["checks"]}
    assert ok.exit_code == (0 if report["passed"] else 1)
    assert states["python"] == "ok" and states["mlx"] == "ok"
    # HF_HUB_OFFLINE is set by conftest: the download size is unknown, which is a warning, not a failure.
    assert states["download plan"] == "warn"
    bad = runner.invoke(
        app,
        [
            "doctor",
            "--root",
            str(root),
            "--preset",
            "smoke",
            "--port",
            str(free_port()),
            "--qmd-bin",
            "qmd-missing",
        ],
    )
    assert bad.exit_code == 1
    assert "qmd" in bad.output and "failed" in bad.output
    assert not root.exists()


def test_doctor_help_has_examples() -> None:
    result = runner.invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0 and "delta-mem-mlx doctor --preset smoke" in result.output
