"""``btrdelta device``: A/B roots on btrfs, boot counting, overlays, factory reset, backups.

Thin: each subcommand parses its arguments, calls one function of :mod:`btrdelta.device`
and prints the result (``--json`` where a result is a document).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

from ._common import add_json, examples, human_bytes, positive_int, set_extra_hint
from ._paths import check_location, location, location_keeping_file_url
from .progress import Phases, add_progress_options, add_quiet_option, progress_wanted

_FS_HELP = ("the device's btrfs: where its top-level subvolume is mounted (subvolid=5), or "
            "a block device or image file (mounted privately for the command)")


def _tree_sum_arg(text: str) -> str:
    """A --expect-sum: the 64 hex digits ``btrdelta tree-sum`` prints (a prefix, such as
    the 16 digits ``device status`` shows, was refused only after the whole install)."""
    digits = text.strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a tree-sum: the 64 hex digits `btrdelta tree-sum DIR` prints")
    return digits


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``device`` and its subcommands."""
    p = sub.add_parser(
        "device", help="A/B roots on btrfs: install by delta, boot counting, factory reset",
        description="Device workflows on one btrfs filesystem: a read-only factory base and "
        "two root slots (subvolumes fed by send or delta streams), writable state "
        "subvolumes mounted as overlays, boot counting through the default subvolume and a "
        "boot-counting file, factory reset and backups. Layout: docs/device.md.",
        epilog=examples(
            "btrdelta send rootfs-1 -o rootfs-1.stream          # a release tree, as a stream",
            "btrdelta device init /dev/mmcblk0p3 --factory rootfs-1.stream",
            "btrdelta send --parent rootfs-1 rootfs-2 -o 1-2.stream",
            "btrdelta delta make -f 1-2.stream --old rootfs-1 -o 1-2.delta",
            "btrdelta device install /dev/mmcblk0p3 1-2.delta   # slot b boots next, 3 tries",
            "# reboot; from the new root, once its health check passed:",
            "btrdelta device mark-good /dev/mmcblk0p3   # else the tries run out: a boots again",
            "btrdelta device status /dev/mmcblk0p3",
            note="Without a device: truncate -s 2G disk.img && mkfs.btrfs disk.img, then FS is "
                 "disk.img (mounted for each command). A boot is what the initramfs does: "
                 "mount the top level (mount -o subvolid=5 disk.img /mnt/top) and run "
                 "contrib/boot/btrdelta-boot.sh select /mnt/top (it spends a try); mark-good "
                 "then takes the root on trial (or --slot). docs/device.md has the layout, "
                 "the boot rules and the crash analysis."),
    )
    dsub = p.add_subparsers(dest="device_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    _add_init(dsub)
    _add_install(dsub)
    s = dsub.add_parser("status", help="roots, default, trial, booted root, state subvolumes",
                        description="Show the device: the default root (what boots when "
                        "no trial is pending), the booted root, the next boot, a pending "
                        "trial and its tries left, each root's release, verdict (new, good, "
                        "bad) and tree-sum, and the state subvolumes with how each is "
                        "mounted. Read only: it changes nothing.",
                        epilog=examples("btrdelta device status /mnt/top --json"))
    s.add_argument("fs", metavar="FS", help=_FS_HELP)
    s.add_argument("--json", action="store_true", help="print the status document as JSON")
    s.add_argument("--booted", metavar="ROOT", help="the booted root, when / does not tell")
    s.set_defaults(func=run_status)
    for name, helptext in (
        ("mark-good", "the booted root (or --slot) is good: it becomes the default"),
        ("mark-bad", "the booted root (or --slot; where / does not tell, the root of the "
                     "last trial, ended or not) is bad: its trial ends, or the default "
                     "goes back to the previous good root"),
    ):
        m = dsub.add_parser(name, help=helptext,
                            description=helptext[0].upper() + helptext[1:] + ".",
                            epilog=examples(f"btrdelta device {name} /mnt/top --slot b"))
        m.add_argument("fs", metavar="FS", help=_FS_HELP)
        m.add_argument("--slot", choices=("a", "b", "factory"),
                       help="the root (default: the booted one)")
        m.add_argument("--json", action="store_true", help="print the new status as JSON")
        add_quiet_option(m)
        m.set_defaults(func=run_verdict, verdict=name)
    r = dsub.add_parser("rollback", help="cancel a pending trial, or make the previous good "
                        "root the default",
                        description="Go back. When an installed root is on trial (it would "
                        "boot next, or boots with tries left), the trial is cancelled: the "
                        "default root boots next and the hook gets 'cancel SLOT'. Without a "
                        "trial, the default goes back to the other good slot (or the factory "
                        "base) and the hook gets 'good SLOT'. Recorded in the state file "
                        "first, so a re-run after a power cut finishes the one rollback "
                        "instead of going back twice. Reboot afterwards.",
                        epilog=examples("btrdelta device rollback /mnt/top"))
    r.add_argument("fs", metavar="FS", help=_FS_HELP)
    r.add_argument("--json", action="store_true", help="print the new status as JSON")
    add_quiet_option(r)
    r.set_defaults(func=run_rollback)
    _add_overlay(dsub)
    _add_reset_backup(dsub)


def _add_overlay(dsub: Any) -> None:
    m = dsub.add_parser(
        "mount", help="mount a root read-only with the state subvolumes over it",
        description="Mount the root the next boot takes (or --root) read-only on TARGET, "
        "each overlay state subvolume as overlayfs (lower: the root's directory, upper: "
        "state/NAME/upper) and each bind state subvolume over its path, as the initramfs "
        "does. Undo with umount -R TARGET.",
        epilog=examples("btrdelta device mount /mnt/top /mnt/sysroot && chroot /mnt/sysroot",
                        "umount -R /mnt/sysroot      # undo: the state mounts, then the root"),
    )
    m.add_argument("fs", metavar="FS", help=_FS_HELP)
    m.add_argument("target", metavar="TARGET", help="an empty directory")
    m.add_argument("--root", choices=("a", "b", "factory"),
                   help="the root to mount (default: the one the next boot takes; no try "
                        "spent)")
    m.add_argument("--no-state", action="store_true", help="the root alone, no state")
    add_json(m, "the root and the mounts made")
    add_quiet_option(m)
    m.set_defaults(func=run_mount)
    d = dsub.add_parser(
        "diff", help="what the overlay state subvolumes change in the root",
        description="Read each overlay's upper directory against the root: A added, "
        "M modified (copied up), D deleted (whiteout), R directory replaced (opaque).",
        epilog=examples("btrdelta device diff /mnt/top"),
    )
    d.add_argument("fs", metavar="FS", help=_FS_HELP)
    d.add_argument("--root", choices=("a", "b", "factory"),
                   help="the root to compare with (default: the next boot's)")
    d.add_argument("--json", action="store_true", help="JSON lines: {kind, path}")
    d.set_defaults(func=run_diff)


def _add_reset_backup(dsub: Any) -> None:
    f = dsub.add_parser(
        "factory-reset", help="fresh state subvolumes and the factory base, by one swap",
        description="Every state subvolume is made anew (an empty overlay upper shows the "
        "release's own files) except those kept, which are snapshotted as they are; all "
        "are swapped in by one atomic rename, then the factory base (or the last good "
        "slot) becomes the default. Reboot afterwards (on the system booted from FS, "
        "its mounts keep the old state until then: it is deleted by the first device "
        "command of the next boot).",
        epilog=examples("btrdelta device factory-reset /mnt/top --keep home"),
    )
    f.add_argument("fs", metavar="FS", help=_FS_HELP)
    f.add_argument("--keep", action="append", default=[], metavar="SUBVOL",
                   help="a state subvolume to keep (repeatable)")
    f.add_argument("--to", choices=("factory", "last-good"), default="factory",
                   help="the root selected (default: the factory base)")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    add_quiet_option(f)
    f.set_defaults(func=run_reset)
    b = dsub.add_parser(
        "backup", help="back up a state subvolume as (incremental, delta) send streams",
        description="Snapshot state/SUBVOL read-only and send it to DEST (a directory or an "
        "http(s) URL taking PUT): whole the first time, then incremental against the "
        "last backup DEST holds and delta-compressed against its files. "
        "DEST/SUBVOL.backups.json lists the chain. The device keeps the snapshot of each "
        "destination's last backup, for the 4 destinations used last (each holds the data "
        "changed since).",
        epilog=examples("btrdelta device backup /mnt/top home /media/usb/backups",
                        "btrdelta device backup /mnt/top home https://backup.example/d1  "
                        "# in turns"),
    )
    b.add_argument("fs", metavar="FS", help=_FS_HELP)
    b.add_argument("subvol", metavar="SUBVOL", help="state subvolume name (e.g. home)")
    b.add_argument("dest", metavar="DEST", type=location, help="directory or http(s) URL")
    b.add_argument("--full", action="store_true", help="a whole stream, not incremental")
    b.add_argument("--break-lock", action="store_true",
                   help="over HTTP: take DEST's lock of SUBVOL if its holder has not renewed "
                   "it for 2 minutes (its device gone); a live holder's is never taken")
    b.add_argument("--json", action="store_true", help="print the index entry as JSON")
    add_quiet_option(b)
    b.set_defaults(func=run_backup)
    r = dsub.add_parser(
        "restore", help="restore a state subvolume (or any directory) from its backups",
        description="Receive the backup chain of SUBVOL from SRC (each delta verified "
        "against the subvolume restored before it; the result against the backup's "
        "tree-sum) and swap it in place of state/SUBVOL of FS, then reboot (on the "
        "system booted from FS, its mount keeps the old one until then: it is deleted "
        "by the first device command of the next boot). With --to-dir, receive it "
        "below any directory instead (any filesystem) as SUBVOL.N, N the backup restored.",
        epilog=examples("btrdelta device restore /mnt/top home /media/usb/backups",
                        "btrdelta device restore /srv/copy home /media/usb/backups --to-dir"),
    )
    r.add_argument("fs", metavar="FS|DIR", help=_FS_HELP + "; or a directory with --to-dir")
    r.add_argument("subvol", metavar="SUBVOL", help="the backed-up subvolume's name")
    r.add_argument("src", metavar="SRC", type=location,
                   help="directory or http(s) URL of the backups")
    r.add_argument("--upto", type=int, metavar="N", help="restore backup N (default: last)")
    r.add_argument("--as", dest="as_name", metavar="NAME",
                   help="restore in place of state/NAME, another of the device's state "
                   "subvolumes (default: state/SUBVOL)")
    r.add_argument("--to-dir", action="store_true",
                   help="FS is a plain directory: receive the tree below it")
    add_json(r, "what was restored")
    add_quiet_option(r)
    r.set_defaults(func=run_restore)

    def to_dir_value(args: argparse.Namespace, left: list[str], _words: list[str]) -> str | None:
        # `restore FS home SRC --to-dir /srv/copy`: the directory is FS, --to-dir a switch
        if not args.to_dir or len(left) != 1 or left[0].startswith("-"):
            return None
        return ("--to-dir takes no value (FS is then the directory): btrdelta device restore "
                + shlex.join([left[0], args.subvol, args.src, "--to-dir"]))

    set_extra_hint(r, to_dir_value)


def _add_init(dsub: Any) -> None:
    i = dsub.add_parser(
        "init", help="lay out a btrfs filesystem as a device (factory base, slots, state)",
        description="Receive the factory release as roots/factory (read-only), snapshot it "
        "as slots a and b, create the writable state subvolumes and the state file, and "
        "make slot a the default subvolume.",
        epilog=examples("btrdelta device init /mnt/top --factory rootfs-1.stream \\",
                        "    --state etc:/etc:overlay --state home:/home:bind --tries 3"),
    )
    i.add_argument("fs", metavar="FS", help=_FS_HELP)
    i.add_argument("--factory", required=True, metavar="SOURCE",
                   help="the factory release: a directory tree, a full send stream, a "
                        "repository URL (http(s)://, or file:// for a directory; with --key; "
                        "--to: a version other than the newest) "
                        "or a chunk archive (.bdar) of a full send stream")
    i.add_argument("--key", metavar="PUBKEY",
                   help="a repository's root key, or the key a chunk archive is signed by")
    i.add_argument("--to", metavar="VERSION", help="the repository version (default: newest)")
    i.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="another URL of the repository (repeatable)")
    i.add_argument("--state", action="append", metavar="NAME:/PATH[:overlay|bind]",
                   help="a state subvolume (repeatable; default etc:/etc:overlay, "
                        "var:/var:overlay, home:/home:bind)")
    i.add_argument("--tries", type=positive_int, default=3,
                   help="boots a new slot gets (default 3)")
    i.add_argument("--hook", metavar="PROGRAM",
                   help="boot hook: called as PROGRAM try|good|cancel SLOT [TRIES]")
    i.add_argument("--expect-sum", metavar="TREESUM", type=_tree_sum_arg,
                   help="the factory release's tree-sum (btrdelta tree-sum); refuse others")
    i.add_argument("--force", action="store_true",
                   help="lay out anew: deletes every root and state subvolume (refused on the "
                   "device the running system booted from); also takes over a filesystem "
                   "that is not empty or whose default subvolume is not the top level (a "
                   "system boots it): what is there is kept")
    i.add_argument("--json", action="store_true", help="print the status as JSON")
    add_progress_options(i)
    i.set_defaults(func=run_init)


