"""An HTTP sidecar serving a `SnapshotView` to pods that do not run Python (``snapbus[serve]``).

``snapbus serve`` (or `run_server`) keeps one view of the topic and serves it; `create_app`
builds the same ASGI application (Starlette) around a view the caller already runs.

==========================  ====================================================================
``GET /sessions/{id}``      the session's snapshot fields as JSON; 404 if absent, 400 if the
                            id is not a UUID
``GET /sessions``           ``{"sessions": [...], "count": n}``, sorted by session id; filters
                            ``repo`` (UUID), ``agent``, ``state`` use the view's indexes and
                            combine; 400 for a malformed repo id or an unknown parameter
``GET /changes``            server-sent events: a comment line once subscribed, then one
                            ``event: change`` per change with data ``{"session_id", "old",
                            "new"}`` (``old`` null: created; ``new`` null: deleted or
                            expired); ``event: error`` if the client fell too far behind,
                            ``event: end`` when the view stops; ``: keepalive`` comments
``GET /metrics``            Prometheus metrics (`snapbus.metrics`)
``GET /healthz``            200 unless the view failed or stopped (503); the `Health` as JSON
``GET /readyz``             200 only while the view is caught up and live, else 503; same JSON
``PUT /sessions/{id}``      writes only: publish the JSON body (the snapshot fields, with the
                            defaults of `WorkspaceSnapshot.from_input`; ``session_id`` may
                            be omitted, else must equal the path), wait
                            until this view shows it, answer ``{"snapshot", "receipt"}``;
                            400 for a body that is not JSON, 422 for invalid fields, 503 if
                            the broker did not acknowledge, 504 if the view did not show it
``PATCH /sessions/{id}``    writes only: change some fields of a session the view holds (404
                            if absent), the others keep their values; answers like PUT
``DELETE /sessions/{id}``   writes only: publish a tombstone, wait until the view applied it,
                            answer ``{"deleted": was_present, "receipt"}``: idempotent,
                            200 also for an absent session (``snapbus evict`` alike)
==========================  ====================================================================

Writes are off unless a publisher is given (``--allow-writes``); without one, PUT and DELETE
answer 405 saying so. Errors are JSON ``{"error": message}`` (plus ``"field"`` when one field
is at fault). Reads answer from memory whatever the view holds: route traffic by ``/readyz``
to serve only complete, fresh data.

With a bearer token (``token=``; ``snapbus serve`` reads it from ``SNAPBUS_SERVE_TOKEN`` or
``--token-file``, never from a flag), every ``/sessions`` and ``/changes`` request must carry
``Authorization: Bearer <token>``: a missing or wrong one is 401 with ``WWW-Authenticate:
Bearer``, the same answer either way, checked before anything else and compared in constant
time. ``/metrics``, ``/healthz`` and ``/readyz`` stay open for probes and scrapers; they show
counts and the view's state, never a session. Serving writes beyond loopback without a token
is refused (`ConfigError`); serving reads there without one logs a warning. ``tls_certfile``
(and ``tls_keyfile``) make the listener HTTPS. See docs/sidecar-security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

try:
    import uvicorn
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "snapbus.serve needs Starlette, uvicorn and prometheus-client: "
        "pip install 'snapbus[serve]'"
    ) from exc

from snapbus._signals import stop_on_signals
from snapbus._token import (
    MIN_TOKEN_CHARS,
    TOKEN_ENV,
    check_exposure,
    same_token,
    tls_context,
    token_digest,
)
from snapbus._token import check_token as _check_token
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError, PublishError, ValidationError, ViewError
from snapbus.janitor import Janitor
from snapbus.metrics import InstrumentedPublisher, PublisherMetrics, ViewMetrics
from snapbus.publisher import Receipt, SnapshotPublisher
from snapbus.snapshot import WorkspaceSnapshot, parse_uuid
from snapbus.view import Change, SnapshotView

__all__ = ["MAX_BODY_BYTES", "MIN_TOKEN_CHARS", "TOKEN_ENV", "check_exposure", "create_app",
           "read_token", "run_server", "serving"]

log = logging.getLogger("snapbus.serve")

MAX_BODY_BYTES = 2_000_000
"""Largest PUT body accepted (413 beyond); the encoded snapshot has its own limit."""

_FILTERS = ("repo", "agent", "state")

_UNAUTHORIZED = "a valid bearer token is required"


def read_token(path: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None) -> str | None:
    """The sidecar's bearer token: the file at `path` if given, else ``SNAPBUS_SERVE_TOKEN``.

    None when neither is given. Whitespace around the file's content (a trailing newline) is
    ignored. A token is never taken from a command-line value, which any user sees in ``ps``.

    Raises:
        ConfigError: the file cannot be read, or the token is empty (a variable set to the
            empty string counts: a secret that failed to mount must not open the sidecar),
            shorter than `MIN_TOKEN_CHARS`, or not visible ASCII.
    """
    if path is not None:
        try:
            with open(path, encoding="ascii") as file:
                return _check_token(file.read().strip(), f"file {os.fspath(path)}")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot read the sidecar token file {os.fspath(path)}: "
                              f"{reason}") from exc
    token = (os.environ if env is None else env).get(TOKEN_ENV)
    return None if token is None else _check_token(token, TOKEN_ENV)


def _resolve(host: str, port: int) -> tuple[Any, ...]:
    """The address `host` listens on: the first answer of ``getaddrinfo`` (passive)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]


