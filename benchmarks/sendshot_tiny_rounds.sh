#!/bin/bash
# Tiny changes on a large real tree: the kernel's `btrfs send -p` against
# `btrdelta send SNAP --from-sendshot latest --record`, per round (issue 15's time goal at
# its hardest: the kernel's work follows the change, ~3 ms; a Python process starts at ~20).
#
#   benchmarks/sendshot_tiny_rounds.sh [TREE] [ROUNDS]
#
# TREE (default $BTRDELTA_BENCH_CACHE/realroot-new, else benchmarks/.cache/realroot-new: the
# Debian root `benchmarks realroot` builds, where benchmarks/trees.py caches it) is copied
# into a subvolume of a new 10 GiB loop btrfs under $TMPDIR (or /var/tmp), recorded once,
# then each round appends a line to etc/motd, touches usr/bin/ls and rewrites one 4 KiB
# block of the largest file under usr/lib, takes a read-only snapshot and times both sends
# (bash's $EPOCHREALTIME; no interpreter around either). Prints every round and the medians.
# Root; cleans its mount and loop device on exit.
set -eu
TREE=${1:-${BTRDELTA_BENCH_CACHE:-$(dirname "$0")/.cache}/realroot-new}
ROUNDS=${2:-12}
BTRDELTA=${BTRDELTA:-$(dirname "$0")/../.venv/bin/btrdelta}
[ -d "$TREE" ] || { echo "no tree $TREE (BTRDELTA_BENCH_REALROOT=1 .venv/bin/python -m benchmarks realroot builds it; or give a tree)" >&2; exit 2; }
W=$(mktemp -d "${TMPDIR:-/var/tmp}/btrdelta-tiny.XXXXXX")
cleanup() { umount "$W/mnt" 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
mkdir "$W/mnt"; truncate -s 10G "$W/img"; mkfs.btrfs -q -f "$W/img" >/dev/null
mount -o loop,noatime "$W/img" "$W/mnt"
btrfs -q subvolume create "$W/mnt/live"; cp -a "$TREE/." "$W/mnt/live/"; sync
big=$(cd "$W/mnt/live" && find usr/lib -type f -size +1M -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2)
btrfs -q subvolume snapshot -r "$W/mnt/live" "$W/mnt/s0"
"$BTRDELTA" send "$W/mnt/s0" --record --store "$W/store" -o /dev/null 2>/dev/null >/dev/null
K=(); O=(); prev=s0
for i in $(seq 1 "$ROUNDS"); do
  echo "round $i" >> "$W/mnt/live/etc/motd"; touch "$W/mnt/live/usr/bin/ls"
  dd if=/dev/urandom of="$W/mnt/live/$big" bs=4096 seek="$i" count=1 conv=notrunc status=none
  btrfs -q subvolume snapshot -r "$W/mnt/live" "$W/mnt/s$i"; sync
  a=$EPOCHREALTIME; btrfs send -q -p "$W/mnt/$prev" "$W/mnt/s$i" -f /dev/null; b=$EPOCHREALTIME
  "$BTRDELTA" send "$W/mnt/s$i" --from-sendshot latest --record --store "$W/store" \
      -o /dev/null 2>/dev/null >/dev/null; c=$EPOCHREALTIME
  k=$(echo "($b - $a) * 1000" | bc); o=$(echo "($c - $b) * 1000" | bc)
  printf 'round %2d: kernel send -p %6.1f ms, btrdelta %6.1f ms\n' "$i" "$k" "$o"
  K+=("$k"); O+=("$o"); prev=s$i
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mk=$(med "${K[@]}"); mo=$(med "${O[@]}")
printf '%s: %s files; medians of %d rounds (load %s): kernel %.1f ms, btrdelta %.1f ms (%.1fx)\n' \
  "$TREE" "$(find "$W/mnt/s0" | wc -l)" "$ROUNDS" "$(cut -d' ' -f1 /proc/loadavg)" "$mk" "$mo" \
  "$(echo "$mo / $mk" | bc -l)"
