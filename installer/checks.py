"""Doctor checks: can this machine install and run the sidecar? Each check is ok, warn or fail."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import psutil

from common.kv_budget import GIB, disk_budget, human_gib, kv_bits_name
from presets.memory_plan import MemoryPlan

CheckState = Literal["ok", "warn", "fail"]

MIN_PYTHON = (3, 11)


@dataclass(frozen=True)
class Check:
    """The outcome of one check: its name, ok/warn/fail, and a line saying why."""

    name: str
    state: CheckState
    detail: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form used by `doctor --json`."""
        return asdict(self)


def check_platform(system: str | None = None, machine: str | None = None) -> Check:
    """macOS on Apple Silicon is the target; Linux works for development on MLX's CPU or CUDA backend."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system == "Darwin" and machine == "arm64":
        return Check("platform", "ok", f"macOS {platform.mac_ver()[0] or ''} on Apple Silicon".strip())
    if system == "Darwin":
        return Check("platform", "fail", f"macOS on {machine}: MLX needs Apple Silicon (arm64)")
    if system == "Linux":
        return Check(
            "platform",
            "warn",
            f"Linux {machine}: supported for development on MLX's CPU or CUDA backend "
            "(slow on CPU); the target is macOS on Apple Silicon",
        )
    return Check("platform", "fail", f"{system} {machine} is not supported: use macOS on Apple Silicon")


def check_python(version: tuple[int, ...] | None = None) -> Check:
    """Python 3.11 or newer."""
    version = version or tuple(sys.version_info[:3])
    text = ".".join(str(part) for part in version)
    if version[:2] >= MIN_PYTHON:
        return Check("python", "ok", f"Python {text} ({sys.executable})")
    return Check("python", "fail", f"Python {text} is too old: use Python 3.11 or newer")


def check_mlx() -> Check:
    """MLX imports and names the device it will compute on."""
    try:
        import mlx.core as mx
    except Exception as exc:  # a broken wheel raises more than ImportError
        return Check("mlx", "fail", f"MLX does not import ({exc}): pip install 'mlx[cpu]' or 'mlx'")
    device = mx.default_device()
    version = getattr(mx, "__version__", "?")
    if device.type == mx.gpu:
        return Check("mlx", "ok", f"MLX {version}, device {device}")
    if platform.system() == "Darwin":
        return Check(
            "mlx", "warn", f"MLX {version} runs on {device}: Metal is unavailable, expect it to be slow"
        )
    return Check("mlx", "ok", f"MLX {version}, device {device} (CPU: fine for tiny models and tests)")


def check_memory(min_gb: float, total_bytes: int | None = None) -> Check:
    """Physical RAM against the preset's minimum."""
    total = psutil.virtual_memory().total if total_bytes is None else total_bytes
    have = total / GIB
    if have + 0.5 < min_gb:  # "16 GB" Macs report a little under 16 GiB
        return Check(
            "memory",
            "fail",
            f"{have:.1f} GB of RAM, the preset needs {min_gb:g} GB: choose a smaller preset "
            "(e.g. --preset smoke) or pass --min-memory-gb with --preset custom",
        )
    return Check("memory", "ok", f"{have:.1f} GB of RAM (preset minimum {min_gb:g} GB)")


def check_disk(root: Path, needed_bytes: int | None) -> Check:
    """Free space where the root lives against the download, and the disk cache budget it leaves."""
    free = shutil.disk_usage(existing_ancestor(root)).free
    if needed_bytes is None:
        cache = human_gib(disk_budget(free))
        detail = f"{free / GIB:.1f} GB free (download size not known yet); disk cache budget {cache}"
        return Check("disk", "ok", detail)
    if needed_bytes > free:
        return Check(
            "disk",
            "fail",
            f"{free / GIB:.2f} GB free, the download needs {needed_bytes / GIB:.2f} GB: "
            "free some space or choose another --root",
        )
    cache = human_gib(disk_budget(free - needed_bytes))
    return Check(
        "disk",
        "ok",
        f"{free / GIB:.1f} GB free, the download needs {needed_bytes / GIB:.2f} GB; disk cache budget {cache}",
    )


