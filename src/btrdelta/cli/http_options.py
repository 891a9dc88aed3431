"""The HTTP(S) options every fetching command shares, and the one config built from them.

``add_http_options(parser)`` adds ``--ca-cert``, ``--client-cert``/``--client-key``,
``--header`` (repeatable; ``@FILE`` reads header lines from a file, so tokens stay out of
``ps``), ``--timeout``, ``--retries``, ``--retry-max-wait``, ``-j/--jobs`` and
``--rate-limit``; ``http_config(args)`` turns them into a :class:`HttpConfig`. Nothing else.
"""

from __future__ import annotations

import argparse

from ..errors import BtrdeltaError
from ..transport.config import HttpConfig, parse_header
from ._common import parse_size

__all__ = ["add_http_options", "http_config"]

_DEFAULT = HttpConfig()


def _number(text: str, kind: type[float] | type[int], minimum: float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum:g}: {text!r}")
    return value


def _seconds(text: str) -> float:
    return _number(text, float, 0.001)


def _count(text: str) -> int:
    return int(_number(text, int, 0))


def _jobs(text: str) -> int:
    return int(_number(text, int, 1))


def _rate(text: str) -> int:
    value = parse_size(text.removesuffix("/s"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r}")
    return value


def _header(text: str) -> str:
    if not text.startswith("@"):
        try:
            parse_header(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_http_options(parser: argparse.ArgumentParser, *, retries: int = _DEFAULT.retries
                     ) -> None:
    """Add the shared HTTP(S) options to ``parser`` (in their own help group); ``retries``
    is the command's default (``update`` tries the next mirror after 2)."""
    g = parser.add_argument_group(
        "HTTP(S) options", "how http:// and https:// sources are fetched")
    g.add_argument("--ca-cert", metavar="PEM",
                   help="CA certificate(s) the server's certificate must chain to (PEM file "
                        "or hashed directory; default: the system's trust store)")
    g.add_argument("--client-cert", metavar="PEM",
                   help="client certificate for servers that require one (mutual TLS)")
    g.add_argument("--client-key", metavar="PEM",
                   help="private key of --client-cert (if not in the same file)")
    g.add_argument("--header", action="append", default=[], type=_header,
                   metavar="'NAME: VALUE'",
                   help="extra request header, e.g. 'Authorization: Bearer TOKEN' "
                        "(repeatable; @FILE reads one header per line from FILE)")
    g.add_argument("--timeout", type=_seconds, default=_DEFAULT.timeout, metavar="SECONDS",
                   help="connect timeout and longest silence; a slower request must average "
                        f"{_DEFAULT.min_speed} B/s after that (default {_DEFAULT.timeout:g})")
    g.add_argument("--retries", type=_count, default=retries, metavar="N",
                   help="retries of a failed request: refused or dropped connection, "
                        f"timeout, 5xx (default {retries}; waits double from "
                        f"{_DEFAULT.backoff:g} s)")
    g.add_argument("--retry-max-wait", type=_seconds, default=_DEFAULT.retry_max_wait,
                   metavar="SECONDS",
                   help="longest wait between two attempts (default "
                        f"{_DEFAULT.retry_max_wait:g}); with --retries, how patient to be")
    g.add_argument("-j", "--jobs", type=_jobs, default=_DEFAULT.jobs, metavar="N",
                   help=f"requests in flight, i.e. parallel connections (default "
                        f"{_DEFAULT.jobs})")
    g.add_argument("--rate-limit", type=_rate, default=None, metavar="BYTES/S",
                   help="download at most this fast over all connections, e.g. 2M")


def _headers(values: list[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for value in values:
        if not value.startswith("@"):
            out.append(parse_header(value))
            continue
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\r\n") for line in f]
        except OSError as exc:
            raise BtrdeltaError(f"--header file not read: {exc.strerror}", path=path) from None
        except UnicodeDecodeError:
            raise BtrdeltaError("--header file not read: not UTF-8 text", path=path) from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    out.append(parse_header(line))
                except ValueError:
                    raise BtrdeltaError(f"line {n} is not 'Name: value'", path=path) from None
    return tuple(out)


def http_config(args: argparse.Namespace) -> HttpConfig:
    """The :class:`HttpConfig` for options added by :func:`add_http_options`.

    Raises:
        BtrdeltaError: a header file that cannot be read, a key without a certificate.
    """
    return HttpConfig(
        ca_cert=args.ca_cert, client_cert=args.client_cert, client_key=args.client_key,
        headers=_headers(args.header), timeout=args.timeout, retries=args.retries,
        retry_max_wait=args.retry_max_wait, jobs=args.jobs, rate_limit=args.rate_limit,
        who=f"btrdelta {args.command}",
    )
