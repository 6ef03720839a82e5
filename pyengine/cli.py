"""Command line: argument parsing and wiring only; every command calls into pyengine.methods."""
from __future__ import annotations

import argparse
import sys

from pyengine.train.loop import PRESETS

PRUNE_EPILOG = """
examples:
  pyengine prune --model resnet18                       # EGP on the offline digits data, quick preset
  pyengine prune --model resnet18 --method imp --rounds 5 --rate 0.2
  pyengine prune --model vgg16_bn --method magnitude --sparsity 0.9
  pyengine prune --model resnet18 --dataset cifar10 --download --preset paper --device cuda --rounds 8
  torchrun --nproc_per_node 4 -m pyengine prune --model resnet18 --dataset cifar10 --preset paper
  pyengine prune --model resnet18 --out runs/r18 --resume  # continue a killed run
"""


def _prune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="train, prune (EGP / IMP / magnitude) and report",
        description="Train a model, prune it round by round with EGP (entropy guided), IMP or one-shot "
        "magnitude pruning, and report accuracy, sparsity, per-layer entropy and collapsed layers.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="resnet18", help="resnet18 (CIFAR stem), vgg16_bn, mobilenet_v2, vit, swin_t, or tv:<torchvision name> (default: resnet18)")
    p.add_argument("--method", default="egp", choices=["egp", "imp", "magnitude"], help="egp: entropy-guided budgets; imp: iterative magnitude pruning; magnitude: one shot to --sparsity, then fine-tune (default: egp)")
    p.add_argument("--dataset", default="digits", help="digits (offline, bundled with scikit-learn), fashion-mnist, cifar10, cifar100, tiny-imagenet, imagefolder:PATH (default: digits)")
    p.add_argument("--data-dir", help="folder searched first for the dataset's files")
    p.add_argument("--download", action="store_true", help="allow downloading a dataset that is not found")
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="training recipe: quick (a CPU demo: 3 epochs per round, 16x16 images), paper (160 epochs, SGD 0.1, steps 80/120, wd 1e-4), swin, vit (default: quick)")
    p.add_argument("--epochs", type=int, help="training epochs per round (default: the preset's)")
    p.add_argument("--rounds", type=int, help="pruning rounds after dense training (default: egp 3, imp 5, magnitude 1)")
    p.add_argument("--sparsity", type=float, help="target sparsity in [0, 1): magnitude prunes to it in one shot; egp and imp stop once they reach it")
    p.add_argument("--rate", type=float, default=0.2, help="IMP: fraction of the remaining weights removed per round (default: 0.2)")
    p.add_argument("--zeta", type=float, default=0.5, help="EGP: fraction of the active layers' remaining weights removed per round (default: 0.5)")
    p.add_argument("--estimator", default="egp", choices=["egp", "easier"], help="layer entropy: mean over non-constant neurons (egp) or over all neurons (easier)")
    p.add_argument("--scope", default="global", choices=["global", "layerwise"], help="magnitude ranking for imp/magnitude (default: global)")
    p.add_argument("--rewind", default="lr", choices=["lr", "weights", "reinit", "finetune"], help="after pruning: lr = learning-rate rewinding (keep the weights, fresh full schedule; the papers' choice); weights = back to the weights of --rewind-epoch (lottery ticket); reinit = random re-initialisation; finetune = no rewinding, a short fresh schedule of --finetune-epochs (default: lr)")
    p.add_argument("--rewind-epoch", type=int, default=0, help="with --rewind weights: restart each round from the weights after this dense epoch (default: 0, the initialisation)")
    p.add_argument("--finetune-epochs", type=int, help="epochs per round with --rewind finetune (default: half the preset's)")
    p.add_argument("--noise", type=float, default=0.0, help="symmetric label noise on the training set (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="part of the training set held out as validation")
    p.add_argument("--image-size", type=int, help="resize images to this side (default: the dataset's; 16 with --preset quick)")
    p.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    p.add_argument("--workers", type=int, help="data-loader worker processes (default: the preset's)")
    p.add_argument("--entropy-batches", type=int, help="batches used to measure entropy (default: the whole training set)")
    p.add_argument("--out", help="run folder (default: runs/<model>-<method>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for data split, noise, initialisation and order (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyengine", description="pyengine: compress neural networks - make them sparse and shallower.")
    sub = ap.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    sub.add_parser("info", help="show the build (native kernels, CUDA) and the available models and datasets")
    return ap


def cmd_prune(args) -> int:
    from pyengine.methods.prune_run import PruneConfig, run_prune

    cfg = PruneConfig(
        model=args.model, method=args.method, dataset=args.dataset, data_dir=args.data_dir, download=args.download,
        preset=args.preset, epochs=args.epochs, rounds=args.rounds, sparsity=args.sparsity, rate=args.rate,
        zeta=args.zeta, estimator=args.estimator, scope=args.scope, rewind=args.rewind, rewind_epoch=args.rewind_epoch,
        finetune_epochs=args.finetune_epochs, noise=args.noise, val_fraction=args.val_fraction,
        image_size=args.image_size, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
        entropy_batches=args.entropy_batches, out=args.out, seed=args.seed, device=args.device,
        resume=args.resume, progress=not args.no_progress,
    )
    run_prune(cfg)
    return 0


def cmd_info(args) -> int:
    import torch

    import pyengine
    from pyengine.data import list_datasets
    from pyengine.models import list_models

    print(f"pyengine {pyengine.__version__}, torch {torch.__version__}")
    print(f"native kernels: {'yes' if pyengine.HAS_NATIVE else 'no (pure-PyTorch fallback)'}; CUDA kernels: {'yes' if pyengine.CUDA_COMPILED else 'no'}; CUDA device: {torch.cuda.is_available()}")
    print(f"models: {', '.join(list_models())}, tv:<torchvision name>")
    print(f"datasets: {', '.join(list_datasets())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            return cmd_prune(args)
        return cmd_info(args)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with the same command and --resume", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as exc:
        print(f"pyengine: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
