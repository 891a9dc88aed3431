"""A small virtual machine for power-cut tests of device workflows (``make vmtest``).

``VmKit.prepare(cache)`` fetches Debian's kernel package with ``apt-get download`` (once),
extracts the kernel as an ELF ``vmlinux`` (booted through its PVH entry: no decompression,
no BIOS wait) and builds an initramfs of busybox-static, the modules the device needs
(btrfs, overlay, virtio, 9p, with their dependencies from ``depmod``), the initramfs
script of ``contrib/boot`` and an ``/init`` that acts by the kernel command line:

* ``btrdelta.mode=boot``: select and mount a root as a device boots (spending a try),
  check it (release marker, state subvolumes present, the home marker, whether ``/etc``
  shows the local ``hostname`` of the etc overlay), run its health check (a release marker
  ``bad`` fails it) and, when it is healthy and on trial, mark it good; report one line
  ``BTRDELTA-RESULT choice=... release=... state=... etc=... health=...``; power off.
* ``btrdelta.mode=run``: run ``btrdelta ARGS`` (``btrdelta.args=`` with ``+`` for spaces;
  ``btrdelta.module=`` runs ``python -m MODULE ARGS`` instead, e.g.
  :mod:`btrdelta.testing.cutwrite`) from the host's filesystem, shared read-only over 9p,
  against the virtual disk; print ``BTRDELTA-START`` before and ``BTRDELTA-DONE rc=N``
  after; power off. ``btrdelta.mount=/run/vda`` mounts the disk's btrfs there first (the
  host's ``/run`` is a tmpfs in the guest); ``btrdelta.net=1`` brings up a virtio NIC on
  qemu's user network (the guest 10.0.2.15; the host's loopback is 10.0.2.2 from there; a
  host port can be forwarded to one of the guest's); ``btrdelta.stick=/run/stick`` mounts
  a second disk, ext4 (a USB stick), there.

``VmKit.run(image, mode, ...)`` boots qemu (KVM when it works, else TCG) and returns the
serial console's lines; ``kill_after`` kills qemu (SIGKILL: a power cut) that many seconds
after ``BTRDELTA-START``.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VmKit", "VmResult"]

_MODULES = ("virtio_pci", "virtio_blk", "btrfs", "overlay", "9pnet_virtio", "9p",
            "crc32c_generic", "crc32c-intel", "blake2b_generic", "xxhash_generic",
            "sha256_generic", "virtio_net", "ext4")
_CONTRIB = Path(__file__).resolve().parents[3] / "contrib" / "boot"

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
modprobe -a virtio_pci virtio_blk btrfs overlay 9pnet_virtio 9p virtio_net ext4 2>/dev/null
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
arg() { sed -n "s/.*btrdelta\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
mode=$(arg mode)
finish() { sync; echo "BTRDELTA-END"; poweroff -f; }
mkdir -p /top /sysroot /host
if [ "$mode" = boot ]; then
    if ! mount -t btrfs -o subvolid=5 /dev/vda /top; then
        echo "BTRDELTA-RESULT choice=none release=none state=none etc=none health=none"
        finish
    fi
    choice=$(sh /btrdelta-boot.sh mount /dev/vda /top /sysroot 2>/dev/null | tail -1)
    release=$(cat /sysroot/etc/btrdelta-release 2>/dev/null || echo none)
    state=ok
    for name in etc var home; do [ -d /top/state/$name ] || state=missing-$name; done
    [ "$(cat /sysroot/home/marker 2>/dev/null)" = state-ok ] || state=home-lost
    etc=release
    [ "$(cat /sysroot/etc/hostname 2>/dev/null)" = vm-device ] && etc=local
    health=ok
    [ "$release" = bad ] && health=fail
    [ "$release" = none ] && health=fail
    echo "BTRDELTA-RESULT choice=$choice release=$release state=$state etc=$etc health=$health"
    umount /sysroot/etc /sysroot/var /sysroot/home 2>/dev/null; umount /sysroot
    umount /top
    if [ "$health" = ok ] && [ "$choice" != default ]; then mode=run; good=$choice; fi
fi
if [ "$mode" = run ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 host /host
    mount -t proc proc /host/proc; mount -t sysfs sys /host/sys
    mount -t devtmpfs dev /host/dev; mount -t tmpfs tmp /host/tmp; mount -t tmpfs run /host/run
    if [ "$(arg net)" = 1 ]; then
        ip link set lo up; ip link set eth0 up
        ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
    fi
    at=$(arg mount)
    [ -n "$at" ] && mkdir -p "/host$at" && mount -t btrfs /dev/vda "/host$at"
    at=$(arg stick)
    for i in $(seq 100); do [ -z "$at" ] || [ -b /dev/vdb ] && break; sleep 0.1; done
    [ -n "$at" ] && mkdir -p "/host$at" && mount -t ext4 /dev/vdb "/host$at"
    py=$(arg python); cwd=$(arg cwd); module=$(arg module)
    if [ -n "$good" ]; then args="device mark-good /dev/vda --slot $good"; module=
    else args=$(arg args | tr + ' '); fi
    echo "BTRDELTA-START"
    chroot /host /bin/sh -c "cd $cwd && exec $py -m ${module:-btrdelta} $args" </dev/null
    echo "BTRDELTA-DONE rc=$?"
fi
finish
"""


