"""Delta jobs of ``repo add``: one delta between two releases each, independent of the others.

A job is a small JSON file (``REPO/.btrdelta/jobs/<version>/from-<p>.json``, schema in
``docs/repository.md``) naming the repository, the two versions and the output file. It
runs

* in ``--parallel N`` worker processes of ``repo add`` (:func:`run_pending`), or
* anywhere the repository directory is reachable (a shared file system): ``btrdelta repo
  run-job JOB.json`` (:func:`run_job_file`) rebuilds both trees from the repository's fulls
  in a scratch directory and writes the delta to the job's output; the next ``repo add``
  of that version adopts every output it finds.

Either way the delta is checked before it is published: applied to the older tree, the
result must have the newer release's content identity.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from ..delta import MakeOptions, make_delta
from ..errors import BtrdeltaError, ChecksumError
from ..fs.atomic import atomic_output, write_atomic
from ..repo.canonical import Fields, parse_json
from ..repo.catalog import Catalog
from ..repo.fullindex import decode_full_index
from ..repo.layout import delta_sources, extra_budget, next_trial, paths_to
from ..tree import tree_sum
from .packs import LocalPacks, open_full, publish_file
from .streams import receive_release, write_release_stream

__all__ = ["make_delta_file", "plan_jobs", "run_job_file", "run_pending"]

JOB_TYPE = "btrdelta-repo-job"
#: measured extra deltas tried per release, and how much dearer than the direct delta the
#: path must be for one to be kept (``repo.layout``)
TRIALS = 3
RATIO = 1.2


def make_delta_file(old: Path, new: Path, name: str, identity: str, old_identity: str,
                    out: Path, *, tmp_dir: Path, jobs: int = 1) -> tuple[str, int]:
    """The delta from tree ``old`` to tree ``new`` (release ``name``) into ``out``;
    returns (hex BLAKE3, length)."""
    h = blake3.blake3()
    size = 0
    with tempfile.TemporaryFile(dir=tmp_dir) as stream:
        write_release_stream(stream.write, new, name, identity, parent=old,
                             parent_identity=old_identity)
        stream.seek(0)
        with atomic_output(out) as f:

            def write(data: Any) -> None:
                nonlocal size
                f.write(data)
                h.update(data)
                size += memoryview(data).nbytes

            # the stream's parent UUID is the release identity, not a btrfs UUID; no
            # hdiff-lzma patches: their inflation took the regex r1 -> r8 update path (3
            # hops) from ~40 to ~65 ms of CPU, below issue 14's 100 MB/s, for ~7 % less
            # on the rebuilt library's patch
            make_delta(stream, old, write,
                       MakeOptions(jobs=jobs, check_parent=False, lzma_patches=False),
                       source=str(new))
    return h.hexdigest(), size


def _job_paths(repo: Any, name: str, source: int) -> tuple[Path, Path]:
    d = repo.jobs / name
    return d / f"from-{source}.json", d / f"from-{source}.delta"


def plan_jobs(repo: Any, cat: Catalog, pos: int) -> list[dict[str, Any]]:
    """Write one job file per pending delta of version ``pos``; returns the jobs."""
    entry = cat.versions[pos - 1]
    out = []
    for a in entry.pending:
        job_file, output = _job_paths(repo, entry.name, a)
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job = {"type": JOB_TYPE, "repo": str(repo.root.resolve()), "version": entry.name,
               "from": cat.versions[a - 1].name, "output": str(output.resolve()),
               "command": ["btrdelta", "repo", "run-job", str(job_file.resolve())]}
        # whole or not at all: a power cut never leaves a torn job for a worker to read
        write_atomic(job_file, (json.dumps(job, indent=1) + "\n").encode())
        out.append(job)
    return out


def _materialize(repo_root: Path, cat: Catalog, pos: int, trees: Path) -> Path:
    """Tree of version ``pos`` below ``trees`` (rebuilt from its full if absent)."""
    entry = cat.versions[pos - 1]
    path = trees / entry.name
    if path.exists():
        return path
    fidx = repo_root / "fulls" / f"{entry.full_id}.fidx"
    data = fidx.read_bytes()
    if blake3.blake3(data).hexdigest() != entry.full_id:
        raise ChecksumError("full index does not match its name", source=str(fidx))
    full = decode_full_index(data, source=str(fidx))
    with open_full(full, LocalPacks(repo_root), source=str(fidx)) as stream:
        receive_release(stream, trees, entry.name, source=str(fidx),  # type: ignore[arg-type]
                        delta=False, identity=entry.identity)
    return path


def _check_delta(delta: Path, trees: Path, cat: Catalog, source: int, pos: int) -> None:
    """Apply ``delta`` below ``trees``; the result must be version ``pos``."""
    stage = f".check-{pos}-{source}"
    from .publish import _remove_tree

    _remove_tree(trees / stage)
    try:
        with open(delta, "rb") as f:
            receive_release(f, trees, stage, source=str(delta), delta=True)
        if tree_sum(trees / stage) != cat.versions[pos - 1].identity:
            raise ChecksumError(
                f"applied to {cat.versions[source - 1].name}, the delta does not give "
                f"{cat.versions[pos - 1].name}", source=str(delta))
    finally:
        _remove_tree(trees / stage)


def _worker(args: tuple[str, str, str, str, str, str, str, str]) -> tuple[str, int, float]:
    old, new, name, identity, old_identity, out, tmp_dir, jobs = args
    t0 = time.monotonic()
    digest, size = make_delta_file(Path(old), Path(new), name, identity, old_identity,
                                   Path(out), tmp_dir=Path(tmp_dir), jobs=int(jobs))
    return digest, size, time.monotonic() - t0


def run_pending(repo: Any, cat: Catalog, pos: int, report: Any, *, parallel: int,
                verify: bool, say: Callable[[str], None]) -> None:
    """Adopt finished job outputs, make the other pending deltas, record them all."""
    entry = cat.versions[pos - 1]
    trees = repo.trees
    trees.mkdir(exist_ok=True)
    repo.tmp.mkdir(exist_ok=True)
    new = _materialize(repo.root, cat, pos, trees)
    todo: list[tuple[int, tuple[str, str, str, str, str, str, str, str]]] = []
    outputs: dict[int, Path] = {}
    for a in list(entry.pending):
        old = _materialize(repo.root, cat, a, trees)
        _, output = _job_paths(repo, entry.name, a)
        outputs[a] = output
        if not output.exists():
            output.parent.mkdir(parents=True, exist_ok=True)
            jobs = max(1, (os.cpu_count() or 1) // max(1, parallel))
            todo.append((a, (str(old), str(new), entry.name, entry.identity,
                             cat.versions[a - 1].identity, str(output), str(repo.tmp),
                             str(jobs))))
    times: dict[int, float] = {}
    if todo:
        n = min(parallel, len(todo))
        say(f"{entry.name}: {len(todo)} delta{'' if len(todo) == 1 else 's'} on {n} "
            f"process{'' if n == 1 else 'es'}")
        if parallel > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(parallel, len(todo)), mp_context=ctx) as pool:
                for (a, _), (_, _, secs) in zip(todo, pool.map(_worker, [t for _, t in todo]),
                                                strict=True):
                    times[a] = secs
        else:
            for a, args in todo:
                times[a] = _worker(args)[2]
    for a in sorted(outputs, reverse=True):
        if verify:
            say(f"{entry.name}: checking the delta from {cat.versions[a - 1].name}")
            _check_delta(outputs[a], trees, cat, a, pos)
        _record(repo, cat, pos, a, outputs[a], report, times.get(a, 0.0))
    if not entry.measured:
        _try_extras(repo, cat, pos, report, new, verify=verify, say=say)
        entry.measured = True
        repo.save(cat)
    with contextlib.suppress(OSError):
        for leftover in (repo.jobs / entry.name).iterdir():
            leftover.unlink()
        (repo.jobs / entry.name).rmdir()


def _record(repo: Any, cat: Catalog, pos: int, a: int, output: Path, report: Any,
            secs: float) -> None:
    """Publish the delta ``a -> pos`` made in ``output`` and record it."""
    entry = cat.versions[pos - 1]
    digest, size = publish_file(output, repo.root / "deltas", "delta")
    entry.deltas[a] = (digest, size)
    if a in entry.pending:
        entry.pending.remove(a)
    repo.save(cat)
    report.deltas.append((cat.versions[a - 1].name, size, secs))


def _extras(cat: Catalog) -> int:
    """Deltas of the catalog that the layout does not name (measured extras)."""
    return sum(len(set(v.deltas) - set(delta_sources(q)))
               for q, v in enumerate(cat.versions, 1))


def _try_extras(repo: Any, cat: Catalog, pos: int, report: Any, new: Path, *, verify: bool,
                say: Callable[[str], None]) -> None:
    """Make the measured extra deltas into ``pos`` that pay (``repo.layout``): at most
    :data:`TRIALS` tried, kept within :func:`~btrdelta.repo.layout.extra_budget`."""
    entry = cat.versions[pos - 1]
    tried: set[int] = set()
    while len(tried) < TRIALS and _extras(cat) < extra_budget(pos):
        sizes = [{a: n for a, (_h, n) in v.deltas.items()} for v in cat.versions[:pos]]
        u = next_trial(pos, sizes, tried, ratio=RATIO)
        if u is None:
            return
        tried.add(u)
        path = paths_to(pos, sizes)[u]
        old = _materialize(repo.root, cat, u, repo.trees)
        _, output = _job_paths(repo, entry.name, u)
        output.parent.mkdir(parents=True, exist_ok=True)
        _digest, size, secs = _worker((str(old), str(new), entry.name, entry.identity,
                                      cat.versions[u - 1].identity, str(output),
                                      str(repo.tmp), str(os.cpu_count() or 1)))
        name = cat.versions[u - 1].name
        if path <= RATIO * size:
            say(f"{entry.name}: a delta from {name} ({size} bytes) does not pay (the path "
                f"costs {path})")
            output.unlink()
            continue
        if verify:
            say(f"{entry.name}: checking the delta from {name}")
            _check_delta(output, repo.trees, cat, u, pos)
        _record(repo, cat, pos, u, output, report, secs)


def run_job_file(job_file: str, *, work: str | None = None, jobs: int | None = None) -> Path:
    """Run one job file (``btrdelta repo run-job``); returns the output written."""
    from .publish import Repo

    with open(job_file, "rb") as f:
        raw = f.read()
    job = Fields(parse_json(raw, job_file), job_file)
    job.expect("type", JOB_TYPE)
    repo = Repo(job.text("repo"))
    cat = repo.load()
    pos, src = cat.position(job.text("version")), cat.position(job.text("from"))
    if pos is None or src is None:
        raise BtrdeltaError("the job's versions are not in the repository", source=job_file)
    output = Path(job.text("output"))
    with tempfile.TemporaryDirectory(prefix="btrdelta-job-", dir=work) as scratch:
        trees = Path(scratch)
        old = _materialize(repo.root, cat, src, trees)
        new = _materialize(repo.root, cat, pos, trees)
        make_delta_file(old, new, cat.versions[pos - 1].name, cat.versions[pos - 1].identity,
                        cat.versions[src - 1].identity, output, tmp_dir=trees,
                        jobs=jobs or os.cpu_count() or 1)
        from .publish import _remove_tree

        for child in trees.iterdir():
            if child.is_dir():
                _remove_tree(child)
    return output
