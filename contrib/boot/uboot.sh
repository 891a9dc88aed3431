#!/bin/sh
# btrdelta boot hook for U-Boot: the choice in the U-Boot environment (fw_setenv from
# libubootenv; /etc/fw_env.config says where the environment is), for a boot script that
# counts btrdelta_left down and boots rootflags=subvol=roots/SLOT (docs/device.md).
#   uboot.sh try SLOT TRIES | good SLOT | cancel SLOT
# FW_ENV_CONFIG overrides the configuration file.
set -eu
cfg=${FW_ENV_CONFIG:-/etc/fw_env.config}
action=$1 slot=$2
script=$(mktemp)
trap 'rm -f "$script"' EXIT
# one fw_setenv -s: every variable of a step changes in one write of the environment
case "$action" in
    try) printf 'btrdelta_try=%s\nbtrdelta_left=%s\n' "$slot" "$3" > "$script" ;;
    good) printf 'btrdelta_default=%s\nbtrdelta_try=\nbtrdelta_left=\n' "$slot" > "$script" ;;
    cancel) printf 'btrdelta_left=0\n' > "$script" ;;
    *) echo "uboot.sh: unknown action $action" >&2; exit 2 ;;
esac
fw_setenv -c "$cfg" -s "$script"
