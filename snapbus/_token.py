"""The sidecars' shared rules: their token, listening beyond loopback, their TLS files.

Both the HTTP sidecar (`snapbus.serve`) and the Redis-protocol one (`snapbus.resp`) use them;
this module imports neither Starlette nor hiredis.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import socket
import ssl

from snapbus.errors import ConfigError

TOKEN_ENV = "SNAPBUS_SERVE_TOKEN"
"""The environment variable `read_token` reads the sidecar's bearer token from."""

MIN_TOKEN_CHARS = 16
"""Shortest bearer token accepted: ``openssl rand -hex 32`` makes a good one."""

_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP header carries intact
_TOKEN_HINT = f"set {TOKEN_ENV} or --token-file"


def check_token(token: str, source: str) -> str:
    """Return `token` if it is a good sidecar token, else raise `ConfigError` naming `source`.

    Good: at least `MIN_TOKEN_CHARS` visible ASCII characters (no spaces).
    """
    if not token:
        raise ConfigError(f"the sidecar token from {source} is empty")
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(f"the sidecar token from {source} must be visible ASCII characters, "
                          "without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the sidecar token from {source} is shorter than {MIN_TOKEN_CHARS} "
                          "characters; make one with `openssl rand -hex 32`")
    return token


def token_digest(token: str | bytes) -> bytes:
    """The SHA-256 of a token: compared with `hmac.compare_digest`, equal lengths leak
    nothing, not even the token's length."""
    return hashlib.sha256(token.encode("latin-1") if isinstance(token, str) else token).digest()


def same_token(given: bytes, digest: bytes) -> bool:
    """Whether `given` is the token of `digest`, in constant time."""
    return hmac.compare_digest(hashlib.sha256(given).digest(), digest)


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _addresses(host: str) -> list[str] | None:
    """Every address listening on `host` binds (passive ``getaddrinfo``), or None if it does
    not resolve. The empty host and the wildcards bind every interface: ``create_server``
    listens on each address of a name that has several."""
    if host in ("", "*"):
        return ["0.0.0.0", "::"]
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return None
    return [str(info[4][0]) for info in found]


def check_exposure(host: str, *, has_token: bool, allow_writes: bool) -> str | None:
    """Check that serving on `host` exposes no session unguarded beyond loopback.

    Returns a one-line warning when reads would be open beyond loopback (no token), else
    None. Every address `host` resolves to must be loopback to count as loopback; the empty
    host and the wildcards (``0.0.0.0``, ``::``) are every interface. A host that does not
    resolve counts as beyond loopback (listening on it then fails with its own error).

    Raises:
        ConfigError: writes would be open beyond loopback (no token).
    """
    if has_token:
        return None
    addresses = _addresses(host)
    if addresses and all(_is_loopback(address) for address in addresses):
        return None
    shown = repr(host) if not host.strip() else host
    if allow_writes:
        raise ConfigError(f"refusing to serve writes on {shown} (beyond loopback) without a "
                          f"token: {_TOKEN_HINT}")
    return (f"serving every session to anyone who reaches {shown} (beyond loopback, no "
            f"token): {_TOKEN_HINT}")


def tls_context(certfile: str | os.PathLike[str] | None,
                keyfile: str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """A server's TLS context of the PEM certificate chain `certfile` (and key, unless
    `keyfile`), Python's defaults (TLS 1.2+); None without a certificate.

    Raises:
        ConfigError: a key without a certificate, or the files cannot be loaded (one line).
    """
    if certfile is None:
        if keyfile is not None:
            raise ConfigError("a TLS key needs its certificate: give --tls-cert too")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # (An empty password: an encrypted key fails here instead of prompting on a terminal.)
        context.load_cert_chain(certfile, keyfile, password=lambda: b"")
    except OSError as exc:
        files = os.fspath(certfile) + (f" with key {os.fspath(keyfile)}" if keyfile else "")
        raise ConfigError(
            f"cannot load the TLS certificate {files}: {exc.strerror or exc}; both must be PEM, "
            "the key unencrypted and matching the certificate (or in the certificate file)"
        ) from exc
    return context