def check_port(host: str, port: int, held_by_this_root: bool = False) -> Check:
    """The sidecar's port can be bound (or is held by this root's own sidecar)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if held_by_this_root:
            return Check("port", "ok", f"{host}:{port} is held by this root's sidecar (it will be restarted)")
        return Check(
            "port",
            "fail",
            f"cannot listen on {host}:{port} ({exc.strerror}): stop what uses it or pass --port",
        )
    return Check("port", "ok", f"{host}:{port} is free")


def check_root(root: Path) -> Check:
    """The root (or the folder it will be created in) is writable; creates nothing."""
    if root.exists() and not root.is_dir():
        return Check("root", "fail", f"{root} exists and is not a directory: choose another --root")
    target = existing_ancestor(root)
    if not os.access(target, os.W_OK | os.X_OK):
        return Check("root", "fail", f"{target} is not writable: choose a root you can write to (--root)")
    if target == root:
        return Check("root", "ok", f"{root} is writable")
    return Check("root", "ok", f"{root} will be created (in {target})")


def check_kv_memory(plan: MemoryPlan) -> Check:
    """The KV budget this machine gives the model, and how many OpenClaw-sized sessions it holds."""
    budget = plan.budget
    report = plan.report()
    sessions = {name: row["sessions"] for name, row in report["openclaw_sessions"].items()}
    copying = {name: row["sessions_without_sharing"] for name, row in report["openclaw_sessions"].items()}
    terms = (
        f"{human_gib(budget.ram_bytes)} RAM − {human_gib(budget.os_reserve)} macOS and apps − "
        f"{human_gib(budget.openclaw_reserve)} OpenClaw − {human_gib(budget.model_bytes)} model − "
        f"{human_gib(budget.runtime_reserve)} runtime"
    )
    chosen = kv_bits_name(plan.kv_bits)
    detail = (
        f"KV budget {human_gib(budget.kv_bytes)} ({terms}); OpenClaw-sized sessions it holds with the system "
        f"prompt shared: {sessions['none']} float, {sessions['8']} at 8-bit, {sessions['4']} at 4-bit (copying it "
        f"per session: {copying['none']}, {copying['8']}, {copying['4']}); the preset uses "
        f"{'float' if plan.kv_bits is None else f'{plan.kv_bits}-bit'} KV here, context window {plan.context_window}"
    )
    if budget.kv_bytes == 0:
        return Check("kv budget", "fail", f"no room for a KV cache: {terms} is not positive")
    return Check("kv budget", "ok" if sessions[chosen] >= 1 else "warn", detail)


def check_qmd(qmd_bin: str) -> Check:
    """The `qmd` binary the sidecar will run for memory snippets is on PATH."""
    found = shutil.which(qmd_bin)
    if found is None:
        return Check(
            "qmd",
            "fail",
            f"{qmd_bin!r} not found: npm install -g @tobilu/qmd, pass --qmd-bin PATH, "
            "or use --attention-state-source request",
        )
    return Check("qmd", "ok", f"qmd at {found}")


def run_checks(
    root: Path,
    *,
    min_memory_gb: float,
    host: str,
    port: int,
    download_bytes: int | None = None,
    qmd_bin: str | None = None,
    port_held_by_this_root: bool = False,
) -> list[Check]:
    """Every doctor check in display order; qmd only when it is asked for."""
    checks = [
        check_platform(),
        check_python(),
        check_mlx(),
        check_memory(min_memory_gb),
        check_root(root),
        check_disk(root, download_bytes),
        check_port(host, port, port_held_by_this_root),
    ]
    if qmd_bin is not None:
        checks.append(check_qmd(qmd_bin))
    return checks


def format_checks(checks: list[Check]) -> list[str]:
    """A small table of check results for people."""
    width = max(len(c.name) for c in checks)
    return [f"  [{c.state:^4}] {c.name:<{width}}  {c.detail}" for c in checks]


def failures(checks: list[Check]) -> list[Check]:
    """The checks that block an install."""
    return [check for check in checks if check.state == "fail"]


def existing_ancestor(path: Path) -> Path:
    """The path itself if it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