def _add_install(dsub: Any) -> None:
    n = dsub.add_parser(
        "install", help="rebuild the inactive slot from a release; boot it once, with tries",
        description="SOURCE is a delta stream, a send stream (incremental: its parent is "
        "found among the roots by UUID), a directory tree, a versions repository URL "
        "(http(s)://, or file:// for a directory; the "
        "cheapest path from the running root's release, as btrdelta update plans it, "
        "verified against the signed index) or a chunk archive (.bdar, path or URL) of a "
        "root's plain send stream (chunks of the running root reused). The inactive slot is "
        "rebuilt "
        "under a hidden name (a delta's old files verified before they are patched), its "
        "tree-sum taken (and checked with --expect-sum), then the slot is committed as the "
        "next boot by one atomic step: the boot-counting file try-SLOT+TRIES. Interrupted at "
        "any point, the device still boots the old root; a re-run cleans up and completes.",
        epilog=examples(
            "btrdelta device install /mnt/top v1-v2.delta "
            "--expect-sum \"$(btrdelta tree-sum v2 | cut -c1-64)\"",
            "btrdelta device install /dev/mmcblk0p3 v1-v2.delta --key release.pub",
            "btrdelta device install /mnt/top https://updates.example.com/os --key root.pub "
            "--to 2.1",
            "btrdelta device install /mnt/top https://updates.example.com/rootfs-2.bdar",
            note="With --key, the release is refused unless v1-v2.delta.sig is a signature "
                 "by release.pub."),
    )
    n.add_argument("fs", metavar="FS", help=_FS_HELP)
    n.add_argument("source", metavar="SOURCE", type=location_keeping_file_url,
                   help="delta stream, send stream ('-': stdin), directory tree, repository URL "
                   "or chunk archive (.bdar)")
    n.add_argument("--expect-sum", metavar="TREESUM", type=_tree_sum_arg,
                   help="the release's tree-sum (btrdelta tree-sum NEW; for a stream made by "
                        "btrfs send -p, tree-sum --ignore-root-mtime NEW: the kernel may not "
                        "send the top directory's mtime)")
    n.add_argument("--tries", type=positive_int,
                   help="boots the new slot gets (default: the device's)")
    n.add_argument("--booted", metavar="ROOT", help="the booted root, when / does not tell")
    n.add_argument("--key", action="append", metavar="PUBKEY",
                   help="refuse SOURCE unless signed by this Ed25519 public key "
                        "(repeatable: any of them; btrdelta sign, send/delta make --sign)")
    n.add_argument("--signature", metavar="SIG",
                   help="the detached signature (default SOURCE.sig; needed for stdin)")
    n.add_argument("--to", metavar="VERSION",
                   help="the repository version to install (default: the newest)")
    n.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="another URL of the repository, tried in turn (repeatable)")
    n.add_argument("--json", action="store_true", help="print the result as JSON")
    add_progress_options(n, verbose=True)
    n.set_defaults(func=run_install)


