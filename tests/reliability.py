"""Shared pieces of the reliability tests: the figures they record, and a real server with a short answer cap.

Each test that measures something calls `record_figures`, which writes
`.cache/reliability/<name>.json` (git-ignored) and prints one line (visible with `pytest -s`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from server_process import KEY, MODEL, Server, start_server

from common.files import atomic_write_json
from common.settings import SidecarSettings, save_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
FIGURES_DIR = REPO_ROOT / ".cache" / "reliability"
AUTH = {"Authorization": f"Bearer {KEY}"}
SESSION_FILE = re.compile(r"^[0-9a-f]{64}\.(delta|base)\.session\.npz$")
STATE_PATHS = (
    SESSION_FILE,
    re.compile(r"^server\.lock$"),  # one server per state dir (sidecar/server/state_dir_lock.py)
    re.compile(r"^kv(/sessions|/prefixes)?$"),
    re.compile(r"^kv/sessions/[0-9a-f]{64}\.(delta|base)(/(manifest\.json|[0-9]+\.safetensors))?$"),
    re.compile(r"^kv/prefixes/[0-9a-f]{32}\.(json|safetensors)$"),
    # The disk cache's writer runs after each answer: a file it is writing has a temporary name.
    re.compile(
        r"^kv/(sessions/[0-9a-f]{64}\.(delta|base)/\.(manifest\.json|[0-9]+\.safetensors)"
        r"|prefixes/\.[0-9a-f]{32}\.(json|safetensors))\.[a-z0-9_]+\.tmp$"
    ),
)


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Write what a test measured to FIGURES_DIR/<name>.json and print it."""
    atomic_write_json(FIGURES_DIR / f"{name}.json", {"name": name, **figures})
    print(f"\nreliability figures {name}: {json.dumps(figures)}")


def start_capped_server(
    model_dir: Path, adapter_dir: Path, work: Path, *extra: str, max_output_tokens: int = 16
) -> Server:
    """A real `serve` whose answers stop after `max_output_tokens`, so that fuzzed requests stay fast."""
    root = work / "root"
    settings = SidecarSettings(
        model_path=str(model_dir), model_id=MODEL, adapter_path=str(adapter_dir), max_output_tokens=max_output_tokens
    )
    save_settings(root, settings)
    return start_server(model_dir, adapter_dir, work, "--root", str(root), *extra)


def health(server: Server) -> dict[str, Any]:
    """The server's /health body (it must answer 200)."""
    response = httpx.get(f"{server.base_url}/health", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def is_openai_error(content: bytes) -> bool:
    """True when a body is exactly {"error": {message, type, param, code}} with a message and no trace."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return False
    error = body["error"]
    return (
        set(error) == {"message", "type", "param", "code"}
        and isinstance(error["message"], str)
        and bool(error["message"])
        and "Traceback" not in error["message"]
    )


def unexpected_files(state_dir: Path) -> list[str]:
    """Paths in the state dir that are neither `<sha256>.<mode>.session.npz` nor the disk cache's
    hashed names (`kv/sessions/<sha256>.<mode>/…`, `kv/prefixes/<id>.…`): no key or text names a file."""
    if not state_dir.exists():
        return []
    paths = (str(p.relative_to(state_dir)) for p in state_dir.rglob("*"))
    return sorted(path for path in paths if not any(pattern.match(path) for pattern in STATE_PATHS))


def saved_session(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """The token ids and the δ-state per layer after them, as a session file holds them."""
    with np.load(path, allow_pickle=False) as data:
        layers = sorted((name for name in data.files if name.startswith("state_")), key=lambda n: int(n[6:]))
        return data["tokens"].tolist(), [data[name] for name in layers]
