"""The install, step by step: checks → plan → consent → downloads → adapter → settings → start → receipt.

Each step raises InstallError naming what failed and what to do. Nothing is written before consent,
and from then on the root is locked (supervisors.root_lock) against other commands changing it;
an existing receipt is removed before anything changes and the new one is written only after every
other step worked, so a root without a receipt is never mistaken for a working install. A rerun
reuses every file that is already complete.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.health import Health
from common.kv_budget import KvShape, disk_budget, human_gib, model_weight_bytes, parse_kv_bits
from common.layout import RootLayout
from common.receipt import Receipt, new_receipt, remove_receipt, write_receipt
from common.settings import SettingsError, SidecarSettings, load_settings, save_settings
from installer.checks import failures, format_checks, run_checks
from installer.downloads import (
    DownloadPlan,
    download,
    human_bytes,
    plan_downloads,
)
from presets.catalog import Preset, Source
from presets.memory_plan import (
    MemoryPlan,
    announced_window,
    describe_disk_cache,
    describe_memory,
    machine_ram,
    plan_memory,
    quantization_problem,
)
from sidecar.delta.adapter_files import (
    NPZ_FILE,
    PT_FILE,
    AdapterError,
    convert_adapter,
    load_adapter,
    model_dims,
    validate_adapter,
)
from sidecar.delta.config import CONFIG_FILE
from supervisors import SupervisorKind, make_supervisor
from supervisors.readiness import DEFAULT_HEALTH_TIMEOUT_S, wait_until_healthy
from supervisors.root_lock import hold_root


class InstallError(UserError, RuntimeError):
    """An install step that failed; the message names the step and what to do."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class ConsentRefused(InstallError):
    """The operator did not agree to the downloads (or could not be asked)."""


@dataclass(frozen=True)
class InstallRequest:
    """What to install where, and how to run it."""

    root: Path
    preset: Preset
    host: str
    port: int
    supervisor: SupervisorKind
    api_key: str | None = None
    start: bool = True
    assume_yes: bool = False
    interactive: bool = False
    progress: bool = True
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    kv_bits: str | None = None  # "none", "8" or "4"; None: kept from a previous install, else the preset's for this RAM
    max_disk_bytes: int | None = None  # None: from the free disk (common.kv_budget.disk_budget)
    keep_alive_s: float | None = None  # None: kept from a previous install, else the preset's

    @property
    def starts(self) -> bool:
        """Whether the install starts the sidecar: never when OpenClaw is the one to start it."""
        return self.start and self.supervisor != "openclaw"


@dataclass(frozen=True)
class InstallResult:
    """The receipt written, the settings in force and, when started, the sidecar's health answer."""

    receipt: Receipt
    settings: SidecarSettings
    health: Health | None


Echo = Callable[[str], None]
Confirm = Callable[[str], bool]


