"""``btrdelta replicate``: send a subvolume to a receiver that keeps the base, resumably."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .._defaults import DEFAULT_STORE
from ..errors import BtrdeltaError, ProtocolError, TransportError, UsageError, shown
from ._common import human_bytes, parse_size
from ._paths import refuse_inside
from .progress import Progress, add_progress_options, progress_wanted

_EPILOG = """\
examples:
  btrdelta replicate /data /backup                       # a local destination (a pipe)
  btrdelta replicate /data ssh://backup@nas:2222/pool/data
  btrdelta replicate --listen 0.0.0.0:7447 --key nas.key --allow laptop.pub /pool/data
  btrdelta replicate /data tcp://nas:7447 --key laptop.key --peer nas.pub
  btrdelta replicate --serve /pool/data                  # what ssh runs on the other side
  btrdelta replicate /data ssh://nas/pool/data --every 5m --json   # a service (systemd)

Each run sends what changed since the newest sendshot the receiver holds (a full stream the
first time), in checkpointed segments: run it again after a cut and it resumes. The sender
keeps a cursor per receiver and prunes the sendshots no receiver needs.

--every INTERVAL runs in one process until SIGTERM or Ctrl-C: a round now, then one every
INTERVAL (30s, 5m, 1h), each what one run does (a one-shot run can follow it, and it one);
a line per round (--json: a JSON line). A failed round is one line and is tried again
after 1 s, 2 s, 4 s ... up to INTERVAL; it resumes. SIGTERM exits 0 (in a round: once its
transfer is left resumable). A systemd unit: docs/replicate.md.

