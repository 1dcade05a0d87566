"""Security: loopback by default, keys required beyond it, 401 and nothing else, no key in logs or
file names, a malicious .pt refused without running, and no eval, exec or shell in product code.
"""

from __future__ import annotations

import ast
import base64
import os
import pickle
import re
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from reliability import AUTH, REPO_ROOT, health, is_openai_error, record_figures
from server_process import KEY, MODEL, Server, start_server, stop_server
from typer.testing import CliRunner

from common.exit_codes import CONFIG_ERROR
from common.receipt import read_receipt
from common.settings import SettingsError, SidecarSettings
from installer.cli import app
from sidecar.server.app import create_app
from sidecar.sessions.keys import SESSION_HEADERS, hash_session_key

pytestmark = pytest.mark.e2e

PRODUCT_DIRS = ("installer", "sidecar", "plugin_tools", "presets")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tiny_model_dir, tiny_adapter_dir, tmp_path_factory.mktemp("security"), "--log-level", "debug"
    )
    yield running
    if running.process.poll() is None:
        stop_server(running)


# --------------------------------------------------------------------------- binding and keys


def test_the_server_listens_on_loopback_only_by_default(server: Server) -> None:
    listening = [
        c.laddr for c in psutil.Process(server.process.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening)
    assert SidecarSettings(model_path="/m", model_id="m").host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "127.0.0.1.nip.io"])
def test_binding_beyond_loopback_needs_a_key(host: str) -> None:
    with pytest.raises(SettingsError, match="without an API key"):
        SidecarSettings(model_path="/m", model_id="m", host=host).validate()
    SidecarSettings(model_path="/m", model_id="m", host=host, api_key="k").validate()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.8.9.10"])
def test_loopback_needs_no_key(host: str) -> None:
    SidecarSettings(model_path="/m", model_id="m", host=host).validate()