def _print_status(st: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(st, indent=1))
        return
    trial = st["trial"]
    print(f"default: {st['default']}   booted: {st['booted'] or '?'}   "
          f"next boot: {st['next_boot']}")
    if trial and trial["tries_left"] == 0:
        slot = trial["slot"]
        bad = st["roots"][slot].get("verdict") == "bad"
        print(f"trial: {slot} ended after {trial['boots']} boots, "
              + ("marked bad" if bad else "never marked good")
              + f": the default boots; the next install rebuilds {slot}"
              + ("" if bad else f" (mark-bad --slot {slot} records the verdict)"))
    elif trial:
        print(f"trial: {trial['slot']}, {trial['tries_left']} tries left, "
              f"{trial['boots']} boots made")
    for name, r in st["roots"].items():
        if not r["present"]:
            print(f"  {name:8} (empty)")
            continue
        flags = "".join(f" [{f}]" for f in ("default", "booted") if r[f])
        print(f"  {name:8} {r.get('release', '?'):24} {r.get('verdict', '?'):5} "
              f"{r.get('tree_sum', '')[:16]}{flags}")
    for s in st["state"]:
        print(f"  state/{s['name']:6} {s['mode']:8} {s['path']}"
              f"{'' if s['present'] else ' (missing)'}")
    if st["pending"]:
        print(_pending_text(st["pending"]))


