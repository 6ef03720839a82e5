#!/usr/bin/env bash
# The published recipes of the depth methods (EASIER, NEPENTHE, LaCoOT) on CIFAR-10, for anyone with a
# GPU and the data, to compare with the papers' tables:
#   EASIER (arXiv 2404.18949, appendix Table 5; removed/total activations):
#     ResNet-18 92.47 (0/17) 92.40 (7/17) 92.10 (8/17) 90.35 (9/17) 84.52 (12/17)
#     VGG-16-bn 93.50 (0/15) 93.61 (8/15) 93.04 (10/15); Swin-T 91.66 (0/12) 91.41 (7/12)
#     MobileNetV2 93.65 (0/35) 93.16 (12/35) 92.05 (17/35)
#   LaCoOT (arXiv 2406.08933): lambda 5 (ResNet-18), 9 (MobileNetV2), 0.1 (Swin-T); accuracy, MACs and
#     parameters per number of blocks removed without fine-tuning.
#
# Every run: 160 epochs per training run, SGD momentum 0.9, batch 128, steps at 80/120 (x0.1), weight
# decay 1e-4 (--preset paper; Swin-T: --preset swin, lr 1e-3), 10% of the training set held out for
# validation (the methods' default). Each run writes report.json (the per-iteration / per-block table),
# depth_per_iteration.png or accuracy_vs_macs.png, and final/ (export it with `pyengine export`).
#
#   DATA=/path/with/cifar10 SWIN_WEIGHTS=/path/swin_t-704ceda3.pth bash benchmarks/depth_recipes.sh [which]
#
# which: easier-resnet18 easier-vgg16 easier-mobilenet easier-swin nepenthe-resnet18 nepenthe-mobilenet
#        nepenthe-swin lacoot-resnet18 lacoot-mobilenet lacoot-swin, or all (default). A killed run
#        continues with the same command plus --resume (set RESUME=1).
#
# Costs (an H100): one 160-epoch CIFAR-10 ResNet-18 run is about 30-40 min, so EASIER's full
# iteration sweep (one run per activation: 17 for ResNet-18) is a day; ITERATIONS limits it.
# Differences from the authors' set-up that matter for the comparison:
# - the authors' VGG-16-bn is torchvision's ImageNet-pretrained network (4096-wide classifier) at
#   32x32 with lr 0.01; pyengine's vgg16_bn is the CIFAR variant (512-wide classifier, random init):
#   pass a torchvision checkpoint with --weights and --model tv:vgg16_bn to follow them exactly;
# - EASIER's script runs every iteration whatever the accuracy: TOLERANCE=100 (default here) does the
#   same; the paper's flow stops at a tolerance (e.g. TOLERANCE=1).
set -euo pipefail

DATA=${DATA:?set DATA to the folder holding CIFAR-10 (or pass DOWNLOAD=1)}
OUT=${OUT:-runs/depth-recipes}
DEVICE=${DEVICE:-cuda}
TOLERANCE=${TOLERANCE:-100}
ITERATIONS=${ITERATIONS:-}
WHICH=${1:-all}
PY=${PYTHON:-python}
EXTRA=()
[[ -n "${DOWNLOAD:-}" ]] && EXTRA+=(--download)
[[ -n "${RESUME:-}" ]] && EXTRA+=(--resume)
ITER=()
[[ -n "$ITERATIONS" ]] && ITER+=(--iterations "$ITERATIONS")

prune() {  # name, then pyengine prune arguments
  local name=$1; shift
  echo "== $name"
  "$PY" -m pyengine prune --dataset cifar10 --data-dir "$DATA" --device "$DEVICE" --out "$OUT/$name" \
    "${EXTRA[@]}" "$@"
}

SWIN=()
need_swin() {  # the authors fine-tune torchvision's ImageNet Swin-T at 32x32
  if [[ -z "${SWIN_WEIGHTS:-}" ]]; then
    echo "set SWIN_WEIGHTS to torchvision's swin_t ImageNet checkpoint (swin_t-704ceda3.pth)" >&2
    exit 2
  fi
  SWIN=(--weights "$SWIN_WEIGHTS" --reset-head)
}

run_one() {
  case $1 in
    easier-resnet18)   prune "$1" --model resnet18 --method easier --preset paper --tolerance "$TOLERANCE" "${ITER[@]}" ;;
    easier-vgg16)      prune "$1" --model vgg16_bn --method easier --preset paper --lr 0.01 --tolerance "$TOLERANCE" \
                         "${ITER[@]}" ;;
    easier-mobilenet)  prune "$1" --model mobilenet_v2 --method easier --preset paper --tolerance "$TOLERANCE" \
                         "${ITER[@]}" ;;
    easier-swin)       need_swin; prune "$1" --model swin_t --method easier --preset swin "${SWIN[@]}" \
                         --tolerance "$TOLERANCE" "${ITER[@]}" ;;
    nepenthe-resnet18) prune "$1" --model resnet18 --method nepenthe --preset paper --tolerance "$TOLERANCE" ;;
    nepenthe-mobilenet) prune "$1" --model mobilenet_v2 --method nepenthe --preset paper --tolerance "$TOLERANCE" ;;
    nepenthe-swin)     need_swin; prune "$1" --model swin_t --method nepenthe --preset swin "${SWIN[@]}" \
                         --tolerance "$TOLERANCE" ;;
    lacoot-resnet18)   prune "$1" --model resnet18 --method lacoot --preset paper --lambda-reg 5 ;;
    lacoot-mobilenet)  prune "$1" --model mobilenet_v2 --method lacoot --preset paper --lambda-reg 9 ;;
    lacoot-swin)       need_swin; prune "$1" --model swin_t --method lacoot --preset swin "${SWIN[@]}" --lambda-reg 0.1 ;;
    *) echo "unknown recipe $1" >&2; return 2 ;;
  esac
}

if [[ $WHICH == all ]]; then
  for r in lacoot-resnet18 lacoot-mobilenet lacoot-swin easier-resnet18 easier-vgg16 easier-mobilenet easier-swin \
           nepenthe-resnet18 nepenthe-mobilenet nepenthe-swin; do
    run_one "$r"
  done
else
  run_one "$WHICH"
fi
