"""The canonical wire format of the OpenClaw plugin tools.

Every JSON object that `python -m plugin_tools` reads or prints has one of the shapes
below; the JS entry hands the printed object to OpenClaw unchanged, and the tests check
real outputs against a JSON schema derived from these types. Change a shape here first.

OpenClaw grades a tool call by the top-level result keys `status`, `ok`, `success`,
`error`, `timedOut` and `exitCode`, so no payload uses them at the top level.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

STATUS_TOOL = "delta_mem_mlx_status"
PROVIDER_CONFIG_TOOL = "delta_mem_mlx_provider_config"
PROVIDER_ID = "delta-mem-mlx"

ToolName = Literal["delta_mem_mlx_status", "delta_mem_mlx_provider_config"]
AttentionMode = Literal["request", "qmd", "none"]
MaxTokensField = Literal["max_completion_tokens", "max_tokens"]


class PluginConfig(TypedDict, total=False):
    """`plugins.entries.delta-mem-mlx.config` (the manifest's configSchema)."""

    sidecarBaseUrl: str
    modelId: str
    sidecarRoot: str
    pythonCommand: str
    attentionStateEnabled: bool
    attentionAdapter: str
    attentionMode: AttentionMode
    attentionLimit: int
    contextWindow: int
    toolTimeoutSeconds: int
    allowManagedDownloads: bool


class StatusParams(TypedDict, total=False):
    """The parameters of `delta_mem_mlx_status` (none: it reports on the configured root)."""


class ProviderConfigParams(TypedDict, total=False):
    """The parameters of `delta_mem_mlx_provider_config`; each overrides the installed value."""

    baseUrl: str
    modelId: str
    contextWindow: int
    maxTokens: int


class ToolRequest(TypedDict, total=False):
    """What the JS entry writes to stdin: the plugin's config and the tool call's parameters."""

    config: PluginConfig
    params: dict[str, Any]


class PlatformReport(TypedDict):
    """The machine against the project's target (macOS on Apple Silicon)."""

    system: str
    machine: str
    python: str
    apple_silicon: bool
    supported: bool
    note: str


class InstallReport(TypedDict):
    """What the install root holds and whether its receipt still matches the files."""

    root: str
    root_exists: bool
    receipt_present: bool
    installed: bool
    preset: str | None
    model_id: str | None
    model_path: str | None
    model_present: bool
    adapter_path: str | None
    adapter_present: bool | None
    problems: list[str]


class LastExitReport(TypedDict):
    """How the sidecar last exited, as its supervisor tells (supervisors.LastExit)."""

    description: str
    code: int | None
    signal: str | None
    time: str | None
    restarts: int | None


class SupervisorReport(TypedDict):
    """Who keeps the sidecar running (launchd, systemd or a pidfile), its state and its last exit."""

    kind: str | None
    state: str
    pid: int | None
    detail: str
    uptime_s: float | None
    last_exit: LastExitReport | None


class HealthReport(TypedDict):
    """The sidecar's `GET /health`, fetched over HTTP with a short timeout."""

    url: str
    reachable: bool
    http_code: int | None
    body: dict[str, Any] | None
    problem: str | None


class SessionsAtPrecision(TypedDict):
    """What one OpenClaw-sized session holds at a KV precision, and how many the budget holds: referencing
    the shared prefix (held once, `prefix_bytes`), and with a private copy of it each."""

    prefix_bytes: int
    bytes_per_session: int
    sessions: int
    bytes_per_session_without_sharing: int
    sessions_without_sharing: int


class MemoryReport(TypedDict):
    """The installed sidecar's KV budget and precision, the formula's terms on this machine, and how
    many OpenClaw-sized sessions (12,059-token shared system prompt + 4,096 own tokens) the budget holds."""

    formula: dict[str, int]
    kv_budget_bytes: int
    kv_bits: str
    kv_group_size: int
    context_window: int
    openclaw_sessions: dict[str, SessionsAtPrecision]
    disk_cache_bytes: int  # the disk cache's budget (max_disk_bytes; 0: off)


class StatusPayload(TypedDict):
    """The result of `delta_mem_mlx_status`."""

    tool: Literal["delta_mem_mlx_status"]
    summary: str
    ready: bool
    platform: PlatformReport
    install: InstallReport
    supervisor: SupervisorReport
    health: HealthReport
    memory: MemoryReport | None
    plugin_config: PluginConfig
    next_steps: list[str]
    notes: list[str]


class ModelCost(TypedDict):
    """Per-token prices OpenClaw shows: a local model costs nothing."""

    input: float
    output: float
    cacheRead: float
    cacheWrite: float


class ModelCompat(TypedDict):
    """The OpenAI-compatibility flags OpenClaw reads for a custom model route."""

    sendSessionAffinityHeaders: bool
    supportsUsageInStreaming: bool
    supportsTools: bool
    supportsDeveloperRole: bool
    maxTokensField: MaxTokensField


class ProviderModel(TypedDict):
    """One entry of `models.providers.delta-mem-mlx.models`."""

    id: str
    name: str
    reasoning: bool
    input: list[Literal["text"]]
    contextWindow: int
    maxTokens: int
    cost: ModelCost
    compat: ModelCompat


class LocalService(TypedDict):
    """`models.providers.delta-mem-mlx.localService`: how OpenClaw starts the sidecar on demand."""

    command: str
    args: list[str]
    cwd: str
    env: dict[str, str]
    healthUrl: str
    readyTimeoutMs: int
    idleStopMs: int


class _StartedByOpenClaw(TypedDict, total=False):
    """What a provider block holds only for a root installed with `--supervisor openclaw`."""

    localService: LocalService


class ProviderBlock(_StartedByOpenClaw):
    """The value of `models.providers.delta-mem-mlx` in openclaw.json."""

    baseUrl: str
    apiKey: str
    api: Literal["openai-completions"]
    timeoutSeconds: int
    models: list[ProviderModel]


class ModelsSection(TypedDict):
    """The `models` part of the config patch."""

    mode: Literal["merge"]
    providers: dict[str, ProviderBlock]


class DefaultModel(TypedDict):
    """`agents.defaults.model`: the model every agent uses unless told otherwise."""

    primary: str


class ModelAlias(TypedDict):
    """One `agents.defaults.models["<provider>/<model>"]` entry."""

    alias: str


class AgentDefaults(TypedDict):
    """The `agents.defaults` part of the config patch."""

    model: DefaultModel
    models: dict[str, ModelAlias]


class AgentsSection(TypedDict):
    """The `agents` part of the config patch."""

    defaults: AgentDefaults


class ConfigPatch(TypedDict):
    """What `provider-config --apply` merges into openclaw.json."""

    models: ModelsSection
    agents: AgentsSection


class ProviderConfigPayload(TypedDict):
    """The result of `delta_mem_mlx_provider_config`."""

    tool: Literal["delta_mem_mlx_provider_config"]
    summary: str
    provider_id: str
    model_ref: str
    alias: str
    config_patch: ConfigPatch
    defaults_from: str
    apply_command: str
    notes: list[str]


class ToolProblem(TypedDict):
    """A handled failure: what went wrong and what to do, printed instead of a result."""

    tool: str
    summary: str
    problem: str
    hint: str