class _Guard:
    """Checks a request's bearer token in constant time (no token: every request passes)."""

    def __init__(self, token: str | None) -> None:
        if token is not None:
            _check_token(token, "token=")
        # Digests, so that compare_digest compares equal lengths: not even the length leaks.
        self._digest = None if token is None else token_digest(token)

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def allows(self, request: Request) -> bool:
        if self._digest is None:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" else ""
        # (Starlette decodes header bytes as Latin-1: encoding back gives the bytes sent.)
        return same_token(given.encode("latin-1"), self._digest)

    def __call__(self, handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap `handler` so that it runs only for an authorized request."""
        async def guarded(request: Request) -> Response:
            if not self.allows(request):
                return _error(401, _UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)

        return guarded


def _error(status: int, message: str, *, field: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def _receipt(receipt: Receipt) -> dict[str, Any]:
    return {"topic": receipt.topic, "partition": receipt.partition, "offset": receipt.offset,
            "timestamp_ms": receipt.timestamp_ms}


def _change_event(change: Change) -> str:
    data = {
        "session_id": str(change.session_id),
        "old": change.old.to_dict() if change.old is not None else None,
        "new": change.new.to_dict() if change.new is not None else None,
    }
    return _event("change", data)


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Service:
    """The request handlers, over one view and an optional publisher."""

    def __init__(self, view: SnapshotView, publisher: SnapshotPublisher | None,
                 registry: CollectorRegistry, *, write_timeout_s: float, heartbeat_s: float,
                 max_pending: int, token: str | None) -> None:
        self.guard = _Guard(token)
        self.view = view
        self.publisher = publisher
        self.registry = registry
        self.write_timeout_s = write_timeout_s
        self.heartbeat_s = heartbeat_s
        self.max_pending = max_pending
        self.closing = asyncio.Event()
        """Set when the server shuts down: open event streams end."""

    # ------------------------------------------------------------------ reads

    async def session(self, request: Request) -> Response:
        method = request.method
        if method in ("PUT", "PATCH", "DELETE") and self.publisher is None:
            return _error(405, "writes are disabled on this server; start it with "
                               "`snapbus serve --allow-writes` to PUT, PATCH or DELETE "
                               "sessions",
                          headers={"Allow": "GET, HEAD"})
        try:
            session_id = parse_uuid(request.path_params["session_id"], field="session_id")
        except ValidationError as exc:
            return _error(400, str(exc), field=exc.field)
        if method in ("PUT", "PATCH"):
            return await self._put(request, session_id, patch=method == "PATCH")
        if method == "DELETE":
            return await self._delete(session_id)
        snapshot = self.view.get(session_id)
        if snapshot is None:
            return _error(404, f"session {session_id} is not in the view of topic "
                               f"{self.view.config.topic!r}")
        return JSONResponse(snapshot.to_dict())

    async def sessions(self, request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - set(_FILTERS))
        if unknown:
            return _error(400, f"unknown query parameter(s): {', '.join(unknown)}; "
                               f"filter with {', '.join(_FILTERS)}")
        repo, agent, state = (params.get(name) for name in _FILTERS)
        try:
            found = self.view.select(repo_id=repo, agent_id=agent, state=state)
        except ValidationError as exc:
            return _error(400, str(exc).replace("repo_id", "repo"), field="repo")
        selected = sorted(found, key=lambda s: s.key)
        return JSONResponse({"sessions": [s.to_dict() for s in selected],
                             "count": len(selected)})

    async def changes(self, request: Request) -> Response:
        if self.view.status in ("failed", "stopped"):
            return _error(503, f"the view is {self.view.status}: no changes will come",
                          headers={"Retry-After": "5"})
        return StreamingResponse(
            self._events(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(self) -> AsyncIterator[str]:
        stream = self.view.changes(max_pending=self.max_pending)
        closing = asyncio.ensure_future(self.closing.wait())
        pending: asyncio.Future[Change] | None = None
        try:
            yield f": subscribed to {self.view.config.topic}\n\n"
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(stream))
                waiting: set[asyncio.Future[Any]] = {pending, closing}
                done, _ = await asyncio.wait(waiting, timeout=self.heartbeat_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    yield _event("end", {"reason": "the server is shutting down"})
                    return
                if pending not in done:
                    yield ": keepalive\n\n"
                    continue
                finished, pending = pending, None
                try:
                    change = finished.result()
                except StopAsyncIteration:
                    yield _event("end", {"reason": "the view stopped"})
                    return
                except ViewError as exc:
                    yield _event("error", {"error": str(exc)})
                    return
                yield _change_event(change)
        finally:
            stream.close()
            closing.cancel()
            if pending is not None:
                pending.cancel()

    async def metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type})

    async def healthz(self, request: Request) -> Response:
        health = self.view.health()
        ok = health.status not in ("failed", "stopped")
        return JSONResponse(dataclasses.asdict(health), status_code=200 if ok else 503)

    async def readyz(self, request: Request) -> Response:
        health = self.view.health()
        return JSONResponse(dataclasses.asdict(health), status_code=200 if health.ready else 503)

    # ------------------------------------------------------------------ writes

    async def _put(self, request: Request, session_id: uuid.UUID, *,
                   patch: bool = False) -> Response:
        assert self.publisher is not None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the body is not valid JSON: {exc}")
        if not isinstance(data, dict):
            return _error(422, "the body must be a JSON object of snapshot fields, not "
                               f"{type(data).__name__}")
        if "session_id" in data:
            try:
                given = parse_uuid(data["session_id"], field="session_id")
            except ValidationError as exc:
                return _error(422, str(exc), field="session_id")
            if given != session_id:
                return _error(422, f"session_id in the body ({given}) differs from the one "
                                   f"in the path ({session_id}); omit it or make them equal",
                              field="session_id")
        current = self.view.get(session_id) if patch else None
        if patch and current is None:
            return _error(404, f"session {session_id} is not in the view of topic "
                               f"{self.view.config.topic!r}; PATCH changes existing "
                               "sessions (PUT creates one)")
        fields = {**data, "session_id": str(session_id)}
        try:
            snapshot = (current.updated(fields) if current is not None
                        else WorkspaceSnapshot.from_input(fields))
            receipt = await self.publisher.publish(snapshot)
        except ValidationError as exc:
            return _error(422, str(exc), field=exc.field)
        except PublishError as exc:
            return _error(503, str(exc), headers={"Retry-After": "1"})
        return await self._written(receipt, {"snapshot": snapshot.to_dict()})

    async def _delete(self, session_id: uuid.UUID) -> Response:
        assert self.publisher is not None
        present = session_id in self.view
        try:
            receipt = await self.publisher.evict(session_id)
        except PublishError as exc:
            return _error(503, str(exc), headers={"Retry-After": "1"})
        return await self._written(receipt, {"deleted": present})

    async def _written(self, receipt: Receipt, body: dict[str, Any]) -> Response:
        """Answer once the view applied the record: the client reads its own write."""
        try:
            await self.view.wait_for(receipt, timeout=self.write_timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"stored at {receipt.topic}[{receipt.partition}]@"
                               f"{receipt.offset}, but the view did not apply it within "
                               f"{self.write_timeout_s:g} s")
        except ViewError as exc:
            return _error(503, f"stored at {receipt.topic}[{receipt.partition}]@"
                               f"{receipt.offset}, but {exc}")
        return JSONResponse({**body, "receipt": _receipt(receipt)})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail, headers=exc.headers)


def create_app(
    view: SnapshotView,
    publisher: SnapshotPublisher | None = None,
    *,
    registry: CollectorRegistry | None = None,
    write_timeout_s: float = 10.0,
    heartbeat_s: float = 15.0,
    max_pending: int = 10_000,
    token: str | None = None,
) -> Starlette:
    """Build the ASGI application serving `view` (see the module docstring for the routes).

    The caller starts and stops the view and publisher; the application only uses them.

    Args:
        view: the view to serve.
        publisher: enables PUT and DELETE when given (it should write the view's topic).
        registry: the Prometheus registry ``/metrics`` serves; the view's metrics are
            registered on it (default: a new registry). Register publisher metrics there too
            (an `InstrumentedPublisher` whose `PublisherMetrics` uses this registry).
        write_timeout_s: how long a write waits for the view to apply it (504 after).
        heartbeat_s: seconds between keep-alive comments on ``/changes``.
        max_pending: changes an event-stream client may fall behind before the server ends
            its stream with ``event: error`` (it may reconnect, then re-read ``/sessions``).
        token: when given, every ``/sessions`` and ``/changes`` request needs
            ``Authorization: Bearer <token>`` (401 otherwise); see `read_token`.

    Raises:
        ConfigError: a token shorter than `MIN_TOKEN_CHARS` or not visible ASCII.
    """
    registry = registry if registry is not None else CollectorRegistry()
    ViewMetrics(view, registry)
    service = _Service(view, publisher, registry, write_timeout_s=write_timeout_s,
                       heartbeat_s=heartbeat_s, max_pending=max_pending, token=token)
    guard = service.guard
    app = Starlette(
        routes=[
            Route("/sessions", guard(service.sessions), methods=["GET"]),
            Route("/sessions/{session_id}", guard(service.session),
                  methods=["GET", "PUT", "PATCH", "DELETE"]),
            Route("/changes", guard(service.changes), methods=["GET"]),
            Route("/metrics", service.metrics, methods=["GET"]),
            Route("/healthz", service.healthz, methods=["GET"]),
            Route("/readyz", service.readyz, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.snapbus = service
    return app


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its caller (uvicorn re-raises them on exit)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen, so that address errors surface here, with a clear message."""
    try:
        family, kind, proto, _, address = _resolve(host, port)
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _check_tls(certfile: str | os.PathLike[str] | None,
               keyfile: str | os.PathLike[str] | None) -> None:
    """Load the certificate and key once here, so that a bad file is one clear line."""
    tls_context(certfile, keyfile)


@contextlib.asynccontextmanager
async def serving(app: Starlette, host: str = "127.0.0.1", port: int = 0,
                  *, access_log: bool = False,
                  tls_certfile: str | os.PathLike[str] | None = None,
                  tls_keyfile: str | os.PathLike[str] | None = None) -> AsyncIterator[str]:
    """Serve `app` with uvicorn in the running event loop; yield its base URL.

    Port 0 picks a free port. On exit the server stops: event streams of a `create_app`
    application end, then open requests get a few seconds to finish. With `tls_certfile`
    (PEM, the chain; the key too unless `tls_keyfile`) the server speaks HTTPS only.

    Raises:
        ConfigError: the address cannot be listened on, the TLS files cannot be loaded, or a
            `create_app` application with writes and no token would listen beyond loopback
            (see `check_exposure`).
    """
    _check_tls(tls_certfile, tls_keyfile)
    sock = _listen(host, port)
    try:
        service = getattr(app.state, "snapbus", None)
        if isinstance(service, _Service):
            _warn_exposure(sock, writable=service.publisher is not None,
                           guarded=service.guard.enabled)
    except ConfigError:
        sock.close()
        raise
    async with _serving(app, sock, access_log=access_log, tls_certfile=tls_certfile,
                        tls_keyfile=tls_keyfile) as url:
        yield url


def _warn_exposure(sock: socket.socket, *, writable: bool, guarded: bool) -> None:
    """`check_exposure` on the address bound: raise for writes, log a warning for reads."""
    warning = check_exposure(sock.getsockname()[0], has_token=guarded, allow_writes=writable)
    if warning is not None:
        log.warning("%s", warning)


@contextlib.asynccontextmanager
async def _serving(app: Starlette, sock: socket.socket, *, access_log: bool,
                   tls_certfile: str | os.PathLike[str] | None = None,
                   tls_keyfile: str | os.PathLike[str] | None = None) -> AsyncIterator[str]:
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    scheme = "http" if tls_certfile is None else "https"
    # ssl_ciphers=None keeps Python's defaults (TLS 1.2+, forward secrecy): older uvicorn
    # releases would otherwise set the wide "TLSv1" cipher list.
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=access_log,
                            timeout_graceful_shutdown=5, ws="none",
                            ssl_certfile=tls_certfile, ssl_keyfile=tls_keyfile,
                            ssl_ciphers=None)
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="snapbus-serve")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise ConfigError(f"the HTTP server on port {bound_port} did not start")
            await asyncio.sleep(0.01)
        yield f"{scheme}://{url_host}:{bound_port}"
    finally:
        service = getattr(app.state, "snapbus", None)
        if isinstance(service, _Service):
            service.closing.set()
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()


