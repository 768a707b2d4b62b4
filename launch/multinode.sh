#!/usr/bin/env bash
# Several nodes, one command per node (the same on every node except NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh --model DIR --tasks a,b --output DIR [--tp 8]
# Ranks are numbered node by node (global rank = node * NPROC_PER_NODE + local rank), so a
# tensor-parallel group of up to NPROC_PER_NODE ranks never spans two nodes.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-evalkit}" \
  -m evalkit "$@"
