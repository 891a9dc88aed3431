"""The record-sink interface: every consumer of a stream, driven by one loop."""

from __future__ import annotations

import io

import pytest

from btrdelta.stream import StreamReader, StreamWriter
from btrdelta.stream.dump import JsonDumpSink, TextDumpSink
from btrdelta.stream.sink import RecordSink, VerifySink, feed
from tests.conftest import committed_streams

STREAMS = committed_streams()


def test_every_sink_implements_the_interface() -> None:
    out = io.BytesIO()
    for sink in (TextDumpSink(out.write), JsonDumpSink(out.write), StreamWriter(out.write),
                 VerifySink()):
        assert isinstance(sink, RecordSink)


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_writer_sink_gives_the_kernel_stream_back(path: object) -> None:
    data = path.read_bytes()  # type: ignore[attr-defined]
    out = io.BytesIO()
    n = feed(StreamReader(io.BytesIO(data)).events(), StreamWriter(out.write))
    assert out.getvalue() == data
    verify = VerifySink()
    assert feed(StreamReader(io.BytesIO(data)).events(), verify) == n == verify.records
    assert verify.streams == 1


@pytest.mark.parametrize("path", STREAMS, ids=lambda p: p.name)
def test_text_sink_is_btrfs_receive_dump(path: object) -> None:
    # the .dump files beside the streams are what `btrfs receive --dump` printed
    expected = path.with_suffix(".dump").read_bytes()  # type: ignore[attr-defined]
    out = io.BytesIO()
    sink = TextDumpSink(out.write, batch=7, progs=(6, 2))  # several renders, state kept
    feed(StreamReader(io.BytesIO(path.read_bytes())).events(), sink,  # type: ignore[attr-defined]
         stop_at_end=True)
    sink.close()
    assert out.getvalue() == expected


def test_stop_at_end_and_flush_after_error() -> None:
    data = STREAMS[0].read_bytes()
    twice = data + data
    verify = VerifySink()
    n = feed(StreamReader(io.BytesIO(twice)).events(), verify, stop_at_end=True)
    assert verify.streams == 1
    assert n == verify.records
    # a stream cut in the middle: what was read is still dumped when the sink is closed
    out = io.BytesIO()
    sink = TextDumpSink(out.write, progs=(6, 2))
    with pytest.raises(Exception, match=r"truncated|ended"):
        feed(StreamReader(io.BytesIO(data[: len(data) // 2])).events(), sink)
    sink.close()
    assert out.getvalue()
    assert STREAMS[0].with_suffix(".dump").read_bytes().startswith(out.getvalue())


@pytest.mark.parametrize("path", STREAMS[::4], ids=lambda p: p.name)
def test_a_reader_fed_whole_batches_gives_the_same_output(path: object) -> None:
    # feed(StreamReader) hands decoded batches to a sink with apply_batch (the text dumper),
    # events one by one to the others: both give what the event loop gives
    data = path.read_bytes() * 2  # type: ignore[attr-defined]
    for make, stop in ((TextDumpSink, True), (TextDumpSink, False), (JsonDumpSink, False)):
        by_event, by_batch = io.BytesIO(), io.BytesIO()
        sink_e, sink_b = make(by_event.write), make(by_batch.write)
        n_e = feed(StreamReader(io.BytesIO(data)).events(), sink_e, stop_at_end=stop)
        n_b = feed(StreamReader(io.BytesIO(data)), sink_b, stop_at_end=stop)
        sink_e.close()
        sink_b.close()
        assert (n_b, by_batch.getvalue()) == (n_e, by_event.getvalue())
        assert by_batch.getvalue().count(b'"stream"') == (2 if make is JsonDumpSink else 0)
