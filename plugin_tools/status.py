"""`delta_mem_mlx_status`: the platform, the install root, the supervisor and the sidecar's /health."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import psutil

from common.health import probe_health
from common.kv_budget import kv_budget
from common.receipt import read_receipt, verify_receipt
from common.settings import SettingsError, SidecarSettings
from plugin_tools.payloads import (
    STATUS_TOOL,
    HealthReport,
    InstallReport,
    MemoryReport,
    PlatformReport,
    PluginConfig,
    StatusPayload,
    SupervisorReport,
)
from plugin_tools.target import (
    TargetError,
    install_root,
    installed_settings,
    resolve_api_base,
    settings_for_url,
)
from presets.memory_plan import MemoryPlan, installed_shape, machine_ram
from supervisors import supervisor_for_root
from supervisors.port_owner import describe_listener, listener_pid

# The tool runs inside an agent turn: a sidecar that does not answer quickly is reported, not awaited.
HEALTH_TIMEOUT_S = 2.0


def platform_report() -> PlatformReport:
    """This machine against the target: macOS on Apple Silicon (Linux works on MLX's CPU backend)."""
    system, machine = platform.system(), platform.machine()
    apple_silicon = system == "Darwin" and machine == "arm64"
    if apple_silicon:
        note = "macOS on Apple Silicon: MLX runs on the GPU (Metal)"
    elif system == "Linux":
        note = "Linux: supported for development; MLX runs on the CPU (slowly) or on CUDA"
    else:
        note = f"{system} {machine} is not supported: MLX needs macOS on Apple Silicon, or Linux"
    return {
        "system": system,
        "machine": machine,
        "python": platform.python_version(),
        "apple_silicon": apple_silicon,
        "supported": apple_silicon or system == "Linux",
        "note": note,
    }


def install_report(root: Path) -> tuple[InstallReport, SidecarSettings | None]:
    """The root's receipt, preset, model and adapter, and every problem found with them."""
    receipt = read_receipt(root)
    # Sizes only: hashing gigabytes of weights would not fit in a tool call.
    problems = verify_receipt(root, hashes=False)
    try:
        settings = installed_settings(root)
    except SettingsError as exc:
        settings = None
        problems.append(str(exc))
    if receipt is not None:
        model_path, adapter_path, model_id = receipt.model_path, receipt.adapter_path, receipt.model_id
    elif settings is not None:
        model_path, adapter_path, model_id = settings.model_path, settings.adapter_path, settings.model_id
    else:
        model_path = adapter_path = model_id = None
    report: InstallReport = {
        "root": str(root),
        "root_exists": root.is_dir(),
        "receipt_present": receipt is not None,
        "installed": receipt is not None and not problems,
        "preset": receipt.preset if receipt is not None else None,
        "model_id": model_id,
        "model_path": model_path,
        "model_present": model_path is not None and Path(model_path).is_dir(),
        "adapter_path": adapter_path,
        "adapter_present": None if adapter_path is None else Path(adapter_path).is_dir(),
        "problems": sorted(set(problems), key=problems.index),
    }
    return report, settings


def supervisor_report(root: Path) -> SupervisorReport:
    """The supervisor's view of the sidecar process, with how it last exited when the supervisor says."""
    try:
        state = supervisor_for_root(root).status()
    except Exception as exc:  # a status tool reports what it cannot read instead of failing
        problem = f"cannot ask the supervisor: {exc}"
        return {
            "kind": None,
            "state": "unknown",
            "pid": None,
            "detail": problem,
            "uptime_s": None,
            "last_exit": None,
        }
    last_exit = state.last_exit
    return {
        "kind": state.kind,
        "state": state.state,
        "pid": state.pid,
        "detail": state.detail,
        "uptime_s": _uptime(state.pid),
        "last_exit": None if last_exit is None else asdict(last_exit),  # type: ignore[typeddict-item]
    }


def health_report(target: SidecarSettings, api_base: str) -> HealthReport:
    """The sidecar's /health, asked with a short timeout."""
    health = probe_health(target, timeout=HEALTH_TIMEOUT_S)
    return {
        "url": api_base.removesuffix("/v1") + "/health",
        "reachable": health.status_code is not None,
        "http_code": health.status_code,
        "body": health.body,
        "problem": health.error,
    }


def memory_report(settings: SidecarSettings) -> MemoryReport | None:
    """The installed KV budget and precision against this machine's formula (None: the model is unreadable)."""
    installed = installed_shape(settings.model_path, settings.adapter_path)
    if installed is None:
        return None
    shape, weights = installed
    budget = kv_budget(machine_ram(), weights)
    plan = MemoryPlan(budget, shape, settings.kv_bits, settings.kv_group_size, settings.context_window)
    report = {**plan.report(settings.max_kv_bytes), "disk_cache_bytes": settings.max_disk_bytes}
    return report  # type: ignore[return-value]


def build_status(config: PluginConfig) -> StatusPayload:
    """The `delta_mem_mlx_status` payload for the configured install root."""
    root = install_root(config)
    install, settings = install_report(root)
    notes = _config_notes(config, settings)
    installed_base = resolve_api_base({}, settings)
    try:
        configured_base = resolve_api_base(config, settings)
    except TargetError as exc:
        notes.append(str(exc))
        configured_base = installed_base
    if configured_base != installed_base and settings is not None:
        notes.append(
            f"OpenClaw is configured for {configured_base} "
            f"but the installed sidecar listens on {installed_base}"
        )
    # The root's own sidecar when there is one, else whatever answers where the plugin points.
    target = settings if settings is not None else settings_for_url(configured_base)
    health = health_report(target, installed_base if settings is not None else configured_base)
    ready = install["installed"] and health["problem"] is None
    supervisor = _reconciled(supervisor_report(root), settings, health)
    return {
        "tool": STATUS_TOOL,
        "summary": _summary(install, health, ready),
        "ready": ready,
        "platform": platform_report(),
        "install": install,
        "supervisor": supervisor,
        "health": health,
        "memory": memory_report(settings) if settings is not None else None,
        "plugin_config": config,
        "next_steps": _next_steps(root, install, health, ready, supervisor["kind"]),
        "notes": notes,
    }


def _reconciled(
    supervisor: SupervisorReport, settings: SidecarSettings | None, health: HealthReport
) -> SupervisorReport:
    """The supervisor's report, unless a sidecar of this root answers while the supervisor runs none."""
    body = health["body"] or {}
    if supervisor["state"] == "running" or settings is None or body.get("model") != settings.model_id:
        return supervisor
    pid = listener_pid(settings.port)
    detail = (
        f"a sidecar of this root answers at {health['url']} ({describe_listener(settings.port)}), but "
        f"{supervisor['kind'] or 'no supervisor'} does not run it ({supervisor['detail']}): it was started "
        "with --foreground or by hand, or outlived its keeper; stop-sidecar cannot stop it"
    )
    return {**supervisor, "state": "unsupervised", "pid": pid, "detail": detail, "uptime_s": _uptime(pid)}


def _uptime(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        return round(max(0.0, time.time() - psutil.Process(pid).create_time()), 1)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _summary(install: InstallReport, health: HealthReport, ready: bool) -> str:
    if ready:
        return f"ready: {install['model_id']} is installed and the sidecar answers at {health['url']}"
    if not install["receipt_present"]:
        return f"not installed: no completed install in {install['root']}"
    if install["problems"]:
        return f"the install has {len(install['problems'])} problem(s): {install['problems'][0]}"
    return f"installed, but the sidecar is not healthy: {health['problem']}"


def _next_steps(
    root: Path, install: InstallReport, health: HealthReport, ready: bool, supervisor_kind: str | None
) -> list[str]:
    if ready:
        return ["delta-mem-mlx provider-config --apply  (once, unless OpenClaw already has the provider)"]
    if not install["receipt_present"] or install["problems"]:
        return [f"delta-mem-mlx install-sidecar --root {root}  (a rerun repairs an incomplete install)"]
    if supervisor_kind == "openclaw" and health["http_code"] is None:
        return [
            f"nothing to start: OpenClaw starts the sidecar when an agent needs the model (after "
            f"'delta-mem-mlx provider-config --apply --root {root}', once)"
        ]
    if health["http_code"] == 503:
        return ["wait for the model to load, then ask for the status again"]
    return [
        f"delta-mem-mlx start-sidecar --root {root}",
        f"delta-mem-mlx logs --root {root}  (if it does not start)",
    ]


def _config_notes(config: PluginConfig, settings: SidecarSettings | None) -> list[str]:
    """Where the plugin config and the installed sidecar disagree."""
    if settings is None:
        return []
    notes: list[str] = []
    mode = "none" if config.get("attentionStateEnabled") is False else config.get("attentionMode")
    if mode is not None and mode != settings.attention_state_source:
        notes.append(
            f"the plugin config asks for memory snippets from {mode!r} but the sidecar uses "
            f"{settings.attention_state_source!r}: start it with --attention-state-source {mode}"
        )
    limit = config.get("attentionLimit")
    if limit is not None and settings.attention_state_source == "qmd" and limit != settings.qmd.limit:
        notes.append(
            f"the plugin config's attentionLimit {limit} differs from "
            f"the sidecar's QMD limit {settings.qmd.limit}"
        )
    adapter = config.get("attentionAdapter")
    served = Path(settings.adapter_path) if settings.adapter_path else None
    if adapter and Path(os.path.realpath(Path(adapter).expanduser())) != served:
        notes.append(
            f"the plugin config's attentionAdapter {adapter} is not the adapter the sidecar serves ({served})"
        )
    model_id = config.get("modelId")
    if model_id and model_id != settings.model_id:
        notes.append(
            f"the plugin config's modelId {model_id!r} differs from the installed {settings.model_id!r}"
        )
    return notes
