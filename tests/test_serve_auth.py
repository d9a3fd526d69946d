"""The HTTP sidecar's bearer token, its loopback rule and TLS, through httpx (issue 22).

A test binds ``0.0.0.0`` to listen beyond loopback and connects through 127.0.0.1. The TLS
certificate is the one the Kafka engine's helper makes for 127.0.0.1/localhost, signed by a
throwaway CA the clients trust.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from snapbus._kafka_broker import _make_tls_files
from snapbus.cli import cli
from snapbus.config import KafkaConfig
from snapbus.errors import ConfigError
from snapbus.metrics import InstrumentedPublisher, PublisherMetrics
from snapbus.serve import TOKEN_ENV, check_exposure, create_app, read_token, serving
from snapbus.topic import ensure_topic
from snapbus.view import SnapshotView
from tests.helpers import eventually, make_snapshot, snapbus_process

if TYPE_CHECKING:
    from tests.conftest import BrokerAddress

WAIT_S = 30.0
TOKEN = "s3cret-token-0123456789abcdef"
UNAUTHORIZED = {"error": "a valid bearer token is required"}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def body_of(snapshot: Any) -> dict[str, str]:
    data: dict[str, str] = snapshot.to_dict()
    del data["session_id"]
    return data


def local_url(url: str) -> str:
    """The URL of a server bound to every interface, through loopback."""
    return url.replace("0.0.0.0", "127.0.0.1")  # (the address the test bound)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, and a server certificate for 127.0.0.1/localhost: as a key file plus a cert file
    (chain), and as one PEM bundle holding both."""
    directory = tmp_path_factory.mktemp("tls")
    files = _make_tls_files(directory)
    bundle = (directory / "broker.pem").read_text()  # key, certificate, CA
    end = "-----END PRIVATE KEY-----\n"
    key, chain = bundle.split(end)
    (directory / "server-key.pem").write_text(key + end)
    (directory / "server.pem").write_text(chain)
    return {"ca": files.cafile, "cert": str(directory / "server.pem"),
            "key": str(directory / "server-key.pem"), "bundle": str(directory / "broker.pem"),
            "client_cert": files.certfile, "client_key": files.keyfile}


def trusting(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


@pytest.fixture
async def parts(broker: BrokerAddress, topic_name: str
                ) -> AsyncIterator[tuple[SnapshotView, InstrumentedPublisher, CollectorRegistry]]:
    """A running view and publisher over a fresh topic, and the registry of their metrics."""
    config = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name)
    registry = CollectorRegistry()
    async with (
        InstrumentedPublisher(config, metrics=PublisherMetrics(registry)) as publisher,
        SnapshotView(config, fetch_max_wait_ms=20) as view,
    ):
        yield view, publisher, registry


Parts = tuple[SnapshotView, InstrumentedPublisher, CollectorRegistry]

# ---------------------------------------------------------------------------- the token


