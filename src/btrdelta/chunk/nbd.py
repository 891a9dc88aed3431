"""A read-only NBD server (fixed newstyle) over an image in a chunk store.

Handshake options: ``NBD_OPT_EXPORT_NAME``, ``GO``, ``INFO``, ``LIST``, ``ABORT``,
``STRUCTURED_REPLY``, ``LIST_META_CONTEXT``/``SET_META_CONTEXT`` (the one context
``base:allocation``) and ``STARTTLS`` (when a TLS context is given the server runs in
FORCEDTLS mode: every other option before TLS gets ``NBD_REP_ERR_TLS_REQD``). Others get
``NBD_REP_ERR_UNSUP``.

Commands: ``READ`` (simple replies, or one ``OFFSET_DATA`` chunk per read once structured
replies are negotiated; errors then come as ``ERROR`` chunks with a message), ``BLOCK_STATUS``
for ``base:allocation`` (runs of all-zero chunks are ``HOLE|ZERO``, the rest data: what
``nbdinfo --map``, ``qemu-img map`` and ``nbdcopy``'s sparse copies read), ``FLUSH``
(succeeds), ``DISC``; writes, trims and write-zeroes get ``EPERM``. The export name is the
image name; the empty name selects it too.

Facts from the protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
(structured replies, metadata querying, TLS). Listening addresses and their errors come from
:mod:`btrdelta.transport.listen`; a unix socket file is removed when the server closes.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import socket
import socketserver
import ssl
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..transport.listen import ListenAddress, bind_listener, parse_listen
from .chunker import chunk_digest
from .store import ImageReader

__all__ = ["ExtentMap", "NbdServer"]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_POLICY = (1 << 31) | 2
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_TLS_REQD = (1 << 31) | 5
REP_ERR_UNKNOWN = (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH = 1, 2, 4
TFLAG_SEND_DF, TFLAG_CAN_MULTI_CONN = 1 << 7, 1 << 8
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_REQ_ONE = 1 << 3
REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS = 1, 5
REPLY_TYPE_ERROR = (1 << 15) | 1
STATE_HOLE, STATE_ZERO = 1, 2
EPERM, EIO, EINVAL = 1, 5, 22

BASE_ALLOCATION = b"base:allocation"
BASE_ALLOCATION_ID = 1
MAX_OPTION_DATA = 4096
MAX_REQUEST = 32 << 20
MAX_EXTENTS = 4096  # per BLOCK_STATUS reply
_MAX_EXTENT = (1 << 32) - 4096  # an extent's length is 32 bits: split longer runs

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
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


class ExtentMap:
    """Allocation runs of an image: all-zero chunks are holes, the rest data.

    A chunk is zero when its id is the BLAKE3 of that many zero bytes; only chunks that
    compress at least 32-fold are hashed to check, so building the map costs a pass over
    the order, not over the data.
    """

    def __init__(self, reader: ImageReader) -> None:
        index = reader.index
        zero_ids: dict[int, bytes] = {}
        zero = bytearray(len(index.digests))
        for e, (raw, comp) in enumerate(zip(index.raw_sizes, index.comp_sizes, strict=True)):
            if comp * 32 < raw:
                if raw not in zero_ids:
                    zero_ids[raw] = chunk_digest(bytes(raw))
                zero[e] = index.digests[e] == zero_ids[raw]
        self.size = reader.size
        self.starts = array("Q")
        self.flags = bytearray()
        last = -1
        for pos, e in enumerate(index.order):
            flag = STATE_HOLE | STATE_ZERO if zero[e] else 0
            if flag != last:
                self.starts.append(index.starts[pos])
                self.flags.append(flag)
                last = flag

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """``(length, flags)`` runs covering ``[offset, offset + length)``, at most ``limit``."""
        out: list[tuple[int, int]] = []
        end = min(offset + length, self.size)
        k = bisect.bisect_right(self.starts, offset) - 1
        pos = offset
        while pos < end and len(out) < limit:
            run_end = self.starts[k + 1] if k + 1 < len(self.starts) else self.size
            n = min(run_end, end, pos + _MAX_EXTENT) - pos
            out.append((n, self.flags[k]))
            pos += n
            if pos >= run_end:
                k += 1
        return out


@dataclass(slots=True)
class _Session:
    """What one connection negotiated."""

    sock: socket.socket
    structured: bool = False
    allocation: bool = False
    tls: bool = False


class _Handler(socketserver.BaseRequestHandler):
    server: NbdServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = _Session(sock)
        try:
            if self._negotiate(session):
                self._transmit(session)
        except _Closed:
            pass
        except (OSError, ssl.SSLError) as exc:  # includes resets and failed TLS handshakes
            self.server.log(f"{self.client_address}: connection dropped: {exc}")
        finally:
            if session.sock is not sock:  # the TLS wrapper owns the descriptor now
                with contextlib.suppress(OSError):
                    session.sock.close()

    # -- handshake -------------------------------------------------------------------------
    def _negotiate(self, s: _Session) -> bool:
        srv = self.server
        s.sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                   FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv_exact(s.sock, 4))
        if client_flags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES):
            raise _Closed
        no_zeroes = bool(client_flags & CLIENT_FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(_recv_exact(s.sock, _OPT.size))
            if magic != IHAVEOPT or length > MAX_OPTION_DATA:
                raise _Closed
            data = _recv_exact(s.sock, length)
            if srv.tls is not None and not s.tls and opt not in (OPT_STARTTLS, OPT_ABORT):
                if opt == OPT_EXPORT_NAME:
                    raise _Closed  # cannot be refused with a reply
                self._reply(s, opt, REP_ERR_TLS_REQD, b"TLS is required (STARTTLS)")
                continue
            if opt == OPT_EXPORT_NAME:
                if not srv.knows(data):
                    raise _Closed
                s.sock.sendall(struct.pack(">QH", srv.reader.size, self._tflags(s))
                               + (b"" if no_zeroes else b"\0" * 124))
                return True
            if opt == OPT_ABORT:
                self._reply(s, opt, REP_ACK)
                return False
            if opt in (OPT_INFO, OPT_GO):
                if self._info(s, opt, data) and opt == OPT_GO:
                    return True
                continue
            handler = self._OPTIONS.get(opt)
            if handler is None:
                self._reply(s, opt, REP_ERR_UNSUP)
            else:
                handler(self, s, opt, data)

    def _tflags(self, s: _Session) -> int:
        flags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN
        return flags | (TFLAG_SEND_DF if s.structured else 0)

    @staticmethod
    def _reply(s: _Session, opt: int, rep: int, data: bytes = b"") -> None:
        s.sock.sendall(_OPT_REPLY.pack(REPLY_MAGIC, opt, rep, len(data)) + data)

    def _info(self, s: _Session, opt: int, data: bytes) -> bool:
        """``NBD_OPT_INFO``/``GO``: name, requested infos; returns True if it succeeded."""
        if len(data) < 6:
            self._reply(s, opt, REP_ERR_INVALID)
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._reply(s, opt, REP_ERR_INVALID)
            return False
        (count,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * count != len(data):
            self._reply(s, opt, REP_ERR_INVALID)
            return False
        if not self.server.knows(data[4 : 4 + nlen]):
            self._reply(s, opt, REP_ERR_UNKNOWN, b"no such export")
            return False
        self._reply(s, opt, REP_INFO,
                    struct.pack(">HQH", INFO_EXPORT, self.server.reader.size, self._tflags(s)))
        self._reply(s, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
        self._reply(s, opt, REP_ACK)
        return True

    def _opt_list(self, s: _Session, opt: int, data: bytes) -> None:
        if data:
            self._reply(s, opt, REP_ERR_INVALID)
            return
        name = self.server.name.encode()
        self._reply(s, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
        self._reply(s, opt, REP_ACK)

    def _opt_structured(self, s: _Session, opt: int, data: bytes) -> None:
        if data:
            self._reply(s, opt, REP_ERR_INVALID)
            return
        s.structured = True
        self._reply(s, opt, REP_ACK)

    def _opt_meta_context(self, s: _Session, opt: int, data: bytes) -> None:
        """``LIST``/``SET_META_CONTEXT``: only ``base:allocation`` exists."""
        if not s.structured:
            self._reply(s, opt, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            name, queries = _parse_meta_request(data)
        except (struct.error, ValueError):
            self._reply(s, opt, REP_ERR_INVALID)
            return
        if not self.server.knows(name):
            self._reply(s, opt, REP_ERR_UNKNOWN, b"no such export")
            return
        if opt == OPT_LIST_META_CONTEXT:
            found = not queries or any(q in (b"base:", BASE_ALLOCATION) for q in queries)
        else:
            found = BASE_ALLOCATION in queries
            s.allocation = found
        if found:
            self._reply(s, opt, REP_META_CONTEXT,
                        struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION)
        self._reply(s, opt, REP_ACK)

    def _opt_starttls(self, s: _Session, opt: int, data: bytes) -> None:
        tls = self.server.tls
        if tls is None:
            self._reply(s, opt, REP_ERR_POLICY, b"TLS is not configured on this server")
            return
        if data or s.tls:
            self._reply(s, opt, REP_ERR_INVALID)
            return
        self._reply(s, opt, REP_ACK)
        s.sock = tls.wrap_socket(s.sock, server_side=True)
        s.tls = True

    _OPTIONS: ClassVar[dict[int, Callable[[_Handler, _Session, int, bytes], None]]] = {
        OPT_LIST: _opt_list,
        OPT_STRUCTURED_REPLY: _opt_structured,
        OPT_LIST_META_CONTEXT: _opt_meta_context,
        OPT_SET_META_CONTEXT: _opt_meta_context,
        OPT_STARTTLS: _opt_starttls,
    }

    # -- transmission ----------------------------------------------------------------------
    def _transmit(self, s: _Session) -> None:
        size = self.server.reader.size
        while True:
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack(
                _recv_exact(s.sock, _REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _Closed
            if cmd == CMD_DISC:
                return
            if cmd == CMD_WRITE:
                if length > MAX_REQUEST:
                    raise _Closed
                _recv_exact(s.sock, length)  # drain the payload, then refuse
            bad = length > MAX_REQUEST or offset + length > size
            if cmd == CMD_READ:
                self._read(s, handle, offset, length, bad)
            elif cmd == CMD_BLOCK_STATUS:
                self._block_status(s, handle, offset, length, flags, bad)
            elif cmd == CMD_FLUSH:
                self._simple(s, handle, 0)
            elif cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
                self._simple(s, handle, EPERM)
            else:
                self._error(s, handle, EINVAL, f"command {cmd} not supported")

    def _simple(self, s: _Session, handle: int, error: int) -> None:
        s.sock.sendall(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))

    def _error(self, s: _Session, handle: int, error: int, message: str) -> None:
        """An error reply: a structured ``ERROR`` chunk with the message when negotiated."""
        if not s.structured:
            self._simple(s, handle, error)
            return
        text = message.encode()[:4096]
        payload = struct.pack(">IH", error, len(text)) + text
        s.sock.sendall(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                   handle, len(payload)) + payload)

    def _read(self, s: _Session, handle: int, offset: int, length: int, bad: bool) -> None:
        if bad:
            self._error(s, handle, EINVAL, f"read of {length} bytes at {offset} outside the "
                        f"export or over {MAX_REQUEST} bytes")
            return
        try:
            data = self.server.reader.pread(length, offset)
        except Exception as exc:  # a missing/short chunk file: report EIO, keep serving
            self.server.read_failed(exc)
            self._error(s, handle, EIO, f"read at {offset}: {exc}")
            return
        if s.structured:
            head = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                               handle, 8 + length) + struct.pack(">Q", offset)
        else:
            head = _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)
        if s.tls:
            s.sock.sendall(head + data)
        else:
            s.sock.sendmsg([head, data])
        self.server.count(length)

    def _block_status(self, s: _Session, handle: int, offset: int, length: int, flags: int,
                      bad: bool) -> None:
        if not s.allocation:
            self._error(s, handle, EINVAL, "no metadata context negotiated")
            return
        if length == 0 or offset + length > self.server.reader.size:
            self._error(s, handle, EINVAL, f"block status of {length} bytes at {offset} "
                        "outside the export")
            return
        limit = 1 if flags & CMD_FLAG_REQ_ONE else MAX_EXTENTS
        runs = self.server.extents.extents(offset, length, limit)
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", n, f) for n, f in runs)
        s.sock.sendall(_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                   REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload)


def _parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]]:
    """Export name and queries of a ``LIST``/``SET_META_CONTEXT`` option."""
    (nlen,) = struct.unpack_from(">I", data)
    name = data[4 : 4 + nlen]
    pos = 4 + nlen
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise ValueError("query past the option's end")
        queries.append(data[pos : pos + qlen])
        pos += qlen
    if pos != len(data) or len(name) != nlen:
        raise ValueError("option length does not match its contents")
    return name, queries


class NbdServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """A threading NBD server for one image.

    Args:
        reader: the image.
        name: the export name.
        listen: ``HOST:PORT`` (port 0 picks one), ``unix:PATH``, or a parsed address.
        log: called with one line per connection event.
        tls: a server TLS context: clients must ``STARTTLS`` before anything else.
        on_error: called with the error of a read that fails (a chunk missing or damaged
            in the store: the client gets EIO with the message), once per distinct error.

    Raises:
        ValueError: a malformed ``listen`` string.
        BtrdeltaError: the address is busy or cannot be used (naming it).
    """

    daemon_threads = True

    def __init__(self, reader: ImageReader, name: str,
                 listen: str | ListenAddress = "127.0.0.1:10809", *,
                 log: Callable[[str], None] | None = None,
                 tls: ssl.SSLContext | None = None,
                 on_error: Callable[[Exception], object] | None = None) -> None:
        where = parse_listen(listen) if isinstance(listen, str) else listen
        self.socket = bind_listener(where, backlog=16)
        super().__init__(self.socket.getsockname(), _Handler)
        self.listen_address = where
        self._unix_inode = os.stat(where.path).st_ino if where.family == socket.AF_UNIX else None
        self.reader = reader
        self.extents = ExtentMap(reader)
        self.name = name
        self.tls = tls
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._log = log
        self.on_error = on_error
        self._said: set[str] = set()

    def knows(self, name: bytes) -> bool:
        """The export ``name`` is ours (the empty name is the default export)."""
        return name in (b"", self.name.encode())

    def log(self, line: str) -> None:
        """Emit one log line (if a log was given)."""
        if self._log is not None:
            self._log(line)

    def read_failed(self, exc: Exception) -> None:
        """A read failed (its client gets EIO): ``on_error``, once per distinct error."""
        with self._lock:
            if self.on_error is None or str(exc) in self._said:
                return
            self._said.add(str(exc))
        self.on_error(exc)

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
        """Close the listening socket; remove the unix socket file if it is still ours."""
        self.socket.close()
        path = self.listen_address.path
        if self._unix_inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._unix_inode:
                    os.unlink(path)
            self._unix_inode = None

    @property
    def uri(self) -> str:
        """An ``nbd://`` (``nbds://`` with TLS, ``+unix`` for a socket) URI for libnbd."""
        scheme = "nbds" if self.tls is not None else "nbd"
        if self.socket.family == socket.AF_UNIX:
            return f"{scheme}+unix:///{self.name}?socket={self.listen_address.path}"
        host, port = self.socket.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}/{self.name}"
