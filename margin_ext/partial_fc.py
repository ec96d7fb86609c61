"""``PartialFC``: the margin-softmax head with its classes split across ranks.

Rank r of the head's process group owns the contiguous classes
[start_r, start_r + n_r), n_r = C // R + (r < C % R), and only their centres. One
step reads straight down:

1. gather the batch: every rank's batch size (with a code for anything wrong with
   its inputs, so that all ranks raise the same error instead of hanging), then the
   embeddings (autograd-aware) and the labels of the global batch;
2. map each global label to its column in this shard (-1 where another rank owns it)
   and, with ``sample_rate < 1`` in training, keep the positives of the shard plus
   uniformly drawn negatives;
3. the head pipeline (:func:`margin_ext.pipeline.head_losses`, shared with the
   functional op): the owner of each row's class computes cos(theta_y) and a sum over
   the ranks hands it to everybody; the spec's target logit and its derivative per row
   (random margins drawn once, broadcast from rank 0); the shard's kernels give per-row
   (log-sum-exp, target logit); log-sum-exp across ranks (MAX then SUM of rescaled
   sums), target logit from its owner (a SUM), the spec's extra term;
4. the loss: the mean over the global batch's counted rows, identical on every rank.

Backward: the kernels give each rank the gradient of its shard's centres and its
classes' share of the gradient of every gathered row; the gather's backward sums the
shares and returns each rank the gradient of its own rows (see
:mod:`margin_ext.distributed` for the convention).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .backends import BACKENDS, resolve
from .margins import ArcFace, MarginSpec
from .monitoring import best_class
from .pipeline import class_chunk_size, head_losses
from .row_sparse import gather_rows
from .subcenters import class_rows
from .validation import (EMB_NDIM, FLOAT_DTYPES, NOT_TENSOR, OK, batch_error, batch_problem, dtype_code,
                         dtype_name)

INIT_STD = 0.01  # insightface's PartialFC initialises the centres from N(0, 0.01)
INIT_BLOCK = 4096  # classes drawn from one generator; a shard boundary never changes the numbers

_DDP_MESSAGE = (
    "PartialFC must not be wrapped in DistributedDataParallel: its weight is sharded "
    "across the ranks (each rank holds different classes), not replicated, and DDP "
    "would overwrite every shard with rank 0's and average unrelated gradients. Wrap "
    "only the backbone in DDP and call the head directly: "
    "loss = head(ddp_backbone(images), labels).")


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix64 steps), so nearby inputs give unrelated streams."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & mask)) & mask
        h = (h + 0x9E3779B97F4A7C15) & mask
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
        h ^= h >> 31
    return h >> 1


_INIT_STREAM, _SAMPLE_STREAM = 1, 2


def initial_class_centres(start: int, stop: int, embedding_size: int, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The initial centres of classes [start, stop), as every PartialFC draws them.

    N(0, INIT_STD) like insightface, but each block of INIT_BLOCK global classes has its
    own generator seeded from (seed, block), so a class's centre depends only on its
    global index and ``seed``: the shards of R ranks put together equal the weight of
    one process, whatever R. Drawn on the CPU in float32, then cast to ``dtype``.
    """
    out = torch.empty(stop - start, embedding_size)
    first_block, last_block = start // INIT_BLOCK, (stop - 1) // INIT_BLOCK
    for block in range(first_block, last_block + 1):
        g = torch.Generator().manual_seed(_mix_seed(_INIT_STREAM, seed, block))
        values = torch.normal(0.0, INIT_STD, (INIT_BLOCK, embedding_size), generator=g)
        lo, hi = max(start, block * INIT_BLOCK), min(stop, (block + 1) * INIT_BLOCK)
        out[lo - start:hi - start] = values[lo - block * INIT_BLOCK:hi - block * INIT_BLOCK]
    return out.to(dtype)


def sample_classes(local_labels: torch.Tensor, num_local: int, sample_rate: float,
                   generator: torch.Generator):
    """The shard's columns kept this step (ascending) and the labels remapped to them.

    Every class of the shard that is a positive of the global batch is kept; uniformly
    drawn negatives fill up to ceil(sample_rate * num_local) classes (all positives are
    kept even when they are more). ``local_labels`` holds -1 for rows this shard does
    not own, and keeps -1 there.
    """
    owned = local_labels >= 0
    positives = torch.unique(local_labels[owned])  # sorted
    # round first: 0.1 * 30 is 3.0000000000000004 in floating point
    keep = min(num_local, math.ceil(round(sample_rate * num_local, 9)))
    if positives.numel() >= keep:
        index = positives
    else:
        score = torch.rand(num_local, generator=generator, device=local_labels.device)
        score[positives] = 2.0  # above every uniform draw: positives are always among the top
        index = score.topk(keep).indices.sort().values
    remapped = torch.where(owned, torch.searchsorted(index, local_labels), local_labels)
    return index, remapped


