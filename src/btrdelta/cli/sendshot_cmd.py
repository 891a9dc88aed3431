"""``btrdelta sendshot list|show|delete|prune|forget|create``: the sendshot store."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from typing import Any

from ..errors import BtrdeltaError, StreamFormatError, UsageError
from ..send.store import DEFAULT_STORE, SendshotStore, StoredSendshot, parse_grid
from ._common import examples, human_bytes, positive_int
from .progress import Phases, add_progress_options, add_quiet_option, progress_wanted

_EPILOG = """\
examples:
  btrdelta send /data -o full.stream --record          # full stream + sendshot of /data
  btrdelta send /data -o inc.stream --from-sendshot latest --record
  btrdelta sendshot list
  btrdelta sendshot prune --keep 3                      # or --grid 1h:24,1d:7,1w:4
  btrdelta sendshot create /mnt/recv/data.20240101      # adopt a tree a receiver holds
"""


def _grid(text: str) -> list[tuple[int, int]]:
    """An argparse type: a retention grid (``parse_grid``), a usage error if it is not."""
    try:
        return parse_grid(text)
    except BtrdeltaError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sendshot``."""
    p = sub.add_parser(
        "sendshot", help="list, show, delete, prune, forget or create sendshot records",
        description=(
            "Sendshots are records of what a receiver holds after a send (metadata and "
            "block digests, no data): the base of an incremental `send --from-sendshot` "
            "without keeping the old snapshot. Records live in a store (default "
            f"{DEFAULT_STORE}, or --store DIR); a receiver's cursor (kept by `replicate`) "
            "protects the record it needs from delete and prune."),
        epilog=_EPILOG,
    )
    store_help = f"the store (default {DEFAULT_STORE})"
    p.add_argument("--store", metavar="DIR", help=store_help)
    p.add_argument("--json", action="store_true", help="print JSON on standard output")
    # the same options after the action too (`sendshot list --store DIR`, as `send` spells
    # it); SUPPRESS keeps a value given before the action when they are absent after it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=store_help)
    after.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print JSON on standard output")
    cmds = _Actions(p.add_subparsers(dest="sendshot_command", metavar="ACTION", required=True),
                    after)
    cmds.add_parser("list", help="every record, oldest first",
                    description="List the records of the store, oldest first: id, time, "
                    "kind, source, the stream's UUID, size, the record it was sent against, "
                    "and the receivers' cursors that hold it.",
                    epilog=examples("btrdelta sendshot list",
                                    "btrdelta sendshot --store /var/lib/shots --json list"))
    show = cmds.add_parser("show", help="one record in full (its head and counts)",
                           description="Show one record: its head (time, kind, name, "
                           "source, the stream's UUID and ctransid, the record it was sent "
                           "against, the receivers holding it) and counts (inodes, files, "
                           "data bytes, blocks).",
                           epilog=examples("btrdelta sendshot show latest",
                                           "btrdelta sendshot --json show 3f2a9c"))
    show.add_argument("id", metavar="ID", help="a digest, a unique prefix, the name it was sent as "
                      "(send --record --name), or 'latest'")
    delete = cmds.add_parser("delete", help="delete records",
                             description="Delete records by id. A record a receiver's "
                             "cursor names is the base of that receiver's next send: it is "
                             "kept unless --force (the next send to it is then full).",
                             epilog=examples("btrdelta sendshot delete 3f2a9c 81b0d4"))
    delete.add_argument("ids", metavar="ID", nargs="+",
                        help="digests, unique prefixes (sendshot list shows them) or the "
                             "names they were sent as")
    delete.add_argument("--force", action="store_true",
                        help="also a record a receiver's cursor names")
    add_quiet_option(delete)
    prune = cmds.add_parser("prune", help="delete what a retention rule does not keep "
                                          "(never what a receiver needs, never the newest)",
                            description="Delete the records a retention rule does not keep "
                                        "(per source; never one a receiver's cursor names, "
                                        "never the newest), and the temporary files that "
                                        "killed sends left (their process gone, older than "
                                        "an hour).",
                            epilog=examples("btrdelta sendshot prune --keep 3",
                                            "btrdelta sendshot prune --grid 1h:24,1d:7,1w:4 -n"))
    prune.add_argument("--keep", type=positive_int, metavar="N",
                       help="keep the newest N per source")
    prune.add_argument("--grid", type=_grid, metavar="GRID",
                       help="keep the newest in each of the last COUNT intervals of each "
                       "LENGTH, counted back from now: LENGTHUNIT:COUNT,... with the units "
                       "m (minutes), h, d, w, y; e.g. 1h:24,1d:7,1w:4")
    prune.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    add_quiet_option(prune)
    _add_forget(cmds)
    _add_create(cmds)
    p.set_defaults(func=run)


