#!/usr/bin/env bash
# Zero-shot CLIP (the original scripts/coop/zeroshot.sh).
# usage: DATA=/path/to/datasets bash scripts/zeroshot.sh DATASET CFG   (CFG: rn50, rn101, vit_b32, vit_b16)
set -euo pipefail
DATA=${DATA:-/path/to/datasets}
TRAINER=ZeroshotCLIP
DATASET=$1
CFG=$2

coop-train \
    --root "${DATA}" \
    --trainer ${TRAINER} \
    --dataset-config-file configs/datasets/${DATASET}.yaml \
    --config-file configs/trainers/CoOp/${CFG}.yaml \
    --output-dir output/${TRAINER}/${CFG}/${DATASET} \
    --eval-only
