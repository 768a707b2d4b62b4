#!/usr/bin/env bash
# One node, NPROC processes: launch/torchrun.sh NPROC --model DIR --tasks a,b --output DIR [flags]
# Every process runs the same evaluation loop; evalkit reads the layout from torchrun's
# RANK / LOCAL_RANK / WORLD_SIZE and its own flags, nothing else.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC evalkit-flags...}
shift
exec torchrun --standalone --nproc_per_node="$nproc" -m evalkit "$@"
