"""Dense vs folded network: depth, layers, parameters, MACs and latency, with an exactness check.

The default case is the collapse of the default EGP run on ResNet-18 (CIFAR stem): conv1 and
conv2 of both layer3 blocks emptied; ``--linearise`` adds activations to linearise first.

    python benchmarks/bench_fold.py --device cuda --batch 32
    python benchmarks/bench_fold.py --model resnet50 --linearise layer1.0.relu2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyengine.graph import (  # noqa: E402
    Edit,
    EditHistory,
    apply_edits,
    fold_network,
    measure_latency,
    network_stats,
    replay,
)
from pyengine.models import build_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--empty", nargs="*", default=["layer3.0.conv1", "layer3.0.conv2",
                                                  "layer3.1.conv1", "layer3.1.conv2"],
                    help="weight layers to zero (the collapse to fold away)")
    ap.add_argument("--linearise", nargs="*", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, 10, image_size=args.image_size).eval()
    for m in model.modules():  # trained-looking BN statistics, so BN folding is not trivial
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for name in args.empty:
        model.get_submodule(name).weight.data.zero_()
    model = model.to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        edited, history = apply_edits(model, [Edit("linearise", n) for n in args.linearise])
        folded, applied, refused = fold_network(edited, x)
    history = EditHistory(list(history) + list(applied))

    # exactness: the same folds on a float64 copy equal the edited network in float64
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e64, x64 = edited.double(), x.double()
        f64, _, _ = fold_network(e64, x64)
        err = float((f64(x64) - e64(x64)).abs().max() / e64(x64).abs().max())
        edited = edited.float()
        # replay from a fresh base + the folded state dict gives the same network, bit for bit
        fresh = build_model(args.model, 10, image_size=args.image_size).to(device)
        again = replay(fresh, EditHistory.from_json(history.to_json()), x)
        again.load_state_dict(folded.state_dict())
        same = torch.equal(again.eval()(x), folded(x))

    rows = {}
    for which, net in (("dense", model), ("folded", folded)):
        stats = network_stats(net, x[:1])
        stats["latency_ms"] = measure_latency(net, x, device)
        rows[which] = stats
    print(f"{args.model} {args.image_size}x{args.image_size} batch {args.batch} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f" (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'':8} {'depth':>6} {'convs':>6} {'linears':>8} {'params':>10} {'MACs':>12} {'latency ms':>11}")
    for which, s in rows.items():
        print(f"{which:8} {s['depth']:>6} {s['conv_layers']:>6} {s['linear_layers']:>8} "
              f"{s['params']:>10} {s['macs']:>12} {s['latency_ms']:>11.3f}")
    print(f"folded vs edited (float64): max rel err {err:.2e}; replay identical: {same}")
    print(f"applied: {len(applied)} edits; refused: {len(refused)}")
    for r in refused:
        print(f"  refused {r['kind']} {r['target']} into {r['into']}: {r['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "image_size": args.image_size, "batch": args.batch,
            "device": str(device), "torch": torch.__version__, "rows": rows,
            "rel_err_fp64": err, "replay_identical": same,
            "applied": history.describe(), "refused": refused}, indent=2))
    return 0 if err < 1e-10 and same else 1


if __name__ == "__main__":
    sys.exit(main())
