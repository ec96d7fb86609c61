"""Checkpoints of the sharded head that load on any number of ranks.

Built on ``torch.distributed.checkpoint`` (DCP). Each rank writes its shard of the
centres as a ``ShardedTensor`` shard placed at the shard's global row offset, so the
checkpoint describes the one (C x D) matrix, not R pieces of it; on load, each rank
asks DCP for the rows of its new shard and DCP reads them from whichever files hold
them. Optimizer state that has the centres' shape (SGD's momentum, Adam's moments) is
saved the same way; the rest (Adam's step, the parameter groups) is replicated.

Why ShardedTensor rather than DTensor: DTensor's Shard(0) places rows by
``torch.chunk`` (ceil(C / R) per rank), while our shards are C // R + (r < C % R)
rows (e.g. C = 37 on 3 ranks: 13, 12, 12 against 13, 13, 11); a ShardedTensor takes
the offsets as they are. Without an initialised process group the head's single shard
is the whole matrix and is saved as a plain tensor, which DCP treats the same way.

Loading runs no code from the files. Everything is a tensor: the small state (the
head's shape, the optimizer's groups, ``extra``) is JSON held in a uint8 tensor, and
DCP reads tensors with ``torch.load(weights_only=True)``. DCP's own index (the
``.metadata`` file) is a pickle: it is read by :mod:`margin_ext.dcp_metadata`, which
admits only the few classes DCP writes there, and an entry that would make DCP
unpickle a value (a "bytes" entry) is refused.

Both functions are collectives: every rank of the head's process group calls them,
with a ``directory`` on a filesystem all of them see.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from . import tensor_json
from .partial_fc import PartialFC

FORMAT_VERSION = 2  # 1: the small state was pickled (no longer read)
_ROWS, _WHOLE, _OBJECT = "rows", "whole", "object"
_HEAD_META, _OPTIMIZER_META, _EXTRA = "head.meta", "optimizer.meta", "extra"
_EXTRA_TENSOR = "extra.tensor."
_MAX_JSON_BYTES = 64 << 20  # the small state is kilobytes; a larger declared size is a corrupt index


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is corrupt or unsafe, or does not fit what loads it."""


def save_head(directory: str, head: PartialFC, optimizer: Optional[torch.optim.Optimizer] = None,
              *, extra: Optional[Dict[str, Any]] = None) -> None:
    """Save ``head`` (and ``optimizer``, which must optimize only ``head.parameters()``).

    extra: small state, the same on every rank, to keep beside it (a GradScaler's
    state_dict, the step, ...); :func:`load_head` returns it. It may hold None, bool,
    int, float, str, tensors, and lists, tuples and dicts of them (stored as JSON and
    tensors, never pickled); anything else is a TypeError.
    """
    _check_head(head)
    state: Dict[str, Any] = {
        "head.weight": _by_rows(head, head.weight.detach()),
        _HEAD_META: _json_tensor({"format": FORMAT_VERSION, "num_classes": head.num_classes,
                                  "embedding_size": head.embedding_size, "subcenters": head.subcenters,
                                  "world_size": head.world_size,
                                  "sampling_step": head.sampling_step, "margin": repr(head.margin),
                                  "margin_state": _margin_state(head)}),
    }
    if optimizer is not None:
        names = _parameter_names(head, optimizer)
        saved = optimizer.state_dict()
        layout, objects = {}, {}
        for index, per_param in saved["state"].items():
            name, param = names[index], head.get_parameter(names[index])
            for key, value in per_param.items():
                fqn = f"optimizer.state.{name}.{key}"
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape:
                    layout[fqn], state[fqn] = _ROWS, _by_rows(head, value)
                elif isinstance(value, torch.Tensor):
                    layout[fqn], state[fqn] = _WHOLE, value
                else:
                    layout[fqn], objects[fqn] = _OBJECT, value
        groups = [dict(g, params=[names[i] for i in g["params"]]) for g in saved["param_groups"]]
        text, tensors = tensor_json.encode({"type": _state_format(optimizer), "layout": layout,
                                            "objects": objects, "param_groups": groups}, "optimizer state")
        if tensors:
            raise TypeError("the optimizer's parameter groups hold tensors, which save_head does not store")
        state[_OPTIMIZER_META] = _text_tensor(text)
    if extra is not None:
        text, tensors = tensor_json.encode(extra, "extra")
        state[_EXTRA] = _text_tensor(text)
        state.update({f"{_EXTRA_TENSOR}{i}": t for i, t in enumerate(tensors)})
    dcp = _dcp()
    with _quiet():
        # overwrite: saving again to the same directory (a "latest" checkpoint) is intended
        dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, overwrite=True),
                 process_group=head.process_group, no_dist=_no_dist())


