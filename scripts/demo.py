"""`make demo`: the whole update story on data this script makes itself (needs root).

1. a btrfs on a loop file; release v1, then v2 *rebuilt* (every file rewritten, a few changed)
2. the kernel's full and incremental send streams; btrdelta verify / stat / dump on them
3. a delta stream: the incremental stream with binary patches; expanded back bit for bit
4. a device without btrfs (ext4): btrdelta receive of v1, then of the delta; tree-sum check;
   the same on btrfs, where unchanged files are reflinked from v1
5. userspace send from plain directories, received by the kernel's btrfs receive
6. whole images: a chunk archive served over HTTP, cloned reusing what the device has
7. a device: factory base and A/B slots on btrfs, install by delta, boot counting brings the
   old root back after a bad update, mark-good, overlays, factory reset, backup
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from btrdelta.testing.loopfs import loop_fs

BOLD, DIM, END = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{END}", flush=True)


def sh(cmd: str, *, show: int = 12, check: bool = True, pipefail: bool = True) -> str:
    """Run a shell command as a user would type it; print it and the head of its output.
    ``pipefail``: a failure anywhere in a pipeline fails it (off for ``... | head``, whose
    writer exits 141 when head stops reading, as coreutils' do)."""
    print(f"$ {cmd}", flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    opts = ["-o", "pipefail"] if pipefail else []
    proc = subprocess.run(["bash", *opts, "-c", cmd], capture_output=True,
                          text=True, env=env, check=False)
    out = (proc.stdout + proc.stderr).rstrip("\n")
    lines = out.splitlines()
    for line in lines[:show]:
        print(f"  {DIM}{line}{END}")
    if len(lines) > show:
        print(f"  {DIM}... ({len(lines) - show} more lines){END}")
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: command failed ({proc.returncode}): {cmd}")
    return proc.stdout


def size(path: Path) -> int:
    return path.stat().st_size


def make_release(src: Path, dst: Path) -> None:
    """v1: a real tree (a slice of Python's standard library) as an 'application'."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("json", "email", "http", "xml", "asyncio", "importlib", "logging",
                 "unittest", "urllib", "concurrent", "sqlite3", "encodings"):
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / "lib" / name,
                            ignore=shutil.ignore_patterns("__pycache__", "test*"))
    (dst / "VERSION").write_text("1.0.0\n")
    (dst / "etc").mkdir()
    (dst / "etc/app.conf").write_text("threads = 4\nlog = /var/log/app.log\n")
    for where in ("var", "home"):  # where `device mount` puts the device's state
        (dst / where).mkdir()


def rebuild_release(v1: Path, v2: Path) -> None:
    """v2: the same release rebuilt from scratch: new inodes everywhere, ~1/4 of the files
    changed a little, a few added, removed and renamed (what a CI build produces)."""
    rng = random.Random(2)
    shutil.copytree(v1, v2, symlinks=True)  # fresh copies: the kernel sees new files
    files = sorted(p for p in v2.rglob("*.py") if p.is_file())
    for p in rng.sample(files, len(files) // 4):
        lines = p.read_text(errors="surrogateescape").splitlines(keepends=True)
        at = rng.randrange(len(lines) + 1)
        lines.insert(at, f"# rebuilt for 2.0.0 ({rng.randrange(10**6)})\n")
        p.write_text("".join(lines), errors="surrogateescape")
    for p in rng.sample(files, 5):
        if p.exists():
            p.unlink()
    (v2 / "lib/json").rename(v2 / "lib/json2")
    (v2 / "VERSION").write_text("2.0.0\n")
    (v2 / "lib/new_module.py").write_text("def hello():\n    return 'v2'\n" * 50)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (loop devices, mount).", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="btrdelta-demo-")))
        os.chdir(work)

        step("1. A btrfs on a loop file; release v1, then v2 rebuilt from scratch")
        src = stack.enter_context(loop_fs("btrfs", size="1G"))
        print(f"  btrfs mounted at {src}")
        sh(f"btrfs -q subvolume create {src}/app")
        make_release(stdlib, src / "app")
        sh(f"btrfs -q subvolume snapshot -r {src}/app {src}/v1")
        rebuild_release(src / "v1", work / "build-v2")  # the CI output of release 2
        sh(f"rm -rf {src}/app/* && cp -a {work}/build-v2/. {src}/app/")
        sh(f"btrfs -q subvolume snapshot -r {src}/app {src}/v2")
        sh(f"du -sh {src}/v1 {src}/v2")

        step("2. The kernel sends v1 (full) and v1 -> v2 (incremental); btrdelta reads them")
        sh(f"btrfs -q send -f v1.stream {src}/v1")
        sh(f"btrfs -q send -p {src}/v1 -f v1-v2.stream {src}/v2")
        sh("btrdelta verify -f v1.stream && btrdelta verify -f v1-v2.stream")
        sh("btrdelta stat -f v1-v2.stream", show=30)
        # dump exits 141 (EPIPE) when head stops reading first, as btrfs receive --dump
        sh("btrdelta dump -f v1-v2.stream | head -8", pipefail=False)
        sh("cmp <(btrdelta dump -f v1-v2.stream) <(btrfs receive --dump -f v1-v2.stream)"
           " && echo 'dump is byte-identical to btrfs receive --dump'")

        step("3. A delta stream: writes replaced by binary patches against v1")
        sh(f"btrdelta delta make -f v1-v2.stream --old {src}/v1 -o v1-v2.delta")
        sh("btrdelta stat -f v1-v2.delta", show=20)
        sh("zstd -q -19 --long=27 -f v1-v2.stream -o v1-v2.stream.zst")
        kernel, zst, delta = (size(Path(p)) for p in
                              ("v1-v2.stream", "v1-v2.stream.zst", "v1-v2.delta"))
        print(f"  kernel incremental stream   {kernel:>12,} bytes")
        print(f"  ... compressed zstd -19     {zst:>12,} bytes")
        print(f"  btrdelta delta stream       {delta:>12,} bytes"
              f"  ({kernel / max(delta, 1):.1f}x smaller than the kernel stream)")
        sh(f"btrdelta delta expand -f v1-v2.delta --old {src}/v1 -o back.stream"
           " && cmp back.stream v1-v2.stream && echo 'expanded stream is bit-identical'")

        step("4. A device receives v1, then applies the delta directly: ext4, then btrfs")
        dev = stack.enter_context(loop_fs("ext4", size="512M"))
        sh(f"btrdelta receive -f v1.stream {dev}")
        sh(f"btrdelta receive -f v1-v2.delta {dev}")
        sh(f"ls {dev}")
        sh(f"btrdelta tree-sum --ignore-root-mtime --compare {dev}/v2 {src}/v2")
        print("  (on a btrfs device, unchanged files are reflinked from v1 instead:)")
        bdev = stack.enter_context(loop_fs("btrfs", size="512M"))
        sh(f"btrfs -q receive -f v1.stream {bdev} && btrdelta receive -f v1-v2.delta {bdev}")
        sh(f"btrdelta tree-sum --ignore-root-mtime --compare {bdev}/v2 {src}/v2")
        sh(f"sync && btrfs filesystem du -s {bdev}/v2")

        step("5. Userspace send from plain directories (a build host without btrfs)")
        plain = work / "plain"
        sh(f"mkdir -p {plain} && cp -a {src}/v1 {plain}/v1 && cp -a {src}/v2 {plain}/v2")
        sh(f"btrdelta send {plain}/v1 -o us-v1.stream && "
           f"btrdelta send --parent {plain}/v1 {plain}/v2 -o us-v1-v2.stream")
        print(f"  userspace incremental {size(Path('us-v1-v2.stream')):>12,} bytes vs kernel's "
              f"{kernel:,} (the kernel resends every rebuilt file)")
        dst = stack.enter_context(loop_fs("btrfs", size="1G"))
        sh(f"btrfs -q receive -f us-v1.stream {dst} && btrfs -q receive -f us-v1-v2.stream {dst}")
        sh(f"btrdelta tree-sum --ignore-root-mtime --compare {dst}/v2 {plain}/v2")

        step("6. Whole images: a chunk archive on a dumb HTTP server, cloned incrementally")
        for v in ("v1", "v2"):
            sh(f"mkfs.ext4 -q -F -d {src}/{v} -U 6ba7b810-9dad-11d1-80b4-00c04fd430c8 "
               f"-E root_owner=0:0 {v}.ext4 64M")
            sh(f"mkdir -p srv && btrdelta image compress -i {v}.ext4 -o srv/{v}.bdar")
        log = work / "serve.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "btrdelta", "serve", "--port", "0", str(work / "srv")],
            stderr=log.open("w"), stdout=subprocess.PIPE, text=True)
        stack.callback(server.terminate)
        port = _wait_port(log)
        url = f"http://127.0.0.1:{port}"
        sh(f"btrdelta image clone {url}/v1.bdar store/v1")
        sh(f"btrdelta image clone --dry-run {url}/v2.bdar store/v2")
        sh(f"btrdelta image clone {url}/v2.bdar store/v2 --output v2.out")
        sh("cmp v2.out v2.ext4 && echo 'cloned v2 image is bit-identical'")
        print(f"  v2 archive {size(Path('srv/v2.bdar')):,} bytes; "
              "the clone fetched only the chunks v1 did not have (see above)")
        # no store at all: straight onto the "slot" that holds v1, updated in place
        sh("cp v1.ext4 slot-b.img")
        sh(f"btrdelta image clone {url}/v2.bdar --output slot-b.img --in-place")
        sh("cmp slot-b.img v2.ext4 && echo 'slot B now holds v2, bit-identical, no store used'")
        device_story(stack, src, work)
    print(f"\n{BOLD}demo finished in {time.monotonic() - t0:.0f} s{END}")
    return 0


def device_story(stack: ExitStack, src: Path, work: Path) -> None:
    """7. The device workflow on a loop btrfs (docs/device.md)."""
    step("7. A device: A/B roots fed by the delta, boot counting, overlays, factory reset")
    top = stack.enter_context(loop_fs("btrfs", size="1G"))
    sh(f"btrdelta device init {top} --factory v1.stream --tries 2")
    sh(f"btrfs subvolume get-default {top}")
    sh(f"btrdelta device install {top} v1-v2.delta")
    sh(f"btrdelta device status {top}")
    boot = Path(__file__).resolve().parents[1] / "contrib/boot/btrdelta-boot.sh"
    print("  three boots; v2 never marks itself good (its health check fails):")
    for _ in range(3):
        sh(f"busybox sh {boot} select {top}")
    sh(f"btrdelta device status {top}")
    print("  the old root is back by itself; install again, boot, health check passes:")
    sh(f"btrdelta device mark-bad {top} --slot b")
    sh(f"btrdelta device install {top} v1-v2.delta && busybox sh {boot} select {top}")
    sh(f"btrdelta device mark-good {top} --slot b && btrfs subvolume get-default {top}")
    sh(f"btrdelta tree-sum --ignore-root-mtime --compare {top}/roots/b {src}/v2")
    sysroot = work / "sysroot"
    sysroot.mkdir()
    sh(f"btrdelta device mount {top} {sysroot}")
    sh(f"echo device-1 > {sysroot}/etc/hostname && touch {sysroot}/x 2>&1 | head -1",
       check=False)
    sh(f"umount -R {sysroot}; btrdelta device diff {top}")
    sh(f"btrdelta device backup {top} home backups && ls backups")
    sh(f"btrdelta device factory-reset {top} --keep home && btrdelta device status {top}")


def _wait_port(log: Path) -> int:
    for _ in range(100):
        text = log.read_text() if log.exists() else ""
        if "http://127.0.0.1:" in text:  # "serving DIR on http://127.0.0.1:PORT/"
            return int(text.split("http://127.0.0.1:")[1].split("/")[0])
        time.sleep(0.05)
    raise SystemExit(f"demo: btrdelta serve did not start: {shlex.quote(log.read_text())}")


if __name__ == "__main__":
    sys.exit(main())
