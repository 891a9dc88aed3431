"""The receiver's ACKs from a thread of their own (``update.replica.AckWriter``): each one
written after the meta naming its segment's end was saved, in order; a failure ends the
stream in the applier's thread once and is raised by every later call; ``drain`` waits for
every ACK queued."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from btrdelta.errors import TransportError
from btrdelta.protocol import Ack
from btrdelta.update.partial import AckWriter


class _Log:
    """A fake connection and partial transfer writing into one log (their order)."""

    def __init__(self, save_fails: int = -1, send_fails: int = -1) -> None:
        self.log: list[tuple[str, int]] = []
        self.failed: list[BaseException] = []
        self.save_fails, self.send_fails = save_fails, send_fails
        self.threads: set[int] = set()

    def save(self, doc: dict[str, Any]) -> None:
        self.threads.add(threading.get_ident())
        if doc["offset"] == self.save_fails:
            raise OSError(28, "No space left on device")
        self.log.append(("save", doc["offset"]))

    def send(self, msg: Ack) -> None:
        if msg.offset == self.send_fails:
            raise TransportError("pipe: the peer went away")
        self.log.append(("ack", msg.offset))


def _acks(log: _Log) -> AckWriter:
    return AckWriter(log, log, log.failed.append)  # type: ignore[arg-type]


def test_each_ack_follows_its_saved_meta_in_order() -> None:
    log = _Log()
    acks = _acks(log)
    for i in range(50):
        acks.put({"offset": i}, Ack(i, i))
    acks.drain()
    assert log.log == [(kind, i) for i in range(50) for kind in ("save", "ack")]
    assert len(log.threads) == 1  # one thread, not the applier's
    assert threading.get_ident() not in log.threads
    assert acks._thread is None  # (ended: drain waited for it)
    acks.drain()  # (nothing queued: nothing to wait for)


@pytest.mark.parametrize(("save_fails", "send_fails"), [(3, -1), (-1, 5)])
def test_a_failure_ends_the_stream_once_and_is_raised_after(save_fails: int,
                                                            send_fails: int) -> None:
    log = _Log(save_fails, send_fails)
    at = max(save_fails, send_fails)
    acks = _acks(log)
    for i in range(10):
        try:
            acks.put({"offset": i}, Ack(i, i))
        except (OSError, TransportError):
            break
    with pytest.raises((OSError, TransportError)):
        acks.drain()
    assert len(log.failed) == 1
    assert acks.error is log.failed[0]
    assert ("ack", at) not in log.log  # its ACK not sent
    assert all(i <= at for _kind, i in log.log)  # nothing after it
    with pytest.raises((OSError, TransportError)):
        acks.put({"offset": 99}, Ack(99, 99))
    acks.drain(check=False)
