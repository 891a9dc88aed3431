"""The subvolume lifecycle without an applier: begin (empty or from a parent), fill, finish
(received UUID, read-only, pre-commit hook, final name) or abort, on the directory backend
and on real btrfs (checked with ``btrfs subvolume show``); and the hook through receive()."""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from btrdelta.errors import (
    ApplyError,
    ChecksumError,
    MissingBaseError,
    TransportError,
    UnsafePathError,
)
from btrdelta.fs.sandbox import Sandbox
from btrdelta.receive import (
    PendingSubvol,
    Registry,
    Subvolumes,
    find_parent,
    find_subvolume,
    receive,
    uses_btrfs,
)
from btrdelta.receive.subvolumes import TMP_PREFIX
from btrdelta.stream.records import Snapshot
from tests.conftest import btrfs_loop
from tests.fs.conftest import progs, subvolume_show

from .helpers import events, subvol
from .test_failures import FULL

UUID_A, UUID_B = uuid.UUID(int=0xA), uuid.UUID(int=0xB)


@pytest.fixture(scope="module")
def btrfs_mnt() -> Iterator[Path]:
    with btrfs_loop(size="256M") as mnt:
        yield mnt


@pytest.fixture(params=["dir", "btrfs"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "dir":
        d = tmp_path / "dest"
    else:
        d = request.getfixturevalue("btrfs_mnt") / f"dest-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


def _write(sandbox: Sandbox | None, path: bytes, data: bytes) -> None:
    assert sandbox is not None
    fd, name = sandbox.parent(path)
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                  dir_fd=fd)
    try:
        os.write(out, data)
    finally:
        os.close(out)


def _entries(dest: Path) -> list[str]:
    """What DEST holds (temporaries included), the directory backend's registry left out."""
    return sorted(p.name for p in dest.iterdir() if p.name != ".btrdelta-subvols.json")


def test_slot_update_without_an_applier(dest: Path) -> None:
    """A device-style update: the active slot snapshotted as a hidden temporary, changed,
    then given its received UUID, made read-only and renamed into place."""
    with Subvolumes(dest) as subs:
        assert subs.btrfs == uses_btrfs(dest)
        first = subs.begin(b"slot-a", UUID_A, 7)
        _write(first.sandbox, b"os-release", b"v1\n")
        a = subs.finish(first)
        assert _entries(dest) == ["slot-a"]
        pending = subs.begin(b"slot-b", UUID_B, 9, parent=a.path, parent_uuid=UUID_A)
        assert pending.path == dest / os.fsdecode(pending.tmp)
        assert pending.path.name.startswith(TMP_PREFIX)
        assert (pending.path / "os-release").read_bytes() == b"v1\n"  # from the parent
        _write(pending.sandbox, b"os-release", b"v2\n")
        assert _entries(dest) == sorted(["slot-a", pending.path.name])  # not visible yet
        b = subs.finish(pending)
        assert subs.find(UUID_B) == b.path == dest / "slot-b"
        assert find_subvolume(dest, UUID_A, btrfs=subs.btrfs) == a.path
        snap = Snapshot(path=b"c", uuid=uuid.uuid4(), ctransid=1, clone_uuid=UUID_B,
                        clone_ctransid=9)
        assert find_parent(dest, snap) == b.path
    assert _entries(dest) == ["slot-a", "slot-b"]
    assert (dest / "slot-a" / "os-release").read_bytes() == b"v1\n"  # the parent untouched
    assert (dest / "slot-b" / "os-release").read_bytes() == b"v2\n"
    assert (b.uuid, b.ctransid, b.parent_uuid, b.parent_path) == (UUID_B, 9, UUID_A, a.path)
    if b.btrfs:  # what the kernel recorded, as btrfs-progs shows it
        shown_a, shown_b = subvolume_show(a.path), subvolume_show(b.path)
        assert shown_b["Received UUID"] == str(UUID_B)
        assert shown_b["Parent UUID"] == shown_a["UUID"]
        assert shown_a["Received UUID"] == str(UUID_A)
        assert shown_a["Flags"] == shown_b["Flags"] == "readonly"
    else:
        entries = {e.name: e for e in Registry(dest).entries()}
        assert (entries["slot-b"].uuid, entries["slot-b"].parent_uuid) == (UUID_B, UUID_A)
        assert (entries["slot-a"].uuid, entries["slot-a"].ctransid) == (UUID_A, 7)


def test_a_hook_raising_keep_on_leaves_the_complete_subvolume_to_finish_later(
        dest: Path) -> None:
    """What replication does when the connection is cut while it waits for the COMMIT:
    the complete subvolume stays under its temporary name (sealed on btrfs), and a later
    finish of it reopened (not sealed again: the kernel refuses that) gives it its name."""

    def cut(pending: PendingSubvol) -> None:
        raise TransportError("cut")

    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7, tmp=b".btrdelta-tmp-kept-partial")
        _write(pending.sandbox, b"f", b"content")
        with pytest.raises(TransportError):
            subs.finish(pending, pre_commit=cut, keep_on=(TransportError,))
        assert pending.done
        assert not (dest / "slot").exists()
        assert (dest / ".btrdelta-tmp-kept-partial" / "f").read_bytes() == b"content"
        again = subs.reopen(b"slot", b".btrdelta-tmp-kept-partial", UUID_A, 7)
        # a receiver killed after sealing it applies END again: finish without sealed=True
        done = subs.finish(again, pre_commit=lambda p: None)
    assert (done.path / "f").read_bytes() == b"content"
    assert _entries(dest) == ["slot"]
    if done.btrfs:
        show = subvolume_show(done.path)
        assert "readonly" in show["Flags"]
        assert show["Received UUID"] == str(UUID_A)