Exit codes: 0 also when the receiver is already current; 2 a usage mistake; 5 a key not
allowed (--allow) or not the pinned one (--peer); 7 the connection (ssh, TCP, a receiver
that exited); 9 refused by the protocol (no-common-base, diverged, exists, busy); 130
interrupted: run it again to resume."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``replicate``."""
    p = sub.add_parser(
        "replicate", help="send SOURCE to DEST (local, ssh://, tcp://) against what it holds",
        description=(
            "Replicate a subvolume (or any directory) to a receiver: the two sides agree on "
            "the newest sendshot the receiver holds, the sender sends an incremental stream "
            "against it (live subvolumes through a read-only snapshot kept until the receiver "
            "committed), and the receiver shows the new subvolume only when it is complete."),
        epilog=_EPILOG,
    )
    p.add_argument("source", metavar="SOURCE", nargs="?", help="what to send")
    p.add_argument("dest", metavar="DEST", nargs="?",
                   help="a local directory, ssh://[user@]host[:port]/path or tcp://host:port")
    p.add_argument("--serve", metavar="DIR", help="receive one transfer into DIR over "
                                                  "standard input and output")
    p.add_argument("--listen", metavar="ADDR",
                   help="receive over TCP on HOST:PORT into DEST (then the only positional "
                   "argument)")
    p.add_argument("--allow", metavar="PUBKEY", action="append", default=[],
                   help="(--listen) a client key allowed to connect (repeatable)")
    p.add_argument("--key", metavar="KEY", help="this side's private key (tcp)")
    p.add_argument("--peer", metavar="PUBKEY", help="the server's public key (tcp://)")
    p.add_argument("--no-auth", action="store_true",
                   help="plain TCP without authentication (loopback addresses only)")
    p.add_argument("--every", metavar="INTERVAL", type=_interval,
                   help="replicate now and then every INTERVAL (30s, 5m, 1h) until SIGTERM "
                        "or Ctrl-C, in this one process; a failed round is tried again "
                        "after 1 s, 2 s, 4 s ... up to INTERVAL")
    p.add_argument("--once", action="store_true", help="(--listen) exit after one transfer")
    p.add_argument("--store", metavar="DIR", help=f"the sendshot store (default {DEFAULT_STORE})")
    p.add_argument("--segment", metavar="SIZE", default="8M", type=parse_size,
                   help="bytes unacknowledged at most (resend at most this after a cut; a "
                        "checkpoint every half; default 8M)")
    p.add_argument("--rate-limit", metavar="RATE", type=parse_size,
                   help="bytes per second at most (e.g. 20M)")
    p.add_argument("--full", action="store_true",
                   help="send a full stream when the receiver holds no common base")
    p.add_argument("--compress", choices=("zstd", "none"), default="none",
                   help="send file data compressed (ENCODED_WRITE; default none)")
    p.add_argument("--no-prune", action="store_true",
                   help="keep sendshots no receiver needs")
    p.add_argument("--ssh", default="ssh", metavar="CMD",
                   help="the ssh command (with options), e.g. 'ssh -i key -o ...' "
                        "(default: ssh)")
    p.add_argument("--remote-cmd", default="btrdelta", metavar="CMD",
                   help="btrdelta on the other side (ssh://; default: btrdelta, found on "
                        "the remote PATH)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up on a silent TCP peer after this long (default 60)")
    p.add_argument("--backend", choices=("auto", "btrfs", "dir"), default="auto",
                   help="(the receiving side: DEST, ssh://, --serve, --listen) subvolumes "
                        "on btrfs, or directories (default auto: subvolumes where DEST is on "
                        "btrfs)")
    add_progress_options(p, verbose=True)
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Replicate, serve or listen."""
    from .._malloc import keep_freed_memory

    if args.serve or args.listen:
        if args.every is not None:
            raise UsageError("--every is the sending side's (replicate SOURCE DEST --every "
                             "INTERVAL); --serve and --listen receive one transfer after "
                             "another already")
        keep_freed_memory()  # the stream goes through Python buffers on both sides
        return _serve(args) if args.serve else _listen(args)
    if not args.source or not args.dest:
        raise UsageError("replicate needs SOURCE and DEST (or --serve/--listen)")
    # the receiver (a local child, ssh) starts while this side imports and sets up the send
    # side: its start-up is what the first byte waits for (a local one is a fork of this
    # process, which has imported the CLI and the protocol: no interpreter to start)
    if args.every is not None:
        from .replicate_loop import one_heap, run_every

        keep_freed_memory()
        one_heap()
        try:  # (a first connection that fails is a failed round: tried again)
            first: tuple[Any, str] = _connect(args)
        except UsageError:
            raise
        except BtrdeltaError:
            first = (None, args.dest)
        return run_every(args, *first)
    ch, peer = _connect(args)
    try:
        keep_freed_memory()
        return _replicate(args, ch, peer)
    finally:
        ch.close()


def _interval(text: str) -> float:
    from .replicate_loop import parse_interval

    return parse_interval(text)


def _replicate(args: argparse.Namespace, ch: Any, peer: str) -> int:
    from ..send.store import SendshotStore

    store = SendshotStore(args.store or DEFAULT_STORE)
    result = replicate_round(args, store, ch, peer)
    if args.json:
        print(json.dumps(result_json(result)))
    elif not args.quiet:
        say_result(args, result)
    if failed(result):
        raise ProtocolError(result.message)
    return 0


def replicate_round(args: argparse.Namespace, store: Any, ch: Any, peer: str) -> Any:
    """One replication over ``ch`` (connected to ``peer``): the ``ReplicateResult``, once
    more on a new connection when a resume's stream diverged. Raises what the transfer
    raises (a ``TransportError`` with the receiver's last line added)."""
    from ..update.replicate import replicate

    options: dict[str, Any] = {
        "segment": args.segment, "allow_full": args.full,
        "prune": not args.no_prune, "compress": None if args.compress == "none" else "zstd",
        "rate_limit": args.rate_limit or None,
        # (kept in the receiver's cursor: `sendshot list` says where each receiver is)
        "dest": args.dest if "://" in args.dest else os.path.abspath(args.dest),
    }
    # bytes of the stream the receiver holds (resumed ones included) and the rate, after
    # each checkpointed segment; the size is known only at the end
    progress = Progress("replicate", enabled=progress_wanted(args))
    options["on_progress"] = lambda done, _total: progress.update(done)
    with progress:
        progress.update(0)  # (a line at once: the connection and the send's set-up take time)
        for attempt in range(2):
            if attempt:  # the stream made again for a resume diverged: a new conversation
                ch, peer = _connect(args)
            try:
                result = replicate(args.source, ch, store=store, peer=peer, **options)
            except TransportError as exc:
                # a receiver that exits (a missing DEST, ssh refused) closes the pipe: say
                # why, from the last line it wrote on its standard error
                ch.close()
                said = getattr(ch, "err", "").strip().splitlines()
                if said:
                    last = shown(said[-1].removeprefix("btrdelta replicate: "))
                    exc.message = f"{exc.message}; {peer} said: {last}"
                    cmd = (args.remote_cmd.split() or ["btrdelta"])[0]
                    if cmd in last and ("command not found" in last or "No such file" in last
                                        or last.endswith("not found")):
                        exc.message += (" (install btrdelta there, or give its path: "
                                        "--remote-cmd /path/to/btrdelta)")
                raise
            finally:
                ch.close()
            if result.outcome != "diverged":
                break
    return result


def failed(result: Any) -> bool:
    """Whether ``result`` is a failure: a stream made again for a resume that diverged
    twice, or a refusal other than ``already-current`` (the receiver holds nothing new)."""
    return (result.outcome == "diverged"
            or (result.outcome == "refused" and "already-current" not in result.message))


def result_json(result: Any) -> dict[str, Any]:
    """``--json``'s keys of a ``ReplicateResult``."""
    return {k: getattr(result, k) for k in result.__match_args__}


def say_result(args: argparse.Namespace, result: Any, who: str = "replicate") -> None:
    """The lines of a round on stderr (a refusal is the caller's error line, once)."""
    if result.adopted:
        print(f"{who}: the receiver had committed {result.adopted} (the last run was "
              "cut before it heard so): adopted", file=sys.stderr)
    if result.outcome == "committed":
        resumed = (f", resumed at {human_bytes(result.resumed_from)}"
                   if result.resumed_from else "")
        print(f"{who}: {result.kind} -> {result.name}: {human_bytes(result.sent)} "
              f"sent of {human_bytes(result.size)} (file data estimated "
              f"{human_bytes(result.estimate)}){resumed}; sendshot "
              f"{(result.sendshot or '')[:16]}", file=sys.stderr)
        if args.verbose:
            base = f"sendshot {result.base[:16]}" if result.base else "none (a full stream)"
            print(f"  receiver {result.receiver}, base {base}, {result.pruned} "
                  f"sendshot(s) pruned", file=sys.stderr)
    elif not failed(result):
        said = result.message.removeprefix("already-current: ")
        what = "nothing to send" if said != result.message else result.outcome
        print(f"{who}: {what}: {said}", file=sys.stderr)


def _connect(args: argparse.Namespace) -> tuple[Any, str]:
    from ..update import channels

    dest: str = args.dest
    extra = ["--backend", args.backend] if args.backend != "auto" else []
    if dest.startswith("ssh://"):
        return channels.spawn_ssh(dest, args.ssh, args.remote_cmd, extra), dest
    if dest.startswith("tcp://"):
        if extra:
            raise UsageError("--backend is the receiving side's: give it to the "
                             "`replicate --listen` at the other end of tcp://")
        host, port = channels.parse_address(dest[len("tcp://"):].rstrip("/"))
        if args.no_auth:
            channels.check_loopback(host)
            sock = channels.connect_tcp(host, port, timeout=args.timeout)
            return channels.SocketChannel(sock, dest), dest
        if not args.key or not args.peer:
            raise UsageError("tcp:// needs --key (this side's key) and --peer (the "
                                "server's public key), or --no-auth on loopback")
        from ..trust import load_peer_key, load_private_key

        key, peer = load_private_key(args.key), load_peer_key(args.peer)
        sock = channels.connect_tcp(host, port, timeout=args.timeout)
        return channels.tls_client(sock, key, peer, dest), dest
    # (a replica in what it copies: SRC/SRC.DATE, the receiver's state files in SRC)
    refuse_inside(dest, args.source, "DEST {inner} {how} SOURCE {outer}: the replica would "
                  "be part of what it copies; give a directory outside it", mounts_apart=True)
    if not os.path.isdir(dest):  # (else the receiver's exit: 'the peer closed', exit 7)
        import shlex

        raise BtrdeltaError(f"destination {dest} " + (
            "is not a directory" if os.path.exists(dest) else
            f"does not exist (make it first: mkdir -p {shlex.quote(dest)})"))
    from . import main

    argv = ["replicate", *extra, "--serve", dest]  # (--serve takes DEST: options first)
    return channels.fork_local(dest, lambda: main(argv), extra), dest


def _serve(args: argparse.Namespace) -> int:
    from ..update.channels import PipeChannel
    from ..update.replica import Replica

    if os.isatty(1):  # (a person typed it: binary messages on a terminal, which mangles them)
        raise UsageError("--serve speaks the replication protocol on its standard input and "
                         "output, not to a terminal: it is what `btrdelta replicate SOURCE "
                         f"{args.serve}` (or ssh://HOST{args.serve}) runs")
    replica = Replica(args.serve, backend=args.backend, on_warning=_warner(args, "--serve"))
    ch = PipeChannel(os.fdopen(0, "rb", buffering=0), os.fdopen(1, "wb", buffering=0),
                     name="stdio")
    try:
        result = replica.serve(ch, peer="sender")
    finally:  # (raised: its error line and code are main's)
        ch.close()
    if result.outcome in ("failed", "busy"):  # one error line, as every command's
        print(f"btrdelta {args.command}: error: {result.message}", file=sys.stderr)
        return ProtocolError.exit_code
    if result.outcome == "interrupted" and not args.quiet:
        print(f"replicate --serve: interrupted ({result.message}); {_what_is_kept(result)}",
              file=sys.stderr)
    elif args.verbose and not args.quiet:
        _say_served("replicate --serve", result)
    return 0


def _what_is_kept(result: Any) -> str:
    """What an interrupted conversation of the receiving side leaves (``ServeResult``)."""
    if not result.kept:
        return "no transfer had begun, nothing is kept"
    return (f"the partial transfer is kept ({human_bytes(result.received_bytes)} received "
            "in this connection): the next run resumes it")


def _warner(args: argparse.Namespace, who: str) -> Any:
    """Warnings of the receiving side, on stderr (a warning is shown even with -q)."""

    def warn(msg: str) -> None:
        print(f"replicate {who}: warning: {msg}", file=sys.stderr, flush=True)

    return warn


def _say_served(who: str, result: Any) -> None:
    """``-v``: how a conversation of the receiving side ended, and what it received."""
    got = result.received
    what = f": {got.name} uuid={got.uuid}" if got is not None else ""
    why = f" ({result.message})" if result.message else ""
    print(f"{who}: {result.outcome}{what}, {result.received_bytes} bytes received{why}",
          file=sys.stderr, flush=True)


def _current(result: Any) -> str | None:
    """Why there was nothing to receive, when the sender said the receiver is current."""
    said = result.message.removeprefix("already-current: ")
    return said if result.outcome == "refused" and said != result.message else None


def _peer_error(exc: BtrdeltaError, name: str) -> str:
    """A refused connection's error without the address the line already names; a client
    that hung up during the handshake is said in words (not as the TLS library's EOF)."""
    import ssl

    text, cause = str(exc).removeprefix(f"{name}: "), exc.__cause__
    if isinstance(cause, (ssl.SSLEOFError, ConnectionError)) or text.endswith(
            "the peer closed the connection during authentication"):
        return ("authentication failed: the client hung up (does it pin another server "
                "key with --peer?)")
    if isinstance(cause, ssl.SSLError) and cause.reason in ("WRONG_VERSION_NUMBER",
                                                             "HTTP_REQUEST"):
        return "TLS handshake failed: the client does not speak TLS (a --no-auth client?)"
    return text


def _listen(args: argparse.Namespace) -> int:
    import socket

    from ..update import channels
    from ..update.replica import Replica

    dest = args.dest or args.source
    if not dest:
        raise UsageError("--listen needs DEST")
    host, port = channels.parse_address(args.listen)
    if args.no_auth:
        channels.check_loopback(host)
    elif not args.key or not args.allow:
        raise UsageError("--listen needs --key and --allow PUBKEY... (or --no-auth on "
                            "loopback)")
    from ..trust import load_peer_key, load_private_key

    key = load_private_key(args.key) if not args.no_auth else None
    allowed = [load_peer_key(p) for p in args.allow]
    replica = Replica(dest, backend=args.backend, on_warning=_warner(args, "--listen"))
    replica.settle()  # (no thread of ours left while we wait: a signal's handler runs)
    try:
        server = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                      else socket.AF_INET, reuse_port=False)
    except OSError as exc:
        raise BtrdeltaError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from exc
    if not args.quiet:
        print(f"replicate: listening on {args.listen}", file=sys.stderr, flush=True)
    with server:
        while True:
            sock, addr = _accept(server)
            sock.settimeout(args.timeout)
            name = f"{addr[0]}:{addr[1]}"
            try:
                if key is None:
                    ch: Any = channels.SocketChannel(sock, name)
                    who = "anonymous"
                else:
                    ch, who = channels.tls_server(sock, key, allowed, name)
                result = replica.serve(ch, peer=name)
                ch.close()
                current = _current(result)
                if args.verbose and not args.quiet:
                    _say_served(f"replicate: {name} ({who[:16]})", result)
                elif current is not None and not args.quiet:
                    print(f"replicate: {name} ({who[:16]}): nothing to receive: {current}",
                          file=sys.stderr, flush=True)
                elif not args.quiet:
                    print(f"replicate: {name} ({who[:16]}): {result.outcome}, "
                          f"{result.received_bytes} bytes received"
                          + (f" ({result.message})" if result.message else "")
                          + (f"; {_what_is_kept(result)}"
                             if result.outcome == "interrupted" else ""),
                          file=sys.stderr, flush=True)
            except BtrdeltaError as exc:
                sock.close()
                print(f"replicate: {name}: refused: {_peer_error(exc, name)}",
                      file=sys.stderr, flush=True)
                result = None
            if args.once and result is not None:  # (nothing to receive is no failure)
                ok = result.outcome == "committed" or _current(result) is not None
                return 0 if ok else ProtocolError.exit_code


