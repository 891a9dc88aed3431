#!/bin/sh
# btrdelta-boot.sh: the initramfs side of a btrdelta device (busybox sh is enough).
#
#   btrdelta-boot.sh select TOP          print the root to boot ("a", "b", "factory" or
#                                        "default"), spending one try of a pending trial
#   btrdelta-boot.sh mount DEV TOP ROOT  select, then mount the chosen root read-only on ROOT
#                                        and the state subvolumes over it (overlays, binds);
#                                        prints the choice
#
# TOP is where the filesystem's top level is mounted read-write (mount -o subvolid=5).
# Layout and rules: docs/device.md. The decision, in full:
#   1. a file TOP/.btrdelta/boot/try-SLOT+LEFT[-DONE] with LEFT > 0: rename it to
#      try-SLOT+(LEFT-1)-(DONE+1), sync, boot TOP/roots/SLOT (mount -o subvol=roots/SLOT);
#   2. otherwise boot the default subvolume (mount without subvol=).
set -eu

select_root() {
    top=$1
    for f in "$top"/.btrdelta/boot/try-*; do
        [ -e "$f" ] || continue
        name=${f##*/try-}
        slot=${name%%+*}
        count=${name#*+}
        left=${count%%-*}
        done=${count#*-}
        [ "$done" = "$count" ] && done=0
        case "$slot" in a|b|factory) ;; *) continue ;; esac
        case "$left$done" in *[!0-9]*) continue ;; esac
        [ -d "$top/roots/$slot" ] || continue
        if [ "$left" -gt 0 ]; then
            mv "$f" "$top/.btrdelta/boot/try-$slot+$((left - 1))-$((done + 1))"
            sync
            echo "$slot"
            return 0
        fi
    done
    echo default
}

mount_root() {
    dev=$1 top=$2 root=$3 choice=$4
    if [ "$choice" = default ]; then
        mount -t btrfs -o ro "$dev" "$root"
    else
        mount -t btrfs -o "ro,subvol=roots/$choice" "$dev" "$root"
    fi
    [ -f "$top/.btrdelta/mounts" ] || return 0
    while read -r mode name path; do
        case "$mode" in overlay|bind) ;; *) continue ;; esac
        state="$top/state/$name"
        [ -d "$state" ] || { echo "btrdelta-boot: state/$name missing" >&2; continue; }
        [ -d "$root$path" ] || continue
        if [ "$mode" = overlay ]; then
            mount -t overlay overlay \
                -o "lowerdir=$root$path,upperdir=$state/upper,workdir=$state/work" "$root$path"
        else
            mount --bind "$state" "$root$path"
        fi
    done < "$top/.btrdelta/mounts"
}

case "${1:-}" in
    select) select_root "$2" ;;
    mount) choice=$(select_root "$3"); mount_root "$2" "$3" "$4" "$choice"; echo "$choice" ;;
    *) echo "usage: $0 select TOP | mount DEV TOP ROOT" >&2; exit 2 ;;
esac
