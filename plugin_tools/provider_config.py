"""The `models.providers.delta-mem-mlx` block OpenClaw 2026.9.6 accepts, and how to make it the default."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.durations import format_duration
from common.errors import UserError
from common.health import READY_PATH, base_url
from common.layout import RootLayout
from common.load_time import ready_timeout_s
from common.receipt import read_receipt
from common.settings import SidecarSettings
from plugin_tools.config_check import value_problem
from plugin_tools.payloads import (
    PROVIDER_CONFIG_TOOL,
    PROVIDER_ID,
    ConfigPatch,
    LocalService,
    PluginConfig,
    ProviderBlock,
    ProviderConfigParams,
    ProviderConfigPayload,
)
from plugin_tools.target import install_root, installed_settings, resolve_api_base
from presets.catalog import MIN_CONTEXT_WINDOW, load_preset
from presets.memory_plan import preset_plan
from supervisors import sidecar_command, sidecar_environment

# Before anything is installed, the block describes what the default preset will serve.
DEFAULT_PRESET = "qwen3-delta"
ALIAS = "delta-mem"
# A non-secret marker: OpenClaw accepts it for loopback URLs, and a sidecar without a key ignores it.
LOCAL_API_KEY = "delta-mem-mlx-local"
HIDDEN_API_KEY = "<hidden: run 'delta-mem-mlx provider-config --apply' to write the sidecar's key>"
APPLY_COMMAND = "delta-mem-mlx provider-config --apply"

# Conservative speeds for a 4B 4-bit model on the smallest Apple Silicon Macs, so that a full
# context prefill plus a full answer fits in the provider timeout instead of being cut off.
_SLOWEST_PREFILL_TOKENS_PER_S = 100
_SLOWEST_DECODE_TOKENS_PER_S = 10
_MIN_TIMEOUT_S = 300
# OpenClaw stops a sidecar it started after this long without a request. The sidecar has unloaded
# its model long before (its keep-alive, 5 minutes by default), so what is left is the process
# itself (≤ 400 MB); stopping it too saves that, and a start then costs the imports as well.
DEFAULT_IDLE_STOP_S = 30 * 60
# Far beyond any model's window; bounds the arithmetic on values a model or a config sends.
MAX_TOKEN_COUNT = 100_000_000


class ProviderConfigError(UserError, ValueError):
    """A provider setting OpenClaw or the sidecar would refuse, with the reason."""

    topic = "provider config"


@dataclass(frozen=True)
class ProviderInputs:
    """The resolved values the provider block is built from."""

    api_base: str
    model_id: str
    api_key: str | None
    context_window: int
    max_tokens: int
    defaults_from: str
    notes: tuple[str, ...]
    local_service: LocalService | None = None


def resolve_inputs(
    root: Path, config: PluginConfig, params: ProviderConfigParams, idle_stop_s: float | None = None
) -> ProviderInputs:
    """Pick each value from the tool parameters, the plugin config, the installed root, then defaults.

    A root installed with `--supervisor openclaw` also gets the `localService` OpenClaw starts it
    with, stopped after `idle_stop_s` idle seconds (default DEFAULT_IDLE_STOP_S; 0: never).
    """
    settings = installed_settings(root)
    notes: list[str] = []
    if settings is None:
        preset = load_preset(DEFAULT_PRESET)
        defaults_from = f"the {DEFAULT_PRESET} preset on this machine (nothing installed at {root} yet)"
        plan = preset_plan(preset)  # the window an install would announce here
        installed_window = plan.context_window if plan is not None else preset.context_window
        installed_max = preset.max_output_tokens
        installed_id = preset.model_id or ""
    else:
        defaults_from = f"the sidecar installed at {root}"
        installed_window, installed_max = settings.context_window, settings.max_output_tokens
        installed_id = settings.model_id

    model_id = params.get("modelId") or config.get("modelId") or installed_id
    window = params.get("contextWindow") or config.get("contextWindow") or installed_window
    context_window = _positive_int("contextWindow", window)
    max_tokens = _positive_int("maxTokens", params.get("maxTokens") or installed_max)
    if context_window < MIN_CONTEXT_WINDOW:
        raise ProviderConfigError(
            f"context window {context_window} is below OpenClaw's minimum of {MIN_CONTEXT_WINDOW} tokens: "
            f"use at least {MIN_CONTEXT_WINDOW}, and a sidecar installed with a window that large"
        )
    if max_tokens >= context_window:
        raise ProviderConfigError(
            f"maxTokens {max_tokens} must be smaller than the context window {context_window}"
        )
    if settings is not None:
        if model_id != settings.model_id:
            notes.append(
                f"model id {model_id!r} differs from the installed sidecar's {settings.model_id!r}: "
                "it will answer 404"
            )
        if context_window > settings.context_window:
            notes.append(
                f"context window {context_window} is larger than the sidecar's {settings.context_window}: "
                "longer prompts will be refused"
            )
    receipt = read_receipt(root)
    started_by_openclaw = settings is not None and receipt is not None and receipt.supervisor == "openclaw"
    if idle_stop_s is not None and not started_by_openclaw:
        raise ProviderConfigError(
            f"--idle-stop is for a sidecar OpenClaw starts, and the one at {root} is not installed that way",
            hint=f"reinstall with 'delta-mem-mlx install-sidecar --supervisor openclaw --root {root}'",
        )
    api_base = resolve_api_base(config, settings, params.get("baseUrl"))
    service = None
    if started_by_openclaw:
        assert settings is not None
        if api_base != resolve_api_base({}, settings):
            raise ProviderConfigError(
                f"OpenClaw starts the sidecar at {root}, which listens on {resolve_api_base({}, settings)}: "
                f"the base URL {api_base} would send its requests elsewhere"
            )
        service = local_service(root, settings, DEFAULT_IDLE_STOP_S if idle_stop_s is None else idle_stop_s)
    return ProviderInputs(
        api_base=api_base,
        model_id=model_id,
        api_key=settings.api_key if settings is not None else None,
        context_window=context_window,
        max_tokens=max_tokens,
        defaults_from=defaults_from,
        notes=tuple(notes),
        local_service=service,
    )


def local_service(root: Path, settings: SidecarSettings, idle_stop_s: float) -> LocalService:
    """How OpenClaw starts this root's sidecar: absolute paths only (OpenClaw looks nothing up on PATH)."""
    command, *args = sidecar_command(root)
    return {
        "command": os.path.abspath(command),  # the venv's python as invoked: resolving its link would leave the venv
        "args": [*args, "--log-to-root"],  # OpenClaw drops the child's output once it is ready
        "cwd": str(RootLayout.of(root).root),
        "env": {name: value for name, value in sidecar_environment().items() if name != "PATH"},
        "healthUrl": base_url(settings) + READY_PATH,
        "readyTimeoutMs": ready_timeout_s(root) * 1000,
        "idleStopMs": round(idle_stop_s * 1000),
    }


def timeout_seconds(context_window: int, max_tokens: int) -> int:
    """A provider timeout long enough for a full-context prefill and a full answer on a slow Mac."""
    needed = context_window / _SLOWEST_PREFILL_TOKENS_PER_S + max_tokens / _SLOWEST_DECODE_TOKENS_PER_S
    return max(_MIN_TIMEOUT_S, math.ceil(needed))


def provider_block(inputs: ProviderInputs, reveal_api_key: bool) -> ProviderBlock:
    """The value of `models.providers.delta-mem-mlx`."""
    if inputs.api_key is None:
        api_key = LOCAL_API_KEY
    else:
        api_key = inputs.api_key if reveal_api_key else HIDDEN_API_KEY
    block: ProviderBlock = {
        "baseUrl": inputs.api_base,
        "apiKey": api_key,
        "api": "openai-completions",
        "timeoutSeconds": timeout_seconds(inputs.context_window, inputs.max_tokens),
        "models": [
            {
                "id": inputs.model_id,
                "name": f"δ-mem {inputs.model_id} (local MLX)",
                "reasoning": False,
                "input": ["text"],
                "contextWindow": inputs.context_window,
                "maxTokens": inputs.max_tokens,
                "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                # Session affinity headers are how the sidecar tells OpenClaw sessions apart; a
                # configured header would be one static value shared by every session.
                "compat": {
                    "sendSessionAffinityHeaders": True,
                    "supportsUsageInStreaming": True,
                    "supportsTools": True,
                    "supportsDeveloperRole": False,
                    "maxTokensField": "max_completion_tokens",
                },
            }
        ],
    }
    if inputs.local_service is not None:
        block["localService"] = inputs.local_service
    return block


