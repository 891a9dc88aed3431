"""The replication state machine (sans-I/O, as h11): bytes in, messages out.

One :class:`Connection` per side (``role`` ``"sender"`` or ``"receiver"``). The caller
feeds what it read with :meth:`Connection.receive_data` (``b""`` at the end of input) and
takes messages with :meth:`Connection.next_event` (``NEED_DATA`` until a whole message is
there); :meth:`Connection.send` turns a message into the bytes to write. Both check the order
of the conversation, whichever side a message comes from::

    both:      HELLO                               (versions, capabilities, ids)
    receiver:  HOLDINGS                            (what it holds; a partial transfer)
    sender:    PLAN | REFUSE                       (base chosen, or a typed refusal)
    receiver:  ACCEPT | REFUSE
    sender:    (DATA* CHECKPOINT)* ... COMMIT      receiver: ACK per CHECKPOINT | REFUSE
    receiver:  COMMITTED | REFUSE

and within the stream: DATA offsets follow each other from the plan's offset, a CHECKPOINT
closes the bytes sent since the last one (index and offset in order), an ACK names a
checkpoint already sent, COMMIT comes after the last ACK and names the size sent. Anything
else is a :class:`~btrdelta.errors.ProtocolError` naming the message and its offset in the
connection, raised again by every later call. Sockets, ssh and files are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from ..errors import ProtocolError, StreamFormatError
from ..stream.constants import CMD_HEADER_SIZE
from ..stream.framing import EOF, NEED_DATA, Framer, Sentinel
from .messages import (
    DATA,
    FRAMING,
    HEADER,
    NAMES,
    SENDER_FRAMING,
    VERSIONS,
    Accept,
    Ack,
    Checkpoint,
    Commit,
    Committed,
    Data,
    Hello,
    Holdings,
    Message,
    Plan,
    Refuse,
    check_header,
    data_crc,
    data_raw,
    decode,
    encode,
    encode_data,
    header,
    max_data,
)

__all__ = ["EOF", "NEED_DATA", "Connection"]

_ROLES: Final = ("sender", "receiver")
#: message type -> (who sends it, phases it is allowed in)
_ALLOWED: Final[dict[type, tuple[str, frozenset[str]]]] = {
    Hello: ("both", frozenset({"hello"})),
    Holdings: ("receiver", frozenset({"holdings"})),
    Plan: ("sender", frozenset({"plan"})),
    Accept: ("receiver", frozenset({"accept"})),
    Data: ("sender", frozenset({"stream"})),
    Checkpoint: ("sender", frozenset({"stream"})),
    Ack: ("receiver", frozenset({"stream"})),
    Commit: ("sender", frozenset({"stream"})),
    Committed: ("receiver", frozenset({"commit"})),
    Refuse: ("both", frozenset({"hello", "holdings", "plan", "accept", "stream", "commit"})),
}


class Connection:
    """One side of a replication conversation.

    Args:
        role: ``"sender"`` or ``"receiver"``.
        source: name of the peer in error messages (``ssh://host``, ``tcp://...``).
    """

    def __init__(self, role: str, *, source: str | None = None) -> None:
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.role = role
        self.peer_role = _ROLES[1 - _ROLES.index(role)]
        self._in = Framer(SENDER_FRAMING if role == "sender" else FRAMING, source=source)
        self._header_sent = False
        self._hellos = {"sent": False, "received": False}
        #: the conversation's phase: hello, holdings, plan, accept, stream, commit, done
        self.phase = "hello"
        #: the version both speak (after both HELLOs)
        self.version = 0
        self.peer_hello: Hello | None = None
        self._mine: tuple[int, ...] = VERSIONS  # the versions this side's HELLO lists
        # the stream
        self._offset = 0  # next DATA offset
        self._closed_at = 0  # offset of the last CHECKPOINT
        self._next_index = 0
        self._acked = -1
        self._size = 0

    # -- output ---------------------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The bytes of ``msg`` (with this side's header before the first one).

        Raises:
            ProtocolError: this side may not send ``msg`` now (a bug in the caller).
        """
        self._check(msg, self.role, "send")
        if isinstance(msg, Data) and not data_crc(self.version):
            out = b"".join(bytes(b) for b in
                           encode_data(msg.offset, [msg.data], crc=False,
                                       raw=data_raw(self.version))[0])
        else:
            out = encode(msg)
        self._advance(msg, self.role)
        if not self._header_sent:
            self._header_sent = True
            return header() + out
        return out

    def send_data(self, offset: int, pieces: Sequence[Any]) -> list[Any]:
        """:meth:`send` of ``Data(offset, b"".join(pieces))`` as buffers to write in order
        (the pieces among them, not joined: for ``writev``).

        Raises:
            ProtocolError: DATA may not be sent now, or not at that offset.
        """
        out, size = encode_data(offset, pieces, crc=data_crc(self.version),
                                raw=data_raw(self.version))
        if size > max_data(self.version):
            raise ValueError(f"DATA of {size} bytes in protocol version {self.version}")
        sender, phases = _ALLOWED[Data]
        if sender != self.role or self.phase not in phases:
            raise ProtocolError(f"DATA is not allowed now (phase {self.phase}, {self.role})")
        self._check_data(offset, size)
        self._offset += size
        if not self._header_sent:
            self._header_sent = True
            out.insert(0, header())
        return out

    # -- input ----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not taken as messages yet."""
        return self._in.avail

    @property
    def peer_header_read(self) -> bool:
        """Whether the peer's header (before its first message) was received."""
        return bool(self._in.version)

    def needed(self) -> int:
        """Bytes still missing for the peer's header or the next message (a read-size
        hint: at least the rest of a header, counted up to the largest message)."""
        fr = self._in
        return fr.needed(0 if fr.version else HEADER.size)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the peer (``b""``: the peer closed the connection)."""
        self._in.feed(data)

    def next_event(self) -> Message | Literal[Sentinel.NEED_DATA, Sentinel.EOF]:
        """The next message, ``NEED_DATA``, or ``EOF`` (closed cleanly after the last one).

        Raises:
            ProtocolError: malformed bytes, an unknown message, one out of order (located).
        """
        fr = self._in
        if fr.failed is not None:
            raise fr.failed
        if not fr.version:
            if fr.avail < HEADER.size:
                if fr.eof:
                    if not fr.avail and self.phase == "done":
                        return EOF
                    fr.fail(ProtocolError("connection closed before the peer's header"),
                            indexed=False)
                return NEED_DATA
            try:
                fr.version = check_header(fr.peek(HEADER.size))
            except ProtocolError as exc:
                fr.fail(exc, indexed=False)
            fr.consume(HEADER.size, 0)
        if fr.eof and not fr.avail and self.phase == "done":
            return EOF
        try:
            frame = fr.next_frame()
        except StreamFormatError as exc:
            fr.fail(ProtocolError(exc.message), cmd=None)
        if frame is NEED_DATA:
            return NEED_DATA
        cmd, mv, start, length = frame
        try:
            msg = decode(cmd, mv, start + CMD_HEADER_SIZE, start + CMD_HEADER_SIZE + length,
                         self.version)
            self._check(msg, self.peer_role, "receive")
        except ProtocolError as exc:
            fr.fail(exc, cmd=cmd)
        fr.consume(CMD_HEADER_SIZE + length)
        self._advance(msg, self.peer_role)
        return msg

    # -- the rules ------------------------------------------------------------------------

    def _check(self, msg: Message, who: str, how: str) -> None:
        rule = _ALLOWED.get(type(msg))
        name = NAMES.get(_number(msg), type(msg).__name__)
        if rule is None:  # pragma: no cover - every message type has a rule
            raise ProtocolError(f"unknown message {name}")
        sender, phases = rule
        if sender not in ("both", who):
            raise ProtocolError(f"{name} comes from the {sender}, not the {who}")
        if self.phase not in phases:
            raise ProtocolError(f"{name} is not allowed now (phase {self.phase})")
        if isinstance(msg, Hello) and self._hellos["sent" if how == "send" else "received"]:
            raise ProtocolError("a second HELLO")
        if isinstance(msg, Hello) and how == "receive" and msg.role != self.peer_role:
            raise ProtocolError(f"the peer says it is a {msg.role}, expected a {self.peer_role}")
        if isinstance(msg, Data):
            if len(msg.data) > max_data(self.version):
                raise ProtocolError(f"DATA of {len(msg.data)} bytes in protocol version "
                                    f"{self.version}")
            self._check_data(msg.offset, len(msg.data))
        elif isinstance(msg, Checkpoint):
            if msg.index != self._next_index or msg.offset != self._offset or \
                    (msg.offset <= self._closed_at and msg.index):
                raise ProtocolError(
                    f"CHECKPOINT {msg.index} at {msg.offset}, expected {self._next_index} at "
                    f"{self._offset}")
        elif isinstance(msg, Ack):
            if not self._acked < msg.index < self._next_index:
                raise ProtocolError(f"ACK of checkpoint {msg.index}, which was not sent")
        elif isinstance(msg, Commit) and (msg.size != self._offset or self._closed_at != msg.size
                                          or self._acked != self._next_index - 1):
            raise ProtocolError(f"COMMIT of {msg.size} bytes before every byte was "
                                f"checkpointed and acknowledged ({self._offset} sent)")

    def _check_data(self, offset: int, size: int) -> None:
        if offset != self._offset or not size:
            raise ProtocolError(f"DATA at offset {offset}, expected {self._offset}")

    def _advance(self, msg: Message, who: str) -> None:
        if isinstance(msg, Refuse):
            self.phase = "done"
        elif isinstance(msg, Hello):
            self._hellos["sent" if who == self.role else "received"] = True
            if who != self.role:
                self.peer_hello = msg
            else:
                self._mine = msg.versions
            if all(self._hellos.values()):
                assert self.peer_hello is not None
                # what both HELLOs list (and this build speaks)
                common = set(VERSIONS) & set(self._mine) & set(self.peer_hello.versions)
                if not common:
                    raise ProtocolError(
                        f"no common protocol version (peer: {self.peer_hello.versions}, "
                        f"here: {self._mine})")
                self.version = max(common)
                if not data_crc(self.version):  # DATA's bytes: the stream's CRCs
                    self._in.unchecked = DATA
                self.phase = "holdings"
        elif isinstance(msg, Holdings):
            self.phase = "plan"
        elif isinstance(msg, Plan):
            self.phase = "accept"
            self._offset = self._closed_at = msg.offset
            self._next_index = msg.segments
            self._acked = msg.segments - 1
        elif isinstance(msg, Accept):
            self.phase = "stream"
        elif isinstance(msg, Data):
            self._offset += len(msg.data)
        elif isinstance(msg, Checkpoint):
            self._closed_at = msg.offset
            self._next_index += 1
        elif isinstance(msg, Ack):
            self._acked = msg.index
        elif isinstance(msg, Commit):
            self.phase = "commit"
        elif isinstance(msg, Committed):
            self.phase = "done"

    @property
    def unacked(self) -> int:
        """Checkpoints sent and not acknowledged yet."""
        return self._next_index - 1 - self._acked


def _number(msg: Message) -> int:
    from .messages import _attrs

    return _attrs(msg)[0] if not isinstance(msg, Data) else 6