async def test_token_guards_every_session_route_and_only_those(parts: Parts) -> None:
    view, publisher, registry = parts
    snapshot = make_snapshot(agent_id="auth0|secret-agent", intent="rotate the launch codes")
    path = f"/sessions/{snapshot.session_id}"
    routes = [("GET", "/sessions"), ("GET", path), ("HEAD", path), ("PUT", path),
              ("DELETE", path), ("GET", "/changes"), ("GET", "/sessions/not-a-uuid")]
    refused_headers: list[dict[str, str]] = [
        {},                                           # no token
        bearer("wrong-token-0123456789abcdef"),       # wrong token
        bearer("x" * len(TOKEN)),                     # wrong, same length
        bearer(TOKEN[:-1]),                           # a prefix
        bearer(TOKEN + "x"),                          # an extension
        {"Authorization": TOKEN},                     # no scheme
        {"Authorization": f"Basic {TOKEN}"},          # another scheme
        {"Authorization": "Bearer"},                  # a scheme alone
        {"Authorization": f"Bearer {TOKEN} extra"},   # junk after the token
    ]
    app = create_app(view, publisher, registry=registry, token=TOKEN)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        for method, route in routes:
            for headers in refused_headers:
                response = await client.request(method, route, headers=headers,
                                                json=body_of(snapshot))
                assert response.status_code == 401, (method, route, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":  # the same answer, whatever was wrong
                    assert response.json() == UNAUTHORIZED
        assert view.stats.records_applied == 0  # no refused write was published

        # The right token, with the scheme in any case.
        put = await client.put(path, json=body_of(snapshot), headers=bearer())
        assert put.status_code == 200, put.text
        got = await client.get(path, headers={"Authorization": f"bearer {TOKEN}"})
        assert got.json() == snapshot.to_dict()
        listed = await client.get("/sessions", headers=bearer())
        assert listed.json()["count"] == 1
        async with client.stream("GET", "/changes", headers=bearer()) as stream:
            assert stream.status_code == 200
            first = await asyncio.wait_for(stream.aiter_lines().__anext__(), WAIT_S)
            assert first.startswith(": subscribed")

        # Probes and the scraper need no token, and show nothing of any session.
        for open_route in ("/healthz", "/readyz", "/metrics"):
            response = await client.get(open_route)
            assert response.status_code == 200, open_route
            for secret in (str(snapshot.session_id), str(snapshot.repo_id),
                           str(snapshot.changeset_id), "secret-agent", "launch codes"):
                assert secret not in response.text, (open_route, secret)
        assert (await client.get("/readyz")).json()["sessions"] == 1  # a count only

        deleted = await client.delete(path, headers=bearer())
        assert deleted.json()["deleted"] is True


async def test_token_is_checked_before_the_write_switch(parts: Parts) -> None:
    view, _, _ = parts
    app = create_app(view, token=TOKEN)  # read-only
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
        path = f"/sessions/{make_snapshot().session_id}"
        assert (await client.put(path, json={})).status_code == 401
        assert (await client.put(path, json={}, headers=bearer())).status_code == 405
        assert (await client.get(path, headers=bearer())).status_code == 404


def test_create_app_refuses_a_weak_token() -> None:
    view = SnapshotView(KafkaConfig(bootstrap_servers="127.0.0.1:1", topic="t"))
    for weak in ("", "short", "has a space in it 0123", "ünicode-token-0123456789"):
        with pytest.raises(ConfigError, match="sidecar token"):
            create_app(view, token=weak)


# ---------------------------------------------------------------------------- beyond loopback


def test_check_exposure() -> None:
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "::1"):
        assert check_exposure(host, has_token=False, allow_writes=True) is None, host
    for host in ("0.0.0.0", "::"):
        assert check_exposure(host, has_token=True, allow_writes=True) is None
        warning = check_exposure(host, has_token=False, allow_writes=False)
        assert warning is not None
        assert "\n" not in warning
        assert "beyond loopback" in warning
        assert TOKEN_ENV in warning
        with pytest.raises(ConfigError, match=f"refusing to serve writes on {host} "):
            check_exposure(host, has_token=False, allow_writes=True)