def load_head(directory: str, head: PartialFC,
              optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, Any]:
    """Load a checkpoint of :func:`save_head` into ``head`` (and ``optimizer``).

    The checkpoint may come from any number of ranks; the centres and the optimizer
    state land bit for bit in this head's shards. Everything is checked before
    anything changes. Returns the ``extra`` saved with it ({} if none).

    Reading runs no code from the files (see the module's docstring): a crafted,
    corrupt or truncated checkpoint raises :class:`CheckpointError`.
    """
    _check_head(head)
    names = _parameter_names(head, optimizer) if optimizer is not None else None
    stored = read_index(directory)
    try:
        return _load_checked(directory, head, optimizer, names, stored)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError,
            MemoryError) as error:
        raise CheckpointError(f"the checkpoint in {directory!r} is malformed ({type(error).__name__}: {error})") \
            from None


def read_index(directory: str) -> Dict[str, Any]:
    """The entries of the DCP index in ``directory`` (read safely), after checking its data files."""
    from .dcp_metadata import METADATA_FILE, check_files, read_metadata_file

    try:
        metadata = read_metadata_file(f"{directory}/{METADATA_FILE}")
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {directory!r}: its index {METADATA_FILE} is missing") from None
    except OSError as error:
        raise CheckpointError(f"cannot read the checkpoint in {directory!r} ({error})") from None
    except Exception as error:  # an unpickler meets every kind of garbage; all of it means "corrupt"
        raise CheckpointError(f"the checkpoint in {directory!r} is corrupt or unsafe: its index "
                              f"{METADATA_FILE} {error}") from None
    try:
        check_files(directory, metadata)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"the checkpoint in {directory!r} is incomplete: {error}") from None
    return metadata.state_dict_metadata


