"""The replication protocol (floor 3): messages and the sans-I/O state machine.

:mod:`.messages` (value classes and their bytes on the send stream's framing),
:mod:`.machine` (:class:`~.machine.Connection`: bytes in, messages out, order checked) and
:mod:`.plan` (choosing the base from what the receiver holds: pure). Sockets, ssh, TLS and
the sending and receiving themselves are ``update.replicate``'s.
"""

from __future__ import annotations

from .machine import EOF, NEED_DATA, Connection
from .messages import (
    Accept,
    Ack,
    Checkpoint,
    Commit,
    Committed,
    Data,
    Held,
    Hello,
    Holdings,
    Message,
    Partial,
    Plan,
    Refuse,
)

__all__ = [
    "EOF",
    "NEED_DATA",
    "Accept",
    "Ack",
    "Checkpoint",
    "Commit",
    "Committed",
    "Connection",
    "Data",
    "Held",
    "Hello",
    "Holdings",
    "Message",
    "Partial",
    "Plan",
    "Refuse",
]