async def run_server(
    config: KafkaConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    allow_writes: bool = False,
    ttl_s: float | None = None,
    janitor: bool = False,
    janitor_interval_s: float = 30.0,
    fetch_max_wait_ms: int = 100,
    redis_port: int | None = None,
    redis_upstream: str | None = None,
    http: bool = True,
    on_listening: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
    token: str | None = None,
    tls_certfile: str | os.PathLike[str] | None = None,
    tls_keyfile: str | os.PathLike[str] | None = None,
) -> None:
    """Run the sidecar until SIGINT or SIGTERM: a view of the topic, served over HTTP.

    The server listens while the view replays the topic (``/readyz`` answers 503 until it
    is live). A publisher is started if writes are allowed or a janitor runs; the janitor
    (with a TTL) deletes expired sessions from the topic every `janitor_interval_s`.

    Args:
        redis_port: also serve the Redis protocol on this port (`snapbus.resp`); clients
            AUTH with `token`; `redis_upstream` is its upstream Redis URL for keys other than
            snapshots.
        http: serve HTTP on `port` (False: only the Redis protocol, which needs `redis_port`).
        on_listening: called with each server's URL once it listens.
        on_ready: called with each server's URL once the view has replayed the topic and is
            live.
        token: the bearer token every ``/sessions`` and ``/changes`` request must carry
            (`read_token` reads it); without one, writes are refused beyond loopback and
            reads there are served with a warning logged.
        tls_certfile, tls_keyfile: serve HTTPS (see `serving`), and TLS on the Redis port
            (``rediss://``).

    Raises:
        ConfigError: the address cannot be listened on, a janitor without a TTL, a bad token
            or TLS file, or writes beyond loopback without a token.
        KafkaUnavailableError, TopicError: the view or the publisher cannot start.
    """
    if janitor and ttl_s is None:
        raise ConfigError("a janitor needs a TTL: it deletes the sessions the TTL expired")
    if token is not None:
        _check_token(token, "token=")
    _check_tls(tls_certfile, tls_keyfile)
    registry = CollectorRegistry()
    from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        async with contextlib.AsyncExitStack() as stack:
            # Cheap checks first, so that a failure leaves nothing half started.
            if not http and redis_port is None:
                raise ConfigError("nothing to serve: no HTTP and no Redis port")
            sock = _listen(host, port) if http else None
            if sock is not None:
                stack.callback(sock.close)
                _warn_exposure(sock, writable=allow_writes, guarded=token is not None)
            else:  # (raises early for writes; serving_redis logs the warning for reads)
                check_exposure(host, has_token=token is not None, allow_writes=allow_writes)
            publisher: InstrumentedPublisher | None = None
            if allow_writes or janitor:
                publisher = InstrumentedPublisher(config, metrics=PublisherMetrics(registry))
                await stack.enter_async_context(publisher)  # creates the topic if missing
            view = SnapshotView(config, ttl_s=ttl_s, fetch_max_wait_ms=fetch_max_wait_ms,
                                ensure_topic=False)
            stack.push_async_callback(view.stop)
            urls = []
            if sock is not None:
                app = create_app(view, publisher if allow_writes else None, registry=registry,
                                 token=token)
                urls.append(await stack.enter_async_context(
                    _serving(app, sock, access_log=log.isEnabledFor(logging.INFO),
                             tls_certfile=tls_certfile, tls_keyfile=tls_keyfile)))
            if redis_port is not None:
                from snapbus.resp import serving_redis

                urls.append(await stack.enter_async_context(serving_redis(
                    view, publisher if allow_writes else None, host=host, port=redis_port,
                    token=token, upstream=redis_upstream, tls_certfile=tls_certfile,
                    tls_keyfile=tls_keyfile)))
            for url in urls:
                log.info("serving %s on %s (%s%s)", config.topic, url,
                         "writes allowed" if allow_writes else "read-only",
                         ", token required" if token is not None else "")
                if on_listening is not None:
                    on_listening(url)
            starting = asyncio.create_task(view.start())
            stopping = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not starting.done():  # stopped during the initial replay
                    return
                starting.result()  # raises why the view could not start
                if on_ready is not None:
                    for url in urls:
                        on_ready(url)
                if janitor and publisher is not None:
                    await stack.enter_async_context(
                        Janitor(view, publisher, interval_s=janitor_interval_s))
                await stopping
            finally:
                for task in (starting, stopping):
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
