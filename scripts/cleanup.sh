#!/bin/sh
# Remove a test run's temporary directory (make test, scripts/longrun.sh), first saying so
# on standard error with its size: the trees of a whole `make test` (~155,000 files, 5.3 GB)
# took 36 s to remove after pytest's summary, silently (session 29, 2 cores under load);
# `du` of them costs ~1 s. `rm -rf` deletes trees of any depth. The caller's exit code is
# not changed (this runs from its EXIT trap).
# Usage: scripts/cleanup.sh NAME DIR
size=$(du -sh --one-file-system "$2" 2>/dev/null | cut -f1)
echo "$1: removing the run's temporary files (${size:-?}B in $2)" >&2
rm -rf --one-file-system "$2"
