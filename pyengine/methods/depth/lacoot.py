"""LaCoOT - layer collapse through optimal transport (Quetu, Liao, Hezbri, Pizzati, Tartaglione,
ICCV 2025, arXiv 2406.08933; methods.md section 5).

Training loss: cross-entropy + lambda * mean over the monitored block pairs of the max-sliced
Wasserstein distance (p = 2, K random unit directions drawn afresh at every step) between the
two sets of B points that a batch gives at a block's input and output, each sample's feature
map flattened (d = C*H*W). Pairs, as in the authors' code:

- ResNet: consecutive blocks within a stage, i.e. the input and output of every block after the
  first of its stage (identity shortcut); ResNet-18: the second BasicBlock of each stage, 4 terms;
- MobileNetV2: the input and output of the depthwise unit of every stride-1 block that expands
  (the unit is the removable part);
- Swin-T / ViT: the block's input and its MLP branch's output (before the residual sum).

lambda per architecture as published for CIFAR-10: ResNet-18 5, MobileNetV2 9, Swin-T 0.1 (ViT:
no published value, Swin-T's is used). The directions come from a generator seeded by (seed,
round, epoch, step), so a resumed run draws exactly the directions of an uninterrupted one.

After training (no fine-tuning): every block is scored by its distance on the validation split
(ResNet: the sliced Wasserstein mean over K seeded directions, as the authors' validation; the
others: max-sliced), blocks are ranked from the smallest distance, and removed one by one
(replaced by the identity: pyengine.graph Edit "replace_block"). Each step's accuracy,
parameters, MACs, depth and latency make the report's table (``report["method_result"]``) and
the accuracy-vs-MACs plot. The result keeps the most blocks removed within ``--tolerance`` of
the validation accuracy before removal (or exactly ``--remove-blocks``).

Differences from the authors' scripts, on purpose: their ResNet removal order is fixed (deepest
block first), the Swin script ranks by a combination of z-score and percentile of the distances
and the MobileNetV2 script maps the ranked index i to the block i+1 (block 1 is never removed);
here every architecture is ranked by its validation distance, as the paper describes.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from pyengine.methods.base import Method, StepCallback, register
from pyengine.methods.depth.common import DepthTolerance, last_within_tolerance, network_numbers
from pyengine.methods.options import option
from pyengine.ops import sliced_wasserstein, sliced_wasserstein_grouped

__all__ = ["LaCoOT", "LaCoOTOptions", "BlockPair", "ARCH_DEFAULTS", "find_block_pairs", "lacoot_regulariser",
           "BlockCapture", "score_blocks"]

# Published per-architecture settings (CIFAR-10). val_reduce: how validation distances are computed
# (the authors' ResNet validation uses POT's sliced_wasserstein_distance, the others the max).
ARCH_DEFAULTS = {
    "resnet": {"lambda_reg": 5.0, "val_reduce": "mean"},
    "mobilenet_v2": {"lambda_reg": 9.0, "val_reduce": "max"},
    "swin": {"lambda_reg": 0.1, "val_reduce": "max"},
    "vit": {"lambda_reg": 0.1, "val_reduce": "max"},  # ours: no published value, Swin-T's
    "custom": {"lambda_reg": 1.0, "val_reduce": "max"},  # the authors' script default
}


@dataclass
class LaCoOTOptions(DepthTolerance):
    lambda_reg: float | None = option(None, "LaCoOT: weight lambda of the sliced-Wasserstein term (default per "
                                      "architecture, as published: ResNet 5, MobileNetV2 9, Swin-T and ViT 0.1, "
                                      "other models 1)", low=0.0)
    directions: int = option(50, "LaCoOT: random directions per distance, drawn afresh every step", low=1)
    val_reduce: str | None = option(None, "LaCoOT: validation distance used to rank blocks: mean (sliced W, the "
                                    "authors' ResNet choice) or max (max-sliced W, their MobileNetV2/Swin choice); "
                                    "default per architecture", choices=("mean", "max"))
    remove_blocks: int | None = option(None, "LaCoOT: remove exactly this many blocks (default: as many as "
                                       "--tolerance allows)", low=0)
    monitor_blocks: list[str] | None = option(None, "LaCoOT: module paths of the blocks to regularise and rank, "
                                              "each with input and output of the same shape (default: the "
                                              "architecture's, see the method's documentation)")
    score_batches: int | None = option(None, "LaCoOT: validation batches used to score the blocks (default: all)",
                                       low=1)


@dataclass(frozen=True)
class BlockPair:
    """A monitored pair: the input of module ``src`` and the output of module ``dst``; removing it
    replaces module ``block`` by the identity."""

    block: str
    src: str
    dst: str


def _identity_shortcut(block: nn.Module) -> bool:
    if hasattr(block, "shortcut"):  # pyengine BasicBlock / Bottleneck
        return isinstance(block.shortcut, nn.Identity)
    if hasattr(block, "downsample"):  # torchvision BasicBlock / Bottleneck
        return block.downsample is None
    return False


def _stride1(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (1, 1)


def find_block_pairs(model: nn.Module, blocks: list[str] | None = None) -> tuple[str, list[BlockPair]]:
    """(architecture key, monitored pairs) of ``model`` as the authors choose them, or the
    explicit ``blocks`` (module paths; each pair is a block's own input and output)."""
    named = dict(model.named_modules())
    if blocks:
        missing = [b for b in blocks if b not in named or b == ""]
        if missing:
            raise KeyError(f"--monitor-blocks: {type(model).__name__} has no module(s) {missing}")
        return "custom", [BlockPair(b, b, b) for b in blocks]
    pairs: list[BlockPair] = []
    arch = None
    for name, m in named.items():
        cls = type(m).__name__
        if cls in ("SwinTransformerBlock", "SwinTransformerBlockV2") and hasattr(m, "mlp"):
            arch = "swin"
            pairs.append(BlockPair(name, name, f"{name}.mlp"))
        elif cls == "Block" and hasattr(m, "mlp") and hasattr(m, "attn") and type(m).__module__.startswith("pyengine"):
            arch = "vit"
            pairs.append(BlockPair(name, name, f"{name}.mlp"))
        elif cls == "InvertedResidual":
            if hasattr(m, "dw") and hasattr(m, "expand") and _stride1(m.dw.conv):  # pyengine MobileNetV2
                arch = "mobilenet_v2"
                pairs.append(BlockPair(f"{name}.dw", f"{name}.dw", f"{name}.dw"))
            elif hasattr(m, "conv") and len(m.conv) == 4 and _stride1(m.conv[1][0]):  # torchvision's
                arch = "mobilenet_v2"
                pairs.append(BlockPair(f"{name}.conv.1", f"{name}.conv.1", f"{name}.conv.1"))
    if arch is None:
        for sname, stage in model.named_children():
            if sname.startswith("layer") and isinstance(stage, nn.Sequential):
                for i, blk in enumerate(stage):
                    if i >= 1 and _identity_shortcut(blk):
                        arch = "resnet"
                        pairs.append(BlockPair(f"{sname}.{i}", f"{sname}.{i}", f"{sname}.{i}"))
    if not pairs:
        raise ValueError(f"LaCoOT does not know which blocks of a {type(model).__name__} to monitor (it knows "
                         "ResNet, MobileNetV2, Swin-T and ViT); name them with --monitor-blocks "
                         "(options={'monitor_blocks': [...]})")
    return arch, pairs


def lacoot_regulariser(pairs: list[tuple[Tensor, Tensor]], *, n_directions: int = 50, p: float = 2.0,
                       reduce: str = "max", generator: torch.Generator | None = None,
                       directions: list[Tensor] | None = None, check_nan: bool = True,
                       packed: bool | None = None) -> tuple[Tensor, Tensor]:
    """Mean over pairs of the (max-)sliced Wasserstein distance between the flattened per-sample
    features of each pair; returns (mean, per-pair distances). ``directions[i]`` (K, d_i) fixes the
    directions of pair i; otherwise ``n_directions`` are drawn from ``generator`` per pair.
    ``check_nan=False`` returns NaN instead of raising, without reading the result back (on CUDA
    the check is a host sync); the training step uses it and leaves a NaN to the training loop's
    non-finite-loss check.

    packed: all G pairs in one native call with one autograd node
    (:func:`pyengine.ops.sliced.sliced_wasserstein_grouped`: each pair projected on its own block
    of one (K, sum d) draw) instead of G calls - the same distances and gradients for the same
    directions, a fraction of the host work, which is what a launch-bound GPU step pays for.
    Default: packed when every pair has the same batch size, dtype and device. ``packed=False``
    draws each pair's directions separately (other values for the same seed)."""
    if not pairs:
        raise ValueError("lacoot_regulariser needs at least one pair")
    flat = []
    packable = True  # one batch size, dtype and device for all pairs
    for i, (a, b) in enumerate(pairs):
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if a.shape != b.shape:
            raise ValueError(f"pair {i}: the two point sets have shapes {tuple(a.shape)} and {tuple(b.shape)}; a "
                             "monitored block must keep its input's size")
        if a.dtype != b.dtype:
            a, b = a.float(), b.float()
        a0 = flat[0][0] if flat else a
        packable = packable and a.shape[0] == a0.shape[0] and a.dtype == a0.dtype and a.device == a0.device
        flat.append((a, b))
    if directions is not None and len(directions) != len(flat):
        raise ValueError(f"directions holds {len(directions)} tensors for {len(flat)} pairs")
    if packed is None:
        packed = packable
    elif packed and not packable:
        raise ValueError("packed=True needs pairs with one batch size, dtype and device")
    if packed:
        d = sliced_wasserstein_grouped([a for a, _ in flat], [b for _, b in flat], directions,
                                       n_directions=n_directions, p=p, reduce=reduce, generator=generator,
                                       check_nan=check_nan)
    else:
        d = torch.stack([sliced_wasserstein(a, b, directions[i] if directions is not None else None,
                                            n_directions=n_directions, p=p, reduce=reduce, generator=generator,
                                            check_nan=check_nan) for i, (a, b) in enumerate(flat)])
    return d.mean(), d


def _version(t) -> int | None:
    """A tensor's version counter (None where there is none: inference-mode tensors, non-tensors)."""
    try:
        return t._version
    except (AttributeError, RuntimeError):
        return None


class BlockCapture:
    """Forward hooks that keep, for every pair, the input of ``src`` (a pre-hook: before the block
    runs) and the output of ``dst`` of the latest forward (only while ``enabled``); a context
    manager. A kept tensor that an in-place operation changed afterwards (an
    ``nn.ReLU(inplace=True)`` inside the block on its input, or after the block on its output)
    no longer holds the block's input or output: :meth:`take` refuses it, naming the block."""

    def __init__(self, model: nn.Module, pairs: list[BlockPair]):
        self.model, self.pairs = model, pairs
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[tuple[str, str], int | None] = {}
        self.enabled = True
        self._handles = []

    def __enter__(self):
        named = dict(self.model.named_modules())
        for p in self.pairs:
            for path in (p.src, p.dst):
                if path not in named:
                    raise KeyError(f"LaCoOT: the network has no module {path!r} (was it edited?)")

            def pre(module, args, key=p.block):
                if self.enabled:
                    self.inputs[key] = args[0]
                    self._versions[("input", key)] = _version(args[0])

            def post(module, args, out, key=p.block):
                if self.enabled:
                    self.outputs[key] = out
                    self._versions[("output", key)] = _version(out)

            self._handles.append(named[p.src].register_forward_pre_hook(pre))
            self._handles.append(named[p.dst].register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self._versions.clear()

    def take(self) -> list[tuple[Tensor, Tensor]]:
        missing = [p.block for p in self.pairs if p.block not in self.inputs or p.block not in self.outputs]
        if missing:
            raise RuntimeError(f"LaCoOT: the forward did not call the monitored module(s) of {missing}; in an "
                               "edited (traced) network the blocks are no longer modules that are called")
        for p in self.pairs:
            for side, table, where in (("input", self.inputs, "inside the block"),
                                       ("output", self.outputs, "after the block")):
                was = self._versions.get((side, p.block))
                if was is not None and _version(table[p.block]) != was:
                    raise RuntimeError(
                        f"LaCoOT: the {side} of block {p.block!r} was changed in place {where} (an in-place "
                        "operation, e.g. nn.ReLU(inplace=True) or x += ...), so it no longer holds what the "
                        f"distance compares: make the operations that write on the block's {side} out-of-place")
        out = [(self.inputs[p.block], self.outputs[p.block]) for p in self.pairs]
        self.clear()
        return out


@torch.no_grad()
def _check_pair_shapes(model: nn.Module, pairs: list[BlockPair], example_input: Tensor) -> None:
    """Named blocks must keep their input's shape (their distance compares the two, and removing
    one makes its input its output): checked on the example input, naming the block."""
    was = model.training
    model.eval()
    try:
        with BlockCapture(model, pairs) as cap:
            model(example_input)
            bad = [f"{p.block} ({list(cap.inputs[p.block].shape[1:])} -> {list(cap.outputs[p.block].shape[1:])})"
                   for p in pairs if p.block in cap.inputs and p.block in cap.outputs
                   and cap.inputs[p.block].shape != cap.outputs[p.block].shape]
            unused = [p.block for p in pairs if p.block not in cap.inputs or p.block not in cap.outputs]
    finally:
        model.train(was)
    if bad:
        raise ValueError(f"--monitor-blocks: block(s) {bad} change the shape of their input; LaCoOT compares a "
                         "block's input with its output and removes a block by making its input its output")
    if unused:
        raise ValueError(f"--monitor-blocks: block(s) {unused} are not called in the forward")


def _mixed_seed(*parts) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash())."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@torch.no_grad()
def score_blocks(model: nn.Module, pairs: list[BlockPair], loader, device, *, n_directions: int = 50,
                 reduce: str = "mean", seed: int = 0, max_batches: int | None = None) -> dict[str, float]:
    """Each pair's distance on ``loader`` (eval mode), averaged over batches as the authors do; the
    directions of batch i are seeded by (seed, i), so scores are reproducible."""
    was = model.training
    model.eval()
    sums = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    n = 0
    gen = torch.Generator(device=device)
    try:
        with BlockCapture(model, pairs) as cap:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device))
                gen.manual_seed(_mixed_seed(seed, i))
                _, d = lacoot_regulariser(cap.take(), n_directions=n_directions, reduce=reduce, generator=gen)
                sums += d.double()
                n += 1
    finally:
        model.train(was)
    from pyengine.train.dist import all_reduce_sum

    *totals, n = all_reduce_sum(sums.tolist() + [float(n)], device)  # every rank ranks alike
    if n == 0:
        raise ValueError("LaCoOT: the scoring loader gave no batch")
    return {p.block: s / n for p, s in zip(pairs, totals)}


