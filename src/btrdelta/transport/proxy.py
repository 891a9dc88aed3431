"""Which proxy (if any) a request goes through: the environment's ``http_proxy``,
``https_proxy``, ``all_proxy`` and ``no_proxy`` (lower case first, then upper case), as
curl reads them.

- ``http_proxy`` for ``http://`` URLs (``HTTP_PROXY`` too, except in a CGI program, where
  a request's ``Proxy:`` header sets it: "httpoxy"), ``https_proxy`` for ``https://`` URLs,
  ``all_proxy`` for either when its own variable is unset or empty.
- A proxy is ``http://[user:password@]host[:port]`` (``host:port`` alone means
  ``http://``; no port: 80). The credentials go to the proxy as ``Proxy-Authorization:
  Basic``. A proxy reached over TLS (``https://``) or SOCKS is refused with one line naming
  the variable: never a silent direct connection.
- ``no_proxy``: names separated by commas (or spaces). ``*`` alone: no proxy at all. A name
  matches the host itself and its subdomains (``example.com`` and ``.example.com`` both
  match ``example.com`` and ``www.example.com``); an IP address (or a CIDR range,
  ``10.0.0.0/8``, ``fd00::/8``) matches the host written as an address in it; ``name:port``
  only that port. Loopback is not bypassed unless listed (curl's rule).

Only ``os`` lookups happen when no variable is set (a plain fetch imports nothing more).
"""

from __future__ import annotations

import os
from urllib.parse import SplitResult, unquote, urlsplit

__all__ = ["InvalidProxy", "Proxies", "Proxy", "basic_auth", "from_environ"]


class InvalidProxy(ValueError):
    """A proxy variable that cannot be used (its text names the variable)."""


class Proxy:
    """One proxy: where it listens, its ``Proxy-Authorization`` and the variable naming it."""

    __slots__ = ("auth", "host", "port", "variable")

    def __init__(self, host: str, port: int, auth: str | None, variable: str) -> None:
        self.host = host
        self.port = port
        self.auth = auth
        self.variable = variable

    def __str__(self) -> str:
        """``proxy 127.0.0.1:3128 (HTTPS_PROXY)``: no credentials."""
        name = f"[{self.host}]" if ":" in self.host else self.host
        return f"proxy {name}:{self.port} ({self.variable})"


class Proxies:
    """The proxies of the environment for each scheme, and the hosts that bypass them."""

    def __init__(self, by_scheme: dict[str, Proxy], bypass: list[tuple[str, int | None]]
                 ) -> None:
        self._by_scheme = by_scheme
        self._bypass = bypass

    def for_url(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for a request to ``scheme://host:port``, or ``None`` (direct)."""
        proxy = self._by_scheme.get(scheme)
        if proxy is None or _bypassed(self._bypass, host.lower().rstrip("."), port):
            return None
        return proxy


def _variable(name: str) -> tuple[str, str] | None:
    """The value of the lower-case variable, else the upper-case one (empty: unset)."""
    for var in (name, name.upper()):
        if var == "HTTP_PROXY" and "REQUEST_METHOD" in os.environ:
            continue  # (httpoxy: a CGI request's "Proxy:" header sets HTTP_PROXY)
        value = os.environ.get(var, "").strip()
        if value:
            return var, value
    return None


def from_environ() -> Proxies | None:
    """The environment's proxies, ``None`` if no proxy variable is set.

    Raises:
        InvalidProxy: a variable that is no ``http://host[:port]`` proxy, naming it.
    """
    found = {scheme: _variable(f"{scheme}_proxy") for scheme in ("http", "https", "all")}
    if not any(found.values()):
        return None
    by_scheme: dict[str, Proxy] = {}
    for scheme in ("http", "https"):
        if (setting := found[scheme] or found["all"]) is not None:
            by_scheme[scheme] = _parse(*setting)
    no_proxy = _variable("no_proxy")
    return Proxies(by_scheme, _parse_no_proxy(no_proxy[1]) if no_proxy else [])


def _parse(variable: str, value: str) -> Proxy:
    text = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidProxy(f"{variable}={_shown(value)}: not a proxy URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme in ("https", "socks4", "socks4a", "socks5", "socks5h"):
        raise InvalidProxy(f"{variable}={_shown(value)}: {scheme}:// proxies are not "
                           "supported (an http:// proxy is: http://host:port)")
    if scheme != "http":
        raise InvalidProxy(f"{variable}={_shown(value)}: unsupported proxy scheme {scheme}://"
                           " (http://host:port)")
    if not parts.hostname or any(c in value for c in "\r\n\0 \t") \
            or parts.path not in ("", "/") or parts.query:
        raise InvalidProxy(f"{variable}={_shown(value)}: not a proxy URL "
                           "(http://[user:password@]host[:port])")
    return Proxy(parts.hostname, port or 80, basic_auth(parts), variable)


def basic_auth(parts: SplitResult) -> str | None:
    """``Basic ...`` credentials of a URL's ``user:password@`` (``None``: none)."""
    if parts.username is None:
        return None
    import base64

    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _shown(value: str) -> str:
    """The value with any password hidden."""
    at = value.rfind("@")
    if at < 0:
        return repr(value)
    start = value.find("://") + 3 if "://" in value[:at] else 0
    user = value[start:at].partition(":")[0]
    return repr(f"{value[:start]}{user}:***@{value[at + 1:]}")


def _parse_no_proxy(value: str) -> list[tuple[str, int | None]]:
    """``no_proxy``'s entries: (name, port or ``None``); ``("*", None)`` matches all."""
    out: list[tuple[str, int | None]] = []
    for raw in value.replace(",", " ").split():
        entry, port = raw.lower(), None
        if entry.startswith("["):  # [v6]:port
            addr, _, rest = entry[1:].partition("]")
            entry = addr
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
        elif entry.count(":") == 1:  # name:port (a v6 address has several colons)
            name, _, digits = entry.partition(":")
            if digits.isdigit():
                entry, port = name, int(digits)
        entry = entry.strip(".") if entry != "*" else entry
        if entry:
            out.append((entry, port))
    return out


def _bypassed(bypass: list[tuple[str, int | None]], host: str, port: int) -> bool:
    import ipaddress  # (only with a proxy set)

    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = \
            ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry, only in bypass:
        if entry == "*":
            return True
        if only is not None and only != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass  # a name: never matches an address
        elif host == entry or host.endswith("." + entry):
            return True
    return False
