"""Crafted, corrupt and truncated head checkpoints: load_head runs no code and raises CheckpointError.

Every payload here, if it ran, would create a marker file; each test checks the marker is
absent after the load was refused.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

import margin_ext as mx
from margin_ext.checkpoint import CheckpointError, load_head, save_head

DIM, CLASSES = 6, 9
# the files are crafted with DCP in a single process, overwriting: DCP warns about both
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch.distributed.checkpoint")


class Payload:
    """Unpickling this runs ``os.system`` (a shell command that creates ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _head():
    return mx.PartialFC(DIM, CLASSES, mx.CosFace(), seed=3)


def _saved(tmp_path, **kwargs):
    head = _head()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head(torch.randn(4, DIM), torch.tensor([0, 3, 8, 5])).backward()
    optimizer.step()
    directory = tmp_path / "head"
    save_head(str(directory), head, optimizer, **kwargs)
    return directory, head, optimizer


def _refused(directory, marker, *fragments):
    head = _head()
    before = head.weight.detach().clone()
    with pytest.raises(CheckpointError) as caught:
        load_head(str(directory), head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9))
    assert marker is None or not Path(marker).exists(), "the checkpoint ran code"
    assert torch.equal(head.weight, before), "a refused checkpoint changed the head"
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return str(caught.value)


def test_round_trip_of_extra_without_pickle(tmp_path):
    extra = {"scaler": torch.amp.GradScaler("cpu").state_dict(), "step": 7, "betas": (0.9, 0.99),
             "by_index": {0: "a", 5: [1.5, None, True]}, "$dollar": float("inf"), "tensor": torch.arange(4.0),
             "nested": [{"t": torch.ones(2, 3, dtype=torch.int16)}]}
    directory, head, optimizer = _saved(tmp_path, extra=extra)
    loaded_head = _head()
    loaded_optimizer = torch.optim.SGD(loaded_head.parameters(), lr=0.5)
    got = load_head(str(directory), loaded_head, loaded_optimizer)
    assert torch.equal(loaded_head.weight, head.weight)
    assert loaded_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(got.pop("tensor"), extra["tensor"])
    nested = got.pop("nested")
    assert torch.equal(nested[0]["t"], extra["nested"][0]["t"]) and nested[0]["t"].dtype == torch.int16
    assert got == {k: v for k, v in extra.items() if k not in ("tensor", "nested")}
    # nothing of it is a pickle: the index holds tensors only
    index = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    assert all(isinstance(entry, dcp_metadata.TensorStorageMetadata) for entry in index.values())


def test_extra_that_json_cannot_hold_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['bad'\] is a Payload"):
        _saved(tmp_path, extra={"bad": Payload(tmp_path / "never")})


def test_metadata_with_a_reduce_payload(tmp_path):
    directory, _, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _refused(directory, marker, "posix.system" if os.name == "posix" else "system", ".metadata")


def test_metadata_payload_inside_a_valid_index(tmp_path):
    """The index is genuine, with one admitted object hiding a forbidden call."""
    directory, _, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    metadata.planner_data = Payload(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    _refused(directory, marker, "system")


def test_a_bytes_entry_is_never_unpickled(tmp_path):
    """DCP itself would torch.load a "bytes" entry with weights_only=False: that entry is refused."""
    marker = tmp_path / "ran"
    directory = tmp_path / "head"
    dcp.save({"head.weight": torch.zeros(CLASSES, DIM), "head.meta": Payload(marker)},
             storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    _refused(directory, marker, "'head.meta' is a BytesStorageMetadata")


def test_a_data_file_outside_the_folder_is_refused(tmp_path):
    directory, _, _ = _saved(tmp_path)
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    for record in metadata.storage_data.values():
        record.relative_path = "../elsewhere.distcp"
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    _refused(directory, None, "not in a file of the checkpoint folder")


def test_missing_metadata(tmp_path):
    directory, _, _ = _saved(tmp_path)
    (directory / ".metadata").unlink()
    _refused(directory, None, "index .metadata is missing")


@pytest.mark.parametrize("keep", [0, 0.5, 0.999])
def test_truncated_data_file(tmp_path, keep):
    directory, _, _ = _saved(tmp_path)
    data = next(directory.glob("*.distcp"))
    blob = data.read_bytes()
    data.write_bytes(blob[:int(len(blob) * keep)])
    _refused(directory, None, "truncated")


def test_garbled_data_file(tmp_path):
    """Same length, garbage inside: the load fails inside DCP and says so as a CheckpointError."""
    directory, _, _ = _saved(tmp_path)
    data = next(directory.glob("*.distcp"))
    data.write_bytes(bytes(len(data.read_bytes())))
    _refused(directory, None, "cannot load the checkpoint")


def test_garbage_metadata(tmp_path):
    directory, _, _ = _saved(tmp_path)
    (directory / ".metadata").write_bytes(b"\x80\x04garbage" * 10)
    _refused(directory, None, "corrupt or unsafe")


def test_malformed_json_state(tmp_path):
    """A well-formed index whose head.meta tensor holds bytes that are not our JSON."""
    directory = tmp_path / "head"
    for text in (b"\xff\xfe not utf-8", b"{not json", b'{"format": 2}', b'[1, 2]', b"[" * 100000):
        dcp.save({"head.weight": torch.zeros(CLASSES, DIM),
                  "head.meta": torch.frombuffer(bytearray(text), dtype=torch.uint8)},
                 storage_writer=dcp.FileSystemWriter(str(directory), overwrite=True), no_dist=True)
        _refused(directory, None, str(directory))


def test_format_1_checkpoints_are_refused_with_a_reason(tmp_path):
    directory = tmp_path / "head"
    dcp.save({"head.weight": torch.zeros(CLASSES, DIM), "head.meta": pickle.dumps({"format": 1})},
             storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    _refused(directory, None, "never unpickles")
