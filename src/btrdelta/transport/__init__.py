"""Byte-range transport: which ranges to ask for (``plan``), fetching them over HTTP with
retries (``http``), and a small static server with Range support (``server``)."""
