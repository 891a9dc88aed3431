"""A read-only NBD server (fixed newstyle handshake) over an image in a chunk store.

Supports the options ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``, ``NBD_OPT_INFO``,
``NBD_OPT_LIST`` and ``NBD_OPT_ABORT`` (others get ``NBD_REP_ERR_UNSUP``), and the commands
``NBD_CMD_READ`` and ``NBD_CMD_DISC`` (writes and trims get ``EPERM``, ``FLUSH`` succeeds).
Simple replies only. The export name is the image name; the empty name selects it too.
See https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Callable

from .store import ImageReader

__all__ = ["NbdServer", "parse_listen"]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_UNKNOWN = (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_CAN_MULTI_CONN = 1, 2, 4, 1 << 8
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28

MAX_OPTION_DATA = 4096
MAX_REQUEST = 32 << 20

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class _Closed(Exception):
    """The client went away or broke the protocol: drop the connection."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _Closed
        got += k
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    server: NbdServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self._negotiate(sock):
                self._transmit(sock)
        except (_Closed, ConnectionError, OSError):
            pass

    # -- handshake -------------------------------------------------------------------------
    def _negotiate(self, sock: socket.socket) -> bool:
        srv = self.server
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv_exact(sock, 4))
        no_zeroes = bool(client_flags & CLIENT_FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(_recv_exact(sock, _OPT.size))
            if magic != IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Closed
            data = _recv_exact(sock, length)
            if opt == OPT_EXPORT_NAME:
                if not srv.knows(data):
                    raise _Closed
                sock.sendall(struct.pack(">QH", srv.reader.size, srv.tflags)
                             + (b"" if no_zeroes else b"\0" * 124))
                return True
            if opt == OPT_ABORT:
                self._reply(sock, opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                name = srv.name.encode()
                self._reply(sock, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self._reply(sock, opt, REP_ACK)
                continue
            if opt in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    self._reply(sock, opt, REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack_from(">I", data)
                if 4 + nlen + 2 > len(data):
                    self._reply(sock, opt, REP_ERR_INVALID)
                    continue
                if not srv.knows(data[4 : 4 + nlen]):
                    self._reply(sock, opt, REP_ERR_UNKNOWN)
                    continue
                self._reply(sock, opt, REP_INFO,
                            struct.pack(">HQH", INFO_EXPORT, srv.reader.size, srv.tflags))
                self._reply(sock, opt, REP_INFO,
                            struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
                self._reply(sock, opt, REP_ACK)
                if opt == OPT_GO:
                    return True
                continue
            self._reply(sock, opt, REP_ERR_UNSUP)

    @staticmethod
    def _reply(sock: socket.socket, opt: int, rep: int, data: bytes = b"") -> None:
        sock.sendall(_OPT_REPLY.pack(REPLY_MAGIC, opt, rep, len(data)) + data)

    # -- transmission ----------------------------------------------------------------------
    def _transmit(self, sock: socket.socket) -> None:
        reader = self.server.reader
        while True:
            magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(
                _recv_exact(sock, _REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _Closed
            if cmd == CMD_DISC:
                return
            if cmd == CMD_READ:
                if length > MAX_REQUEST or offset + length > reader.size:
                    sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, EINVAL, handle))
                    continue
                try:
                    data = reader.pread(length, offset)
                except Exception:  # a missing/short chunk file: report EIO, keep serving
                    sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, EIO, handle))
                    continue
                sock.sendmsg([_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), data])
                self.server.count(length)
                continue
            if cmd == CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _Closed
                _recv_exact(sock, length)  # drain the payload, then refuse
                sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, EPERM, handle))
                continue
            if cmd == CMD_FLUSH:
                sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                continue
            err = EPERM if cmd == CMD_TRIM else EINVAL
            sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))


def parse_listen(value: str) -> tuple[int, str | tuple[str, int]]:
    """``"HOST:PORT"``, ``":PORT"``, ``"PORT"`` or ``"unix:/path"`` -> (family, address)."""
    if value.startswith("unix:"):
        return socket.AF_UNIX, value[5:]
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


class NbdServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """A threading NBD server for one image.

    Args:
        reader: the image.
        name: the export name.
        listen: ``HOST:PORT`` (port 0 picks one) or ``unix:PATH``.
        log: called with one line per connection event.
    """

    daemon_threads = True

    def __init__(self, reader: ImageReader, name: str, listen: str = "127.0.0.1:10809",
                 *, log: Callable[[str], None] | None = None) -> None:
        family, address = parse_listen(listen)
        super().__init__(address, _Handler)
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(16)
        self.server_address = self.socket.getsockname()
        self.reader = reader
        self.name = name
        self.tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._log = log

    def knows(self, name: bytes) -> bool:
        """The export ``name`` is ours (the empty name is the default export)."""
        return name in (b"", self.name.encode())

    def count(self, n: int) -> None:
        """Count bytes served."""
        with self._lock:
            self.bytes_read += n

    def fileno(self) -> int:
        """The listening socket (for ``selectors``)."""
        return self.socket.fileno()

    def get_request(self) -> tuple[socket.socket, object]:
        """Accept one connection."""
        return self.socket.accept()

    def shutdown_request(self, request: object) -> None:
        """Close a finished connection."""
        sock = request
        assert isinstance(sock, socket.socket)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()

    @property
    def uri(self) -> str:
        """An ``nbd://`` (or ``nbd+unix://``) URI for libnbd clients."""
        if self.socket.family == socket.AF_UNIX:
            return f"nbd+unix:///{self.name}?socket={self.server_address}"
        host, port = self.socket.getsockname()[:2]
        return f"nbd://{host}:{port}/{self.name}"