def test_serve_on_all_interfaces_without_a_key_exits_before_binding(
    tiny_model_dir: Path, tiny_adapter_dir: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DELTA_MEM_MLX_API_KEY"}
    argv = [
        sys.executable, "-m", "installer", "serve", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir),
        "--model-id", MODEL, "--host", "0.0.0.0", "--port", "1",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == CONFIG_ERROR
    assert done.stderr.strip().startswith("Error: refusing to listen on 0.0.0.0 without an API key")
    assert "Traceback" not in done.stderr and "listening on" not in done.stderr + done.stdout


WRONG_CREDENTIALS: dict[str, dict[str, str]] = {
    "none": {},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "key with a suffix": {"Authorization": f"Bearer {KEY}x"},
    "key prefix only": {"Authorization": f"Bearer {KEY[:-1]}"},
    "bearer without a token": {"Authorization": "Bearer"},
    "key without a scheme": {"Authorization": KEY},
    "basic auth with the key": {"Authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()},
    "key in another header": {"X-API-Key": KEY},
    "key in a query string": {},
}
ROUTES = [
    ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/session"),
    ("DELETE", "/v1/session"), ("POST", "/v1/session/save"), ("POST", "/v1/session/load"), ("GET", "/openapi.json"),
    ("GET", "/docs"), ("GET", "/v1/nope"), ("PUT", "/v1/chat/completions"),
]  # fmt: skip


def test_wrong_or_missing_keys_get_401_and_nothing_else(server: Server) -> None:
    state = Path(server.log).parent / "state"
    files_before = sorted(state.iterdir()) if state.exists() else []
    jobs_before = health(server)["jobs"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
    answers = 0
    leaks = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for name, headers in WRONG_CREDENTIALS.items():
            for method, path in ROUTES:
                url = f"{path}?api_key={KEY}" if name == "key in a query string" else path
                session = {"X-OpenClaw-Session-Key": f"intruder-{name}"}
                response = client.request(method, url, json=body, headers={**headers, **session})
                answers += 1
                error = response.json()["error"] if is_openai_error(response.content) else {}
                if response.status_code != 401 or error.get("code") != "invalid_api_key":
                    leaks.append(f"{name} {method} {path}: {response.status_code} {response.text[:100]}")
                elif MODEL in response.text or any(h.lower().startswith("x-delta") for h in response.headers):
                    leaks.append(f"{name} {method} {path}: the 401 tells more than it should")
        # Refused before the body is looked at: an unauthenticated client cannot make the server read 9 MiB.
        big = client.post("/v1/chat/completions", content=b"x" * (9 * 1024 * 1024))
        answers += 1
        if big.status_code != 401:
            leaks.append(f"9 MiB body: {big.status_code}")
    jobs_after = health(server)["jobs"]
    record_figures("auth", {"unauthenticated_requests": answers, "answered_401_and_nothing_else": answers - len(leaks)})
    assert leaks == []
    assert jobs_after == jobs_before
    assert (sorted(state.iterdir()) if state.exists() else []) == files_before
    assert "intruder" not in server.log_text()


# --------------------------------------------------------------------------- session keys stay secret


def test_session_keys_never_reach_logs_file_names_files_or_responses(server: Server) -> None:
    state = Path(server.log).parent / "state"
    secrets = {header: f"secret-{uuid.uuid4().hex}" for header in SESSION_HEADERS}
    seen: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=120, headers=AUTH) as client:
        for header, secret in secrets.items():
            session = {header: secret}
            body = {
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2,
                "attention_state": ["a fact"],
            }  # fmt: skip
            responses = [
                client.post("/v1/chat/completions", json=body, headers=session),
                client.post("/v1/chat/completions", json={**body, "stream": True}, headers=session),
                client.get("/v1/session", headers=session),
                client.post("/v1/session/save", headers=session),
                client.post("/v1/session/load", headers=session),
            ]
            assert [r.status_code for r in responses] == [200] * 5
            assert {r.headers["X-Delta-Session"] for r in responses} == {hash_session_key(secret)}
            seen += [r.text + str(dict(r.headers)) for r in responses]
            assert client.delete("/v1/session", headers=session).json()["reset"] is True
            seen.append(client.post("/v1/chat/completions", json=body, headers=session).text)
            # The disk cache writes a turn's chunk after its answer: saving waits for it.
            assert client.post("/v1/session/save", headers=session).status_code == 200
    files = [p for p in Path(server.log).parent.rglob("*") if p.is_file()]
    places = {
        "log": server.log_text(),
        "responses": "\n".join(seen),
        "file names": "\n".join(str(p) for p in files),
        "file contents": "\n".join(p.read_bytes().decode("latin-1") for p in files if p != server.log),
    }
    found = [f"{place}: {header}" for place, text in places.items() for header, key in secrets.items() if key in text]
    hashed = sum(f"{hash_session_key(secret)}.delta.session.npz" in places["file names"] for secret in secrets.values())
    record_figures(
        "session_key_secrecy",
        {"keys": len(secrets), "places_checked": len(places), "keys_found": len(found), "files_named_by_hash": hashed},
    )
    assert found == []
    assert hashed == len(secrets)
    assert state.is_dir()


# --------------------------------------------------------------------------- hostile adapter files


class _SystemCall:
    """Unpickling this runs a shell command (what a malicious .pt does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def _malicious_adapter(folder: Path, tiny_adapter_dir: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "delta_mem_config.json").write_bytes((tiny_adapter_dir / "delta_mem_config.json").read_bytes())
    with zipfile.ZipFile(folder / "delta_mem_adapter.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _SystemCall(f"touch {marker}")}, protocol=2))
        archive.writestr("archive/version", "3\n")
    return folder


def test_a_malicious_pt_is_refused_without_running_it(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    adapter = _malicious_adapter(tmp_path / "evil-adapter", tiny_adapter_dir, marker)
    # The installer converts the .pt first: refused in one line, nothing installed.
    root = tmp_path / "root"
    args = [
        "install-sidecar-only", "--root", str(root), "--preset", "custom", "--model-path", str(tiny_model_dir),
        "--adapter-path", str(adapter), "--model-id", "tiny", "--min-memory-gb", "1", "--supervisor", "process",
        "--yes",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "unsafe adapter file" in result.output and "posix.system" in result.output
    assert read_receipt(root) is None and not marker.exists()
    # A server pointed at it directly (the real loader, in-process) reports the refusal.
    settings = SidecarSettings(model_path=str(tiny_model_dir), model_id=MODEL, adapter_path=str(adapter))
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while (status := client.get("/health").json())["status"] == "loading":
            assert time.monotonic() < deadline, "the model never finished loading"
            time.sleep(0.05)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        chat = client.post("/v1/chat/completions", json=body)
    assert status["status"] == "error" and "UnsafeArchiveError" in status["error"]
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_load_failed"
    assert not marker.exists()
    record_figures("malicious_pt", {"payload_ran": marker.exists(), "install_refused": True, "server_refused": True})


# --------------------------------------------------------------------------- no eval, exec or shell

# Calls that run code or a shell from data. The restricted unpickler in torch_archive subclasses
# pickle.Unpickler and is checked apart below.
_FORBIDDEN_CALLS = {
    "eval", "exec", "compile", "__import__", "os.system", "os.popen", "os.execl", "os.execlp", "os.execv",
    "os.execvp", "os.spawnl", "os.spawnv", "pickle.load", "pickle.loads", "marshal.loads", "yaml.load",
    "yaml.unsafe_load", "shelve.open", "subprocess.getoutput", "subprocess.getstatusoutput",
}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _findings(source: str, name_of_file: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=name_of_file)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{name_of_file}:{node.lineno}"
        if name in _FORBIDDEN_CALLS:
            found.append(f"{where}: {name}()")
        for keyword in node.keywords:
            constant = keyword.value.value if isinstance(keyword.value, ast.Constant) else None
            if keyword.arg == "shell" and constant is not False:
                found.append(f"{where}: shell={ast.unparse(keyword.value)}")
            if keyword.arg == "allow_pickle" and constant is not False:
                found.append(f"{where}: allow_pickle={ast.unparse(keyword.value)}")
    return found


def test_product_code_has_no_eval_exec_shell_or_unpickling() -> None:
    sources = sorted(p for folder in PRODUCT_DIRS for p in (REPO_ROOT / folder).rglob("*.py"))
    findings = [f for path in sources for f in _findings(path.read_text("utf-8"), str(path.relative_to(REPO_ROOT)))]
    unpicklers = [
        f"{path.relative_to(REPO_ROOT)}" for path in sources if re.search(r"pickle\.Unpickler\b", path.read_text())
    ]
    script = (REPO_ROOT / "plugin_tools" / "index.js").read_text(encoding="utf-8")
    js_findings = re.findall(r"\beval\(|new Function\(|\bexecSync?\(|shell:\s*true|child_process\.exec\b", script)
    record_figures(
        "code_scan",
        {"python_files": len(sources), "js_files": 1, "findings": len(findings) + len(js_findings)},
    )
    assert findings == [] and js_findings == []
    # The one unpickler is the torch archive reader, which allows only the tensor-rebuild globals.
    assert unpicklers == ["sidecar/delta/torch_archive.py"]
    assert "def find_class" in (REPO_ROOT / unpicklers[0]).read_text()
    assert "shell: false" in script
    # The scan does see what it looks for.
    planted = "eval(x)\nos.system(x)\nsubprocess.run(x, shell=True)\nnp.load(f, allow_pickle=1)\n"
    assert len(_findings(planted, "planted.py")) == 4