def _add_forget(cmds: _Actions) -> None:
    forget = cmds.add_parser("forget", help="drop a receiver's cursor (a receiver gone for "
                                            "good): its record is no longer kept for it",
                             description="Drop receivers' cursors: `replicate` keeps one per "
                             "receiver, naming the record that receiver holds, and delete and "
                             "prune keep every record a cursor names. Forget a receiver that "
                             "is gone for good so that retention can delete its records. A "
                             "receiver forgotten that comes back is sent against what it "
                             "holds if the store still has its record, else in full. "
                             "`sendshot list` shows which records each receiver holds.",
                             epilog=examples("btrdelta sendshot forget "
                                             "596136b389804df0a9f8299ba9b79e5f"))
    forget.add_argument("receivers", metavar="RECEIVER", nargs="+",
                        help="receiver ids, as `sendshot list` shows them ('held by')")
    forget.add_argument("--force", action="store_true",
                        help="also a receiver with a transfer in flight (delete the "
                             "temporary snapshot the error names yourself)")
    add_quiet_option(forget)


def _add_create(cmds: _Actions) -> None:
    create = cmds.add_parser("create", help="record a tree a receiver already holds "
                                            "(a received subvolume, a kernel-sent snapshot)",
                             description="Record a tree a receiver already holds, so the "
                             "next `send SOURCE --from-sendshot latest` is incremental "
                             "against it: the sender's read-only snapshot that btrfs send "
                             "sent, or the receiver's copy. The record is named by the UUID "
                             "the receiver knows the tree by (a received subvolume's "
                             "received UUID). No data is kept: metadata and block digests; "
                             "every file is read once to make them (progress on a terminal: "
                             "the walk, then the bytes read).",
                             epilog=examples("btrdelta sendshot create /mnt/recv/data.20240101 "
                                             "--source /data"))
    create.add_argument("path", metavar="SUBVOL_OR_DIR",
                        help="the receiver's copy (a received subvolume) or a tree equal to it")
    create.add_argument("--uuid", help="the UUID the receiver knows it by (default: its "
                                       "received UUID, else its UUID, else the content UUID)")
    create.add_argument("--ctransid", type=int, help="the ctransid to name with --uuid")
    create.add_argument("--name", help="subvolume name in later streams")
    create.add_argument("--source", metavar="SOURCE",
                        help="the sender's source this is a copy of (e.g. PATH is the "
                             "receiver's copy): `send SOURCE --from-sendshot latest` finds it")
    add_progress_options(create)


class _Actions:
    """Sub-parsers that all take the options of ``parent``."""

    def __init__(self, sub: argparse._SubParsersAction[argparse.ArgumentParser],
                 parent: argparse.ArgumentParser) -> None:
        self.sub, self.parent = sub, parent

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        return self.sub.add_parser(name, parents=[self.parent], **kw)


def _when(created: float) -> str:
    """A record's creation time as ``list`` and ``show`` print it (local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


def _receiver(rid: str, cursors: dict[str, dict[str, Any]] | None) -> str:
    """A receiver's id and, when its cursor says, where it is (the DEST replicate gave)."""
    dest = (cursors or {}).get(rid, {}).get("dest")
    return f"{rid} ({dest})" if isinstance(dest, str) else rid


