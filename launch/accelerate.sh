#!/usr/bin/env bash
# The same run through accelerate: launch/accelerate.sh NPROC --model DIR --tasks a,b --output DIR [flags]
# NPROC picks configs/accelerate/<NPROC>proc.yaml (1, 2, 4 or 8).
set -euo pipefail
nproc=${1:?usage: launch/accelerate.sh NPROC evalkit-flags...}
shift
config="$(dirname "$0")/../configs/accelerate/${nproc}proc.yaml"
[ -f "$config" ] || { echo "no accelerate config for $nproc processes (have: 1, 2, 4, 8)" >&2; exit 2; }
exec accelerate launch --config_file "$config" -m evalkit "$@"