def _load_checked(directory, head, optimizer, names, stored):
    wanted = [_HEAD_META] + [k for k in (_OPTIMIZER_META, _EXTRA) if k in stored]
    if _HEAD_META not in stored or "head.weight" not in stored:
        raise CheckpointError(f"the checkpoint in {directory!r} holds no margin_ext head (no {_HEAD_META})")
    small = _load(head, directory, {k: _json_buffer(directory, k, stored[k]) for k in wanted})
    meta = _read_json(directory, small, _HEAD_META)
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"the checkpoint in {directory!r} has no format number in {_HEAD_META}")
    if meta["format"] != FORMAT_VERSION:
        raise CheckpointError(f"the checkpoint in {directory!r} has format {meta['format']}; this margin_ext "
                              f"reads format {FORMAT_VERSION}")
    meta.setdefault("subcenters", 1)  # saved before sub-centres existed
    for name in ("num_classes", "embedding_size", "subcenters"):
        if meta[name] != getattr(head, name):
            raise CheckpointError(f"the checkpoint in {directory!r} has {name}={meta[name]}, "
                                  f"the head has {name}={getattr(head, name)}")
    margin_state = _checked_margin_state(directory, head, meta)
    optimizer_meta = None
    if optimizer is not None:
        if _OPTIMIZER_META not in small:
            raise CheckpointError(f"the checkpoint in {directory!r} holds no optimizer state: "
                                  f"pass optimizer=None or a checkpoint saved with one")
        optimizer_meta = _read_json(directory, small, _OPTIMIZER_META)
        _check_optimizer(directory, optimizer, names, optimizer_meta)

    tensors = {"head.weight": _by_rows(head, torch.empty_like(head.weight.detach()))}
    for fqn, kind in (optimizer_meta["layout"].items() if optimizer_meta else ()):
        saved = stored.get(fqn)
        if kind in (_ROWS, _WHOLE) and saved is None:
            raise CheckpointError(f"the checkpoint in {directory!r} lacks the optimizer tensor {fqn!r}")
        if kind == _ROWS:
            local = torch.empty((head.num_local * head.subcenters,) + tuple(saved.size[1:]), dtype=saved.properties.dtype,
                                device=head.weight.device)
            tensors[fqn] = _by_rows(head, local)
        elif kind == _WHOLE:
            tensors[fqn] = torch.empty(saved.size, dtype=saved.properties.dtype)
        elif kind != _OBJECT:
            raise CheckpointError(f"the checkpoint in {directory!r} has an unknown layout {kind!r} for {fqn!r}")
    extra_tensors = sorted((k for k in stored if k.startswith(_EXTRA_TENSOR)),
                           key=lambda k: int(k[len(_EXTRA_TENSOR):]))
    for fqn in extra_tensors:
        tensors[fqn] = torch.empty(stored[fqn].size, dtype=stored[fqn].properties.dtype)
    loaded = _load(head, directory, tensors)
    extra = _read_json(directory, small, _EXTRA, [loaded[k] for k in extra_tensors]) if _EXTRA in small else {}

    with torch.no_grad():
        head.weight.copy_(_local(loaded["head.weight"]))
    head.sampling_step = int(meta["sampling_step"])
    if margin_state is not None:
        head.margin_state.load_state_dict(margin_state)
    if optimizer_meta is not None:
        _restore_optimizer(optimizer, names, optimizer_meta, loaded)
    return extra


def _margin_state(head: PartialFC):
    """The spec's running statistics (equal on every rank), or None for a stateless spec."""
    return None if head.margin_state is None else head.margin_state.state_dict()


def _checked_margin_state(directory, head: PartialFC, meta):
    """The saved running statistics if the head keeps some, checked against its own; None otherwise."""
    saved = meta.get("margin_state")
    if head.margin_state is None or saved is None:
        return None
    try:
        head.margin_state.copy().load_state_dict(saved)
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint in {directory!r} has running statistics that do not fit "
                              f"the head's margin {head.margin!r}: {error}") from None
    return saved


def _check_optimizer(directory, optimizer, names, meta) -> None:
    if meta["type"] != _state_format(optimizer):
        raise CheckpointError(f"the checkpoint in {directory!r} holds the state of a {meta['type']} "
                         f"optimizer, got optimizer={type(optimizer).__name__}")
    saved = [sorted(g["params"]) for g in meta["param_groups"]]
    current = [sorted(names[i] for i in g["params"]) for g in optimizer.state_dict()["param_groups"]]
    if saved != current:
        raise CheckpointError(f"the optimizer's parameter groups {current} differ from the saved ones {saved}")


def _state_format(optimizer) -> str:
    """The name of the optimizer's kind of state: its class's, unless it declares that it keeps
    another's (margin_ext.RowSparseSGD keeps torch.optim.SGD's)."""
    return getattr(optimizer, "state_format", type(optimizer).__name__)