def _pending_text(pending: dict[str, Any]) -> str:
    """The state file's unfinished operation, said to a person (it was the Python repr of
    the record: ``pending: {'op': 'install', 'slot': 'b', 'started': 1796503670.179}``)."""
    import time

    op = str(pending.get("op", "?"))
    what = [f"{k} {v}" for k, v in pending.items() if k not in ("op", "started")]
    if isinstance(pending.get("started"), (int, float)):
        what.append("started " + time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                               time.gmtime(pending["started"])))
    return (f"pending: {op}{' (' + ', '.join(what) + ')' if what else ''} was cut short: "
            "the next install, mark-good, mark-bad, rollback, factory-reset, backup or "
            "restore finishes or undoes it")


def run_init(args: argparse.Namespace) -> int:
    """Lay out the device."""
    from ..device import init

    with Phases("init", progress_wanted(args)) as progress:
        st = init(args.fs, args.factory, state=args.state, tries=args.tries, hook=args.hook,
                  expect_sum=args.expect_sum, force=args.force,
                  key=args.key, to=args.to, mirrors=args.mirror,
                  on_progress=_fetch_then_receive(progress))
    if not args.quiet or args.json:
        _print_status(st, args.json)
    return 0


def run_install(args: argparse.Namespace) -> int:
    """Install a release."""
    from ..device import install

    _check_install_order(args.fs, args.source)
    for where in (args.source, *(args.mirror or ())):
        if where.startswith(("http://", "https://", "file://")):
            check_location(where, "SOURCE" if where == args.source else "--mirror")
    with Phases("install", progress_wanted(args)) as progress:

        def on_step(name: str) -> None:
            if args.verbose:
                progress.message(f"install: {name}")

        res = install(args.fs, args.source, expect_sum=args.expect_sum, tries=args.tries,
                      booted=args.booted, keys=args.key, signature=args.signature,
                      to=args.to, mirrors=args.mirror, on_step=on_step,
                      on_progress=_fetch_then_receive(progress))
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    elif not args.quiet and res.kept:
        print(f"slot {res.slot} already holds {res.release} (its content is the identity the "
              f"index names): nothing to download or receive; next boot: {res.slot}, "
              f"{res.tries} tries; tree-sum {res.tree_sum}")
    elif not args.quiet:
        what = (f"{res.hops} hop{'s' if res.hops != 1 else ''}, "
                f"{human_bytes(res.downloaded)} downloaded" if res.hops else
                f"{res.records} records, {human_bytes(res.data_bytes)}")
        print(f"installed {res.release} into slot {res.slot} ({what}, {res.seconds:.1f} s); "
              f"next boot: {res.slot}, {res.tries} tries; tree-sum {res.tree_sum}")
    return 0


