"""Byte-range transport: which ranges to ask for (``plan``), the HTTP/1.1 client on sockets
(``client``), the HTTP settings every fetcher shares (``config``), the per-request deadline
and rate limit at its socket reads (``pacing``), fetching ranges with bounded reads and
retries (``http``), and a small static server with Range support (``server``)."""

from __future__ import annotations

__all__ = ["client", "config", "http", "listen", "pacing", "plan", "server"]  # modules