@dataclass
class VmResult:
    """One boot: the console lines, whether it was killed, seconds taken."""

    lines: list[str]
    killed: bool
    seconds: float
    started: float | None = None  # seconds from boot to BTRDELTA-START
    #: seconds from boot at which each line arrived
    times: list[float] | None = None

    def when(self, text: str) -> float | None:
        """Seconds after BTRDELTA-START at which the first line holding ``text`` came."""
        for line, t in zip(self.lines, self.times or [], strict=False):
            if text in line and self.started is not None:
                return t - self.started
        return None

    def result(self) -> dict[str, str]:
        """The ``BTRDELTA-RESULT`` fields (empty when there is none)."""
        for line in self.lines:
            if line.startswith("BTRDELTA-RESULT "):
                return dict(f.split("=", 1) for f in line.split()[1:])
        return {}

    def done_rc(self) -> int | None:
        """The exit code of the command run in the VM (``None``: it did not finish)."""
        for line in self.lines:
            m = re.match(r"BTRDELTA-DONE rc=(\d+)", line)
            if m:
                return int(m[1])
        return None


#: the kits :meth:`VmKit.prepare` made, by cache directory
_PREPARED: dict[Path, VmKit] = {}


class VmKit:
    """Kernel, initramfs and qemu settings for device power-cut tests."""

    def __init__(self, vmlinux: Path, initrd: Path, accel: str) -> None:
        self.vmlinux = vmlinux
        self.initrd = initrd
        self.accel = accel

    @classmethod
    def prepare(cls, cache: Path) -> VmKit:
        """Fetch and extract the kernel, build the initramfs, pick the accelerator; once per
        process and cache (each test module asks: the probe of KVM takes up to 30 s where
        ``/dev/kvm`` is there but does not boot, as in a VM without nested virtualization)."""
        key = cache.resolve()
        if key not in _PREPARED:
            _PREPARED[key] = cls._prepare(cache)
        return _PREPARED[key]

    @classmethod
    def _prepare(cls, cache: Path) -> VmKit:
        cache.mkdir(parents=True, exist_ok=True)
        kver, root = _kernel(cache)
        vmlinux = cache / "vmlinux"
        if not vmlinux.exists():
            data = (root / "boot" / f"vmlinuz-{kver}").read_bytes()
            start = data.find(b"\xfd7zXZ\x00")
            if start < 0:
                raise RuntimeError("vmlinuz: no xz-compressed kernel inside")
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
            vmlinux.write_bytes(elf)
        initrd = cache / "initrd.cpio.gz"
        _initramfs(root, kver, initrd)
        kit = cls(vmlinux, initrd, "tcg")
        kit.accel = kit._probe_kvm()
        return kit

    def _probe_kvm(self) -> str:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg"
        with tempfile.TemporaryDirectory() as tmp:
            img = Path(tmp) / "empty.img"
            img.write_bytes(b"\0" * (1 << 20))
            probe = VmKit(self.vmlinux, self.initrd, "kvm")
            res = probe.run(img, "probe", timeout=30)
        return "kvm" if any("BTRDELTA-END" in line for line in res.lines) else "tcg"

    def command(self, image: Path, mode: str, args: str = "", module: str = "", *,
                net: bool = False, mount: str = "", forward: tuple[int, int] | None = None,
                stick: tuple[Path, str] | None = None) -> list[str]:
        """The qemu command line.

        ``no_timer_check``: under TCG on a loaded host the kernel's check of the timer
        interrupt through the IO-APIC can time out, and it panics ("IO-APIC + timer doesn't
        work!": one boot of a ``make vmtest`` run in session 12, at load 9-14).
        """
        accel = ["-enable-kvm"] if self.accel == "kvm" else ["-accel", "tcg"]
        append = (f"console=ttyS0 panic=-1 quiet no_timer_check btrdelta.mode={mode} "
                  f"btrdelta.python={sys.executable} btrdelta.cwd={os.getcwd()} "
                  f"btrdelta.args={args.replace(' ', '+')}"
                  + (f" btrdelta.module={module}" if module else "")
                  + (" btrdelta.net=1" if net else "")
                  + (f" btrdelta.mount={mount}" if mount else "")
                  + (f" btrdelta.stick={stick[1]}" if stick else ""))
        user = "user,id=n0" + (f",hostfwd=tcp:127.0.0.1:{forward[0]}-:{forward[1]}"
                               if forward else "")
        nic = ["-netdev", user, "-device", "virtio-net-pci,netdev=n0"] if net else []
        second = ["-drive", f"file={stick[0]},format=raw,if=virtio,cache=none,aio=threads"
                  ] if stick else []
        return ["qemu-system-x86_64", *accel, "-m", "1024", "-smp", "1", "-nodefaults",
                "-no-reboot", "-display", "none", "-serial", "stdio",
                "-kernel", str(self.vmlinux), "-initrd", str(self.initrd),
                "-append", append,
                "-drive", f"file={image},format=raw,if=virtio,cache=none,aio=threads",
                "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,"
                "multidevs=remap", *second, *nic]

    def run(self, image: Path, mode: str, args: str = "", *, kill_after: float | None = None,
            timeout: float = 900, module: str = "", net: bool = False,
            mount: str = "", forward: tuple[int, int] | None = None,
            stick: tuple[Path, str] | None = None,
            on_line: Callable[[str], None] | None = None) -> VmResult:
        """Boot once; with ``kill_after``, SIGKILL qemu that long after BTRDELTA-START;
        ``module``: run ``python -m MODULE ARGS`` instead of ``btrdelta ARGS``; ``net``: a
        NIC on qemu's user network, ``forward``: (host port, guest port) forwarded to it;
        ``mount``: where the disk's btrfs is mounted first; ``stick``: (image, where) a
        second disk, ext4, mounted at ``where``; ``on_line``: called with each console line
        as it comes."""
        t0 = time.monotonic()
        proc = subprocess.Popen(self.command(image, mode, args, module, net=net, mount=mount,
                                             forward=forward, stick=stick),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        lines: list[str] = []
        times: list[float] = []
        started: list[float] = []
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        timer: threading.Timer | None = None
        try:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(line)
                times.append(time.monotonic() - t0)
                if on_line is not None:
                    on_line(line)
                if line.startswith("BTRDELTA-START") and not started:
                    started.append(time.monotonic() - t0)
                    if kill_after is not None:
                        timer = threading.Timer(kill_after, kill)
                        timer.start()
        except BaseException:  # Ctrl-C, a failed on_line: no qemu left running its command
            kill()
            raise
        finally:
            proc.wait()
            proc.stdout.close()
            watchdog.cancel()
            if timer is not None:
                timer.cancel()
        return VmResult(lines, killed.is_set(), time.monotonic() - t0,
                        started[0] if started else None, times)


def _kernel(cache: Path) -> tuple[str, Path]:
    """``(version, extracted root)`` of Debian's ``linux-image-amd64`` (downloaded once)."""
    root = cache / "kernel"
    done = cache / "kernel.done"
    if done.exists():
        return done.read_text().strip(), root
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"Depends: (linux-image-(\S+))", out)
    if m is None:
        raise RuntimeError("apt-cache: no kernel package behind linux-image-amd64")
    pkg, kver = m[1], m[2]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        os.chmod(tmp, 0o755)  # apt's sandbox user writes there
        subprocess.run(["apt-get", "download", pkg], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    done.write_text(f"{kver}\n")
    return kver, root


def _initramfs(root: Path, kver: str, out: Path) -> None:
    """busybox-static, the modules (and their dependencies), the scripts, ``/init``."""
    with tempfile.TemporaryDirectory() as tmp:
        ird = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "etc"):
            (ird / d).mkdir()
        busybox = shutil.which("busybox") or "/bin/busybox"
        shutil.copy(busybox, ird / "bin" / "busybox")
        os.symlink("/bin/busybox", ird / "sbin" / "modprobe")
        moddir = root / "lib" / "modules" / kver
        subprocess.run(["depmod", "-b", str(root), kver], check=True)
        wanted = _module_files(moddir)
        dest = ird / "lib" / "modules" / kver
        for rel in wanted:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(moddir / rel, dest / rel)
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (moddir / name).exists():
                shutil.copy(moddir / name, dest / name)
        subprocess.run(["depmod", "-b", str(ird), kver], check=True)
        shutil.copy(_CONTRIB / "btrdelta-boot.sh", ird / "btrdelta-boot.sh")
        (ird / "init").write_text(_INIT)
        os.chmod(ird / "init", 0o755)
        files = subprocess.run(["find", "."], cwd=ird, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=ird, input=files,
                              capture_output=True, check=True).stdout
        import gzip

        out.write_bytes(gzip.compress(cpio, 1))


def _module_files(moddir: Path) -> set[str]:
    """The module files of :data:`_MODULES` and everything they depend on."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        head, _, tail = line.partition(":")
        deps[head] = tail.split()
    by_name = {Path(k).name.split(".ko")[0].replace("-", "_"): k for k in deps}
    todo = [by_name[m.replace("-", "_")] for m in _MODULES if m.replace("-", "_") in by_name]
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel not in seen:
            seen.add(rel)
            todo += deps.get(rel, [])
    return seen
