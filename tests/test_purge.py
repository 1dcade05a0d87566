"""`uninstall --purge` deletes a folder only when it proves to be an install root and holds nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.receipt import load_receipt, new_receipt, write_receipt
from common.settings import SidecarSettings, save_settings
from installer.cli import app
from installer.purge import purge_refusal

runner = CliRunner()


def purge(root: Path) -> tuple[int, str]:
    done = runner.invoke(app, ["uninstall", "--purge", "--yes", "--root", str(root)])
    return done.exit_code, done.output


def an_install(root: Path) -> Path:
    """What an install leaves: settings, receipt, and its folders."""
    save_settings(root, SidecarSettings(model_path=str(root / "models" / "m"), model_id="m"))
    for folder in ("models/m", "adapters/local", "state", "logs", "run"):
        (root / folder).mkdir(parents=True)
    (root / "receipt.json").write_text(json.dumps({"root": str(root)}))
    (root / ".sidecar.json.abc123.tmp").write_text("left by an interrupted write")
    return root


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b'{"anything": 1}', b'{"model_path": "/m", "model_id": "m", "surprise": true}'],
)
def test_a_folder_holding_some_sidecar_json_is_not_deleted(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "projects"
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "chapter1.md").write_text("years of work")
    (folder / "sidecar.json").write_bytes(content)
    code, out = purge(folder)
    assert code == 1 and "does not look like an install root; nothing was deleted" in out
    assert (folder / "thesis" / "chapter1.md").read_text() == "years of work"


def test_an_install_root_with_files_of_someone_else_is_not_deleted(tmp_path: Path) -> None:
    root = an_install(tmp_path / "root")
    (root / "notes.txt").write_text("mine")
    (root / "photos").mkdir()
    code, out = purge(root)
    assert code == 1 and "holds 2 thing(s) an install does not make (notes.txt, photos)" in out
    assert (root / "notes.txt").exists() and (root / "sidecar.json").exists()


def test_a_receipt_for_another_root_is_no_proof(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    receipt = new_receipt(
        tmp_path / "elsewhere", preset="custom", model_id="m", model_source="local", adapter_source=None,
        model_path=tmp_path / "m", adapter_path=None, supervisor="process", files=[],
    )  # fmt: skip
    write_receipt(folder, receipt)
    assert load_receipt(folder) is not None  # a valid receipt, only not this folder's
    assert purge_refusal(folder) is not None
    assert purge(folder)[0] == 1 and folder.exists()


def test_a_symlink_to_a_root_is_not_followed(tmp_path: Path) -> None:
    root = an_install(tmp_path / "root")
    link = tmp_path / "link"
    link.symlink_to(root)
    code, out = purge(link)
    assert code == 1 and "is a symbolic link" in out
    assert root.is_dir() and link.is_symlink()


def test_an_install_root_is_deleted_whole(tmp_path: Path) -> None:
    root = an_install(tmp_path / "root")
    code, out = purge(root)
    assert code == 0, out
    assert "Deleted" in out and not root.exists()
    assert list(tmp_path.iterdir()) == []