def test_pre_commit_hook_sees_the_finished_temporary_and_can_refuse_it(dest: Path) -> None:
    seen: list[bytes] = []
    with Subvolumes(dest) as subs:

        def refuse(pending: PendingSubvol) -> None:
            assert pending.sandbox is not None  # still open: the hook may read through it
            assert not (dest / "slot").exists()
            seen.append((pending.path / "f").read_bytes())
            if subs.btrfs:  # already read-only: what is verified is what becomes visible
                with pytest.raises(OSError, match="Read-only") as info:
                    _write(pending.sandbox, b"f", b"changed")
                assert info.value.errno == errno.EROFS
            raise ChecksumError("signature does not verify")

        pending = subs.begin(b"slot", UUID_A, 7)
        _write(pending.sandbox, b"f", b"content")
        with pytest.raises(ChecksumError, match="signature"):
            subs.finish(pending, pre_commit=refuse)
        assert pending.done
        subs.abort(pending)  # after a failed finish: nothing more to do
        with pytest.raises(ValueError, match="already"):
            subs.finish(pending)
        assert subs.find(UUID_A) is None
    assert seen == [b"content"]
    assert _entries(dest) == []  # neither the final name nor the temporary
    if subs.btrfs:
        assert TMP_PREFIX not in progs("subvolume", "list", dest)


def test_abort_and_refused_begins(dest: Path) -> None:
    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7)
        _write(pending.sandbox, b"f", b"x")
        subs.abort(pending)
        subs.abort(pending)
        assert _entries(dest) == []
        (dest / "taken").mkdir()
        with pytest.raises(ApplyError, match="already exists"):
            subs.begin(b"taken", UUID_A, 7)
        for bad in (b"", b"..", b"a/b", b"."):
            with pytest.raises(UnsafePathError):
                subs.begin(bad, UUID_A, 7)
        # (a parent is looked up on the whole filesystem on btrfs, as btrfs receive does:
        # a UUID no subvolume has)
        with pytest.raises(MissingBaseError, match="parent"):
            subs.begin(b"slot", UUID_B, 8, parent_uuid=uuid.uuid4())
        assert _entries(dest) == ["taken"]
    with Subvolumes(dest, dry_run=True) as dry:
        done = dry.finish(dry.begin(b"slot", UUID_A, 7))
        assert done.path == dest / "slot"
    assert _entries(dest) == ["taken"]


def test_receive_runs_the_hook_before_each_final_name(dest: Path) -> None:
    names: list[str] = []

    def check(pending: PendingSubvol) -> None:
        names.append(pending.path.name)
        assert (pending.path / "d" / "f").read_bytes() == b"hello" * 100
        if pending.uuid == UUID_B:
            raise ChecksumError("signature does not verify")

    (done,) = receive(events(FULL), dest, pre_commit=check)
    assert done.name == "A"
    second = [subvol(b"B", UUID_B, 8), *FULL[1:]]
    with pytest.raises(ChecksumError) as info:
        receive(events(second), dest, pre_commit=check)
    assert info.value.index == len(FULL) - 1  # located at the END that finished it
    assert [n.startswith(TMP_PREFIX) for n in names] == [True, True]
    assert _entries(dest) == ["A"]


