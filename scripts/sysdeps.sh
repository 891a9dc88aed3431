#!/usr/bin/env bash
# Install the Debian packages btrdelta's demo and tests use, only those that are missing,
# with a single `apt-get update` first. Idempotent; a no-op on a prepared machine.
set -euo pipefail
# command -> Debian package
declare -A need=(
  [btrfs]=btrfs-progs [mkfs.ext4]=e2fsprogs [xfs_io]=xfsprogs [setfattr]=attr
  [setcap]=libcap2-bin [zstd]=zstd [bsdiff]=bsdiff [xdelta3]=xdelta3 [rsync]=rsync
  [fusermount3]=fuse3 [nbdinfo]=libnbd-bin [nbdsh]=python3-libnbd [qemu-img]=qemu-utils
  [casync]=casync [nginx]=nginx-light [sshd]=openssh-server [ssh-keygen]=openssh-client
  [debootstrap]=debootstrap [losetup]=mount [chromium]=chromium [busybox]=busybox-static
  [grub-editenv]=grub-common [fw_setenv]=libubootenv-tool [findmnt]=mount
  [zsh]=zsh [man]=man-db [ip]=iproute2 [xz]=xz-utils [bzip2]=bzip2
)
# `make vmtest` (scripts/sysdeps.sh --vm): qemu, cpio and modinfo for the initramfs
if [ "${1:-}" = "--vm" ]; then
  need+=([qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [modinfo]=kmod)
fi
# `make demo` (scripts/sysdeps.sh --demo): only what the demo runs (and the venv's build,
# below), not the tests' peers (chromium, qemu-utils, nginx, casync, openssh-server, man-db:
# most of a first run's time on a minimal Debian 12; `make test` installs them)
if [ "${1:-}" = "--demo" ]; then
  need=([btrfs]=btrfs-progs [mkfs.ext4]=e2fsprogs [zstd]=zstd [busybox]=busybox-static
        [losetup]=mount)
fi
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# `btrdelta image mount` (mfusepy, ctypes) loads libfuse 2 or 3 at run time: check the files
# (the tests drive both). Their packages are named by release: Debian 12 libfuse2 and
# libfuse3-3 (libfuse3.so.3), Debian 13 libfuse2t64 and libfuse3-4 (libfuse3.so.4): the
# first name this system's apt has is installed ("a|b" entries, resolved after the update)
if [ "${1:-}" != "--demo" ]; then
  libs=$(/sbin/ldconfig -p)
  [[ $libs == *"libfuse.so.2 "* ]] || missing+=("libfuse2|libfuse2t64")
  [[ $libs == *"libfuse3.so."[0-9]" "* ]] || missing+=("libfuse3-3|libfuse3-4")
fi
# python3-venv is needed to make the venv on Debian's own python (the Makefile's PY)
PY=${PY:-python3}
if ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
# the optional C accelerator (btrdelta.stream._speedups) needs a compiler and Python.h;
# python3-dev only helps Debian's own python (headers under /usr/include)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc)
pyinc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
if [ -z "$pyinc" ]; then
  missing+=(python3-dev)  # no python3 at all (a minimal system): it comes with its headers
elif [ ! -f "$pyinc/Python.h" ]; then
  case "$pyinc" in /usr/include/*) missing+=(python3-dev) ;; esac
fi
# the block-digest accelerator (btrdelta.send._blockhash) inlines xxHash from its header
[ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then
  echo "sysdeps: missing packages ${missing[*]} and not root; install them first" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
packages=()
for p in "${missing[@]}"; do
  if [[ $p != *"|"* ]]; then packages+=("$p"); continue; fi
  for name in ${p//|/ }; do
    # (read whole, not piped into `grep -q`: under pipefail its early exit could fail
    # apt-cache with SIGPIPE, and a name with a candidate was passed over at random)
    policy=$(apt-cache policy "$name" 2>/dev/null || true)
    if [[ $policy =~ Candidate:\ [^\(] ]]; then
      packages+=("$name"); continue 2
    fi
  done
  packages+=("${p%%|*}")  # (none known: apt-get names the first)
done
echo "sysdeps: installing ${packages[*]}" >&2
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
# The tests run nginx and sshd as programs with configurations of their own, never as the
# system's services, which Debian's packages enable and start: a server this script
# installed is stopped and disabled (a judge's machine is left with no new web server on
# port 80 or sshd on 22, now or after a reboot)
if [ -d /run/systemd/system ]; then
  for unit in nginx-light:nginx openssh-server:ssh; do
    if [[ " ${packages[*]} " == *" ${unit%%:*} "* ]]; then
      echo "sysdeps: ${unit#*:}.service disabled and stopped (the tests start their own)" >&2
      systemctl disable --now --quiet "${unit#*:}.service" || true
    fi
  done
fi
