"""Listening addresses for the servers (``serve``, ``image nbd``): parsing and binding.

Owns the ``--listen`` syntax (``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``PORT``,
``unix:PATH``), opening the listening socket with one-line errors that name the address
(a busy port, an unknown host, a bad port number), and the servers' TLS context. Not the
servers themselves.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import stat
from dataclasses import dataclass

from ..errors import BtrdeltaError

__all__ = ["ListenAddress", "bind_listener", "parse_listen", "parse_port", "server_tls"]


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a TCP ``(host, port)`` or a unix socket ``path``."""

    family: socket.AddressFamily
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_port(text: str) -> int:
    """A TCP port number 0-65535 (0: any free port).

    Raises:
        ValueError: not a number in range (the message names the value).
    """
    if not text.strip().isdigit() or int(text) > 65535:
        raise ValueError(f"not a port number (0-65535): {text!r}")
    return int(text)


def parse_listen(value: str, default_host: str = "127.0.0.1") -> ListenAddress:
    """``"HOST:PORT"``, ``"[::1]:PORT"``, ``":PORT"``, ``"PORT"`` or ``"unix:/path"``.

    Raises:
        ValueError: malformed (the message names the value and the accepted forms).
    """
    forms = "HOST:PORT, [IPV6]:PORT, :PORT, PORT or unix:PATH"
    if value.startswith("unix:"):
        if not value[5:] or "\0" in value:
            raise ValueError(f"bad listen address {value!r} (use {forms})")
        return ListenAddress(socket.AF_UNIX, path=value[5:])
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"bad listen address {value!r} (use {forms})")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad listen address {value!r}: put an IPv6 address in [brackets]")
    try:
        number = parse_port(port)
    except ValueError:
        raise ValueError(f"bad listen address {value!r}: port {port!r} is not 0-65535 "
                         f"(use {forms})") from None
    host = host or default_host
    if any(c.isspace() for c in host) or "\0" in host:
        raise ValueError(f"bad listen address {value!r} (use {forms})")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return ListenAddress(family, host=host, port=number)


def bind_listener(where: ListenAddress, backlog: int = 64) -> socket.socket:
    """A listening socket on ``where``.

    A stale unix socket file (nothing listening on it) is replaced; any other file at that
    path is left alone and reported.

    Raises:
        BtrdeltaError: the address is busy, unknown or not ours, naming it.
    """
    if where.family == socket.AF_UNIX:
        _clear_stale_socket(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: str | tuple[str, int] = where.path
    else:
        try:
            infos = socket.getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise BtrdeltaError(f"cannot listen on {where}: unknown host ({exc.strerror})"
                                ) from None
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address = (str(sockaddr[0]), int(sockaddr[1]))
    try:
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        why = "address already in use (another server on that port?)" \
            if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise BtrdeltaError(f"cannot listen on {where}: {why}") from None
    return sock


def _clear_stale_socket(where: ListenAddress) -> None:
    try:
        st = os.lstat(where.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BtrdeltaError(f"cannot listen on {where}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(where.path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where.path)  # stale: its server is gone
        return
    finally:
        probe.close()
    raise BtrdeltaError(f"cannot listen on {where}: address already in use (a server "
                        "answers on that socket)")


def server_tls(cert: str, key: str | None = None, client_ca: str | None = None
               ) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) with ``cert``/``key``; with ``client_ca``,
    clients must present a certificate signed by it.

    Raises:
        BtrdeltaError: a file that is missing or not PEM, naming which.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("certificate/key", cert), ("client CA", client_ca)):
        if path is None:
            continue
        try:
            if path is cert:
                ctx.load_cert_chain(cert, key)
            else:
                ctx.load_verify_locations(path)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BtrdeltaError(f"TLS {what} not loaded: {why}", path=path) from None
    return ctx
