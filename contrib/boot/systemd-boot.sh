#!/bin/sh
# btrdelta boot hook for systemd-boot: one Boot Loader Specification entry per root in
# $ESP/loader/entries, with systemd-boot's own boot counting in the file name
# (btrdelta-SLOT+TRIES.conf; systemd-boot renames it at each try, systemd-bless-boot or
# this hook's "good" drops the counter). Entries are written from btrdelta-SLOT.template
# (a .conf whose options line says rootflags=subvol=roots/SLOT).
#   systemd-boot.sh try SLOT TRIES | good SLOT | cancel SLOT
# ESP overrides the mount point of the EFI system partition (default /boot/efi).
set -eu
esp=${ESP:-/boot/efi}
dir="$esp/loader/entries"
action=$1 slot=$2
drop() { for f in "$dir"/btrdelta-"$1"+*.conf; do [ -e "$f" ] && rm -f "$f"; done; return 0; }
case "$action" in
    try) drop "$slot"
         cp "$dir/btrdelta-$slot.template" "$dir/.btrdelta-$slot.tmp"
         mv "$dir/.btrdelta-$slot.tmp" "$dir/btrdelta-$slot+$3.conf"
         bootctl --esp-path="$esp" set-oneshot "btrdelta-$slot+$3.conf" 2>/dev/null || true ;;
    good) drop a; drop b; drop factory  # no trial of any slot (another's counted entry
          # stayed the oneshot: after a factory reset the next boot was that trial's root)
          cp "$dir/btrdelta-$slot.template" "$dir/.btrdelta-$slot.tmp"
          mv "$dir/.btrdelta-$slot.tmp" "$dir/btrdelta-$slot.conf"
          bootctl --esp-path="$esp" set-default "btrdelta-$slot.conf" 2>/dev/null || true ;;
    cancel) drop "$slot" ;;
    *) echo "systemd-boot.sh: unknown action $action" >&2; exit 2 ;;
esac