def _check_install_order(fs: str, source: str) -> None:
    """FS and SOURCE swapped (``device install 1-2.delta /mnt/top``): a usage error
    naming the command meant, not "1-2.delta is not a btrfs filesystem".

    Raises:
        UsageError: FS is a URL, or a stream or archive file, and SOURCE exists here.
    """
    import os

    from ._paths import check_not_url

    again = f"btrdelta device install {shlex.quote(source)} {shlex.quote(fs)}"
    check_not_url(fs, "FS", f"the device's filesystem comes first: {again}")
    if not os.path.isfile(fs) or not os.path.exists(source):
        return
    from ..errors import UsageError
    from ..update.identify import Kind, identify

    try:
        with open(fs, "rb") as f:
            what, _ = identify(f)
    except OSError:
        return  # (said by the command itself)
    if what.kind in (Kind.SEND_STREAM, Kind.DELTA_STREAM, Kind.CHUNK_ARCHIVE):
        raise UsageError(f"FS {fs} is {what.describe()}: the device's filesystem comes "
                         f"first: {again}")


def _fetch_then_receive(progress: Phases) -> Callable[[int, int], None]:
    """The device's ``on_progress(records, bytes)`` shown in two phases, each from 0: a
    download (``(0, bytes fetched)``: a repository's artifacts, a .bdar's chunks), then the
    receive (``(records, stream bytes)``; its ``(0, 0)`` at the start says nothing)."""

    def on_progress(records: int, nbytes: int) -> None:
        if records:
            progress("receive", nbytes, None, note=f"{records} records")
        elif nbytes and progress.phase != "receive":
            progress("fetch", nbytes, None)

    return on_progress