def _accept(server: Any) -> tuple[Any, Any]:
    """``server.accept()``, woken by a signal whichever thread the kernel gave it to
    (:func:`wait_signalled`)."""
    while not wait_signalled(server):  # (a signal whose handler did not raise)
        pass
    return server.accept()  # type: ignore[no-any-return]


def wait_signalled(readable: Any = None, timeout: float | None = None,
                   stopped: Callable[[], bool] | None = None) -> bool:
    """Until ``readable`` (a socket, or None) can be read, ``timeout`` seconds passed (None:
    no limit) or a signal was handled; whether it can be read. A signal's handler runs at
    once in this thread, whichever thread the kernel gave the signal to.

    A signal taken by another thread (a library's, or one still leaving the kernel) trips
    Python's flag but does not interrupt ``accept()`` or a sleep in this one, so its handler
    would wait for the next connection (a fresh-clone CI run: SIGTERM ignored for 60 s at
    load 9-13) or the sleep's end. The signal's number reaches a wakeup socket from any
    thread; the wait is a ``select`` on both, and a number read there is raised again in
    this thread, where ``raise_signal`` runs the handler (one call for both: a signal's flag
    is one bit). ``stopped``: asked once the wakeup socket is in place (a handler that only
    notes its signal, having run between the caller's own look and that, would else leave
    the wait to its timeout: ``replicate --every`` slept on after a SIGTERM so)."""
    import select
    import signal
    import socket
    import time

    end = None if timeout is None else time.monotonic() + timeout
    wake, wake_w = socket.socketpair()
    with wake, wake_w:
        wake.setblocking(False)
        wake_w.setblocking(False)
        old = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        try:
            if stopped is not None and stopped():
                return False
            while True:
                left = None if end is None else max(0.0, end - time.monotonic())
                ready = select.select([wake] if readable is None else [readable, wake],
                                      [], [], left)[0]
                if readable is not None and readable in ready:
                    return True
                if not ready:  # (the timeout)
                    return False
                if wake in ready:
                    for signum in wake.recv(64):
                        signal.raise_signal(signum)
                    return False  # (its handler did not raise)
        finally:
            signal.set_wakeup_fd(old)
