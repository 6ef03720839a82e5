#!/usr/bin/env bash
# The published OFA / MOOFA ImageNet recipe on GPUs with torchrun.
#
#   benchmarks/ofa_imagenet.sh /data/imagenet [NGPU] [OUT] [SPACES] [RECIPE]
#
#   /data/imagenet  an ImageNet folder with train/ and val/, one sub-folder per class
#   NGPU            processes per node (default: every visible GPU)
#   OUT             run folder (default: runs/ofa-imagenet)
#   SPACES          "ofa moofa" (default) or one of them
#   RECIPE          moofa-imagenet (default; MOOFA's configs/config_MOOFA.yaml) or ofa-imagenet
#                   (OFA's train_ofa_net.py). Both: full network 180 epochs, then kernel 120 (+5
#                   warm-up), depth 25 + 120 (+5), expand 25 + 120 (+5); batch 64 per GPU, SGD
#                   nesterov 0.9, cosine, wd 3e-5 (not on BN / biases), label smoothing 0.1, KD 1.0,
#                   lr = per-GPU rate x number of GPUs, resolutions 128..224 sampled per batch.
#
# Then: the accuracy predictor on 2000 subnets (balanced over 10 peak-memory bins, measured on a
# 10,000-image hold-out of the training set after BN recalibration on 2000 images) and evolution
# (population 100, 500 generations) at the README's budgets, with one table and one plot for both
# spaces. Every stage resumes: rerun the same command after an interruption.
# Published top-1 (OFA vs MOOFA): <325k 70.81 vs 72.13, <400k 70.98 vs 73.34, <600k 76.02 vs
# 74.99, <700k 75.83 vs 76.55.
set -euo pipefail

DATA=${1:?usage: $0 /path/to/imagenet [NGPU] [OUT] [SPACES] [RECIPE]}
NGPU=${2:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
OUT=${3:-runs/ofa-imagenet}
SPACES=${4:-"ofa moofa"}
RECIPE=${5:-moofa-imagenet}
WORKERS=${WORKERS:-8}
PY=${PYTHON:-python}

# `python -m pyengine ofa` once the command is wired into the CLI, the module itself otherwise
ENTRY=(-m pyengine)

echo "== the peak-memory model against the published numbers"
$PY "${ENTRY[@]}" ofa memory --space ofa --resolution 224                                   # 1,509,984
$PY "${ENTRY[@]}" ofa memory --space ofa --resolution 128 --kernel 3 --expand 3 --depth 2   # 262,912
$PY "${ENTRY[@]}" ofa memory --space moofa --resolution 224 --measure                       # 696,192 (+ measured)

RUNS=()
for SPACE in $SPACES; do
  echo "== training the $SPACE supernet ($RECIPE) on $NGPU GPU(s)"
  # --val-fraction: OFA's valid_size of 10,000 training images
  torchrun --standalone --nproc_per_node "$NGPU" "${ENTRY[@]}" ofa train --space "$SPACE" --preset "$RECIPE" \
    --dataset "imagefolder:$DATA" --device cuda --workers "$WORKERS" --val-fraction 0.0078 \
    --out "$OUT/$SPACE" --resume --no-progress
  RUNS+=(--run "$OUT/$SPACE")
done

echo "== accuracy predictor + evolutionary search under peak-memory budgets"
$PY "${ENTRY[@]}" ofa search "${RUNS[@]}" --budgets 325000,350000,400000,450000,500000,600000,700000,800000 \
  --samples 2000 --memory-bins 10 --population 100 --generations 500 --device cuda --out "$OUT/search" --no-progress

echo "== results: $OUT/search/search.md, $OUT/search/search.json, $OUT/search/accuracy_vs_peak_memory.png"
cat "$OUT/search/search.md"