def _refused(root: Path) -> list[str]:
    """The changes to the tree at ``root`` the kernel refused with EROFS (each tried)."""
    tries = {
        "write": lambda: os.close(os.open(root / "f", os.O_WRONLY)),
        "create": lambda: os.close(os.open(root / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
        "utimes": lambda: os.utime(root / "f", ns=(1, 1)),
        "chmod": lambda: os.chmod(root / "f", 0o600),
        "setxattr": lambda: os.setxattr(root / "f", "user.x", b"1"),
        "mkdir": lambda: os.mkdir(root / "d"),
        "rename": lambda: os.rename(root / "f", root / "g"),
        "unlink": lambda: os.unlink(root / "f"),
    }
    out = []
    for name, change in tries.items():
        try:
            change()
        except OSError as exc:
            if exc.errno == errno.EROFS:
                out.append(name)
    return out


class _WhileSealing:
    """A pre-commit hook that runs while the read-only flag commits."""

    while_sealing = True

    def __init__(self, hook: Callable[[PendingSubvol], object]) -> None:
        self.hook = hook

    def __call__(self, pending: PendingSubvol) -> None:
        self.hook(pending)


def _slow_flag(monkeypatch: pytest.MonkeyPatch, *, before: float = 0.0,
               after: float = 0.0) -> threading.Event:
    """The read-only flag's ioctl starts ``before`` s late and returns ``after`` s late (a
    longer commit); the event is set once it has returned."""
    from btrdelta.receive import subvolumes

    real = subvolumes.set_readonly
    returned = threading.Event()

    def set_readonly(fd: int, readonly: bool = True) -> None:
        time.sleep(before)
        real(fd, readonly)
        time.sleep(after)
        returned.set()

    monkeypatch.setattr(subvolumes, "set_readonly", set_readonly)
    return returned


def test_a_hook_runs_after_the_read_only_flag_committed_unless_it_says_otherwise(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook without ``while_sealing`` (the replica's, which records the new version in its
    state before the final name) runs after the flag's ioctl returned, as before."""
    returned = _slow_flag(monkeypatch, after=0.1)
    dest = btrfs_mnt / f"dest-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    seen: list[bool] = []
    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7)
        subs.finish(pending, pre_commit=lambda p: seen.append(returned.is_set()))
    assert seen == [True]


@pytest.mark.parametrize("slow", ["flag", "commit"])
def test_the_hook_sees_the_read_only_subvolume_while_the_flag_commits(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch, slow: str) -> None:
    """The pre-commit hook runs once the read-only flag is in effect, while its transaction
    still commits (the ioctl has not returned: ``commit``, a commit 0.3 s longer), and not
    before the flag is set (``flag``: the ioctl starts 0.3 s late): each time the kernel
    already refuses every change the hook tries."""
    returned = _slow_flag(monkeypatch, before=0.3 if slow == "flag" else 0.0,
                          after=0.3 if slow == "commit" else 0.0)
    dest = btrfs_mnt / f"dest-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    seen: list[tuple[list[str], bool]] = []
    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7)
        _write(pending.sandbox, b"f", b"content")
        done = subs.finish(pending, pre_commit=_WhileSealing(lambda p: seen.append(
            (_refused(p.path), returned.is_set()))))
    ((refused, after_return),) = seen
    assert refused == ["write", "create", "utimes", "chmod", "setxattr", "mkdir", "rename",
                       "unlink"]
    assert slow == "flag" or not after_return  # "commit": the hook ran 0.3 s before it
    assert returned.is_set()  # before the final name
    assert (done.path / "f").read_bytes() == b"content"
    show = subvolume_show(done.path)
    assert show["Flags"] == "readonly"
    assert show["Received UUID"] == str(UUID_A)


@pytest.mark.parametrize(("when", "hook_fails"), [("before", False), ("after", False),
                                                 ("after", True)])
def test_a_read_only_flag_that_fails_removes_the_subvolume(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch, when: str, hook_fails: bool) -> None:
    """The flag's ioctl failing (``before`` it took effect, or ``after``: set, then cleared
    as the kernel clears it when its commit fails): its error is raised, the hook's instead
    when the hook failed too, and the subvolume is removed; a flag that never took effect
    does not run the hook on a writable subvolume."""
    from btrdelta.receive import subvolumes

    real = subvolumes.set_readonly

    def set_readonly(fd: int, readonly: bool = True) -> None:
        if when == "after":
            real(fd, True)
            time.sleep(0.3)
            real(fd, False)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(subvolumes, "set_readonly", set_readonly)
    dest = btrfs_mnt / f"dest-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    calls: list[list[str]] = []

    def hook(pending: PendingSubvol) -> None:
        calls.append(_refused(pending.path))
        if hook_fails:
            raise ChecksumError("does not verify")

    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7)
        _write(pending.sandbox, b"f", b"content")
        with pytest.raises(ChecksumError if hook_fails else OSError) as info:
            subs.finish(pending, pre_commit=_WhileSealing(hook))
        assert hook_fails or info.value.errno == errno.EIO
        assert calls == ([] if when == "before" else [["write", "create", "utimes", "chmod",
                                                      "setxattr", "mkdir", "rename",
                                                      "unlink"]])
        assert subs.find(UUID_A) is None
    assert _entries(dest) == []
    assert TMP_PREFIX not in progs("subvolume", "list", dest)


