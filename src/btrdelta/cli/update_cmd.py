"""``btrdelta update``: bring DEST to a version of a repository by the cheapest path."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from ..errors import UsageError
from ._common import add_json, human_bytes, naming_output
from ._paths import check_location, check_not_url, location, refuse_inside
from .http_options import add_http_options, http_config
from .progress import Progress, add_progress_options, progress_wanted

_EPILOG = """\
examples:
  btrdelta update https://updates.example/app /var/lib/app --key root.pub
  btrdelta update https://a.example/app /var/lib/app --mirror https://b.example/app
  btrdelta update URL /var/lib/app --to 1.4 --dry-run --json   # the plan only, as JSON

DEST holds versions as DEST/VERSION (btrfs subvolumes, or directories elsewhere). The root
key given once is remembered in DEST/.btrdelta/root.pub (once the index verified with it:
a wrong --key changes nothing). An interrupted update resumes.
Exit codes: 2 a usage mistake (URL and DEST swapped, a URL without its scheme); 3 a file
the mirrors served is not what it should be (not JSON: a portal's page); 5 a signature,
hash, expiry or rollback check failed; 6 --to names no version of the repository; 7 every
mirror failed; 1 DEST/VERSION exists but is not that version.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``update``."""
    p = sub.add_parser(
        "update", help="update DEST from a versions repository (cheapest path, verified)",
        description="Verify the repository's signed index (freshness, rollback), find which "
        "versions DEST holds (by content identity), plan the cheapest download over every "
        "delta and full, print the plan, then fetch, verify and apply it. See "
        "docs/repository.md.",
        epilog=_EPILOG,
    )
    p.add_argument("url", metavar="URL", type=location, help="repository base URL (or directory)")
    p.add_argument("dest", metavar="DEST", help="directory holding versions as DEST/VERSION")
    p.add_argument("--to", metavar="VERSION", help="version wanted (default: the newest)")
    p.add_argument("--key", metavar="ROOT_PUB", help="the repository's root public key")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", type=location,
                   help="another mirror, tried when one fails (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    add_json(p, "the plan and the result")
    add_progress_options(p)
    add_http_options(p, retries=2)
    p.set_defaults(func=run)


class _Reporter:
    """Turns update events into progress: bytes of the plan downloaded (rate, percentage,
    ETA) and the hop being worked on."""

    def __init__(self, progress: Progress, as_json: bool, dest: str) -> None:
        self.progress = progress
        self.dest = dest
        self.as_json = as_json
        self.done = 0
        self.hop = ""

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if kind == "plan":
            self.progress.update(0, total=int(ev["to_download"]) or None)
            if not self.as_json:
                self.progress.print_out(_plan_text(ev, self.dest))
        elif kind in ("fetch", "apply"):
            what = f"{ev['from']} -> {ev['to']}" if ev["from"] else f"full {ev['to']}"
            self.hop = f"hop {ev['hop']}/{ev['hops']} {kind} {what}"
            if self.progress.enabled:
                self.progress.message(f"update: {self.hop}")
            self.progress.update(self.done, note=self.hop)
        elif kind == "bytes":
            self.done += int(ev["n"])
            self.progress.update(self.done, note=self.hop)
        elif kind == "replace":  # (said whatever the output: it changes DEST)
            how = "would replace it" if ev["dry_run"] else "replacing it"
            print(f"btrdelta update: {ev['path']} is not version {ev['version']!r} any more "
                  "(an update here made it; a power cut lost its data?): " + how,
                  file=sys.stderr, flush=True)
        elif kind == "seed":
            self.hop = f"regenerating {ev['version']} as a seed"
            self.progress.update(self.done, note=self.hop)


def _plan_text(ev: dict[str, Any], dest: str) -> str:
    """The plan's lines (or that the target is there already)."""
    plan = ev["plan"]
    start = plan["start"] or "nothing"
    if plan["start"] is None and ev["held"]:  # the full is priced with their chunks
        start += f" (a full, reusing the chunks of {', '.join(ev['held'])})"
    if not plan["steps"]:
        return (f"{ev['target']} is already in {os.path.join(dest, ev['target'])}: "
                "nothing to download\n")
    hops = f"{plan['hops']} hop" + ("s" if plan["hops"] != 1 else "")
    seeds = ev.get("seeded_by") or []
    bound = "at most " if seeds else ""
    lines = [f"plan: from {start} to {ev['target']}: {hops}, "
             f"{human_bytes(plan['bytes'])} ({bound}{ev['to_download']} bytes to download)"]
    if seeds:
        them = (f"the copy of {seeds[0]} here differs from the repository's: it seeds"
                if len(seeds) == 1 else
                f"the copies of {', '.join(seeds)} here differ from the repository's: they "
                "seed")
        lines.append(f"  ({them} the full, and what it holds of it is not downloaded)")
    for s in plan["steps"]:
        what = f"delta {s['from']} -> {s['to']}" if s["kind"] == "delta" else f"full {s['to']}"
        lines.append(f"  {what}: {human_bytes(s['bytes'])}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """``update``."""
    from ..update.versions import update

    check_not_url(args.dest, "DEST", "the repository comes first: btrdelta update "
                  f"{shlex.quote(args.dest)} {shlex.quote(args.url)}")
    if os.path.exists(args.dest) and not os.path.isdir(args.dest):
        raise UsageError(f"DEST {args.dest} is not a directory: DEST holds versions as "
                         "DEST/VERSION (made if missing)")
    for where in (args.url, *args.mirror):
        check_location(where, "URL" if where == args.url else "--mirror")
        if "://" not in where and os.path.isdir(where):  # (DEST/.btrdelta is the client's)
            refuse_inside(args.dest, where, "DEST {inner} {how} the repository {outer}: the "
                          "versions and the client's state would be written among its files; "
                          "give a DEST outside it")
    config = http_config(args)
    progress = Progress("update", enabled=progress_wanted(args) and not args.dry_run)
    reporter = _Reporter(progress, args.json or args.quiet, args.dest)
    with progress, naming_output(args.dest):  # a full DEST (a chunk written, a file)
        result = update(args.url, args.dest, to=args.to, key=args.key, mirrors=args.mirror,
                        dry_run=args.dry_run, on_event=reporter, config=config)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    elif not args.dry_run and result.plan.steps and not args.quiet:
        print(f"{result.target} is in {result.path} ({human_bytes(result.received)} "
              f"received in {result.seconds:.1f} s)")
    return 0
