"""Byte channels for replication: a local or ssh child's pipes, TCP, TLS with pinned keys.

A :class:`Channel` is ``read(n)`` (``b""`` at the end), ``write(data)`` and ``close()``;
the replication code on top is the same for all of them.

* :func:`spawn_local` runs ``btrdelta replicate --serve DEST`` as a child and talks through
  its standard input and output (a pipe); :func:`spawn_ssh` runs the same command on another
  machine with ``ssh`` (as btrbk and zrepl do).
* TCP needs mutual authentication: :func:`tls_client` / :func:`tls_server` wrap a socket in
  TLS 1.3 with a self-signed certificate made from each side's Ed25519 key (``btrdelta key
  generate``); the client checks the server's key against the one it pins, then proves its
  own key by signing the server's nonce, bound to both keys (:func:`_client_auth`); the
  server accepts only keys it was told to allow. Plain TCP without authentication is only
  allowed on a loopback address, and only when asked for.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Protocol

from .. import _native
from ..errors import (
    BtrdeltaError,
    ProtocolError,
    SignatureError,
    TransportError,
    UsageError,
)
from ..protocol import EOF, NEED_DATA, Connection, Message, Refuse
from ..stream.constants import CMD_HEADER_SIZE

if TYPE_CHECKING:  # (the key functions are imported where TLS is used: not over a pipe)
    import socket
    import ssl
    import subprocess

    from ..trust import PrivateKey, PublicKey

# ssl, socket, subprocess and the like are imported where they are used: a receiver over a
# pipe (``replicate --serve``) needs none of them, and they were a tenth of its start-up

__all__ = [
    "Channel",
    "MessageIO",
    "PeerClosed",
    "PeerRefused",
    "PipeChannel",
    "SocketChannel",
    "check_loopback",
    "connect_tcp",
    "fork_local",
    "parse_address",
    "spawn_local",
    "spawn_ssh",
    "tls_client",
    "tls_server",
]

_AUTH_MAGIC = b"btrdelta-replicate-auth\0"
#: the largest message read into a buffer of its announced size (larger ones are refused by
#: the connection from their header)
_MAX_READ = (1 << 20) + (128 << 10)
_AUTH_CONTEXT = b"btrdelta replicate client key v1\0"


class Channel(Protocol):
    """A duplex byte channel.

    A channel may also have ``readinto(buf) -> int`` (0 at the end) and
    ``writev(buffers)`` (send all of them, in order): :class:`MessageIO` then reads each
    message into one buffer of its size and writes DATA without joining its pieces. A
    channel whose ``concurrent`` is true may be read by one thread while another writes
    (the two sides of replication then read ahead in a thread).
    """

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` when the peer closed."""
        ...

    def write(self, data: bytes) -> None:
        """Send all of ``data``."""
        ...

    def close(self) -> None:
        """Close (and reap a child)."""
        ...


class PipeChannel:
    """Two file objects (a child's stdout and stdin, or our own stdin and stdout)."""

    #: one thread may read while another writes
    concurrent = True

    def __init__(self, rfile: BinaryIO | IO[bytes], wfile: BinaryIO | IO[bytes],
                 proc: subprocess.Popen[bytes] | None = None, *, name: str = "pipe") -> None:
        self.rfile, self.wfile, self.proc, self.name = rfile, wfile, proc, name
        #: what the child said on standard error (once closed)
        self.err = ""
        for f in (rfile, wfile):
            _widen_pipe(f)

    def read(self, n: int) -> bytes:
        try:
            return self.rfile.read1(n) if hasattr(self.rfile, "read1") else self.rfile.read(n)
        except OSError as exc:
            raise TransportError(f"{self.name}: read failed: {exc}") from exc

    def readinto(self, buf: Any) -> int:
        """Read into ``buf`` (some bytes, 0 at the end)."""
        try:
            f: Any = self.rfile
            return int(f.readinto1(buf) if hasattr(f, "readinto1") else f.readinto(buf))
        except OSError as exc:
            raise TransportError(f"{self.name}: read failed: {exc}") from exc

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (OSError, ValueError) as exc:
            raise _gone(self.name, exc) from exc

    def writev(self, buffers: Sequence[Any]) -> None:
        """Write ``buffers`` in order with ``writev`` (no joined copy)."""
        try:
            self.wfile.flush()
            fd = self.wfile.fileno()
            _writev_all(lambda views: os.writev(fd, views), buffers)
        except (OSError, ValueError) as exc:
            raise _gone(self.name, exc) from exc

    def close(self) -> None:
        for f in (self.wfile, self.rfile):
            with contextlib.suppress(OSError, ValueError):
                f.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except __import__("subprocess").TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None and not self.proc.stderr.closed:
                self.err = self.stderr_text()
                self.proc.stderr.close()

    def stderr_text(self) -> str:
        """What the child said on standard error (after it exited)."""
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            return self.proc.stderr.read().decode("utf-8", "replace").strip()
        return ""


