#!/usr/bin/env bash
# Evaluate ImageNet-trained CoOp models on another dataset (the original scripts/coop/eval.sh).
# usage: DATA=/path/to/datasets bash scripts/eval.sh DATASET CFG [LOAD_EPOCH]
#   CFG is the config the ImageNet models were trained with (e.g. rn50_ep50).
set -euo pipefail
DATA=${DATA:-/path/to/datasets}
TRAINER=CoOp
SHOTS=16
NCTX=16
CSC=False
CTP=end
DATASET=$1
CFG=$2
LOAD_EPOCH=${3:-50}

for SEED in 1 2 3; do
    coop-train \
        --root "${DATA}" \
        --seed "${SEED}" \
        --trainer ${TRAINER} \
        --dataset-config-file configs/datasets/${DATASET}.yaml \
        --config-file configs/trainers/${TRAINER}/${CFG}.yaml \
        --output-dir output/evaluation/${TRAINER}/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/${DATASET}/seed${SEED} \
        --model-dir output/imagenet/${TRAINER}/${CFG}_${SHOTS}shots/nctx${NCTX}_csc${CSC}_ctp${CTP}/seed${SEED} \
        --load-epoch "${LOAD_EPOCH}" \
        --eval-only \
        TRAINER.COOP.N_CTX ${NCTX} \
        TRAINER.COOP.CSC ${CSC} \
        TRAINER.COOP.CLASS_TOKEN_POSITION ${CTP}
done