def run_status(args: argparse.Namespace) -> int:
    """Print the status."""
    from ..device import status

    _print_status(status(args.fs, booted=args.booted), args.json)
    return 0


def run_verdict(args: argparse.Namespace) -> int:
    """mark-good / mark-bad."""
    from ..device import mark_bad, mark_good

    fn = mark_good if args.verdict == "mark-good" else mark_bad
    st = fn(args.fs, slot=args.slot)
    if not args.json and not args.quiet:
        print(_what_was_done(st))
    if args.json or not args.quiet:
        _print_status(st, args.json)
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    """Roll back."""
    from ..device import rollback

    st = rollback(args.fs)
    if not args.json and not args.quiet:
        print(_what_was_done(st))
    if args.json or not args.quiet:
        _print_status(st, args.json)
    return 0


def _what_was_done(st: dict[str, Any]) -> str:
    """One line on what mark-good, mark-bad or rollback did (from the events it logged),
    before the status: the status alone did not say which root the verdict was about."""
    log = st["log"]
    last = log[-1] if log else {}
    event, slot = last.get("event"), last.get("slot")
    if event == "mark-good":
        later = st["next_boot"] if st["next_boot"] != slot else None  # (an install since)
        return f"marked {slot} good: it is the default" + (
            f"; next boot: {later}, on trial" if later else "")
    if event == "mark-bad":
        before = log[-2] if len(log) > 1 else {}
        if before.get("event") == "rollback" and before.get("reason") == f"{slot} marked bad":
            return f"marked {slot} bad: the default goes back to {before['slot']}"
        return f"marked {slot} bad; next boot: {st['next_boot']}"
    if event == "rollback":
        reason = str(last.get("reason", ""))
        if reason.startswith("trial of "):
            return f"rolled back: the {reason}; next boot: {st['next_boot']}"
        return f"rolled back {reason}: {slot} is the default".replace("  ", " ")
    if event == "recover":  # a re-run after a cut: what the first run left is finished
        return str(last.get("what"))
    return f"nothing to do; next boot: {st['next_boot']}"


