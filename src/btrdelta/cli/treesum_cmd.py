"""``btrdelta tree-sum``: checksum a directory tree (verify an update, compare receivers)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from ..tree import diff_manifests, tree_manifest, tree_sum
from ._common import add_json, examples, meant, set_extra_hint
from .progress import Progress


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tree-sum``."""
    p = sub.add_parser(
        "tree-sum",
        help="checksum a directory tree (content, metadata, xattrs, links)",
        description=(
            "Print one checksum over a whole tree: type, mode, owner, mtime (ns), size, "
            "content, symlink targets, device numbers, link counts and hard-link groups, "
            "xattrs (and with --holes the sparse layout). Equal trees give equal sums, on "
            "any filesystem. atime, ctime and inode numbers are not covered; nested btrfs "
            "subvolumes are skipped. On a terminal a bar shows the entries and bytes read "
            "while it works (cleared at the end: the output is the answer, so there is no "
            "-q and no --progress)."
        ),
        epilog=examples("btrdelta tree-sum /mnt/received/B",
                        "btrdelta tree-sum /mnt/received/B --compare /mnt/src/B",
                        "btrdelta tree-sum --json --holes /mnt/received/B"),
    )
    p.add_argument("dir", metavar="DIR",
                   help="root of the tree; a symlink given here (or as --compare's OTHER) is "
                        "followed, as du and find -H do for their arguments, and as send does; "
                        "the symlinks inside a tree are summed as links")
    p.add_argument("--holes", action="store_true", help="also cover the data/hole layout")
    p.add_argument("--format", type=int, choices=(2, 3), default=2,
                   help="2 (default): each file's content as one BLAKE3 of its whole apparent "
                        "size (holes hashed as zeros); 3: holes and blocks of zeros taken by "
                        "length, so a sparse file costs its data, not its size "
                        "(docs/formats/tree-sum.md). The two give different sums")
    p.add_argument("--ignore-root-mtime", action="store_true",
                   help="leave out the root directory's mtime (a received incremental "
                        "stream may not reproduce it: the kernel sends no utimes for it "
                        "after orphans left it)")
    p.add_argument("--exclude-xattr", action="append", default=[], metavar="NAME",
                   help="leave out this xattr (repeatable)")
    p.add_argument("--manifest", action="store_true", help="print one line per entry")
    p.add_argument("--compare", metavar="OTHER",
                   help="compare DIR with the tree OTHER; list differences ('only in DIR: path', "
                   "'differs: path: fields of DIR != fields of OTHER'), exit 1 if any")
    add_json(p, "the sum (the manifest's lines, the differences)")
    set_extra_hint(p, _two_trees)
    p.set_defaults(func=run)


def _two_trees(args: argparse.Namespace, extra: list[str], words: list[str]) -> str | None:
    """``tree-sum A B`` (as ``diff A B``): the second tree is --compare's."""
    if len(extra) != 1 or extra[0].startswith("-") or args.compare:
        return None
    at = len(words) - 1 - words[::-1].index(extra[0])
    return f"to compare two trees: {meant('btrdelta tree-sum', words, {at: '--compare'})}"


#: the one difference a received incremental stream may leave (tree.treesum's docstring)
_ROOT_MTIME = re.compile(r"differs: \.: mtime=\d+ != mtime=\d+\Z")


def run(args: argparse.Namespace) -> int:
    """Print the sum, the manifest, or the differences."""
    opts = {
        "holes": args.holes,
        "ignore_root_mtime": args.ignore_root_mtime,
        "exclude_xattrs": [n.encode() for n in args.exclude_xattr],
        "version": args.format,
    }
    with _Walked(sys.stderr.isatty()) as walked:
        return _run(args, opts, walked)


class _Walked:
    """A bar of the entries and bytes walked (on a terminal), over one tree or two."""

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress("tree-sum", enabled=enabled, transient=True)
        self.base = (0, 0)  # the first tree's, when comparing
        self.last = (0, 0)

    def __call__(self, entries: int, nbytes: int) -> None:
        self.last = (self.base[0] + entries, self.base[1] + nbytes)
        self.progress.update(self.last[1], note=f"{self.last[0]} entries")

    def next_tree(self) -> None:
        self.base = self.last

    def __enter__(self) -> _Walked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.close()


def _run(args: argparse.Namespace, opts: dict[str, Any], walked: _Walked) -> int:
    opts = {**opts, "on_progress": walked if walked.progress.enabled else None}
    if args.compare:
        mine = tree_manifest(args.dir, **opts)
        walked.next_tree()
        other = tree_manifest(args.compare, **opts)
        walked.progress.close()  # (cleared before the differences are printed)
        diffs = diff_manifests(mine, other, names=(args.dir, args.compare))
        if args.json:
            print(json.dumps({"dir": args.dir, "other": args.compare, "equal": not diffs,
                              "differences": diffs}))
        else:
            for line in diffs:
                print(line)
        if diffs:
            root_mtime = len(diffs) == 1 and _ROOT_MTIME.match(diffs[0]) is not None
            print(f"trees differ: {args.dir} {args.compare}"
                  + (" (only the root's mtime: an incremental stream received, by btrdelta "
                     "or btrfs receive, cannot set it where the kernel sent no utimes "
                     "after its last change; --ignore-root-mtime leaves it out)"
                     if root_mtime else ""), file=sys.stderr)
            return 1
        if not args.json:
            print(f"trees are equal: {args.dir} {args.compare}")
        return 0
    if args.manifest:
        manifest = tree_manifest(args.dir, **opts)
        walked.progress.close()
        entries = (entry.line() for entry in manifest)
        if args.json:
            print(json.dumps({"dir": args.dir, "entries": list(entries)}))
        else:
            for line in entries:
                print(line)
        return 0
    total = tree_sum(args.dir, **opts)
    walked.progress.close()
    if args.json:
        print(json.dumps({"dir": args.dir, "sum": total, "format": f"tree-sum-{args.format}"}))
    else:
        print(f"{total}  {args.dir}")
    return 0