def _line(s: StoredSendshot, cursors: dict[str, dict[str, Any]] | None = None) -> str:
    when = _when(s.created)
    held = (f"  held by {', '.join(_receiver(r, cursors) for r in s.held_by)}"
            if s.held_by else "")
    parent = f" <- {s.head.parent[:12]}" if s.head.parent else ""
    if s.head.base:  # (a chain squashed: a patch of its whole record, sent against another)
        parent += " (a patch of it)" if s.head.base == s.head.parent else \
            f" (a patch of {s.head.base[:12]})"
    return (f"{s.digest[:16]}  {when}  {s.head.kind:7}  {os.fsdecode(s.head.source)}  "
            f"{s.head.stream_uuid}  {s.size} B{parent}{held}")


def _orphans(cursors: dict[str, dict[str, Any]], listed: set[str]) -> None:
    """Print the receivers whose cursor names no record listed (none yet, or one deleted
    with --force): no record line names them, and `forget` needs their ids."""
    for receiver, cursor in sorted(cursors.items()):
        digest = cursor.get("digest")
        if digest in listed:
            continue
        what = (f"its record {str(digest)[:16]} is gone" if digest else
                "it holds no sendshot yet")
        print(f"receiver {_receiver(receiver, cursors)}: {what} (its next replicate chooses "
              f"a base from what it holds, or sends in full; `sendshot forget {receiver}` "
              "drops it)")


def run(args: argparse.Namespace) -> int:
    """Run one action."""
    store = SendshotStore(args.store or DEFAULT_STORE)
    out: Any = None
    if args.sendshot_command == "list":
        every = store.records_list()
        out = [s.to_json() for s in every]
        if not args.json:  # a summary first, as `repo ls`
            cursors = store.cursors()
            total = human_bytes(sum(s.size for s in every))
            print(f"{len(every)} sendshot{'' if len(every) == 1 else 's'}, {total}; "
                  f"{len(cursors)} receiver cursor{'' if len(cursors) == 1 else 's'}; store "
                  f"{store.path}" + ("" if os.path.isdir(store.path) else
                                     " (no such directory yet: a typo, or no send "
                                     "recorded there)"))
            for s in every:
                print(_line(s, cursors))
            for digest, (why, _mtime) in sorted(store.unreadable.items()):
                print(f"{digest[:16]}  cannot be read ({why}): `btrdelta sendshot delete "
                      f"{digest[:16]}` removes it")
            _orphans(cursors, {s.digest for s in every})
    elif args.sendshot_command == "show":
        s = store.resolve(args.id)
        inodes = files = data = blocks = 0
        for node in store.view(s).rows():  # (a patch record: with its chain of bases)
            inodes += 1
            if node.segments is not None:
                files += 1
                data += node.size
                blocks += len(node.blocks) // 16
        out = {**s.to_json(), "inodes": inodes, "files": files, "data_bytes": data,
               "blocks": blocks, "seed": f"{s.head.seed:016x}",
               "tree_digest": s.head.tree_digest.hex()}
        if not args.json:
            text = {**out, "created": _when(s.created),
                    "held_by": ", ".join(_receiver(r, store.cursors()) for r in s.held_by)
                    or "no receiver's cursor",
                    "tree_digest": out["tree_digest"] or "(none)"}
            for k, v in text.items():
                print(f"{k}: {'(none)' if v is None else v}")
    elif args.sendshot_command == "delete":
        out = _delete(store, args)
    elif args.sendshot_command == "prune":
        if args.keep is None and args.grid is None:
            raise UsageError("prune needs --keep N or --grid GRID")
        gone = store.prune(keep=args.keep, grid=args.grid, dry_run=args.dry_run)
        stale = store.leftovers(remove=not args.dry_run)
        out = {"deleted": [s.digest for s in gone], "dry_run": args.dry_run,
               "leftovers": stale}
        if not args.json and not args.quiet:
            for s in gone:
                print(("would delete " if args.dry_run else "deleted ") + _line(s))
            for p in stale:
                print(("would delete " if args.dry_run else "deleted ")
                      + f"leftover temporary file {p}")
            if not gone and not stale:  # (silence read as "did it run?")
                every = store.records_list()
                held = sum(1 for s in every if s.held_by)
                # a patch record's chain of bases stays with it: say so, or a --grid or
                # --keep that keeps one record per interval seems not to have worked
                bases = {s.head.base for s in every}
                kept = sum(1 for s in every if s.digest in bases and not s.held_by)
                print(f"nothing to prune: {len(every)} record"
                      f"{'' if len(every) == 1 else 's'} kept ({held} held by a receiver's "
                      f"cursor" + (f", {kept} the base of a kept patch record" if kept
                                   else "") + f"); store {store.path}")
    elif args.sendshot_command == "forget":
        out = _forget(store, args)
    else:
        out = _create(store, args)
    if args.json:
        print(json.dumps(out))
    return 0


