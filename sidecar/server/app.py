"""The sidecar's FastAPI application: routes, auth, limits and the one error mapping.

Routes:
  GET  /health                 status (503 while the model first loads), model, its state, adapter, sessions
  GET  /ready                  200 once the model loaded (loaded now, or unloaded and loadable), else 503
  GET  /v1/models              the one model served
  POST /v1/chat/completions    OpenAI chat completions (JSON or SSE)
  GET  /v1/session             statistics of the session the request's headers name
  DELETE /v1/session           reset that session
  POST /v1/session/save        persist that session's δ-state now
  POST /v1/session/load        restore that session's δ-state from disk
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.health import READY_PATH
from common.settings import SidecarSettings
from sidecar.engine.interface import EngineError, EngineLike
from sidecar.server.connection_limits import raise_open_file_limit
from sidecar.server.engine_host import EngineHost, EngineLoader, LoadListener
from sidecar.server.protocol import ApiError, ChatCompletionRequest, ErrorType, ModelCard, ModelList
from sidecar.server.serving import ChatCompletionService
from sidecar.sessions.keys import hash_session_key, session_key_from_headers

log = logging.getLogger(__name__)


# OpenClaw's largest requests (a ~42k-character system prompt, 12 tool schemas, long tool
# results) stay far below this; anything bigger is a mistake or an attack.
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class ServerState:
    """What the routes share: the settings and the host that owns the engine (or none)."""

    settings: SidecarSettings
    started: float
    host: EngineHost

    @property
    def chat(self) -> ChatCompletionService | None:
        """The chat service while the model is loaded."""
        return self.host.chat

    @property
    def load_failure(self) -> BaseException | None:
        """The exception of a failed load, if the last load failed."""
        return self.host.load_failure

    @property
    def load_error(self) -> str | None:
        """Why the model failed to load, for /health and 503 answers."""
        return self.host.load_error

    def end_answers(self) -> None:
        """End every answer still running, and any started from now on (the server is stopping)."""
        self.host.end_answers()


def create_app(
    settings: SidecarSettings,
    load_engine: EngineLoader | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    on_loaded: LoadListener | None = None,
) -> FastAPI:
    """Build the sidecar app; the engine loads in the background once the server starts.

    `on_loaded(seconds, first)` is called after every model load (see engine_host.py).
    """
    host = EngineHost(settings, load_engine or _load_real_engine, on_loaded=on_loaded)
    state = ServerState(settings=settings, started=time.time(), host=host)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(host.start())
        try:
            yield
        finally:
            # A load cannot be interrupted: wait for it, so that its engine is closed too. An MLX
            # engine left running into interpreter teardown aborts the process.
            await loading
            await host.close()

    app = FastAPI(
        title="delta-mem-mlx sidecar",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    _add_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=max_body_bytes)

    @app.get("/health")
    async def health() -> JSONResponse:
        base: dict[str, Any] = {
            "model": settings.model_id, **host.describe(), "uptime_s": round(time.time() - state.started, 1)
        }
        if not host.serving:
            status = "error" if state.load_error else "loading"
            extra = {"error": state.load_error} if state.load_error else {}
            return JSONResponse({"status": status, **base, **extra}, status_code=503)
        chat = host.chat
        if chat is None:
            # Unloaded when idle (or loading again): healthy, the next request loads the model.
            return JSONResponse({"status": "ok", **base})
        engine = await chat.engine.health()
        # Still serving, but something the user relies on (saving sessions) is failing.
        status = "degraded" if engine.get("problems") else "ok"
        return JSONResponse({"status": status, **engine, **base})

    @app.get(READY_PATH)
    async def ready() -> JSONResponse:
        # OpenClaw's localService probe: ready once the model has loaded (it may be unloaded since:
        # the next request loads it); 503 while the first load runs or after a failed one.
        body = {"ready": host.serving, "model_state": host.state}
        return JSONResponse(body, status_code=200 if host.serving else 503)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_id, created=int(state.started))])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        chat = await host.acquire()
        try:
            return await chat.create(body, request)
        finally:
            host.release()  # a streamed answer's job holds the model on its own until the stream ends

    @app.get("/v1/session")
    async def session_stats(request: Request) -> JSONResponse:
        key_hash = _key_hash(request)
        async with host.engine() as engine:
            stats = await engine.session_stats(key_hash)
        if stats is None:
            raise ApiError(404, "this session has no state on the server", code="session_not_found")
        return _session_response(key_hash, stats)

    @app.delete("/v1/session")
    async def session_reset(request: Request) -> JSONResponse:
        key_hash = _key_hash(request)
        async with host.engine() as engine:
            return _session_response(key_hash, {"reset": await engine.reset_session(key_hash)})

    @app.post("/v1/session/save")
    async def session_save(request: Request) -> JSONResponse:
        key_hash = _key_hash(request)
        async with host.engine() as engine:
            return _session_response(key_hash, await engine.save_session(key_hash))

    @app.post("/v1/session/load")
    async def session_load(request: Request) -> JSONResponse:
        key_hash = _key_hash(request)
        async with host.engine() as engine:
            return _session_response(key_hash, await engine.load_session(key_hash))

    return app


def _load_real_engine(settings: SidecarSettings) -> EngineLike:
    # Imported here: the engine pulls in MLX and the model code, which the app module and its
    # tests with a fake engine do not need.
    from sidecar.engine.engine import load_engine

    engine = load_engine(settings)
    # Importing mlx-lm set the soft open-file limit to 2048 (the hard one to 4096): take it back up.
    raise_open_file_limit()
    return engine


def _key_hash(request: Request) -> str:
    """The hash of the session key the request's headers name: past this point, a session's only name."""
    return hash_session_key(session_key_from_headers(request.headers))


def _session_response(key_hash: str, payload: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"session": key_hash, **payload}, headers={"X-Delta-Session": key_hash})


# --------------------------------------------------------------------------- errors


def error_response(
    status: int, message: str, type: ErrorType | None = None, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An OpenAI-shaped error response (its type from the status unless given)."""
    body = ApiError(status, message, type=type, param=param, code=code).response_body()
    return JSONResponse(body, status_code=status)


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.response_body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _describe_validation(exc)
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=_HTTP_CODES.get(exc.status_code))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc.status, str(exc), code=exc.code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """The message, parameter and code of a request that failed validation (a 400)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None, "invalid_request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason}", None, "invalid_json"
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    # pydantic prefixes messages of custom validators; the client only needs the reason.
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param or 'body'}: {message}{more}", param, "invalid_request"


# --------------------------------------------------------------------------- auth and body size


class RequestGuard:
    """ASGI middleware: bearer-token auth when a key is set (not for /ready), and a request body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        # The readiness probe says only whether the model has loaded; OpenClaw sends it without a key.
        needs_key = self.api_key is not None and scope.get("path") != READY_PATH
        if needs_key and not _bearer_matches(headers.get(b"authorization", b""), self.api_key):
            response = error_response(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                code="invalid_api_key",
            )
            await response(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _too_large(self) -> JSONResponse:
        message = f"the request body is larger than {self.max_body_bytes} bytes"
        return error_response(413, message, code="request_too_large")

    def _counting(self, receive: Receive) -> Receive:
        # A chunked body has no Content-Length; count what arrives instead.
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # FastAPI passes its own HTTPException through body parsing; others become a 400.
                    raise HTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        return counted


def _bearer_matches(authorization: bytes, api_key: bytes) -> bool:
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)