#: pipe buffer asked for (Linux's default largest for an unprivileged process is 1 MiB): a
#: DATA message then crosses the pipe in one go instead of 64 KiB at a time
_PIPE_SIZE = 1 << 20
#: buffers per writev call (IOV_MAX is 1024 on Linux)
_IOV_MAX = 1024


def _widen_pipe(f: Any) -> None:
    """Ask for a larger buffer when ``f`` is a pipe (nothing otherwise)."""
    import fcntl
    import stat

    try:
        fd = f.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except (OSError, ValueError, AttributeError):
        pass  # a smaller pipe is only slower


def _gone(name: str, exc: Exception) -> TransportError:
    """The error of a failed write to a pipe: a peer that has exited (``EPIPE``) closed the
    connection, whether the write or a read is first to notice it."""
    if isinstance(exc, BrokenPipeError):
        return PeerClosed(f"{name}: the peer closed the connection")
    return TransportError(f"{name}: the peer went away ({exc})")


def _writev_all(writev: Callable[[list[memoryview]], int], buffers: Sequence[Any]) -> None:
    """``writev`` (``os.writev`` of a descriptor, a socket's ``sendmsg``) until every byte
    of ``buffers`` is written."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = writev(views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _spawn(cmd: list[str], name: str) -> PipeChannel:
    import subprocess

    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)
    except OSError as exc:
        raise TransportError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    assert proc.stdout is not None
    assert proc.stdin is not None
    return PipeChannel(proc.stdout, proc.stdin, proc, name=name)


def spawn_local(dest: str, extra: Sequence[str] = ()) -> PipeChannel:
    """``btrdelta replicate --serve DEST`` as a child, over pipes."""
    return _spawn([sys.executable, "-m", "btrdelta", "replicate", *extra, "--serve", dest],
                  f"local {dest}")


def fork_local(dest: str, serve: Callable[[], int], extra: Sequence[str] = ()
               ) -> PipeChannel:
    """``btrdelta replicate --serve DEST`` in a ``fork`` of this process, over pipes, as
    :func:`spawn_local` runs it in a new interpreter: the child calls ``serve`` (the CLI's
    ``--serve`` on standard input and output; its return value is the exit code).

    The first byte of a replication waits for the receiver's HOLDINGS (then the PLAN and
    the ACCEPT): a new interpreter starts, then imports the CLI and the protocol (~60 ms of
    CPU, 0.2-0.3 s on a loaded machine) before it can answer; a fork starts with what this
    process imported (the CLI, the protocol: the sender forks after importing them and
    before its send side) and imports only the receiving side. Only where this process
    runs no other thread (a fork copies the calling thread alone: a lock another one held
    would stay held): else :func:`spawn_local`. The child leaves with ``os._exit`` (no
    ``atexit`` handler of this process runs twice)."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return spawn_local(dest, extra)
    ends = [*os.pipe(), *os.pipe(), *os.pipe()]  # stdin r/w, stdout r/w, stderr r/w
    for f in (sys.stdout, sys.stderr):  # (else the child writes it out again)
        with contextlib.suppress(Exception):
            f.flush()
    try:
        pid = os.fork()
    except OSError:
        for fd in ends:
            os.close(fd)
        return spawn_local(dest, extra)
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.dup2(ends[0], 0)
            os.dup2(ends[3], 1)
            os.dup2(ends[5], 2)
            for fd in ends:
                os.close(fd)
            # (on the new descriptors, whatever this process had made of its own)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")  # noqa: SIM115
            code = serve()
        except SystemExit as exc:  # (a usage error)
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                print(f"btrdelta replicate: internal error: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
        finally:
            for f in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    f.flush()
            os._exit(code)
    for fd in (ends[0], ends[3], ends[5]):
        os.close(fd)
    child = _Forked(pid, os.fdopen(ends[4], "rb", buffering=0))
    return PipeChannel(os.fdopen(ends[2], "rb", buffering=0),
                       os.fdopen(ends[1], "wb", buffering=0), child,  # type: ignore[arg-type]
                       name=f"local {dest}")


class _Forked:
    """A child made by :func:`fork_local`, as much of :class:`subprocess.Popen` as
    :class:`PipeChannel` and its users take: ``pid``, ``stderr``, ``returncode``,
    ``poll``, ``wait``, ``kill``."""

    def __init__(self, pid: int, stderr: BinaryIO) -> None:
        self.pid, self.stderr = pid, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and timeout is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                import subprocess

                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.005)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