def install(request: InstallRequest, *, echo: Echo, confirm: Confirm) -> InstallResult:
    """Run every install step in order; raises InstallError (or ConsentRefused) on the first failure."""
    layout = RootLayout.of(request.root)
    preset = request.preset
    supervisor = make_supervisor(request.supervisor, layout.root)
    previous = _previous_settings(layout)

    echo(f"Installing preset {preset.name!r} into {layout.root}")
    checks = run_checks(
        layout.root,
        min_memory_gb=preset.min_memory_gb,
        host=request.host,
        port=request.port,
        qmd_bin=previous.qmd.bin if previous and previous.attention_state_source == "qmd" else None,
        port_held_by_this_root=layout.root.exists() and supervisor.status().state == "running",
    )
    for line in format_checks(checks):
        echo(line)
    failed = failures(checks)
    if failed:
        raise InstallError("checks", f"{failed[0].detail} (run 'delta-mem-mlx doctor' for all checks)")
    model_dir = preset.model.path or layout.model_dir(preset.model.repo or "")
    adapter_dir = layout.adapter_dir(preset.adapter.repo) if preset.adapter else None
    # Settings are checked now, so that a bad --host, --port or --kv-bits fails before any download.
    settings = _settings_for(preset, request, layout, model_dir, adapter_dir, previous)
    settings.validate()
    kv_bits = _kv_bits(request, preset, previous)
    if request.max_disk_bytes is not None and request.max_disk_bytes < 0:
        raise InstallError("settings", "--max-disk-bytes must be 0 (no disk cache) or positive")

    plan = plan_downloads(preset, layout.root)
    for line in _describe_install(plan, preset, request, supervisor.kind):
        echo(line)
    if not plan.fits:
        raise InstallError(
            "disk",
            f"{human_bytes(plan.free_bytes)} free, the install needs {human_bytes(plan.needed_bytes)}: "
            "free some space or choose another --root",
        )
    _ask_consent(plan, request, confirm)

    # From here on the root changes: one command at a time (created first so that it can be locked).
    with hold_root(layout.root, "delta-mem-mlx install-sidecar", create=True):
        remove_receipt(layout.root)
        if plan.missing_bytes:
            echo(f"Downloading {human_bytes(plan.missing_bytes)}…")
        download(plan, progress=request.progress)

        model_files = installed_model_files(model_dir, preset.model_files)
        adapter_files = prepare_adapter(preset.adapter, layout, model_dir) if preset.adapter else []
        if adapter_dir:
            echo(f"Adapter ready and matching the model: {adapter_dir}")

        shape = KvShape.from_dirs(model_dir, adapter_dir)
        memory = plan_memory(preset, shape, model_weight_bytes(model_dir), kv_bits, settings.kv_group_size)
        settings = _with_memory(settings, preset, memory, previous)
        settings = dataclasses.replace(settings, max_disk_bytes=_disk_bytes(request, layout, previous))
        echo(f"Disk cache: {describe_disk_cache(settings.max_disk_bytes)}")
        installed = MemoryPlan(memory.budget, shape, settings.kv_bits, settings.kv_group_size, settings.context_window)
        echo(f"Memory: {describe_memory(installed.report(settings.max_kv_bytes))}")
        save_settings(layout.root, settings)
        echo(f"Settings written: {layout.settings}")

        health = _start(request, settings, echo) if request.starts else None
        if not request.starts and supervisor.status().state == "running":
            echo("Note: the sidecar that is running keeps the old install until 'delta-mem-mlx restart-sidecar'.")

        receipt = new_receipt(
            layout.root,
            preset=preset.name,
            model_id=settings.model_id,
            model_source=_source_text(preset.model, plan, "model"),
            adapter_source=_source_text(preset.adapter, plan, "adapter") if preset.adapter else None,
            model_path=model_dir,
            adapter_path=adapter_dir,
            supervisor=request.supervisor,
            files=model_files + adapter_files,
        )
        write_receipt(layout.root, receipt)
        echo(f"Install receipt written: {layout.receipt}")
        return InstallResult(receipt, settings, health)