def _delete(store: SendshotStore, args: argparse.Namespace) -> dict[str, Any]:
    """``sendshot delete``: records by id, name or ``latest``; one that cannot be read by
    its id (the only way left to name it: ``resolve`` says it cannot be read). Every id is
    resolved before any record is deleted (a mistyped one deletes nothing), and a patch
    record goes before its base when both are named (``delete BASE PATCH`` was refused:
    "the base of patch record(s)")."""
    named: dict[str, tuple[str, str | None]] = {}  # digest -> (what is said, its base)
    for ident in args.ids:
        try:
            s = store.resolve(ident)
            named.setdefault(s.digest, (_line(s), s.head.base))
        except StreamFormatError:
            if (bad := store.damaged(ident)) is None:  # (as of resolve's listing)
                raise
            named.setdefault(bad, (f"{bad[:16]} (it could not be read)", None))
    done = []
    while named:
        bases = {base for _said, base in named.values()}
        digest = next((d for d in named if d not in bases), next(iter(named)))
        said, _base = named.pop(digest)
        store.delete(digest, force=args.force)
        done.append(digest)
        if not args.json and not args.quiet:
            print("deleted " + said)
    return {"deleted": done}


def _forget(store: SendshotStore, args: argparse.Namespace) -> dict[str, Any]:
    forgotten: list[str] = []
    for receiver in args.receivers:
        held = store.forget(receiver, force=args.force).get("digest")
        forgotten.append(receiver)
        if not args.json and not args.quiet:
            print(f"forgot receiver {receiver} (it held "
                  f"{held[:16] if isinstance(held, str) else 'nothing yet'})")
    return {"forgotten": forgotten}


def _create(store: SendshotStore, args: argparse.Namespace) -> dict[str, Any]:
    """``sendshot create``: the record made, said as ``list`` shows one."""
    from uuid import UUID

    from ..send.sendshot import adopt

    try:
        uuid = UUID(args.uuid) if args.uuid else None
    except ValueError as exc:
        raise BtrdeltaError(f"--uuid: not a UUID: {args.uuid!r}") from exc
    with Phases("sendshot create", progress_wanted(args), {"walk": "files"}) as progress:
        s = adopt(store, args.path, uuid=uuid, ctransid=args.ctransid,
                  name=os.fsencode(args.name) if args.name else None, source=args.source,
                  on_entry=lambda files, _: progress("walk", files, None),
                  on_bytes=lambda n: progress("read", n, None))
    if not args.json and not args.quiet:
        # what it made, as `list` shows a record, and what a receiver must hold
        source = os.fsdecode(s.head.source)
        print("recorded " + _line(s))
        print(f"  a receiver holding {s.head.stream_uuid} (ctransid "
              f"{s.head.stream_ctransid}) takes `btrdelta send {shlex.quote(source)} "
              f"--from-sendshot {s.digest[:16]}`")
    return s.to_json()
