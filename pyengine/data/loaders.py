"""DataLoaders for train / val / test, seeded, optionally sharded across processes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from pyengine.data.core import DatasetBundle

__all__ = ["Loaders", "ShardSampler", "build_loaders"]


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + W, r + 2W, ...

    Unlike DistributedSampler, no sample is repeated, so sums of correct predictions and of
    counts all-reduced over ranks give the exact metric.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n - self.rank) / self.num_replicas))


@dataclass
class Loaders:
    """The loaders of one run; ``val`` is None without a validation split. Call
    ``set_epoch(epoch)`` at the start of every epoch (reshuffles a distributed sampler)."""

    train: DataLoader
    val: DataLoader | None
    test: DataLoader

    def set_epoch(self, epoch: int) -> None:
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)

    def __getitem__(self, split: str) -> DataLoader | None:
        return getattr(self, split)


def _as_splits(datasets) -> tuple[Dataset, Dataset | None, Dataset]:
    if isinstance(datasets, DatasetBundle):
        return datasets.train, datasets.val, datasets.test
    if isinstance(datasets, Mapping):
        return datasets["train"], datasets.get("val"), datasets["test"]
    if isinstance(datasets, Sequence) and len(datasets) in (2, 3):
        return (datasets[0], None, datasets[1]) if len(datasets) == 2 else tuple(datasets)
    raise TypeError("datasets must be a DatasetBundle, a mapping with 'train'/'val'/'test', "
                    "or a (train, val, test) or (train, test) tuple")


def build_loaders(datasets, batch_size: int, workers: int = 0, distributed: bool = False,
                  seed: int = 0, *, eval_batch_size: int | None = None, drop_last: bool = False,
                  pin_memory: bool | None = None, num_replicas: int | None = None,
                  rank: int | None = None) -> Loaders:
    """Build train / val / test loaders.

    Training order is reproducible: a generator seeded with ``seed`` drives shuffling, or
    DistributedSampler(seed=seed) when ``distributed``, which needs ``Loaders.set_epoch`` every
    epoch. Augmentation draws from torch's RNG: with ``workers > 0`` the workers' seeds come from
    the same seeded generator, drawn afresh every epoch (workers are not persistent), so
    restoring the generator's state (``loaders.train.generator``) before an epoch reproduces its
    order and augmentation after a resume; with ``workers=0`` augmentation uses the main
    process's global RNG, so seed that (``torch.manual_seed``) for reproducible augmented batches.
    In distributed mode evaluation splits are sharded without padding (``ShardSampler``).
    ``num_replicas`` and ``rank`` default to the initialised process group's.
    """
    train, val, test = _as_splits(datasets)
    eval_bs = eval_batch_size or batch_size
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # Workers are not persistent: every epoch's iterator draws its workers' seeds (and, for
    # training, the shuffle) afresh from the saved-and-restored random state, so an epoch run
    # after a resume sees the same order and augmentation as in an uninterrupted run (persistent
    # workers keep the seeds drawn at the first epoch, which a resumed process cannot re-create),
    # and evaluation draws from the global generator at every pass, as with workers=0.
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
    gen = torch.Generator().manual_seed(int(seed))

    if distributed:
        if num_replicas is None or rank is None:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("distributed=True needs an initialised process group "
                                   "(torch.distributed.init_process_group) or explicit "
                                   "num_replicas and rank")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        train_sampler = DistributedSampler(train, num_replicas=num_replicas, rank=rank,
                                           shuffle=True, seed=seed, drop_last=drop_last)
        train_loader = DataLoader(train, batch_size=batch_size, sampler=train_sampler,
                                  drop_last=drop_last, generator=gen, **common)

        def eval_loader(ds):
            return DataLoader(ds, batch_size=eval_bs, sampler=ShardSampler(ds, num_replicas, rank),
                              **common)
    else:
        train_loader = DataLoader(train, batch_size=batch_size, shuffle=True,
                                  drop_last=drop_last, generator=gen, **common)

        def eval_loader(ds):
            return DataLoader(ds, batch_size=eval_bs, shuffle=False, **common)

    return Loaders(train_loader, eval_loader(val) if val is not None else None, eval_loader(test))
