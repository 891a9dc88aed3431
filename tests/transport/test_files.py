"""Whole small files over HTTP: retries, 404 as an answer, bounded bodies, redirect loops."""

from __future__ import annotations

import httpx
import pytest

from btrdelta.errors import TransportError
from btrdelta.transport.files import FileFetcher


# responses are streams, as from a server (a mock's content= body cannot be read raw)
def _fetcher(handler: httpx.MockTransport) -> FileFetcher:
    return FileFetcher("http://store.test/castr", client=httpx.Client(transport=handler,
                                                                       follow_redirects=True),
                       backoff=0.001)


def test_answers_retries_and_bounds() -> None:
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        path = request.url.path
        if path.endswith("/flaky") and calls.count(path) < 3:
            return httpx.Response(503)
        if path.endswith("/missing"):
            return httpx.Response(404)
        if path.endswith("/big"):
            return httpx.Response(200, stream=httpx.ByteStream(b"x" * 5000))
        if path.endswith("/loop"):
            return httpx.Response(302, headers={"Location": "/castr/loop"})
        if path.endswith("/forbidden"):
            return httpx.Response(403)
        return httpx.Response(200, stream=httpx.ByteStream(b"chunk"))

    f = _fetcher(httpx.MockTransport(handle))
    assert f.get("ab/ok", max_size=100) == b"chunk"
    assert calls[-1] == "/castr/ab/ok"
    assert f.get("flaky", max_size=100) == b"chunk"  # two 503s, then the file
    assert f.stats.retries == 2
    assert f.get("missing", max_size=100) is None
    with pytest.raises(TransportError, match="larger than the 100 bytes"):
        f.get("big", max_size=100)
    with pytest.raises(TransportError, match="TooManyRedirects"):
        f.get("loop", max_size=100)
    with pytest.raises(TransportError, match="HTTP 403"):
        f.get("forbidden", max_size=100)
    f.close()
