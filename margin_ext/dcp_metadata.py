"""Reading a ``torch.distributed.checkpoint`` index without running code from it.

DCP writes its index, the ``.metadata`` file, with ``pickle`` and reads it back with
``pickle.load``: a crafted file runs whatever it names. :class:`SafeFileSystemReader`
reads it with an unpickler that admits only the classes DCP itself writes there (its
metadata dataclasses, ``torch.Size``, dtypes and layouts) and refuses everything else
before anything is built. It then checks what it read:

- every entry is a tensor: a "bytes" entry would make DCP ``torch.load`` its value with
  ``weights_only=False``, and margin_ext never writes one;
- every storage record names a plain file of the checkpoint folder (no ``..``, no
  absolute path) and carries no stream transform.

The tensors themselves are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader

from .safe_files import open_regular
from torch.distributed.checkpoint import metadata as dcp_metadata

METADATA_FILE = ".metadata"
MAX_METADATA_BYTES = 256 << 20  # an index lists tensors and their chunks: kilobytes to megabytes


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint index that names a class outside those DCP writes."""


def _admitted():
    admitted = {("torch", "Size")}
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING", "BytesStorageMetadata"):
        if hasattr(dcp_metadata, name):  # some are absent from older torch releases
            admitted.add((dcp_metadata.__name__, name))
    admitted.add(("torch.distributed.checkpoint.filesystem", "_StorageInfo"))
    # a layout is pickled as _get_layout("torch.strided"): a lookup among torch's layouts
    admitted.add(("torch.serialization", "_get_layout"))
    # StorageMeta.checkpoint_id: the folder it was saved to, as a path
    for module in ("pathlib", "pathlib._local"):
        admitted.update((module, name) for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"))
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            admitted.add(("torch", name))
    return frozenset(admitted)


_ADMITTED = _admitted()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ADMITTED:
            raise UnsafeCheckpointError(f"refers to {module}.{name}, which a checkpoint index never holds")
        return super().find_class(module, name)


def read_metadata_file(path) -> "dcp_metadata.Metadata":
    """The DCP index at ``path``, unpickled with only DCP's own classes admitted, then checked."""
    with open_regular(path) as handle:  # a FIFO named .metadata would block the load: refused
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"is {size} bytes, more than the {MAX_METADATA_BYTES} an index of tensors takes")
        metadata = _RestrictedUnpickler(handle).load()
    check_metadata(metadata)
    return metadata


def check_metadata(metadata) -> None:
    """Raise ValueError unless ``metadata`` describes tensors stored in plain files of the folder."""
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"holds a {type(metadata).__name__}, not a checkpoint index")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError("its index of entries is not a dict")
    for fqn, entry in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str) or not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise ValueError(f"entry {fqn!r} is a {type(entry).__name__}, not a tensor: margin_ext writes "
                             f"only tensors and never unpickles a value")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise ValueError("its storage records are not a dict")
    for index, record in storage.items():
        relative = getattr(record, "relative_path", None)
        if (not isinstance(relative, str) or not relative or os.path.basename(relative) != relative
                or relative in (".", "..")):
            raise ValueError(f"entry {getattr(index, 'fqn', index)!r} is stored in {relative!r}, "
                             f"not in a file of the checkpoint folder")
        if getattr(record, "transform_descriptors", None):
            raise ValueError(f"entry {getattr(index, 'fqn', index)!r} is stored through transforms "
                             f"{record.transform_descriptors!r}, which margin_ext never writes")
        for field in ("offset", "length"):
            value = getattr(record, field, None)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"entry {getattr(index, 'fqn', index)!r} has {field}={value!r}")


def check_files(directory, metadata) -> None:
    """Raise ValueError if a data file of ``metadata`` is missing or shorter than its records say."""
    ends = {}
    for record in metadata.storage_data.values():
        ends[record.relative_path] = max(ends.get(record.relative_path, 0), record.offset + record.length)
    for name, end in sorted(ends.items()):
        file = Path(directory) / name
        if not file.is_file():
            raise ValueError(f"its data file {name} is missing")
        size = file.stat().st_size
        if size < end:
            raise ValueError(f"its data file {name} is truncated ({size} bytes, the index needs {end})")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with the index read by :func:`read_metadata_file`."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        name = METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}"
        metadata = read_metadata_file(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None and hasattr(dcp_metadata, "StorageMeta"):
            metadata.storage_meta = dcp_metadata.StorageMeta()
        if getattr(metadata, "storage_meta", None) is not None and hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata
