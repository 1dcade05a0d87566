"""Which install root and which sidecar URL a tool call is about."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.errors import UserError
from common.health import base_url
from common.layout import default_root
from common.settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    SidecarSettings,
    load_settings,
    settings_path,
)
from plugin_tools.payloads import PluginConfig


class TargetError(UserError, ValueError):
    """A sidecar URL that cannot be used, with the reason."""


def install_root(config: PluginConfig) -> Path:
    """The plugin's `sidecarRoot`, else the default install root."""
    configured = config.get("sidecarRoot")
    if configured:
        # realpath, not Path.resolve: Python 3.11 raises RuntimeError for a loop of symlinks.
        return Path(os.path.realpath(Path(configured).expanduser()))
    return default_root()


def installed_settings(root: Path) -> SidecarSettings | None:
    """The root's sidecar settings, or None before anything was installed there."""
    if not settings_path(root).exists():
        return None
    return load_settings(root)


def api_base_url(url: str) -> str:
    """Normalise a sidecar URL given with or without `/v1` to the `…/v1` form OpenClaw wants."""
    example = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/v1"
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as exc:
        raise TargetError(f"sidecar URL {url!r} cannot be used ({exc}); use a URL like {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetError(f"sidecar URL {url!r} is not an http(s) URL like {example}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def resolve_api_base(
    config: PluginConfig, settings: SidecarSettings | None, override: str | None = None
) -> str:
    """The sidecar's `…/v1` URL: the override, the plugin config, the installed settings or the default."""
    url = override or config.get("sidecarBaseUrl")
    if url:
        return api_base_url(url)
    if settings is not None:
        return api_base_url(base_url(settings))
    return api_base_url(f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")


def settings_for_url(api_base: str) -> SidecarSettings:
    """Settings that only locate a sidecar this root did not install (enough to probe its /health)."""
    parts = urlsplit(api_base)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return SidecarSettings(model_path="", model_id="", host=parts.hostname or DEFAULT_HOST, port=port)
