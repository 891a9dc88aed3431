"""``btrdelta serve``: a static HTTP server with Range support, for tests and demos."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import types

from ..errors import BtrdeltaError
from ..transport.listen import parse_port
from ..transport.server import StaticServer
from ._common import examples


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve",
        help="serve a directory over HTTP with Range support (tests and demos)",
        description=(
            "Serve the files below DIR over HTTP/1.1 with single and multi-range requests "
            "(not those whose path has a name starting with '.': a publisher's "
            "REPO/.btrdelta, a .git, keys are 404). GET and HEAD only: it takes no PUT "
            "(501), so it is no destination for `device backup` to an http(s) URL (a server "
            "taking PUT, MOVE and DELETE is: nginx with dav_methods PUT MOVE DELETE). "
            "Logs one line per request with the body bytes sent on stderr; stops cleanly on "
            "SIGINT or SIGTERM and prints the total. Production uses any web server or CDN."
        ),
        epilog=examples("btrdelta serve ./www --bind 0.0.0.0 --port 8080",
                        "btrdelta serve -q ./www --port 0      # any free port, no request log"),
    )
    p.add_argument("dir", metavar="DIR", help="directory to serve")
    p.add_argument("--port", type=_port, default=8080,
                   help="TCP port (0: any free; default 8080)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; :: for all IPv6)")
    p.add_argument("--idle-timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="close a connection silent (or not reading) this long (default 60)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not log requests")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if not os.path.isdir(args.dir):
        raise BtrdeltaError("not a directory" if os.path.lexists(args.dir) else
                            "does not exist", path=args.dir)
    with os.scandir(args.dir):  # (one it cannot read is refused now, not served as 404s)
        pass
    server = StaticServer(args.dir, (args.bind, args.port), log=log,
                          idle_timeout=args.idle_timeout)
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server.running():
            print(f"serving {server.root} on {_where(server)}", file=sys.stderr, flush=True)
            while not stop.wait(0.5):
                pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    n = server.requests
    print(f"stopped: {n} request{'' if n == 1 else 's'}, {server.bytes_served} bytes served",
          file=sys.stderr, flush=True)
    return 0


def _where(server: StaticServer) -> str:
    """The URL to give clients; for a wildcard bind (0.0.0.0, ::) no client can use the
    bound address itself, so say the port and name this host as an example."""
    host, port = server.server_address[:2]
    if str(host) in ("0.0.0.0", "::"):
        return (f"port {port} of every address of this host (e.g. "
                f"http://{socket.gethostname()}:{port}/)")
    return f"{server.url}/"
