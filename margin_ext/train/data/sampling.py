"""The order in which ranks read the training set: resumable mid-epoch on any number of processes."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DistributedSampler, Sampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after the first ``skip`` samples.

    The epoch's permutation is DistributedSampler's (seeded by seed + epoch), dealt to
    the ranks round-robin, so after k steps of b samples per rank exactly the first
    k * b * world_size entries are consumed, whatever the world size: a resume on a
    different number of processes drops that prefix and deals the rest to the new
    ranks. With ``skip = 0`` it yields exactly DistributedSampler's indices.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return math.ceil((len(self.dataset) - self.skip) / self.num_replicas)

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = torch.randperm(len(self.dataset), generator=generator).tolist()[self.skip:]
        total = len(self) * self.num_replicas
        while len(indices) < total:  # pad by repeating, as DistributedSampler does
            indices += indices[:total - len(indices)]
        return iter(indices[self.rank:total:self.num_replicas])


class Batches(Sampler):
    """Batches of a sampler, the last one smaller; a last batch of one sample joins the one
    before it, because BatchNorm cannot train on a single sample."""

    def __init__(self, sampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def _batches(self):
        indices = list(self.sampler)
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return batch_count(len(self.sampler), self.batch_size)


def batch_count(samples: int, batch_size: int) -> int:
    """Batches that :class:`Batches` makes of ``samples`` samples."""
    count = math.ceil(samples / batch_size)
    return count - 1 if count > 1 and samples % batch_size == 1 else count