def test_the_flag_is_waited_for_when_its_effect_cannot_be_seen(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root that refused writes before the flag (not root, an immutable directory): the
    change cannot be seen, so the hook waits for the ioctl to return."""
    from btrdelta.receive import subvolumes

    returned = _slow_flag(monkeypatch, after=0.3)
    dest = btrfs_mnt / f"dest-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    with Subvolumes(dest) as subs:
        pending = subs.begin(b"slot", UUID_A, 7)
        assert pending.sandbox is not None
        flag = subvolumes._ReadOnly(pending.sandbox.root_fd)
        flag.begin()
        flag.wait_in_effect(was_writable=False)
        assert returned.is_set()
        flag.end()
        flag.end()  # (once more: nothing)
        subs.abort(pending)


def _made_by(monkeypatch: pytest.MonkeyPatch, call: str = "create_snapshot") -> list[str]:
    """Names of the threads that create snapshots (the subvolumes module's calls; or
    copies: ``copy_tree``)."""
    from btrdelta.receive import subvolumes

    seen: list[str] = []
    real = getattr(subvolumes, call)

    def spy(*args: object, **kwargs: object) -> None:
        seen.append(threading.current_thread().name)
        real(*args, **kwargs)

    monkeypatch.setattr(subvolumes, call, spy)
    return seen


class _Sealing:
    """A hook run while the read-only flag commits; what it saw."""

    while_sealing = True

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def __call__(self, pending: PendingSubvol) -> None:
        assert pending.sandbox is not None
        self.seen.append(os.access(".", os.W_OK, dir_fd=pending.sandbox.root_fd))


def _parent_subvol(dest: Path, subs: Subvolumes) -> Path:
    first = subs.begin(b"parent", UUID_A, 7)
    _write(first.sandbox, b"os-release", b"v1\n")
    return subs.finish(first).path


def test_a_snapshot_made_ahead_is_the_one_begin_takes(btrfs_mnt: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """:meth:`Subvolumes.snapshot_ahead` snapshots the parent in a thread before the
    SNAPSHOT record is at hand; ``begin`` of that name, UUID and parent takes it (no
    second snapshot), and the kernel records it as a snapshot of the parent. With a hook
    that runs while sealing, the same thread sets the read-only flag (no other starts);
    without one it is stopped and the seal is made as before."""
    from btrdelta.receive import subvolumes

    flagged: list[str] = []
    real_flag = subvolumes.set_readonly

    def set_readonly(fd: int, flag: bool) -> None:
        flagged.append(threading.current_thread().name)
        real_flag(fd, flag)

    monkeypatch.setattr(subvolumes, "set_readonly", set_readonly)
    for sealing in (_Sealing(), None):
        dest = btrfs_mnt / f"ahead-{uuid.uuid4().hex[:8]}"
        dest.mkdir()
        made = _made_by(monkeypatch)
        flagged.clear()
        with Subvolumes(dest, parents={}) as subs:
            parent = _parent_subvol(dest, subs)
            assert subs.parents is not None
            subs.parents[UUID_A] = parent
            subs.snapshot_ahead((b"next", UUID_B, UUID_A))
            pending = subs.begin(b"next", UUID_B, 9, parent_uuid=UUID_A)
            assert made == ["btrdelta-snapshot"]
            assert (pending.path / "os-release").read_bytes() == b"v1\n"
            _write(pending.sandbox, b"os-release", b"v2\n")
            done = subs.finish(pending, pre_commit=sealing)
        assert _entries(dest) == ["next", "parent"]
        assert (done.path / "os-release").read_bytes() == b"v2\n"
        shown, shown_parent = subvolume_show(done.path), subvolume_show(parent)
        assert shown["Parent UUID"] == shown_parent["UUID"]
        assert shown["Received UUID"] == str(UUID_B)
        assert shown["Flags"] == "readonly"
        assert flagged == ["MainThread", "btrdelta-snapshot" if sealing else "MainThread"]
        assert sealing is None or sealing.seen == [False]
        assert not [t for t in threading.enumerate() if t.name == "btrdelta-snapshot"]


@pytest.mark.parametrize("other", ["name", "uuid", "parent", "unused"])
def test_a_snapshot_made_ahead_for_something_else_is_deleted(
        btrfs_mnt: Path, other: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One that ``begin`` is not called for as it was made (another name, UUID or parent)
    is deleted and ``begin`` makes its own; one never taken is deleted at close: no
    temporary is left in DEST."""
    dest = btrfs_mnt / f"ahead-{other}-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    made = _made_by(monkeypatch)
    with Subvolumes(dest, parents={}) as subs:
        parent = _parent_subvol(dest, subs)
        empty = subs.finish(subs.begin(b"empty", uuid.UUID(int=0xE), 3))
        assert subs.parents is not None
        subs.parents[UUID_A] = parent
        subs.parents[empty.uuid] = empty.path
        subs.snapshot_ahead((b"next", UUID_B, UUID_A))
        if other == "unused":
            while not any(p.name.startswith(TMP_PREFIX) for p in dest.iterdir()):
                time.sleep(0.001)
            assert made == ["btrdelta-snapshot"]
        else:
            name = b"other" if other == "name" else b"next"
            wanted = uuid.UUID(int=0xC) if other == "uuid" else UUID_B
            base = empty.uuid if other == "parent" else UUID_A
            pending = subs.begin(name, wanted, 9, parent_uuid=base)
            assert made == ["btrdelta-snapshot", "MainThread"]
            assert (pending.path / "os-release").exists() == (other != "parent")
            subs.finish(pending, pre_commit=_Sealing())
    assert not [p for p in _entries(dest) if p.startswith(TMP_PREFIX)]
    assert not [t for t in threading.enumerate() if t.name == "btrdelta-snapshot"]


def test_a_snapshot_that_cannot_be_made_ahead_is_refused_by_begin(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's failure is not raised there: ``begin`` makes the snapshot again and
    raises what the kernel says (the temporary name taken: EEXIST)."""
    dest = btrfs_mnt / f"ahead-fails-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    made = _made_by(monkeypatch)
    with Subvolumes(dest, parents={}) as subs:
        parent = _parent_subvol(dest, subs)
        assert subs.parents is not None
        subs.parents[UUID_A] = parent
        taken = f"{TMP_PREFIX}{UUID_B.hex[:12]}-{os.getpid()}"
        (dest / taken).mkdir()
        subs.snapshot_ahead((b"next", UUID_B, UUID_A))
        with pytest.raises(FileExistsError):
            subs.begin(b"next", UUID_B, 9, parent_uuid=UUID_A)
        assert made == ["btrdelta-snapshot", "MainThread"]
    assert _entries(dest) == sorted(["parent", taken])  # not ours: left alone


def test_no_snapshot_is_made_ahead_without_a_known_parent_or_in_a_dry_run(
        btrfs_mnt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = btrfs_mnt / f"ahead-none-{uuid.uuid4().hex[:8]}"
    dest.mkdir()
    made = _made_by(monkeypatch)
    with Subvolumes(dest, parents={}) as subs:
        subs.snapshot_ahead((b"next", UUID_B, UUID_A))
    with Subvolumes(dest, dry_run=True, parents={UUID_A: dest}) as dry:
        dry.snapshot_ahead((b"next", UUID_B, UUID_A))
    with Subvolumes(dest, backend="dir", parents={UUID_A: dest}) as dirs:
        dirs.snapshot_ahead((b"next", UUID_B, UUID_A))
    assert made == []
    assert _entries(dest) == []


@pytest.mark.parametrize("other", ["taken", "uuid", "unused"])
def test_a_copy_made_ahead_on_the_directory_backend(tmp_path: Path, other: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On the directory backend :meth:`Subvolumes.snapshot_ahead` copies the parent in a
    thread; ``begin`` of that name, UUID and parent takes the copy (no second copy), one
    made for something else is removed and ``begin`` copies again, one never taken is
    removed at close; the parent is untouched and no temporary is left in DEST."""
    copies = _made_by(monkeypatch, "copy_tree")
    dest = tmp_path / "dest"
    dest.mkdir()
    with Subvolumes(dest, backend="dir", parents={}) as subs:
        parent = _parent_subvol(dest, subs)
        assert subs.parents is not None
        subs.parents[UUID_A] = parent
        subs.snapshot_ahead((b"next", UUID_B, UUID_A))
        if other == "unused":
            deadline = time.monotonic() + 30
            while not copies and time.monotonic() < deadline:
                time.sleep(0.001)
            assert copies == ["btrdelta-snapshot"]
        else:
            wanted = UUID_B if other == "taken" else uuid.UUID(int=0xC)
            pending = subs.begin(b"next", wanted, 9, parent_uuid=UUID_A)
            assert copies == (["btrdelta-snapshot"] if other == "taken"
                              else ["btrdelta-snapshot", "MainThread"])
            assert (pending.path / "os-release").read_bytes() == b"v1\n"
            _write(pending.sandbox, b"os-release", b"v2\n")
            done = subs.finish(pending)
            assert (done.path / "os-release").read_bytes() == b"v2\n"
            assert subs.find(wanted) == done.path
    assert (parent / "os-release").read_bytes() == b"v1\n"
    assert _entries(dest) == (["parent"] if other == "unused" else ["next", "parent"])
    assert not [t for t in threading.enumerate() if t.name == "btrdelta-snapshot"]


def test_a_hook_that_does_not_register_leaves_the_registry_alone(tmp_path: Path) -> None:
    """On the directory backend a ``pre_commit`` whose ``register`` is false gets its tree
    under its final name, checked, but no registry entry (nothing finds it by UUID); the
    registry's other entries stay."""

    class Unregistered:
        register = False

        def __init__(self) -> None:
            self.seen: list[bytes] = []

        def __call__(self, pending: PendingSubvol) -> None:
            self.seen.append(pending.name)

    dest = tmp_path / "dest"
    dest.mkdir()
    hook = Unregistered()
    with Subvolumes(dest, backend="dir") as subs:
        parent = _parent_subvol(dest, subs)
        pending = subs.begin(b"next", UUID_B, 9, parent=parent)
        _write(pending.sandbox, b"os-release", b"v2\n")
        done = subs.finish(pending, pre_commit=hook)
        assert hook.seen == [b"next"]
        assert (done.path / "os-release").read_bytes() == b"v2\n"
        assert subs.find(UUID_B) is None
        assert subs.find(UUID_A) == parent
    assert _entries(dest) == ["next", "parent"]


class _Ahead:
    """A pre-commit hook whose entry is written while it runs (``register_ahead``): it
    waits (up to 30 s) until the registry names the new tree, then does ``then``."""

    register_ahead = True

    def __init__(self, subs: Subvolumes, then: Callable[[], None] = lambda: None) -> None:
        self.subs = subs
        self.then = then
        self.seen: list[tuple[bool, Path | None]] = []

    def __call__(self, pending: PendingSubvol) -> None:
        deadline = time.monotonic() + 30
        listed = False
        while not listed and time.monotonic() < deadline:
            listed = any(e.name == "next" for e in Registry(self.subs.dest).entries())
            time.sleep(0.001)
        self.seen.append((listed, self.subs.find(UUID_B)))
        self.then()


def test_the_entry_is_written_while_the_check_runs(tmp_path: Path) -> None:
    """On the directory backend a ``pre_commit`` whose ``register_ahead`` is true sees the
    registry entry of the tree it checks written while it runs (its ``fsync``s off the
    path); the entry finds nothing until the rename, then the tree under its final name."""
    dest = tmp_path / "dest"
    dest.mkdir()
    with Subvolumes(dest, backend="dir") as subs:
        parent = _parent_subvol(dest, subs)
        hook = _Ahead(subs)
        pending = subs.begin(b"next", UUID_B, 9, parent=parent)
        _write(pending.sandbox, b"os-release", b"v2\n")
        done = subs.finish(pending, pre_commit=hook)
        assert hook.seen == [(True, None)]
        assert subs.find(UUID_B) == done.path == dest / "next"
        assert (done.path / "os-release").read_bytes() == b"v2\n"
    assert _entries(dest) == ["next", "parent"]
    assert not [t for t in threading.enumerate() if t.name == "btrdelta-register"]


def test_a_failed_check_takes_the_entry_written_ahead_back(tmp_path: Path) -> None:
    """A check that fails after the entry was written ahead: the tree is removed, the entry
    taken back (the registry as before), the parent's entry kept."""
    dest = tmp_path / "dest"
    dest.mkdir()

    def fail() -> None:
        raise ChecksumError("received next does not have its content identity")

    with Subvolumes(dest, backend="dir") as subs:
        parent = _parent_subvol(dest, subs)
        hook = _Ahead(subs, fail)
        pending = subs.begin(b"next", UUID_B, 9, parent=parent)
        with pytest.raises(ChecksumError):
            subs.finish(pending, pre_commit=hook)
        assert hook.seen == [(True, None)]
        assert [e.name for e in Registry(dest).entries()] == ["parent"]
        assert subs.find(UUID_A) == parent
    assert _entries(dest) == ["parent"]


def test_a_receiver_killed_during_the_check_leaves_an_entry_that_finds_nothing(
        tmp_path: Path) -> None:
    """``kill -9`` (as a power cut) while the check runs, the entry already written ahead:
    nothing is under the final name, the entry finds nothing, and the next receive of
    that name sweeps the temporary and is found by its UUID."""
    import signal
    import subprocess
    import sys

    dest = tmp_path / "dest"
    dest.mkdir()
    with Subvolumes(dest, backend="dir") as subs:
        parent = _parent_subvol(dest, subs)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from tests.receive.test_subvolumes import UUID_B, _Ahead, _write\n"
        "from btrdelta.receive import Subvolumes\n"
        "dest = Path(sys.argv[1])\n"
        "with Subvolumes(dest, backend='dir') as subs:\n"
        "    pending = subs.begin(b'next', UUID_B, 9, parent=dest / 'parent')\n"
        "    _write(pending.sandbox, b'os-release', b'v2\\n')\n"
        "    subs.finish(pending, pre_commit=_Ahead(subs, lambda: os.kill(os.getpid(), "
        "signal.SIGKILL)))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script, str(dest)], env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "next" in [e.name for e in Registry(dest).entries()]
    assert not (dest / "next").exists()
    left = [n for n in _entries(dest) if n != "parent"]
    assert len(left) == 1
    assert left[0].startswith(TMP_PREFIX)
    with Subvolumes(dest, backend="dir") as subs:
        assert subs.find(UUID_B) is None
        pending = subs.begin(b"next", UUID_B, 9, parent=parent)
        _write(pending.sandbox, b"os-release", b"v3\n")
        done = subs.finish(pending)
        assert subs.find(UUID_B) == done.path == dest / "next"
    assert (dest / "next" / "os-release").read_bytes() == b"v3\n"
    assert _entries(dest) == ["next", "parent"]


def test_an_entry_written_ahead_of_a_receive_that_fails_is_taken_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``receive()`` a hook whose ``register_ahead`` is true has the entry written
    from the subvolume's first record on (by the thread ``begin`` started); a record that
    fails before the end takes it back: the registry as before, nothing left in DEST."""
    from btrdelta.stream.records import Write

    calls: list[tuple[str, str]] = []
    add, remove = Registry.add, Registry.remove
    monkeypatch.setattr(Registry, "add", lambda self, e: (calls.append(("add", e.name)),
                                                          add(self, e))[1])
    monkeypatch.setattr(Registry, "remove", lambda self, n, u: (calls.append(("remove", n)),
                                                                remove(self, n, u))[1])

    class Check:
        register_ahead = True

        def __call__(self, pending: PendingSubvol) -> None:
            raise AssertionError("not reached")

    dest = tmp_path / "dest"
    dest.mkdir()
    broken = [*FULL[:-1], Write(path=b"no/such/file", offset=0, data=b"x"), FULL[-1]]
    with pytest.raises(ApplyError):
        receive(events(broken), dest, pre_commit=Check(), backend="dir")
    assert calls == [("add", "A"), ("remove", "A")]
    assert Registry(dest).entries() == []
    assert _entries(dest) == []
    assert not [t for t in threading.enumerate() if t.name == "btrdelta-register"]
