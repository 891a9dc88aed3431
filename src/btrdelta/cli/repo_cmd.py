"""``btrdelta repo``: publish releases into a versions repository on dumb mirrors."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

from ..errors import UsageError
from ._common import add_jobs, add_json, avg_chunk_size, examples, human_bytes, zstd_level
from ._paths import check_location, location, refuse_inside
from .progress import add_progress_options, add_quiet_option, progress_wanted

_EPILOG = """\
examples:
  btrdelta repo init www/app
  btrdelta repo add www/app 1.0 /build/app-1.0          # a tree, a ro snapshot or a full stream
  btrdelta repo add www/app 1.1 /build/app-1.1 -j 4
  btrdelta repo sign www/app --key root.key --timestamp-key timestamp.key --expires 7d
  btrdelta repo sign www/app --timestamp-key timestamp.key --expires 7d   # cron: timestamp only
  btrdelta repo ls www/app          (or: btrdelta repo ls https://mirror/app --key root.pub)
  rsync -a --exclude=/.btrdelta www/app/ mirror:/srv/app/   # what mirrors carry
  btrdelta repo gc www/app --dry-run   # unreferenced packs, fulls, old indexes and bins

batch systems: `repo add REPO V SOURCE --plan-only` prints the delta jobs (JSON); run each
anywhere the repository directory is mounted with `btrdelta repo run-job JOB.json`, then
`repo add REPO V` picks up their results. See docs/repository.md.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``repo`` and its subcommands."""
    p = sub.add_parser(
        "repo", help="versions repository: publish releases, deltas and a signed index",
        description="A versions repository is a plain directory any static server or mirror "
        "can carry: each release's full (chunked, deduplicated across releases), deltas at "
        "logarithmic distances, a signed index. Devices update with `btrdelta update`. "
        "Format: docs/formats/repository.md; workflow: docs/repository.md.",
        epilog=_EPILOG,
    )
    rsub = p.add_subparsers(dest="repo_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=usage)
    _add_init(rsub)
    _add_add(rsub)
    _add_run_job(rsub)
    _add_sign(rsub)
    _add_ls(rsub)
    _add_gc(rsub)


def _add_init(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = rsub.add_parser("init", help="create an empty repository",
                        description="Make REPO an empty versions repository: a plain "
                        "directory any static web server or mirror serves as it is. The "
                        "chunk size and zstd level of the fulls are fixed here for every "
                        "release. Then repo add each release and repo sign.",
                        epilog=examples("btrdelta repo init www/app",
                                        "btrdelta repo init www/app --avg-chunk 256K"))
    i.add_argument("repo", metavar="REPO", help="directory to make (empty or new)")
    i.add_argument("--avg-chunk", type=avg_chunk_size, default=64 << 10, metavar="SIZE",
                   help="average chunk size of fulls (default 64K)")
    i.add_argument("--level", type=zstd_level, default=12,
                   help="zstd level of chunks (default 12)")
    i.add_argument("--solid-level", type=zstd_level, default=19, metavar="LEVEL",
                   help="zstd level of each release's solid full, the ~32 MiB frames a "
                   "first install downloads (default 19; 0: none)")
    add_json(i, "the repository made")
    add_quiet_option(i)
    i.set_defaults(func=run_init)


def _add_add(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = rsub.add_parser(
        "add", help="add the next release (full + deltas)",
        description="Add release VERSION (a directory tree, a read-only btrfs snapshot or a "
        "full send stream) after the newest one: store its full (only the chunks no earlier "
        "release stored), receive it again and check its identity (tree-sum), make deltas "
        "from older releases (each checked by applying it), and update index.html. Nothing "
        "is public until repo sign. With --plan-only the deltas become job files for repo "
        "run-job on other machines; repo add REPO VERSION without SOURCE adopts their "
        "outputs (and finishes an interrupted add).",
        epilog=examples("btrdelta repo add www/app 1.1 /build/app-1.1 -j 4",
                        "btrdelta repo add www/app 1.2 /snap/app-1.2     # a ro btrfs snapshot",
                        "btrdelta repo add www/app 1.3 rel-1.3.stream --plan-only > jobs.json"))
    a.add_argument("repo", metavar="REPO", help="the repository (made by repo init)")
    a.add_argument("version", metavar="VERSION",
                   help="the new version's name (free-form; versions are ordered as added)")
    a.add_argument("source", metavar="SOURCE", nargs="?",
                   help="directory tree, read-only btrfs snapshot, or full send stream "
                   "(not needed to finish a version whose jobs are pending)")
    add_jobs(a, 1, "make deltas in N processes (default 1)")
    a.add_argument("--parallel", dest="jobs", type=int, help=argparse.SUPPRESS)  # old name
    a.add_argument("--plan-only", action="store_true",
                   help="store the full, write the delta jobs and print them as JSON")
    a.add_argument("--no-verify", action="store_true",
                   help="do not check each delta by applying it")
    add_json(a, "the report")
    add_progress_options(a)
    a.set_defaults(func=run_add)


def _add_run_job(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    j = rsub.add_parser("run-job", help="run one delta job written by `repo add --plan-only`",
                        description="Make the one delta a job file of repo add --plan-only "
                        "describes, on any machine that can read the repository (at the "
                        "path the job names), and write it next to the job; repo add REPO "
                        "VERSION then checks it and publishes it.",
                        epilog=examples("btrdelta repo run-job www/app/.btrdelta/jobs/1.3/"
                                        "from-2.json --work /scratch  # 1.3 from the 2nd"))
    j.add_argument("job", metavar="JOB.json", help="a job file that repo add --plan-only wrote")
    j.add_argument("--work", metavar="DIR", help="scratch directory (default: $TMPDIR)")
    add_jobs(j, None, "diff threads (default: CPUs)")
    add_json(j, "the delta written")
    add_quiet_option(j)
    j.set_defaults(func=run_job)


def _add_sign(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = rsub.add_parser(
        "sign", help="sign the index (root key) and the timestamp",
        description="Publish: with --key, write the next signed index (every version, full "
        "and delta, with sizes and digests; signed by the root key), then a timestamp "
        "naming it (signed by --timestamp-key, valid for --expires). Without --key, sign "
        "only a fresh timestamp (from cron, more often than it expires: clients refuse an "
        "expired one). Clients verify both before using anything.",
        epilog=examples(
            "btrdelta repo sign www/app --key root.key --timestamp-key ts.key --expires 7d",
            "btrdelta repo sign www/app --timestamp-key ts.key --expires 1d   # cron",
            "btrdelta repo sign www/app --key new-root.key --previous-key root.key"))
    s.add_argument("repo", metavar="REPO", help="the repository")
    s.add_argument("--key", metavar="ROOT_KEY", help="root private key: sign a new index")
    s.add_argument("--timestamp-key", metavar="KEY",
                   help="timestamp private key (default: the root key)")
    s.add_argument("--previous-key", metavar="OLD_ROOT_KEY",
                   help="rotate the root key: root/<N>.json names --key, signed by this "
                   "key and by --key (clients that pinned the old root follow it)")
    s.add_argument("--expires", default="7d", metavar="AGE", type=parse_age,
                   help="timestamp lifetime (default 7d; s m h d suffixes)")
    s.add_argument("--index-expires", default="365d", metavar="AGE", type=parse_age,
                   help="index lifetime (default 365d)")
    add_json(s, "what is signed now")
    add_quiet_option(s)
    s.set_defaults(func=run_sign)


def _add_ls(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = rsub.add_parser(
        "ls", help="versions, artifacts and sizes of a repository",
        description="List the versions of a repository (a directory, or a mirror's URL, "
        "verified against the root key with --key), oldest first: each version with its "
        "full (chunked size, stream size, tree-sum) and the deltas that lead to it with "
        "their sizes, and which signed index publishes them.",
        epilog=examples("btrdelta repo ls www/app",
                        "btrdelta repo ls https://mirror.example/app --key root.pub --json"))
    ls.add_argument("repo", metavar="REPO|URL", type=location,
                    help="repository directory or base URL")
    ls.add_argument("--key", metavar="ROOT_PUB",
                    help="verify the signed index and list it as a client sees it (a URL, a "
                    "mirror's copy, or a publisher's directory instead of its catalog)")
    add_json(ls, "the listing")
    ls.set_defaults(func=run_ls)


def _add_gc(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = rsub.add_parser(
        "gc", help="remove files no version or kept index refers to",
        description="Remove from the repository what nothing refers to: packs and full "
        "indexes of a repo add cut short, signed indexes older than the newest N and the "
        "bins only they name, temporary files of killed writers, the publisher's scratch "
        "space. What the catalog or a kept index names is never touched, so mirrors may "
        "sync at any time (rsync --delete removes the same files there).",
        epilog=examples("btrdelta repo gc /srv/repo --dry-run",
                        "btrdelta repo gc /srv/repo --keep-indexes 3"))
    g.add_argument("repo", metavar="REPO", help="the repository")
    g.add_argument("--keep-indexes", type=int, default=2, metavar="N",
                   help="signed indexes kept, newest first (default 2: a mirror one sign "
                        "behind still serves a whole state)")
    g.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    add_json(g, "the report")
    add_quiet_option(g)
    g.set_defaults(func=run_gc)


def parse_age(text: str) -> int:
    """'7d' -> seconds (a lifetime: more than 0)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    t = text.strip().lower()
    try:
        age = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not an age: {text!r} (e.g. 7d, 12h)") from None
    if age <= 0:  # (signed metadata that expires as it is made)
        raise argparse.ArgumentTypeError(f"not a lifetime: {text!r} (more than 0, e.g. 7d)")
    return age


def run_init(args: argparse.Namespace) -> int:
    """``repo init``."""
    from ..update.publish import init_repo

    repo = init_repo(args.repo, avg_chunk=args.avg_chunk, level=args.level,
                     solid_level=args.solid_level)
    if args.json:
        print(json.dumps({"repo": str(repo.root), "avg_chunk": args.avg_chunk,
                          "level": args.level, "solid_level": args.solid_level}))
    elif not args.quiet:
        print(f"initialized empty repository {args.repo}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    """``repo add``."""
    from .._malloc import return_freed_memory
    from ..update.publish import add_release

    if "/" in args.version and os.path.exists(args.version):
        name = shlex.quote(args.source) if args.source else "VERSION"
        raise UsageError(f"VERSION {args.version} is a path: the version's name comes first: "
                         f"btrdelta repo add {shlex.quote(args.repo)} {name} "
                         f"{shlex.quote(args.version)}")
    if args.source and os.path.isdir(args.source):
        refuse_inside(args.repo, args.source, "REPO {inner} {how} SOURCE {outer}: the release "
                      "would hold the repository being written; give a tree outside it",
                      mounts_apart=True)
    return_freed_memory()  # the delta jobs read whole files for diffing
    shown = progress_wanted(args)
    started = time.monotonic()

    def say(step: str) -> None:
        # one line a step, with the time so far: the steps report no bytes, and a bar
        # below them stood at '0.00B [00:32, ?B/s]' on a terminal
        if shown:
            print(f"repo add: {step} ({time.monotonic() - started:.1f} s)", file=sys.stderr,
                  flush=True)

    report = add_release(args.repo, args.version, args.source,
                         parallel=max(1, args.jobs), plan_only=args.plan_only,
                         verify=not args.no_verify, on_progress=say)
    if args.plan_only:
        from ..update.publish import Repo

        jobs = [json.loads(p.read_text()) for p in sorted((Repo(args.repo).jobs
                                                           / args.version).glob("*.json"))]
        print(json.dumps(jobs, indent=1))
        return 0
    if args.json:
        print(json.dumps({
            "version": report.version, "position": report.position,
            "identity": report.identity, "stream_size": report.stream_size,
            "chunks": report.chunks, "new_chunks": report.new_chunks,
            "new_chunk_bytes": report.new_chunk_bytes, "full_bytes": report.full_bytes,
            "solid_bytes": report.solid_bytes,
            "deltas": [{"from": a, "bytes": n, "seconds": round(t, 3)}
                       for a, n, t in report.deltas],
            "seconds": round(report.seconds, 3)}, indent=1))
        return 0
    if args.quiet:
        return 0
    # (no chunks packed: an add that finishes one --plan-only or a cut began, which stored
    # the full; was '0 of 0 chunks new (0 B)')
    stored = (f"{report.new_chunks} of {report.chunks} chunks new "
              f"({human_bytes(report.new_chunk_bytes)})" if report.chunks else
              "its full stored by the repo add that began it")
    print(f"{report.version} (#{report.position}): stream {human_bytes(report.stream_size)}, "
          f"{stored}, full download {human_bytes(report.full_bytes)}"
          + (f" (solid {human_bytes(report.solid_bytes)})" if report.solid_bytes else ""))
    for source, n, secs in report.deltas:
        print(f"  delta from {source}: {human_bytes(n)} ({secs:.1f} s)")
    print(f"  {report.seconds:.1f} s")
    return 0


def run_job(args: argparse.Namespace) -> int:
    """``repo run-job``."""
    from .._malloc import return_freed_memory
    from ..update.jobs import run_job_file

    return_freed_memory()
    out = run_job_file(args.job, work=args.work, jobs=args.jobs)
    if args.json:
        print(json.dumps({"job": args.job, "output": str(out), "bytes": out.stat().st_size}))
    elif not args.quiet:
        print(f"wrote {out}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    """``repo sign``."""
    from ..update.sign import sign_repo

    if not args.key and not args.timestamp_key:
        raise UsageError("give --key (new index) or --timestamp-key")
    res = sign_repo(args.repo, root_key=args.key, timestamp_key=args.timestamp_key,
                    expires=args.expires, index_expires=args.index_expires,
                    previous_key=args.previous_key)
    if args.json:
        print(json.dumps(res))
    elif not args.quiet:
        print(f"index version {res['index_version']} ({res['versions']} versions), timestamp "
              f"version {res['timestamp_version']} expires {res['timestamp_expires']}, root "
              f"version {res['root_version']}")
    return 0


def _print_listing(doc: dict[str, Any]) -> None:
    nv, nd = doc["versions_count"], doc["deltas_count"]
    print(f"{nv} version{'' if nv == 1 else 's'}, {nd} delta{'' if nd == 1 else 's'}; "
          f"{doc['signed']}")
    for v in doc["versions"]:
        print(f"{v['position']:>5}  {v['name']:<24} full {human_bytes(v['full_bytes']):>10}  "
              f"stream {human_bytes(v['stream_size']):>10}  {v['identity'][:16]}")
        if v["solid"]:
            print(f"         {'solid full':<31} {human_bytes(v['solid']['bytes']):>10}  "
                  f"{v['solid']['path']}")
        for d in v["deltas"]:
            print(f"         delta from {d['from']:<20} {human_bytes(d['bytes']):>10}  "
                  f"{d['path']}")
        if v["unfinished"]:
            print(f"         unfinished (an add cut short, or delta jobs pending): `btrdelta "
                  f"repo add {shlex.quote(doc['repository'])} {v['name']}` finishes it")


def run_gc(args: argparse.Namespace) -> int:
    """``repo gc``."""
    from ..update.gc import collect_garbage

    if args.keep_indexes < 1:
        raise UsageError("--keep-indexes must be at least 1 (the current index)")
    report = collect_garbage(args.repo, keep_indexes=args.keep_indexes, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    elif not args.quiet:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(report.removed)} files ({human_bytes(report.bytes)}); kept "
              f"indexes {', '.join(map(str, report.kept_indexes)) or '-'}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    """``repo ls``."""
    from ..update.listing import list_repo

    check_location(args.repo, "REPO|URL")
    doc = list_repo(args.repo, key=args.key)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print_listing(doc)
    return 0