def spawn_ssh(target: str, ssh: str = "ssh", remote: str = "btrdelta",
              extra: Sequence[str] = ()) -> PipeChannel:
    """``ssh [-p PORT] [USER@]HOST REMOTE replicate [EXTRA] --serve PATH`` for ``target`` =
    ``ssh://[user@]host[:port]/path`` (``extra``: options of the remote side, such as
    ``--backend dir``)."""
    rest = target[len("ssh://"):]
    hostpart, slash, path = rest.partition("/")
    if not slash or not hostpart:
        raise UsageError(f"not ssh://[user@]host[:port]/path: {target!r}")
    user, at, hostport = hostpart.rpartition("@")
    port = None
    if hostport.startswith("[") and "]" in hostport:  # [v6]:port, user@[v6]:port
        host, _, tail = hostport[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host = hostport
    host = f"{user}@{host}" if at else host
    if port and not port.isdigit():  # (else ssh's "Bad port", exit 7)
        raise UsageError(f"not ssh://[user@]host[:port]/path: {target!r} (port {port!r} "
                         "is not a number; a slash goes before the path)")
    import shlex

    cmd = shlex.split(ssh)
    if port:
        cmd += ["-p", port]
    # (--serve takes DEST: the options before it)
    remote_cmd = [*shlex.split(remote), "replicate", *extra, "--serve", "/" + path]
    cmd += [host, " ".join(shlex.quote(w) for w in remote_cmd)]
    return _spawn(cmd, f"ssh {host}")


class SocketChannel:
    """A connected (TLS or plain) socket."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        import ssl

        self.sock, self.name = sock, name
        self._tls = isinstance(sock, ssl.SSLSocket)
        #: one thread may read while another writes (not on TLS: one SSL object)
        self.concurrent = not self._tls

    def read(self, n: int) -> bytes:
        try:
            return self.sock.recv(n)
        except OSError as exc:
            raise self._failed("read", exc) from exc

    def readinto(self, buf: Any) -> int:
        """Read into ``buf`` (some bytes, 0 at the end)."""
        try:
            return self.sock.recv_into(buf)
        except OSError as exc:
            raise self._failed("read", exc) from exc

    def write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._failed("write", exc) from exc

    def writev(self, buffers: Sequence[Any]) -> None:
        """Send ``buffers`` in order (gathered by the kernel on a plain socket; TLS
        encrypts one buffer at a time, so there they are joined)."""
        if self._tls:
            self.write(b"".join(buffers))
            return
        try:
            _writev_all(self.sock.sendmsg, buffers)
        except OSError as exc:
            raise self._failed("write", exc) from exc

    def _failed(self, what: str, exc: OSError) -> TransportError:
        """The error of a failed read or write: a peer that exited or was killed (the
        kernel resets its connection; TLS sees the stream end without its close) closed
        the connection, as on a pipe, rather than 'EOF occurred in violation of protocol'."""
        import ssl

        if isinstance(exc, TimeoutError):
            return TransportError(f"{self.name}: the peer went silent (timeout)")
        if isinstance(exc, (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError)):
            return PeerClosed(f"{self.name}: the peer closed the connection")
        return TransportError(f"{self.name}: {what} failed: {exc}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port).

    Raises:
        UsageError: not that, or a port past 65535 (``--listen HOST:99999`` was an internal
            error: bind()'s OverflowError).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise UsageError(f"not HOST:PORT (a port 0-65535): {text!r}")
    return host.strip("[]"), int(port)


def check_loopback(host: str) -> None:
    """Refuse unauthenticated TCP anywhere but on a loopback address."""
    import ipaddress

    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise UsageError(f"unauthenticated TCP is only allowed on a loopback address, not "
                     f"{host!r}")


def connect_tcp(host: str, port: int, *, timeout: float) -> socket.socket:
    import socket

    """A TCP connection (TransportError naming the address when it fails)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- TLS with pinned Ed25519 keys -------------------------------------------------------


@contextlib.contextmanager
def _cert_files(key: PrivateKey) -> Iterator[tuple[str, str]]:
    """A self-signed certificate of ``key`` (and the key) as PEM files, removed after."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from ..trust import key_id

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, key_id(key)[:32])])
    now = time.time()
    import datetime as dt

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(dt.datetime.fromtimestamp(now - 86400, dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + 10 * 365 * 86400, dt.UTC))
            .sign(key, None))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="btrdelta-tls-") as d:
        cpath, kpath = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cpath, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        yield cpath, kpath


def _context(purpose: ssl.Purpose, key: PrivateKey) -> ssl.SSLContext:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # keys are pinned below, not chained to a CA
    with _cert_files(key) as (cert, keyfile):
        ctx.load_cert_chain(cert, keyfile)
    return ctx


def _peer_key(sock: ssl.SSLSocket) -> PublicKey:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    der = sock.getpeercert(binary_form=True)
    if not der:
        raise SignatureError("the peer presented no certificate")
    pub = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise SignatureError("the peer's certificate is not an Ed25519 key")
    return pub


def _raw(key: PublicKey) -> bytes:
    import base64

    from ..trust import public_key_text

    return base64.b64decode(public_key_text(key))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise TransportError("the peer closed the connection during authentication")
        out += got
    return out


def tls_client(sock: socket.socket, key: PrivateKey, server_key: PublicKey,
               name: str) -> SocketChannel:
    """TLS 1.3 to a server whose key must be ``server_key``; then prove ``key``.

    Raises:
        SignatureError: the server's key is not the pinned one, or it refused ours.
    """
    import ssl

    from ..trust import key_id, sign_message

    try:
        tls = _context(ssl.Purpose.SERVER_AUTH, key).wrap_socket(sock)
    except OSError as exc:
        raise TransportError(f"{name}: TLS handshake failed: {exc}") from exc
    got = _peer_key(tls)
    if _raw(got) != _raw(server_key):
        tls.close()
        raise SignatureError(f"{name}: the server's key {key_id(got)[:16]} is not the pinned "
                             f"key {key_id(server_key)[:16]}")
    try:
        hello = _recv_exact(tls, len(_AUTH_MAGIC) + 32)
        if not hello.startswith(_AUTH_MAGIC):
            raise ProtocolError(f"{name}: not a btrdelta replication server")
        nonce = hello[len(_AUTH_MAGIC):]
        mine = _raw(key.public_key())
        sig = sign_message(key, _AUTH_CONTEXT + nonce + _raw(server_key) + mine)
        tls.sendall(mine + sig)
        verdict = _recv_exact(tls, 2)
    except OSError as exc:
        raise TransportError(f"{name}: authentication failed: {exc}") from exc
    if verdict != b"OK":
        raise SignatureError(f"{name}: the server does not allow key {key_id(key)[:16]}")
    return SocketChannel(tls, name)


def tls_server(sock: socket.socket, key: PrivateKey, allowed: Sequence[PublicKey],
               name: str) -> tuple[SocketChannel, str]:
    """TLS 1.3 for an accepted socket; the client must prove one of ``allowed`` keys.

    Returns:
        The channel and the client's key ID.

    Raises:
        SignatureError: the client's key is not allowed or its proof does not verify.
    """
    import secrets
    import ssl

    from ..trust import key_id, parse_public_key, verify_message

    try:
        tls = _context(ssl.Purpose.CLIENT_AUTH, key).wrap_socket(sock, server_side=True)
    except OSError as exc:
        raise TransportError(f"{name}: TLS handshake failed: {exc}") from exc
    try:
        nonce = secrets.token_bytes(32)
        tls.sendall(_AUTH_MAGIC + nonce)
        answer = _recv_exact(tls, 32 + 64)
    except OSError as exc:
        tls.close()
        raise TransportError(f"{name}: authentication failed: {exc}") from exc
    client_raw, sig = answer[:32], answer[32:]
    match = [k for k in allowed if _raw(k) == client_raw]
    try:
        if not match:
            raise SignatureError(f"{name}: client key "
                                 f"{key_id(parse_public_key(_b64(client_raw)))[:16]} "
                                 "is not allowed")
        verify_message(match[0], _AUTH_CONTEXT + nonce + _raw(key.public_key()) + client_raw,
                       sig, what="client authentication", source=name)
    except BtrdeltaError:
        with contextlib.suppress(OSError):
            tls.sendall(b"NO")
            tls.close()
        raise
    tls.sendall(b"OK")
    return SocketChannel(tls, name), key_id(match[0])


def _b64(raw: bytes) -> bytes:
    import base64

    return base64.b64encode(raw)


def settimeout(ch: Any, seconds: float | None) -> None:
    """Set a socket channel's idle timeout (pipes have none)."""
    sock = getattr(ch, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


class PeerClosed(TransportError):
    """The peer closed the connection."""


class MessageIO:
    """Reading messages from and writing them to a channel through a connection.

    On a channel with ``readinto``, each message is read into one buffer of its own size
    (its header first, then the rest), so the connection never copies a message that two
    reads cut in two; on a channel with ``writev``, :meth:`send_data` writes DATA without
    joining its pieces.
    """

    def __init__(self, ch: Channel, conn: Connection) -> None:
        self.ch, self.conn = ch, conn
        self._readinto = getattr(ch, "readinto", None)
        self._writev = getattr(ch, "writev", None)
        # a message's buffer, filled by reads: not zeroed first where the C helper is built
        speedups = _native.live("speedups")
        self._buffer: Callable[[int], bytearray] = getattr(speedups, "buffer", bytearray)

    def send(self, msg: Message) -> None:
        self.ch.write(self.conn.send(msg))

    def send_data(self, offset: int, pieces: Sequence[Any]) -> None:
        """Send ``Data(offset, b"".join(pieces))``."""
        self.write_frame(self.conn.send_data(offset, pieces))

    def write_frame(self, buffers: Sequence[Any]) -> None:
        """Write the buffers of a frame (:meth:`Connection.send_data`'s) in order."""
        if self._writev is not None:
            self._writev(buffers)
        else:
            self.ch.write(b"".join(buffers))

    def send_raw(self, msg: Message) -> None:
        """Send ``msg`` even where the order forbids it (a last REFUSE)."""
        with contextlib.suppress(ProtocolError):
            self.ch.write(self.conn.send(msg))

    def next(self) -> Message:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                if self._read():
                    continue
                ev = self.conn.next_event() if self.conn.buffered else EOF
                if ev is EOF or ev is NEED_DATA:
                    raise PeerClosed("the peer closed the connection")
                return ev
            if ev is EOF:
                raise PeerClosed("the peer closed the connection")
            return ev

    def _read(self) -> bool:
        """Feed the connection more bytes; False (after feeding the end) at the end."""
        conn = self.conn
        if self._readinto is None:
            data = self.ch.read(1 << 20)
            conn.receive_data(data)
            return bool(data)
        if conn.buffered:  # the rest of what is there (a header read before)
            return self._exact(conn.needed())
        if not conn.peer_header_read:
            return self._exact(conn.needed())
        head = bytearray(CMD_HEADER_SIZE)
        got = self._fill(head)
        if got < CMD_HEADER_SIZE:
            conn.receive_data(head[:got])
            conn.receive_data(b"")
            return False
        length = int.from_bytes(head[:4], "little")
        if length > _MAX_READ:  # the connection says what is wrong with it
            conn.receive_data(head)
            return True
        frame = self._buffer(CMD_HEADER_SIZE + length)
        frame[:CMD_HEADER_SIZE] = head
        got = self._fill(memoryview(frame)[CMD_HEADER_SIZE:])
        conn.receive_data(memoryview(frame)[: CMD_HEADER_SIZE + got])
        if got < length:
            conn.receive_data(b"")
            return False
        return True

    def _exact(self, n: int) -> bool:
        buf = bytearray(max(n, 1))
        got = self._fill(buf)
        if got:
            self.conn.receive_data(memoryview(buf)[:got])
        if got < len(buf):
            self.conn.receive_data(b"")
            return False
        return True

    def _fill(self, buf: Any) -> int:
        """Read until ``buf`` is full or the peer closed; the bytes read."""
        view = memoryview(buf)
        pos = 0
        assert self._readinto is not None
        while pos < len(view):
            n = self._readinto(view[pos:])
            if not n:
                break
            pos += n
        return pos

    def refusal(self, seconds: float = 5.0) -> Refuse | None:
        """The REFUSE a peer sent before it closed the connection a write found closed
        (:class:`PeerClosed`): the reason the broken pipe does not say (a receiver whose
        disk was full), where it is among what is still to be read. A socket's is read
        for ``seconds`` at most; None: no REFUSE, or a pipe (not read: a peer that closed
        only its end of it could keep this waiting)."""
        if getattr(self.ch, "sock", None) is None:
            return None
        settimeout(self.ch, seconds)
        try:
            while not isinstance(msg := self.next(), Refuse):
                pass
        except BtrdeltaError:  # (the end, silence, a message out of order)
            return None
        return msg

    def expect(self, *kinds: type) -> Any:
        msg = self.next()
        if isinstance(msg, Refuse) and Refuse not in kinds:
            raise PeerRefused(msg)
        if not isinstance(msg, kinds):
            raise ProtocolError(f"unexpected {type(msg).__name__}")
        return msg


class PeerRefused(ProtocolError):
    def __init__(self, msg: Refuse) -> None:
        super().__init__(f"the peer refused: {msg.code}: {msg.message}")
        self.refusal = msg