def test_check_exposure_every_interface_and_every_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # "" binds every interface (asyncio's create_server), and a name that does not resolve
    # must not pass for loopback.
    for host in ("", "no-such-host.invalid"):
        with pytest.raises(ConfigError, match=r"refusing to serve writes on .* \(beyond "):
            check_exposure(host, has_token=False, allow_writes=True)
        assert check_exposure(host, has_token=False, allow_writes=False) is not None
        assert check_exposure(host, has_token=True, allow_writes=True) is None
    # A name with a loopback address first and another one after: create_server binds both.
    real = socket.getaddrinfo

    def two(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "two.test":
            return real("127.0.0.1", *args, **kwargs) + real("0.0.0.0", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two)
    with pytest.raises(ConfigError, match=r"refusing to serve writes on two\.test"):
        check_exposure("two.test", has_token=False, allow_writes=True)


async def test_beyond_loopback(parts: Parts, caplog: pytest.LogCaptureFixture) -> None:
    view, publisher, registry = parts
    every = "0.0.0.0"
    # Writes without a token: refused, and nothing listens.
    with pytest.raises(ConfigError, match=r"refusing to serve writes on 0\.0\.0\.0"):
        async with serving(create_app(view, publisher), host=every):
            pass

    # Reads without a token: served, with one warning line.
    with caplog.at_level(logging.WARNING, logger="snapbus.serve"):
        async with serving(create_app(view), host=every) as url, \
                httpx.AsyncClient(base_url=local_url(url), timeout=WAIT_S) as client:
            assert url.startswith("http://0.0.0.0:")
            assert (await client.get("/sessions")).status_code == 200
    warnings = [r for r in caplog.records
                if r.name == "snapbus.serve" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "beyond loopback" in warnings[0].getMessage()
    caplog.clear()

    # With a token: no warning, reads and writes need it.
    snapshot = make_snapshot()
    path = f"/sessions/{snapshot.session_id}"
    with caplog.at_level(logging.WARNING, logger="snapbus.serve"):
        app = create_app(view, publisher, registry=registry, token=TOKEN)
        async with serving(app, host=every) as url, \
                httpx.AsyncClient(base_url=local_url(url), timeout=WAIT_S) as client:
            assert (await client.get("/sessions")).status_code == 401
            assert (await client.get(path)).status_code == 401
            assert (await client.put(path, json=body_of(snapshot))).status_code == 401
            put = await client.put(path, json=body_of(snapshot), headers=bearer())
            assert put.status_code == 200, put.text
            assert (await client.get(path, headers=bearer())).json() == snapshot.to_dict()
            assert (await client.get("/healthz")).status_code == 200
    assert not [r for r in caplog.records if r.name == "snapbus.serve"
                and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------- TLS


async def test_tls_listener(parts: Parts, tls: dict[str, str]) -> None:
    view, publisher, registry = parts
    app = create_app(view, publisher, registry=registry, token=TOKEN)
    async with serving(app, tls_certfile=tls["cert"], tls_keyfile=tls["key"]) as url:
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S,
                                     verify=trusting(tls["ca"])) as client:
            assert (await client.get("/sessions")).status_code == 401
            listed = await client.get("/sessions", headers=bearer())
            assert listed.status_code == 200
            assert listed.json() == {"sessions": [], "count": 0}
            assert (await client.get("/healthz")).status_code == 200
        # A client that does not trust the CA stops at the handshake: the token never leaves.
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get("/sessions", headers=bearer())
        # Plain HTTP on the TLS port gets no answer.
        plain = url.replace("https://", "http://")
        async with httpx.AsyncClient(base_url=plain, timeout=WAIT_S) as cleartext:
            with pytest.raises(httpx.TransportError):
                await cleartext.get("/healthz")

    # The key in the certificate file, beyond loopback, writes on.
    every = "0.0.0.0"
    async with serving(app, host=every, tls_certfile=tls["bundle"]) as url, \
            httpx.AsyncClient(base_url=local_url(url), timeout=WAIT_S,
                              verify=trusting(tls["ca"])) as client:
        assert url.startswith("https://0.0.0.0:")
        snapshot = make_snapshot()
        put = await client.put(f"/sessions/{snapshot.session_id}", json=body_of(snapshot),
                               headers=bearer())
        assert put.status_code == 200, put.text


async def test_bad_tls_files_are_one_clear_error(parts: Parts, tls: dict[str, str],
                                                 tmp_path: Path) -> None:
    view, _, _ = parts
    app = create_app(view)
    cases: list[tuple[dict[str, str | None], str]] = [
        ({"tls_certfile": str(tmp_path / "missing.pem")}, "No such file"),
        ({"tls_certfile": tls["cert"]}, "cannot load the TLS certificate"),  # no key
        ({"tls_certfile": tls["cert"], "tls_keyfile": tls["client_key"]},  # not its key
         "cannot load the TLS certificate"),
        ({"tls_certfile": None, "tls_keyfile": tls["key"]}, "needs its certificate"),
    ]
    for files, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            async with serving(app, **files):  # type: ignore[arg-type]
                pass
        assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------- reading the token


def test_read_token(tmp_path: Path) -> None:
    assert read_token(env={}) is None
    assert read_token(env={TOKEN_ENV: TOKEN}) == TOKEN
    file = tmp_path / "token"
    file.write_text(f"  {TOKEN}\n")
    assert read_token(file, env={}) == TOKEN
    assert read_token(file, env={TOKEN_ENV: "another-token-0123456789"}) == TOKEN  # file wins
    for bad, message in [("", "is empty"), ("short", "shorter than 16"),
                         ("two words 0123456789", "visible ASCII")]:
        with pytest.raises(ConfigError, match=message):
            read_token(env={TOKEN_ENV: bad})
        file.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            read_token(file, env={})
    with pytest.raises(ConfigError, match=r"cannot read the sidecar token file .*No such file"):
        read_token(tmp_path / "missing", env={TOKEN_ENV: TOKEN})
    file.write_bytes("tökén-0123456789abcdef".encode())
    with pytest.raises(ConfigError, match="cannot read the sidecar token file"):
        read_token(file, env={})


# ---------------------------------------------------------------------------- the command


def refused(args: list[str], env: Mapping[str, str | None] | None = None) -> str:
    """Run ``snapbus serve ARGS``, expect exit status 2 and one line; return it."""
    result = CliRunner().invoke(cli, ["serve", *args], env={TOKEN_ENV: None, **(env or {})})
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_serve_command_refusals(tmp_path: Path) -> None:
    assert refused(["--host", "0.0.0.0", "--allow-writes"]) == (
        f"Error: refusing to serve writes on 0.0.0.0 (beyond loopback) without a token: "
        f"set {TOKEN_ENV} or --token-file")
    assert "No such file" in refused(["--token-file", str(tmp_path / "missing")])
    assert TOKEN_ENV in refused([], env={TOKEN_ENV: "short"})
    assert TOKEN_ENV in refused([], env={TOKEN_ENV: ""})
    # The token is never a flag's value.
    result = CliRunner().invoke(cli, ["serve", "--token", TOKEN])
    assert result.exit_code == 2
    assert "No such option '--token'" in result.stderr
    # The empty host listens on every interface: the Redis port alone too.
    assert refused(["--host", "", "--no-http", "--redis-port", "0", "--allow-writes"]) == (
        f"Error: refusing to serve writes on '' (beyond loopback) without a token: "
        f"set {TOKEN_ENV} or --token-file")
    result = CliRunner().invoke(cli, ["serve", "--tls-key", "key.pem"])
    assert result.exit_code == 2
    assert "--tls-key needs --tls-cert" in result.stderr


def serve_args(broker: BrokerAddress, topic_name: str, *args: str) -> list[str]:
    return ["-b", broker.bootstrap_servers, "-t", topic_name, "serve", "--host", "0.0.0.0",
            "--port", "0", "--fetch-max-wait-ms", "20", *args]


async def test_serve_command_with_token_file_and_tls(
    broker: BrokerAddress, topic_name: str, tls: dict[str, str], tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env_token = "from-the-environment-0123456789"  # the file wins over it
    args = serve_args(broker, topic_name, "--allow-writes", "--token-file", str(token_file),
                      "--tls-cert", tls["cert"], "--tls-key", tls["key"], "--redis-port", "0")
    async with snapbus_process(*args, env={TOKEN_ENV: env_token}) as (line, proc):
        assert line.startswith("serving https://0.0.0.0:"), line
        assert "(read-write, bearer token required)" in line
        assert proc.stdout is not None  # the Redis port speaks TLS too: the token is AUTH's
        redis_line = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode()
        assert redis_line.startswith("serving rediss://0.0.0.0:"), redis_line
        redis_url = local_url(redis_line.split()[1]).replace("//", f"//:{TOKEN}@")
        redis_client = aioredis.Redis.from_url(redis_url, ssl_ca_certs=tls["ca"],
                                               socket_timeout=WAIT_S)
        assert await redis_client.ping() is True
        await redis_client.aclose()
        url = local_url(line.split()[1])
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S,
                                     verify=trusting(tls["ca"])) as client:
            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready)
            snapshot = make_snapshot()
            path = f"/sessions/{snapshot.session_id}"
            assert (await client.put(path, json=body_of(snapshot))).status_code == 401
            assert (await client.put(path, json=body_of(snapshot),
                                     headers=bearer(env_token))).status_code == 401
            put = await client.put(path, json=body_of(snapshot), headers=bearer())
            assert put.status_code == 200, put.text
            assert (await client.get(path, headers=bearer())).json() == snapshot.to_dict()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    assert TOKEN not in err.decode()
    assert "beyond loopback" not in err.decode()


async def test_serve_command_warns_when_reads_are_open_beyond_loopback(
    broker: BrokerAddress, topic_name: str,
) -> None:
    await ensure_topic(KafkaConfig(bootstrap_servers=broker.bootstrap_servers, topic=topic_name))
    async with snapbus_process(*serve_args(broker, topic_name), env={}) as (line, proc):
        assert line.startswith("serving http://0.0.0.0:"), line
        assert "(read-only)" in line
        async with httpx.AsyncClient(base_url=local_url(line.split()[1]),
                                     timeout=WAIT_S) as client:
            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready)
            assert (await client.get("/sessions")).json() == {"sessions": [], "count": 0}
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 0, err.decode()
    warnings = [entry for entry in err.decode().splitlines() if "beyond loopback" in entry]
    assert len(warnings) == 1, err.decode()
    assert "WARNING snapbus.serve: serving every session to anyone who reaches 0.0.0.0" \
        in warnings[0]