def installed_model_files(model_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The model files the sidecar loads, after checking the folder looks like an MLX model."""
    if not model_dir.is_dir():
        raise InstallError("model", f"{model_dir} is not a directory")
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    )
    config = model_dir / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InstallError("model", f"{config} is missing: is {model_dir} an MLX model folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InstallError("model", f"{config} cannot be read ({exc}): download it again") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise InstallError("model", f"{config} has no model_type: is {model_dir} an MLX model folder?")
    if not any(p.suffix == ".safetensors" for p in files):
        raise InstallError("model", f"{model_dir} has no model*.safetensors weights")
    return files


def prepare_adapter(source: Source, layout: RootLayout, model_dir: Path) -> list[Path]:
    """Put the adapter in the root (copying a local one), convert .pt → .npz, check it fits the model.

    Returns the adapter files the sidecar loads, for the receipt.
    """
    adapter_dir = layout.adapter_dir(source.repo)
    if source.path is not None:
        _copy_local_adapter(source.path, adapter_dir)
    npz = adapter_dir / NPZ_FILE
    try:
        if not npz.exists():
            convert_adapter(adapter_dir)
        dims = model_dims(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
        validate_adapter(load_adapter(adapter_dir), dims)
    except AdapterError as exc:
        raise InstallError("adapter", str(exc)) from exc
    return [adapter_dir / CONFIG_FILE, npz]


def _copy_local_adapter(source: Path, dest: Path) -> None:
    config = source / CONFIG_FILE
    if not config.is_file():
        raise InstallError("adapter", f"{config} is missing: is {source} a δ-mem adapter folder?")
    weights = [source / name for name in (NPZ_FILE, PT_FILE) if (source / name).is_file()]
    if not weights:
        raise InstallError(
            "adapter", f"{source} has neither {NPZ_FILE} nor {PT_FILE}: is it a δ-mem adapter?"
        )
    # A fresh copy each time, so a converted file never outlives the source it came from.
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for path in (config, weights[0]):
        shutil.copy2(path, dest / path.name)


def _ask_consent(plan: DownloadPlan, request: InstallRequest, confirm: Confirm) -> None:
    if not plan.missing_bytes or request.assume_yes:
        return
    size = human_bytes(plan.missing_bytes)
    if not request.interactive:
        raise ConsentRefused(
            "consent",
            f"refusing to download {size} without your consent, and there is no terminal to ask: "
            "pass --yes to agree to the plan above",
        )
    if not confirm(f"Download {size} into {request.root} and install?"):
        raise ConsentRefused("consent", "cancelled; nothing was downloaded or written")


def _describe_install(
    plan: DownloadPlan, preset: Preset, request: InstallRequest, supervisor_kind: str
) -> list[str]:
    lines = plan.describe() if plan.repos else ["Nothing to download."]
    if preset.model.path is not None:
        lines.append(f"  model: local folder {preset.model.path} (used in place)")
    if preset.adapter is not None and preset.adapter.path is not None:
        lines.append(f"  adapter: local folder {preset.adapter.path} (copied into the root)")
    if preset.adapter is None:
        lines.append("  adapter: none (the sidecar serves the plain model)")
    if request.starts:
        lines.append(
            f"  then: {supervisor_kind} supervision, start, and wait for {request.host}:{request.port}/health"
        )
    elif request.supervisor == "openclaw":
        lines.append("  then: nothing is started; OpenClaw starts the sidecar when an agent needs the model")
    return lines


def _previous_settings(layout: RootLayout) -> SidecarSettings | None:
    if not layout.settings.exists():
        return None
    try:
        return load_settings(layout.root)
    except SettingsError:
        return None  # an unreadable file is replaced by the fresh one


def _settings_for(
    preset: Preset,
    request: InstallRequest,
    layout: RootLayout,
    model_dir: Path,
    adapter_dir: Path | None,
    previous: SidecarSettings | None,
) -> SidecarSettings:
    # Keep what the operator set before (API key, QMD, limits); the install decides the rest.
    chosen: dict[str, Any] = {
        "model_path": str(model_dir),
        "model_id": preset.model_id,
        "adapter_path": str(adapter_dir) if adapter_dir else None,
        "host": request.host,
        "port": request.port,
        "context_window": preset.context_window,
        "max_output_tokens": preset.max_output_tokens,
        "state_dir": str(layout.state),
    }
    if request.api_key is not None:
        chosen["api_key"] = request.api_key
    if request.keep_alive_s is not None:
        chosen["keep_alive_s"] = request.keep_alive_s
    if previous is None:
        return SidecarSettings(**{"keep_alive_s": preset.keep_alive_s, **chosen})
    return dataclasses.replace(previous, **chosen)


def _kv_bits(request: InstallRequest, preset: Preset, previous: SidecarSettings | None) -> int | None:
    if request.kv_bits is not None:
        try:
            return parse_kv_bits(request.kv_bits)
        except ValueError as exc:
            raise InstallError("settings", f"--kv-bits: {exc}") from None
    if previous is not None:
        return previous.kv_bits
    return preset.kv_bits_for(machine_ram())


def _with_memory(
    settings: SidecarSettings, preset: Preset, memory: MemoryPlan, previous: SidecarSettings | None
) -> SidecarSettings:
    """The plan's precision, budget and window; a smaller budget set before is kept (never more than fits)."""
    if memory.budget.kv_bytes == 0:
        raise InstallError(
            "memory",
            f"{human_gib(memory.budget.ram_bytes)} of RAM leaves no room for a KV cache next to the "
            f"{human_gib(memory.budget.model_bytes)} model, macOS and OpenClaw: choose a smaller model",
        )
    problem = quantization_problem(memory.shape, memory.kv_bits, memory.kv_group_size)
    if problem is not None:
        raise InstallError("settings", f"--kv-bits {memory.kv_bits}: {problem}; use --kv-bits none")
    budget = memory.budget.kv_bytes
    if previous is not None:
        budget = min(budget, previous.max_kv_bytes)
    window = announced_window(preset, memory.shape, budget, memory.kv_bits, memory.kv_group_size)
    return dataclasses.replace(
        settings, max_kv_bytes=budget, kv_bits=memory.kv_bits, kv_group_size=memory.kv_group_size, context_window=window
    )


def _disk_bytes(request: InstallRequest, layout: RootLayout, previous: SidecarSettings | None) -> int:
    """The disk cache's budget: as asked, else from the free disk, never more than a previous install's."""
    if request.max_disk_bytes is not None:
        return request.max_disk_bytes
    budget = disk_budget(shutil.disk_usage(layout.root).free)
    return budget if previous is None else min(budget, previous.max_disk_bytes)


def _start(request: InstallRequest, settings: SidecarSettings, echo: Echo) -> Health:
    supervisor = make_supervisor(request.supervisor, request.root)
    echo(f"Starting the sidecar under {supervisor.kind}…")
    try:
        supervisor.install()
        supervisor.restart()
        health = wait_until_healthy(settings, supervisor, request.health_timeout_s)
    except Exception as exc:
        try:
            supervisor.uninstall()
        except Exception:
            pass  # the original failure is the one worth reporting
        raise InstallError("start", str(exc)) from exc
    echo(f"The sidecar is healthy at http://{settings.host}:{settings.port} (model {settings.model_id})")
    return health


def _source_text(source: Source | None, plan: DownloadPlan, role: str) -> str:
    if source is None:
        return "none"
    for repo in plan.repos:
        if repo.role == role:
            return f"{repo.repo}@{repo.commit}"
    return source.describe()