def _logits(out, where: str = "the network"):
    """The class scores in a network's output: the tensor itself, the first element of a tuple or
    list (``(logits, features)``, as Hugging Face and torchvision's auxiliary outputs put them), or
    a dict's ``"logits"``; anything else is refused, naming what it is."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    what = f"a dict with keys {sorted(map(str, out))[:8]}" if isinstance(out, dict) else f"a {type(out).__name__}"
    raise TypeError(f"LaCoOT measures the accuracy after each removal on class scores, but {where} returns {what}: "
                    "return the logits, (logits, ...) or {'logits': ...}")


class _Logits(nn.Module):
    """``model`` with its output reduced to the class scores (:func:`_logits`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _logits(self.model(x), type(self.model).__name__)


class _Labelled:
    """The (inputs, labels) batches of ``loader``; a batch of another form is refused, naming it."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
                form = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (list, tuple)) else "")
                raise ValueError(f"LaCoOT measures the accuracy after each removal: the loader's batches must be "
                                 f"(inputs, labels) pairs, got {form}")
            yield batch


class _RegulariserStep(StepCallback):
    """Adds lambda * mean pair distance to each training step's loss, from the same forward."""

    def __init__(self, method: "LaCoOT"):
        self.m = method
        self.capture: BlockCapture | None = None
        self.epoch = self.step = 0
        self.gen: torch.Generator | None = None
        self.sums: Tensor | None = None
        self.steps = 0
        self.packed: bool | None = None  # lacoot_regulariser's choice (benchmarks set False to compare)

    def on_train_start(self, model):
        self.capture = BlockCapture(self.m.run.model, self.m.pairs).__enter__()

    def on_train_end(self, model):
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None

    def on_epoch_start(self, epoch, total_epochs):
        self.epoch = epoch
        self.sums, self.steps = None, 0

    def on_batch_start(self, step, x, y):
        self.step = step
        self.capture.clear()

    def extra_loss(self, logits, y, x):
        if self.capture is None or self.m.lam == 0.0:
            return None
        pairs = self.capture.take()
        if self.gen is None or self.gen.device != logits.device:
            self.gen = torch.Generator(device=logits.device)
        self.gen.manual_seed(_mixed_seed(self.m.seed, len(self.m.run.rounds), self.epoch, self.step))
        # no NaN check here: it would read the result back (a host sync per pair and step on CUDA);
        # a NaN makes the loss NaN, which the training loop reports with its step
        mean, d = lacoot_regulariser(pairs, n_directions=self.m.opt.directions, reduce="max", generator=self.gen,
                                     check_nan=False, packed=self.packed)
        d = d.detach().double()
        self.sums = d if self.sums is None else self.sums + d
        self.steps += 1
        return self.m.lam * mean

    def train_distances(self) -> dict[str, float] | None:
        if self.sums is None or not self.steps:
            return None
        return {p.block: float(s) / self.steps for p, s in zip(self.m.pairs, self.sums.tolist())}


@register
class LaCoOT(Method):
    """Train with a sliced-Wasserstein term between block inputs and outputs, then remove the blocks
    closest to the identity without fine-tuning."""

    name = "lacoot"
    summary = "depth reduction: optimal-transport regulariser, then blocks removed by distance (LaCoOT, ICCV 2025)"
    Options = LaCoOTOptions
    default_rounds = {"*": 0}  # one training run; the removal needs no retraining
    uses_rewind = False
    default_val_fraction = 0.1  # the authors train on 90% of CIFAR-10's training set

    def __init__(self, options, run):
        super().__init__(options, run)
        self.arch, self.pairs = find_block_pairs(run.model, options.monitor_blocks)
        if options.monitor_blocks and getattr(run, "example_input", None) is not None:
            _check_pair_shapes(run.model, self.pairs, run.example_input)
        d = ARCH_DEFAULTS[self.arch]
        self.lam = options.lambda_reg if options.lambda_reg is not None else d["lambda_reg"]
        self.val_reduce = options.val_reduce or d["val_reduce"]
        cfg = getattr(run, "cfg", None)
        self.seed = cfg.seed if cfg is not None else 0
        self._step = _RegulariserStep(self)
        self._score_loader = None
        self.scores: dict[str, float] | None = None
        self.removed: list[str] | None = None  # the blocks remove() took out, once it ran

    def step_callbacks(self):
        return [self._step]

    def summary_extra(self, summary):
        out = {"blocks_total": len(self.pairs), "lambda": self.lam}
        train = self._step.train_distances()
        if train is not None:
            out["train_distances"] = train
        return out

    # ---- scoring and removal --------------------------------------------------------
    def score(self, loader, *, max_batches: int | None = None) -> dict[str, float]:
        """Scores every monitored block on ``loader`` (batches of (x, y)); with a Compressor, call
        this on validation data before ``step()``, which then removes blocks."""
        if self.removed is not None:
            raise RuntimeError(f"LaCoOT ranks and removes blocks once, after training: this network was already "
                               f"edited ({len(self.removed)} block(s) removed: {self.removed}), and its remaining "
                               "blocks are no longer modules that a forward calls")
        if isinstance(loader, Iterator):  # remove() reads the loader again, once per removal
            raise TypeError("LaCoOT: score() needs a loader that can be read several times (a list of batches or "
                            f"a DataLoader), got a one-shot {type(loader).__name__}: the blocks are scored on it, "
                            "then the accuracy is measured on it after each removal")
        mb = max_batches if max_batches is not None else self.opt.score_batches
        self.scores = score_blocks(self.run.model, self.pairs, loader, self.run.device,
                                   n_directions=self.opt.directions, reduce=self.val_reduce, seed=self.seed,
                                   max_batches=mb)
        self._score_loader = loader
        return self.scores

    def _evaluate(self, model, loader):
        from pyengine.train.loop import evaluate

        if loader is None:
            return None
        res = evaluate(_Logits(model), _Labelled(loader), self.run.device, getattr(self.run, "train_cfg", None))
        if res["n"] == 0:  # an accuracy of nothing would read 0% for every removal, all "within tolerance"
            raise ValueError("LaCoOT: the loader gave no batch to measure the accuracy after each removal on "
                             "(an iterator that was used up?)")
        return res["acc"]

    def remove(self, val_loader, test_loader=None) -> dict:
        """Ranks the blocks by their scores, removes them one by one without fine-tuning, measures
        each step, and edits the network to the chosen number of removals. Returns the record."""
        from pyengine.graph import Edit, apply_edit

        if self.scores is None:
            raise RuntimeError("LaCoOT: score the blocks first (method.score(val_loader))")
        index = {p.block: i for i, p in enumerate(self.pairs)}
        ranking = sorted(self.scores, key=lambda b: (self.scores[b], index[b]))
        model = self.run.model
        rows = []
        for k in range(len(ranking) + 1):
            if k > 0:
                model = apply_edit(model, Edit("replace_block", ranking[k - 1]), self.run.example_input)
            row = {"blocks_removed": k, "removed": ranking[k - 1] if k else None,
                   "val_acc": self._evaluate(model, val_loader), "test_acc": self._evaluate(model, test_loader)}
            row.update(network_numbers(model, self.run.example_input))
            rows.append(row)
            self.run.log(f"[lacoot] {k}/{len(ranking)} block(s) removed"
                         + (f" (+{ranking[k - 1]}, distance {self.scores[ranking[k - 1]]:.4g})" if k else "")
                         + (f": val acc {row['val_acc']:.2f}%" if row["val_acc"] is not None else "")
                         + (f", test acc {row['test_acc']:.2f}%" if row["test_acc"] is not None else "")
                         + f", MACs {row['macs']:,}")
        if self.opt.remove_blocks is not None:
            chosen = min(self.opt.remove_blocks, len(ranking))
            rule = f"--remove-blocks {self.opt.remove_blocks}"
        else:
            chosen = last_within_tolerance(rows, self.opt.tolerance)
            rule = f"--tolerance {self.opt.tolerance:g}"
        if chosen:
            self.run.edit([Edit("replace_block", b) for b in ranking[:chosen]])
        self.run.log(f"[lacoot] result: {chosen} of {len(ranking)} block(s) removed ({rule})")
        rec = {"arch": self.arch, "lambda": self.lam, "directions": self.opt.directions,
              "val_reduce": self.val_reduce, "pairs": [asdict(p) for p in self.pairs], "distances": self.scores,
              "ranking": ranking, "table": rows, "blocks_total": len(ranking), "blocks_removed": chosen,
              "removed": ranking[:chosen], "rule": rule, "val_acc": rows[chosen]["val_acc"],
              "test_acc": rows[chosen]["test_acc"]}
        # done once: a later step() has nothing to act on (the scores belong to the network before)
        self.removed, self.scores, self._score_loader = ranking[:chosen], None, None
        return rec

    def act(self, summary):
        # a user's loop (Compressor): score(val_loader), then step() removes; the runner trains once
        if self._score_loader is None:
            return None
        return self.remove(self._score_loader)

    def finish(self, result):
        loaders = self.run.loaders
        val = loaders["val"]
        scored_on = "val"
        if val is None:  # no validation split (--val-fraction 0): the training images, unaugmented
            val, scored_on = self.run.entropy_loader, "train (no validation split)"
        self.score(val)
        rec = self.remove(val, loaders["test"])
        rec["scored_on"] = scored_on
        train = self._step.train_distances()
        if train is not None:
            rec["train_distances"] = train
        return rec