def model_ref(model_id: str) -> str:
    """How OpenClaw names the model: `<provider>/<model id>`."""
    return f"{PROVIDER_ID}/{model_id}"


def config_patch(block: ProviderBlock) -> ConfigPatch:
    """The provider, the default model and its alias, where openclaw.json keeps each."""
    ref = model_ref(block["models"][0]["id"])
    return {
        "models": {"mode": "merge", "providers": {PROVIDER_ID: block}},
        "agents": {"defaults": {"model": {"primary": ref}, "models": {ref: {"alias": ALIAS}}}},
    }


def build_provider_config(
    config: PluginConfig, params: ProviderConfigParams, reveal_api_key: bool = False, idle_stop_s: float | None = None
) -> ProviderConfigPayload:
    """The `delta_mem_mlx_provider_config` payload for the configured install root."""
    root = install_root(config)
    inputs = resolve_inputs(root, config, params, idle_stop_s)
    block = provider_block(inputs, reveal_api_key)
    notes = list(inputs.notes)
    service = inputs.local_service
    if service is not None:
        stop = format_duration(service["idleStopMs"] / 1000)
        notes.append(
            f"OpenClaw starts the sidecar when an agent needs the model (waiting up to "
            f"{service['readyTimeoutMs'] // 1000} s) and stops it after {stop} idle"
            if service["idleStopMs"]
            else "OpenClaw starts the sidecar when an agent needs the model and keeps it until OpenClaw exits"
        )
    if inputs.api_key is not None and not reveal_api_key:
        notes.append(f"the sidecar requires an API key; '{APPLY_COMMAND}' writes it into openclaw.json")
    ref = model_ref(inputs.model_id)
    return {
        "tool": PROVIDER_CONFIG_TOOL,
        "summary": f"provider {PROVIDER_ID} -> {inputs.api_base}, model {ref} (alias {ALIAS}), "
        f"context window {inputs.context_window}",
        "provider_id": PROVIDER_ID,
        "model_ref": ref,
        "alias": ALIAS,
        "config_patch": config_patch(block),
        "defaults_from": inputs.defaults_from,
        "apply_command": APPLY_COMMAND,
        "notes": notes,
    }


def check_params(params: dict[str, object]) -> ProviderConfigParams:
    """Tool-call parameters checked for unknown names and wrong types (a model can send anything)."""
    known = list(ProviderConfigParams.__annotations__)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ProviderConfigError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name in ("baseUrl", "modelId"):
        if name in params and (not isinstance(params[name], str) or not params[name]):
            raise ProviderConfigError(f"{name} must be a non-empty string (got {params[name]!r})")
        if name in params and (problem := value_problem(params[name], {"type": "string"})) is not None:
            raise ProviderConfigError(f"{name} {problem}")
    for name in ("contextWindow", "maxTokens"):
        if name in params:
            _positive_int(name, params[name])
    return params  # type: ignore[return-value]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKEN_COUNT:
        raise ProviderConfigError(f"{name} must be a positive integer up to {MAX_TOKEN_COUNT} (got {value!r})")
    return value