def run_mount(args: argparse.Namespace) -> int:
    """Mount a root with its state."""
    from ..device.overlay import mount

    res = mount(args.fs, args.target, root=args.root, state=not args.no_state)
    mounts: list[tuple[str, str]] = res["mounts"]  # type: ignore[assignment]
    skipped: list[str] = res["skipped"]  # type: ignore[assignment]
    if args.json:
        print(json.dumps({"root": res["root"], "target": args.target,
                          "mounts": [{"mode": m, "path": p} for m, p in mounts],
                          "skipped": skipped}))
        return 0
    if not args.quiet:
        print(f"mounted root {res['root']} on {args.target}"
              + "".join(f"; {mode} {path}" for mode, path in mounts)
              + f" (undo: umount -R {shlex.quote(args.target)})")
    if skipped:  # writes there hit the read-only root: say why they are not the state's
        print(f"btrdelta device mount: warning: not mounted: {', '.join(skipped)} (root "
              f"{res['root']} has no such directory; the release should create it)",
              file=sys.stderr)
    return 0


def run_diff(args: argparse.Namespace) -> int:
    """Print the overlay changes."""
    from ..device.overlay import diff

    for change in diff(args.fs, root=args.root):
        print(json.dumps(vars(change)) if args.json else change.line())
    return 0


def run_reset(args: argparse.Namespace) -> int:
    """Factory reset."""
    from ..device.reset import factory_reset

    res = factory_reset(args.fs, keep=args.keep, to=args.to)
    if args.json:
        print(json.dumps(res, indent=1))
    elif not args.quiet:
        old = "; the running system uses the old state until the next boot" \
            if res["old_kept"] else ""
        print(f"factory reset: root {res['root']}; reset {', '.join(res['reset']) or 'none'}; "
              f"kept {', '.join(res['kept']) or 'none'}{old}; reboot now")
    return 0


def run_backup(args: argparse.Namespace) -> int:
    """Back up a state subvolume."""
    from ..device.backup import backup

    def waiting(line: str) -> None:  # (also under --quiet and --json: else it looks hung)
        print(line, file=sys.stderr, flush=True)

    entry = backup(args.fs, args.subvol, args.dest, full=args.full, on_wait=waiting,
                   break_lock=args.break_lock)
    if args.json:
        print(json.dumps(entry, indent=1))
    elif not args.quiet:
        for name in entry["removed"]:
            print(f"removed {name} (not in the index: a backup cut short)", file=sys.stderr)
        kind = "whole" if entry["parent"] is None else f"delta from backup {entry['parent']}"
        print(f"backup {entry['n']} of {args.subvol}: {entry['file']} ({kind}, "
              f"{human_bytes(entry['bytes'])})")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    """Restore a state subvolume."""
    from ..device.backup import restore, restore_to_dir

    if args.to_dir:
        got = restore_to_dir(args.src, args.subvol, args.fs, upto=args.upto)
        if args.json:
            print(json.dumps({"subvol": args.subvol, "path": str(got), "tree_sum": None,
                              "old_kept": False}))
        elif not args.quiet:
            print(f"restored {args.subvol} to {got}")
        return 0
    res = restore(args.fs, args.subvol, args.src, upto=args.upto, as_name=args.as_name)
    if args.json:
        print(json.dumps({"subvol": res["subvol"], "path": None, "tree_sum": res["tree_sum"],
                          "old_kept": res["old_kept"]}))
    elif not args.quiet:
        old = f"; the running system uses the old {res['subvol']} until the next boot: " \
            "reboot now" if res["old_kept"] else ""
        print(f"restored state/{res['subvol']} (tree-sum {res['tree_sum']}){old}")
    return 0
