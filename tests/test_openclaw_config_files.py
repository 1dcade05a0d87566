"""`provider-config --apply` against config files that are too big, read-only or in a folder it may not write."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import json5
import pytest
from typer.testing import CliRunner

import common.files
from installer import openclaw_config
from installer.cli import app
from installer.openclaw_config import MAX_CONFIG_BYTES, MAX_JSON5_BYTES

runner = CliRunner()


def apply(config: Path) -> Any:
    return runner.invoke(app, ["provider-config", "--apply", "--config", str(config)])


def test_a_folder_it_may_not_write_is_named_and_nothing_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "openclaw.json"
    config.write_text('{"gateway": {"port": 1}}\n')

    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    # root writes anywhere, so the refusal a normal user meets is injected.
    monkeypatch.setattr(common.files.tempfile, "mkstemp", denied)
    done = apply(config)
    assert done.exit_code == 1
    assert f"cannot write {tmp_path} (Permission denied): {config} is unchanged" in done.output
    assert f"make {tmp_path} writable for you" in done.output and "--root" not in done.output
    assert config.read_text() == '{"gateway": {"port": 1}}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openclaw.json"]


def test_a_config_larger_than_any_openclaw_config_is_refused_unread(tmp_path: Path) -> None:
    config = tmp_path / "openclaw.json"
    config.write_bytes(b'{"pad": "' + b"x" * MAX_CONFIG_BYTES + b'"}')
    done = apply(config)
    assert done.exit_code == 1
    said = f"is larger than {MAX_CONFIG_BYTES} bytes, so it is not OpenClaw's config; nothing was changed"
    assert said in done.output


def test_json5_too_large_to_parse_quickly_is_refused_without_parsing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "openclaw.json"
    config.write_text("// a comment makes it JSON5\n" + json.dumps({"pad": "x" * MAX_JSON5_BYTES}))

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("json5 must not be asked to parse this")

    monkeypatch.setattr(openclaw_config.json5, "loads", never)
    done = apply(config)
    assert done.exit_code == 1
    assert f"too large to read as JSON5 (at most {MAX_JSON5_BYTES // 1024} KB)" in done.output


def test_large_plain_json_and_small_json5_are_still_merged(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"pad": "x" * (MAX_CONFIG_BYTES // 2)}))
    assert apply(plain).exit_code == 0 and json.loads(plain.read_text())["pad"] == "x" * (MAX_CONFIG_BYTES // 2)
    small = tmp_path / "small.json5"
    small.write_text("{pad: 'x', // JSON5\n}\n")
    assert apply(small).exit_code == 0 and json5.loads(small.read_text())["pad"] == "x"