def _restore_optimizer(optimizer, names, meta, loaded) -> None:
    index_of = {name: index for index, name in names.items()}
    state: Dict[int, Dict[str, Any]] = {}
    for fqn, kind in meta["layout"].items():
        name, key = fqn[len("optimizer.state."):].rsplit(".", 1)
        value = meta["objects"][fqn] if kind == _OBJECT else _local(loaded[fqn])
        state.setdefault(index_of[name], {})[key] = value
    groups = [dict(g, params=[index_of[n] for n in g["params"]]) for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _check_head(head) -> None:
    if not isinstance(head, PartialFC):
        raise TypeError(f"head must be a margin_ext.PartialFC, got {type(head).__name__}")


def _parameter_names(head: PartialFC, optimizer) -> Dict[int, str]:
    """The name in ``head`` of each parameter index of ``optimizer.state_dict()``."""
    by_identity = {id(p): name for name, p in head.named_parameters()}
    names, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in by_identity:
                raise ValueError("optimizer must optimize only head.parameters(): it holds a parameter "
                                 f"of shape {tuple(p.shape)} that is not the head's")
            names[index] = by_identity[id(p)]
            index += 1
    return names


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _by_rows(head: PartialFC, local: torch.Tensor):
    """``local`` (this rank's rows of a (C * k, ...) tensor, k sub-centres per class) as DCP
    should see it: placed at row head.start * k."""
    if head.world_size == 1:
        return local
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    local = local.contiguous()
    rest = list(local.shape[1:])
    placement = f"rank:{dist.get_rank()}/{local.device}"  # ShardedTensor names the global rank
    k = head.subcenters
    shard = Shard(local, ShardMetadata([head.start * k] + [0] * len(rest), list(local.shape), placement))
    with _quiet():
        return init_from_local_shards([shard], [head.num_classes * k] + rest, process_group=head.process_group)


def _local(value) -> torch.Tensor:
    if hasattr(value, "local_shards"):  # a ShardedTensor
        return value.local_shards()[0].tensor
    return value


def _json_tensor(value) -> torch.Tensor:
    text, _ = tensor_json.encode(value)
    return _text_tensor(text)


def _text_tensor(text: str) -> torch.Tensor:
    # a tensor, so that DCP reads it back without unpickling anything
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def _json_buffer(directory, fqn, entry) -> torch.Tensor:
    size = tuple(entry.size)
    if entry.properties.dtype != torch.uint8 or len(size) != 1 or size[0] > _MAX_JSON_BYTES:
        raise CheckpointError(f"the checkpoint in {directory!r} has a malformed {fqn!r} entry "
                              f"({entry.properties.dtype}, shape {size})")
    return torch.empty(size, dtype=torch.uint8)


def _read_json(directory, small, fqn, tensors=()):
    try:
        return tensor_json.decode(bytes(small[fqn].tolist()).decode("utf-8"), list(tensors))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint in {directory!r} has a malformed {fqn!r} entry ({error})") from None


def _dcp():
    # imported on first use: it takes longer to import than the rest of margin_ext
    import torch.distributed.checkpoint as dcp

    return dcp


def _load(head, directory, state):
    from torch.distributed.checkpoint.api import CheckpointException

    from .dcp_metadata import SafeFileSystemReader

    try:
        with _quiet():
            _dcp().load(state, storage_reader=SafeFileSystemReader(directory), process_group=head.process_group,
                        no_dist=_no_dist())
    except CheckpointError:
        raise
    # DCP gathers every rank's failure (a garbled file) into a CheckpointException, a BaseException
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"cannot load the checkpoint in {directory!r}: a data file is unreadable "
                              f"({_describe(error)})") from None
    return state


def _describe(error) -> str:
    """The first failure of a DCP load, in one line: its type, its rank, its first line."""
    failures = getattr(error, "failures", None)
    where = ""
    if failures:
        rank, failure = sorted(failures.items())[0]
        failure = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        error, where = getattr(failure, "exception", failure), f" on rank {rank}"
    sentence = str(error).strip().split("\n")[0].split(". ")[0][:200]
    return f"{type(error).__name__}{where}: {sentence}"


class _quiet(warnings.catch_warnings):
    """DCP warns that a process-less save is single-process and that it overwrites an
    older checkpoint (both intended here), ShardedTensor that its ops are deprecated
    (we use it only as a container of placed shards)."""

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
        return result
