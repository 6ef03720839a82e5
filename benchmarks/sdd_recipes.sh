#!/usr/bin/env bash
# Sparse double descent: the published settings on GPUs (methods.md section 6).
#
#   benchmarks/sdd_recipes.sh resnet18      # ResNet-18, CIFAR-10, eps 0.2: vanilla, l2 grid, DSD2 distillation, entropy
#   benchmarks/sdd_recipes.sh vit           # ViT on CIFAR-10, eps 0.2 (ICIAP 2023): AdamW, Linear layers pruned
#   benchmarks/sdd_recipes.sh swin          # Swin-T on CIFAR-10, eps 0.2, same recipe
#   benchmarks/sdd_recipes.sh width         # model-size double descent: ResNet-18 width k, DSD2's VGG-like widths
#   SMOKE=1 benchmarks/sdd_recipes.sh vit   # the same commands with 2 epochs and 2 rounds (a quick GPU check)
#
# Environment: DEVICES (default 0: one GPU; 0,1,2,3 runs one configuration per GPU), DATA (--data-dir,
# default: the default search), OUT (default runs/sdd-recipes). A killed recipe continues where it
# stopped when started again (every command resumes its sweep folder).
#
# Cost (rough): the paper preset trains 160 epochs per round and 35 trainings per run (dense + 34
# rounds); ResNet-18 on CIFAR-10 is a few seconds per epoch on one H100, so one run is on the order of
# 10 GPU-hours; the ViT recipe (200 epochs per round) is longer. --devices spreads the runs of a grid.
# Published reference for the ViT (CIFAR-10, eps 0.2): dense 64.0%, dip ~58.9%, second peak ~71.1%.
set -euo pipefail

recipe="${1:-}"
DEVICES="${DEVICES:-0}"
OUT="${OUT:-runs/sdd-recipes}"
PY="${PYTHON:-python}"
common=(--dataset cifar10 --noise 0.2 --rate 0.2 --devices "$DEVICES")
[[ -n "${DATA:-}" ]] && common+=(--data-dir "$DATA") || common+=(--download)
if [[ -n "${SMOKE:-}" ]]; then
  common+=(--epochs 2 --rounds 2)
  OUT="$OUT-smoke"
fi

sdd() {  # sdd FOLDER ARGS...: start the sweep, or resume it when its folder exists
  local out="$1"; shift
  local resume=()
  [[ -f "$out/sweep.json" ]] && resume=(--resume)
  echo "+ pyengine sdd $* --out $out ${resume[*]}"
  "$PY" -m pyengine sdd "$@" "${common[@]}" --out "$out" "${resume[@]}"
}

case "$recipe" in
  resnet18)
    # ICIP 2023 / DSD2: ResNet-18 (CIFAR stem with the 3x3/2 max-pool, as the authors'), SGD 0.1, momentum 0.9,
    # 160 epochs, steps at 80/120, batch 128, wd 1e-4; IMP r = 0.2 over 34 rounds, learning-rate rewinding.
    # One folder: the l2 grid (one curve per lambda) x {vanilla, distilled from each configuration's dense net}.
    sdd "$OUT/resnet18-cifar10" --model resnet18 --preset paper \
        --weight-decay-grid 0,1e-4,5e-4,1e-3 --kd-teacher dense --kd-alpha 0.8 --kd-temperature 10 --entropy
    ;;
  vit)
    # ICIAP 2023 (the authors' SDD_ViT): ViT patch 4, dim 512, depth 6, 8 heads, MLP 512, dropout 0.1 and
    # embedding dropout 0.1; AdamW lr 1e-4, wd 0.03, cosine over 200 epochs, batch 512; Linear layers pruned.
    sdd "$OUT/vit-cifar10" --model vit --preset vit
    ;;
  swin)
    # Same recipe with a CIFAR Swin-T (torchvision's Swin-T with patch 2 and 4x4 windows; the authors' own Swin
    # downscales 2,2,2,1 - the last stage here downscales once more). Linear layers pruned (the patch embedding
    # is a convolution in torchvision's Swin and stays dense).
    sdd "$OUT/swin-cifar10" --model swin_t --preset vit
    ;;
  width)
    # Model-size double descent under label noise: ResNet-18 of width k, and DSD2's VGG-like family
    # (depth delta = 5, widths 2^gamma).
    sdd "$OUT/resnet18-width" --model resnet18 --preset paper --width-grid 1,2,4,8,16,32,64
    sdd "$OUT/vgglike-width" --model vgglike --depth 5 --preset paper --width-grid 4,8,16,32,64
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