class PartialFC(nn.Module):
    """Margin-softmax head whose class centres are split across the ranks of a group.

    embedding_size, num_classes: D and the total number of classes C.
    margin: a spec from :mod:`margin_ext.margins`.
    sample_rate: in (0, 1]; below 1, each training step keeps, per shard, the classes
        that are positives of the global batch plus uniformly drawn negatives, up to
        ceil(sample_rate * n_r) (Partial FC). 1 is exact and copies nothing. In eval
        mode every class is used.
    process_group: the ranks that share the classes; None: the default group when
        torch.distributed is initialised, else a single process owning every class.
    dtype: storage dtype of the centres.
    backend, chunk_size: as :func:`margin_ext.margin_cross_entropy` ("reference" is not
        available here).
    seed: the initial centres are a function of (seed, global class) only (see
        :func:`initial_class_centres`); negative sampling draws from (seed, rank, step).
    ignore_index: label of rows that do not count.
    sparse_grad: with sampling in training, ``weight.grad`` is a sparse COO tensor of the
        sampled rows instead of a dense (n_r x D) one that is zero elsewhere; pair it with
        :class:`margin_ext.RowSparseSGD` or :class:`margin_ext.RowSparseAdamW`, which update
        only those rows (see :mod:`margin_ext.row_sparse` for what that changes).

    ``head.weight`` is this rank's shard, classes [start, start + n_r). With k sub-centres
    per class (:class:`~margin_ext.margins.SubCenterArcFace`) it holds their n_r * k rows,
    sub-centre q of class start + i at row i * k + q: a class's sub-centres stay on one
    rank, sampling keeps or drops whole classes, and checkpoints reshard by class. Never
    wrap the head in DistributedDataParallel (it raises): its parameters are sharded.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: MarginSpec = ArcFace(),
                 sample_rate: float = 1.0, process_group=None, dtype: torch.dtype = torch.float32,
                 backend: str = "auto", chunk_size: Optional[int] = None, seed: int = 0,
                 ignore_index: int = -1, sparse_grad: bool = False):
        super().__init__()
        self.process_group = process_group
        self.world_size = distributed.group_size(process_group)
        self.rank = distributed.group_rank(process_group)
        config = dict(embedding_size=embedding_size, num_classes=num_classes, margin=repr(margin),
                      sample_rate=sample_rate, dtype=str(dtype), backend=backend,
                      chunk_size=chunk_size, seed=seed, ignore_index=ignore_index, sparse_grad=sparse_grad)
        problem = _config_problem(embedding_size, num_classes, margin, sample_rate, dtype,
                                  backend, chunk_size, seed, ignore_index, sparse_grad)
        # one small exchange so that a rank built differently is an error on every rank
        _agree_on_config(config, problem, distributed.all_gather_objects((config, problem), process_group))
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} is smaller than the {self.world_size} ranks of "
                             f"the process group: every rank needs at least one class")

        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.margin = margin
        self.sample_rate = float(sample_rate)
        self.backend = backend
        self.chunk_size = chunk_size
        self.seed = seed
        self.ignore_index = ignore_index
        self.sparse_grad = sparse_grad
        self.start, self.stop = distributed.shard_range(num_classes, self.world_size, self.rank)
        self.num_local = self.stop - self.start
        #: k, the weight's rows per class: this shard's rows are [start * k, stop * k) of the (C * k, D) whole
        self.subcenters = margin.subcenters
        self.sampling_step = 0  # advances once per sampled step; part of the saved state
        #: the spec's running statistics (AdaFace's norm mean and std; None for a stateless
        #: spec): updated from the global batch in training, frozen in eval, saved with the head
        self.margin_state = margin.initial_state()
        #: global ids of this shard's classes used by the last call (None: all of them)
        self.sampled_classes: Optional[torch.Tensor] = None
        k = self.subcenters
        self.weight = nn.Parameter(initial_class_centres(self.start * k, self.stop * k, embedding_size, seed, dtype))
        self._kernels: Dict[torch.device, object] = {}
        self._sampler: Optional[torch.Generator] = None

    # ------------------------------------------------------------------ the loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean margin loss over the counted rows of the GLOBAL batch (same on every rank).

        embeddings: (b_r, D) this rank's features, not normalized; b_r may differ
        between ranks (and be 0 on some). labels: (b_r,) int64 global class indices
        or ignore_index. generator: for specs with random margins (drawn on rank 0,
        broadcast). A collective: every rank of the group calls it.
        """
        self._refuse_ddp()
        x, y = self._gather_batch(embeddings, labels, differentiable=True)
        counted = (y != self.ignore_index).nonzero().squeeze(1)
        n_rows = counted.numel()
        sampling = self.sample_rate < 1.0 and self.training
        if n_rows == 0:
            # nothing counts anywhere: a zero that still reaches both inputs, on every rank
            # (a row-sparse gradient names no row: a row-sparse optimizer then changes nothing)
            no_rows = torch.zeros(0, dtype=torch.int64, device=self.weight.device)
            none = gather_rows(self.weight, no_rows, self.sparse_grad and sampling)
            return (x[:0].sum() + none.sum()).float()
        if n_rows != y.numel():
            x, y = x[counted], y[counted]

        local_labels = distributed.local_columns(y, self.start, self.stop)
        weight = self.weight
        self.sampled_classes = None
        if sampling:
            index, local_labels = sample_classes(local_labels, self.num_local, self.sample_rate,
                                                 self._next_sampler(weight.device))
            # gradient reaches only the sampled centres (ascending rows, as gather_rows needs)
            weight = gather_rows(weight, class_rows(index, self.subcenters), self.sparse_grad)
            self.sampled_classes = index + self.start

        kernels = self._kernels_for(weight.device)
        classes = weight.shape[0] // self.subcenters
        chunk = self.chunk_size or class_chunk_size(n_rows, weight, self.margin)
        losses = head_losses(x, weight, local_labels, self.margin, kernels, min(chunk, classes),
                             group=self.process_group, generator=generator, state=self.margin_state,
                             update_state=self.training)
        return losses.sum() / n_rows

    def _kernels_for(self, device):
        if device not in self._kernels:
            self._kernels[device] = resolve(self.backend, device)
        return self._kernels[device]

    def _next_sampler(self, device) -> torch.Generator:
        if self._sampler is None or self._sampler.device != device:
            self._sampler = torch.Generator(device=device)
        self._sampler.manual_seed(_mix_seed(_SAMPLE_STREAM, self.seed, self.rank, self.sampling_step))
        self.sampling_step += 1
        return self._sampler

    # ------------------------------------------------------------------ the global batch

    def _gather_batch(self, embeddings, labels, differentiable: bool):
        """Embeddings and labels of every rank, in rank order, after checking them everywhere."""
        group = self.process_group
        code, value = batch_problem(embeddings, labels, self.embedding_size, self.weight.device)
        batch = embeddings.shape[0] if code not in (NOT_TENSOR, EMB_NDIM) else 0
        wants_grad = differentiable and code == OK and embeddings.requires_grad and torch.is_grad_enabled()
        # the dtype travels too: the gather moves raw bytes, so fp16 on one rank and bf16 on
        # another would be reinterpreted (a wrong loss), fp32 against fp16 would break the gather
        dtype = dtype_code(embeddings.dtype) if code == OK else -1
        meta = torch.tensor([batch, code, value, wants_grad, dtype], dtype=torch.int64,
                            device=distributed.collective_device(group))
        table = distributed.all_gather_stacked(meta, group).tolist()
        for rank, (_, code, value, _, _) in enumerate(table):
            if code != OK:
                raise batch_error(code, value, batch=table[rank][0], device=self.weight.device, where=f" on rank {rank}",
                                  expected_size=f"expected embedding_size={self.embedding_size}")
        dtypes = [row[4] for row in table]
        for rank, other in enumerate(dtypes):
            if other != dtypes[0]:
                raise TypeError(f"embeddings.dtype={dtype_name(dtypes[0])} on rank 0 but "
                                f"embeddings.dtype={dtype_name(other)} on rank {rank}: every rank must pass "
                                f"embeddings of one dtype")
        sizes = [row[0] for row in table]
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty: every rank passed 0 rows")
        if not differentiable:
            x = distributed.all_gather_rows(embeddings, sizes, group)
        else:
            if any(row[3] for row in table) and not wants_grad and torch.is_grad_enabled():
                # another rank will run the gather's backward, a collective: take part in it
                embeddings = embeddings.detach().requires_grad_(True)
            x = distributed.gather_rows(embeddings, sizes, group)
        y = distributed.all_gather_rows(labels, sizes, group)
        bad = ((y < 0) | (y >= self.num_classes)) & (y != self.ignore_index)
        if bad.any():
            row = bad.nonzero()[0].item()
            rank = next(r for r in range(len(sizes)) if row < sum(sizes[:r + 1]))
            raise ValueError(f"labels[{row - sum(sizes[:rank])}]={y[row].item()} on rank {rank} is out of "
                             f"range: expected a class in [0, num_classes={self.num_classes}) or "
                             f"ignore_index={self.ignore_index}")
        return x, y

    # ------------------------------------------------------------------ monitoring and export

    @torch.no_grad()
    def top1_accuracy(self, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of the global batch's counted rows whose nearest centre (plain cosine) is
        their label; the same float on every rank (NaN when no row counts). A collective."""
        x, y = self._gather_batch(embeddings, labels, differentiable=False)
        cos, column = best_class(x, self.weight, self.chunk_size, self.subcenters)
        # each shard's best, then the shard with the largest cosine wins (ties: lowest class)
        all_cos = distributed.all_gather_stacked(cos, self.process_group)
        all_class = distributed.all_gather_stacked(column + self.start, self.process_group)
        predicted = all_class.gather(0, all_cos.argmax(dim=0, keepdim=True)).squeeze(0)
        counted = y != self.ignore_index
        if not counted.any():
            return float("nan")
        return (predicted[counted] == y[counted]).double().mean().item()

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """All C centres (C * k sub-centres) on every rank (an all-gather of C x D: for tests and export only)."""
        sizes = [distributed.shard_size(self.num_classes, self.world_size, r) * self.subcenters
                 for r in range(self.world_size)]
        return distributed.all_gather_rows(self.weight.detach(), sizes, self.process_group).clone()

    # ------------------------------------------------------------------ state and misuse

    def get_extra_state(self):
        state = {"sampling_step": self.sampling_step}
        if self.margin_state is not None:
            state["margin_state"] = self.margin_state.state_dict()
        return state

    def set_extra_state(self, state):
        self.sampling_step = int(state["sampling_step"])
        if self.margin_state is not None and "margin_state" in state:
            self.margin_state.load_state_dict(state["margin_state"])

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.start}, {self.stop}) of rank {self.rank}/{self.world_size}, "
                + ("" if self.subcenters == 1 else f"{self.subcenters} sub-centres per class, ")
                + f"margin={self.margin!r}, sample_rate={self.sample_rate}"
                + ("" if self.margin_state is None else f", margin_state={self.margin_state!r}"))

    @property
    def _ddp_params_and_buffers_to_ignore(self):
        # DistributedDataParallel reads this attribute of the module it wraps before it
        # broadcasts rank 0's parameters: the earliest moment to refuse
        raise RuntimeError(_DDP_MESSAGE)

    def _refuse_ddp(self):
        # the head inside a larger module that DDP wraps: DDP marks itself active during
        # its forward; it is misuse only if DDP manages our weight (not told to ignore it)
        active = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if active is not None and any(p is self.weight for p in getattr(active, "_module_parameters", ())):
            raise RuntimeError(_DDP_MESSAGE)


def _config_problem(embedding_size, num_classes, margin, sample_rate, dtype, backend, chunk_size,
                    seed, ignore_index, sparse_grad) -> Optional[str]:
    """What is wrong with this rank's constructor arguments, or None."""
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not positive_int(embedding_size):
        return f"embedding_size={embedding_size!r} is invalid: expected an integer > 0"
    if not positive_int(num_classes):
        return f"num_classes={num_classes!r} is invalid: expected an integer > 0"
    if not isinstance(margin, MarginSpec):
        return f"margin={margin!r} is invalid: expected a margin spec such as margin_ext.ArcFace()"
    if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        return f"sample_rate={sample_rate!r} is invalid: expected a number in (0, 1]"
    if dtype not in FLOAT_DTYPES:
        return f"dtype={dtype!r} is invalid: expected one of {FLOAT_DTYPES}"
    if backend not in BACKENDS or backend == "reference":
        return (f"backend={backend!r} is invalid for PartialFC: expected one of "
                f"{tuple(b for b in BACKENDS if b != 'reference')}")
    if chunk_size is not None and not positive_int(chunk_size):
        return f"chunk_size={chunk_size!r} is invalid: expected an integer >= 1 or None"
    if not isinstance(seed, int):
        return f"seed={seed!r} is invalid: expected an integer"
    if not isinstance(ignore_index, int) or ignore_index >= 0:
        return f"ignore_index={ignore_index!r} is invalid: expected a negative integer"
    if not isinstance(sparse_grad, bool):
        return f"sparse_grad={sparse_grad!r} is invalid: expected True or False"
    return None


def _agree_on_config(config, problem, gathered) -> None:
    """Raise the same error on every rank if any rank's arguments are invalid or differ."""
    for rank, (_, other_problem) in enumerate(gathered):
        if other_problem is not None:
            where = "" if len(gathered) == 1 else f" (on rank {rank})"
            raise ValueError(other_problem + where)
    for rank, (other, _) in enumerate(gathered):
        for name, value in config.items():
            first = gathered[0][0][name]
            if other[name] != first:
                raise ValueError(f"{name}={first!r} on rank 0 but {name}={other[name]!r} on rank {rank}: "
                                 f"every rank must build PartialFC with the same {name}")
