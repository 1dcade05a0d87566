"""Running the sidecar app under uvicorn: bind first, guard connections, end answers at shutdown.

`run_server` returns the process's exit status:
- it binds the port before anything loads, so a busy port fails at once (PortInUseError) and no
  model-load thread is ever left running when the process exits;
- a model that fails to load stops the server (CONFIG_ERROR when the files are wrong, 1 for
  anything else) so that the supervisor sees the failure instead of a process serving 503 for ever;
- at shutdown, answers still running after a grace period (10 s by default) are ended by the app
  (an error event and `[DONE]` for streams, a 503 for the others) before uvicorn would cut them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path

import uvicorn

from common.errors import UserError
from common.exit_codes import CONFIG_ERROR
from common.settings import SidecarSettings
from sidecar.server.app import ServerState, create_app
from sidecar.server.connection_limits import OPEN_FILES, ConnectionLimits, fit_to_open_files, raise_open_file_limit
from sidecar.server.connections import guarded_protocol
from sidecar.server.engine_host import LoadListener
from sidecar.server.log_output import configure_logging, report_dropped
from sidecar.server.state_dir_lock import hold_state_dir

log = logging.getLogger("sidecar.server")

# Time for the ended answers to send their last event before uvicorn cancels what is left.
WIND_DOWN_S = 5.0
BACKLOG = 2048  # uvicorn's default
# A model that fails to load for another reason (memory, a busy device) may load on a retry.
LOAD_FAILED = 1
_BAD_FILES = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class PortInUseError(UserError):
    """The port is taken by another process."""


class BindError(UserError):
    """The address cannot be bound for another reason (not a local address, a privileged port)."""


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to (as asyncio would bind them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve the host {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(infos):
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
            # Listening now, not when uvicorn starts: on Linux a second process may bind a port
            # (SO_REUSEADDR) until someone listens on it, and would then fail only after loading.
            sock.listen(BACKLOG)
        except OSError as exc:
            for opened in sockets:
                opened.close()
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} is in use",
                    hint="stop the other server on it, or choose another port (--port)",
                ) from None
            raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sockets


def exit_status_for(failure: BaseException) -> int:
    """How the process exits after the model failed to load."""
    # Files that are missing, unreadable or wrong: a restart alone will not help.
    return CONFIG_ERROR if isinstance(failure, _BAD_FILES) else LOAD_FAILED


class SidecarServer(uvicorn.Server):
    """uvicorn's server, stopping when the model fails to load and ending answers at shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s
        self.exit_status = 0

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's check, every 0.1 s, whether to stop; also when the model failed to load."""
        if self.state.load_failure is not None and not self.should_exit:
            self.exit_status = exit_status_for(self.state.load_failure)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown, with the answers still running after the grace ended by the app."""
        deadline = asyncio.get_running_loop().call_later(self.grace_s, self.state.end_answers)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
            report_dropped()


def run_server(
    settings: SidecarSettings,
    *,
    log_level: str,
    limits: ConnectionLimits,
    shutdown_grace_s: float,
    log_outputs: tuple[Path, Path] | None,
    log_max_bytes: int,
    on_loaded: LoadListener | None = None,
) -> int:
    """Set up the log, bind, serve until SIGTERM/SIGINT or a failed model load; the exit status.

    Answers in flight get `shutdown_grace_s` to finish after SIGTERM. `log_outputs` are the files a
    supervisor sends stdout and stderr to (see log_output.py). `on_loaded` hears of every model load
    (see engine_host.py). Raises PortInUseError, BindError or StateDirBusyError (another server runs
    on the state dir) before anything is loaded.
    """
    configure_logging(log_level, log_outputs, log_max_bytes)
    # mlx-lm, imported while the model loads, caps the limit at OPEN_FILES: size the cap for that.
    open_files = min(raise_open_file_limit(), OPEN_FILES)
    limits = fit_to_open_files(limits, open_files)
    if settings.state_dir is not None:  # before anything loads; held until the process exits
        hold_state_dir(Path(settings.state_dir), settings.port)
    listeners = bind_listeners(settings.host, settings.port)
    app = create_app(settings, on_loaded=on_loaded)
    config = uvicorn.Config(
        app,
        log_config=None,  # records go to the root logger: one stream, rate-limited (sidecar/server/log_output.py)
        log_level=log_level,
        http=guarded_protocol(limits),
        lifespan="on",
        timeout_graceful_shutdown=round(shutdown_grace_s + WIND_DOWN_S),
        backlog=BACKLOG,
    )
    server = SidecarServer(config, app.state.server, shutdown_grace_s)
    for sock in listeners:
        host, port = sock.getsockname()[:2]
        log.info(
            "listening on http://%s:%d (at most %d connections; headers within %g s, bodies within %g s; "
            "%d open files)",
            f"[{host}]" if ":" in host else host, port, limits.max_connections, limits.header_timeout_s,
            limits.body_timeout_s, open_files,
        )
    server.run(sockets=listeners)
    if server.exit_status:
        # The last line of the log, where `start-sidecar` and `status` look for the reason.
        log.error("the model failed to load (%s): exiting with status %d", server.state.load_error, server.exit_status)
    return server.exit_status
