#!/bin/sh
# btrdelta boot hook for GRUB: keeps the choice in grubenv (grub-editenv), for a grub.cfg
# that boots roots/SLOT with rootflags=subvol=roots/SLOT (snippet in docs/device.md).
#   grub.sh try SLOT TRIES   next boots: SLOT, at most TRIES times (grub.cfg counts down)
#   grub.sh good SLOT        SLOT is the default; no trial
#   grub.sh cancel SLOT      drop a trial of SLOT
# GRUBENV overrides the environment block (default /boot/grub/grubenv).
set -eu
env=${GRUBENV:-/boot/grub/grubenv}
action=$1 slot=$2
case "$action" in
    try) grub-editenv "$env" set "btrdelta_try=$slot" "btrdelta_left=$3" ;;
    good) grub-editenv "$env" set "btrdelta_default=$slot"
          grub-editenv "$env" unset btrdelta_try btrdelta_left ;;
    cancel) grub-editenv "$env" set btrdelta_left=0 ;;
    *) echo "grub.sh: unknown action $action" >&2; exit 2 ;;
esac
