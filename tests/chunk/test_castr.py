"""casync stores over HTTP: a chunk the server lacks (404) comes from the next store, a reply
larger than any chunk file can be is refused before it is buffered."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from btrdelta.chunk.castr import CastrChunks, read_caibx
from btrdelta.chunk.casync import chunk_file_name
from btrdelta.errors import TransportError
from btrdelta.transport.config import HttpConfig
from btrdelta.transport.server import StaticServer

from .test_casync import casync_make


def test_http_store_falls_back_and_is_bounded(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(random.Random(7).randbytes(400_000))
    www = tmp_path / "www"
    www.mkdir()
    index_path, store = casync_make(blob, www, "--chunk-size=16384")
    local = tmp_path / "local.castr"
    shutil.copytree(store, local)
    index, _ = read_caibx(str(index_path))
    gone = chunk_file_name(index.digests[0])
    (store / gone).unlink()  # the server lacks one chunk; the local store has it
    config = HttpConfig(retries=0)
    got: dict[int, bytes] = {}
    with StaticServer(www).running() as server:
        url = f"{server.url}/{store.name}"
        chunks = CastrChunks(index, [url, str(local)], config=config)
        chunks.fetch(range(len(index.digests)), lambda e, data: got.__setitem__(e, data))
        assert b"".join(got[e] for e in index.order) == blob.read_bytes()
        assert chunks.stats.requests == len(index.digests) + 1  # the 404 cost one request
        chunks.close()
        big = store / chunk_file_name(index.digests[1])
        big.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(3 * index.raw_sizes[1]))  # too long
        chunks = CastrChunks(index, [url], config=config)
        with pytest.raises(TransportError, match="larger than"):
            chunks.fetch([1], lambda e, data: None)
        chunks.close()


def test_ctrl_c_stops_the_fetch_of_chunks_not_yet_begun(tmp_path: Path) -> None:
    """A Ctrl-C while a .castr's chunks are fetched ends the fetch once the chunks in hand
    are done. Before, the pool's exit ran every chunk still queued: the whole image was
    fetched after the Ctrl-C."""
    import signal
    import threading
    import time

    blob = tmp_path / "blob"
    blob.write_bytes(random.Random(8).randbytes(800_000))
    index_path, store = casync_make(blob, tmp_path, "--chunk-size=16384")
    index, _ = read_caibx(str(index_path))
    got: list[int] = []
    main = threading.main_thread().ident
    assert main is not None

    def on_chunk(entry: int, _data: bytes) -> None:
        got.append(entry)
        if len(got) == 3:
            signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.02)

    chunks = CastrChunks(index, [str(store)], config=HttpConfig(jobs=2))
    with pytest.raises(KeyboardInterrupt):
        chunks.fetch(range(len(index.digests)), on_chunk)
    chunks.close()
    assert len(index.digests) > 30
    assert len(got) <= 6, (len(got), len(index.digests))
