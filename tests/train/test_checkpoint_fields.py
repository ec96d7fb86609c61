"""Every value read from a checkpoint is checked: a crafted trainer.pt or rng file is a CheckpointError
naming the field, for the resume and for the export alike."""

import pytest
import torch

from margin_ext.export import ExportError, load_backbone
from margin_ext.train import checkpointing as ckpt
from margin_ext.train.__main__ import main

TINY = ["--synthetic-identities", "12", "--synthetic-samples", "3", "--embedding-size", "16", "--batch-size", "8",
        "--val", "none", "--no-plot", "--no-tensorboard", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("fields") / "run"
    assert main(TINY + ["--output", str(run), "--steps", "1"]) == 0
    return ckpt.list_checkpoints(run)[-1]


def _edited(checkpoint, tmp_path, edit, name="trainer.pt"):
    """A copy of ``checkpoint`` whose ``name`` went through ``edit(state)``."""
    import shutil

    copy = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, copy)
    state = torch.load(copy / name, weights_only=True)
    edit(state)
    torch.save(state, copy / name)
    return copy


def _set(*path_and_value):
    *path, value = path_and_value

    def edit(state):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


TRAINER_CASES = {
    "zero global batch": (_set("global_batch", 0), r"field global_batch=0 is invalid"),
    "negative global batch": (_set("global_batch", -16), r"field global_batch=-16"),
    "step 10**18": (_set("step", 10 ** 18), r"field step=1000000000000000000 is invalid: expected an integer in"),
    "step a string": (_set("step", "12"), r"field step='12'"),
    "step a float": (_set("step", 2.0), r"field step=2.0"),
    "step a bool": (_set("step", True), r"field step=True"),
    "world size 0": (_set("world_size", 0), r"field world_size=0"),
    "consumed negative": (_set("consumed", -1), r"field consumed=-1"),
    "elapsed nan": (_set("elapsed_s", float("nan")), r"field elapsed_s=nan"),
    "an extra field": (_set("injected", 1), r"has an unknown field 'injected'"),
    "options of objects": (_set("options", {"lr": [[1]]}), r"field options="),
    "history not rows": (_set("history", {"train": [1, 2]}), r"field history="),
    "backbone of strings": (_set("backbone", {"w": "x"}), r"field backbone="),
    "a NaN weight": (lambda s: s["backbone"][next(iter(s["backbone"]))].fill_(float("nan")),
                     r"field backbone: .* holds non-finite values"),
    "image shape of strings": (_set("shape", "image_shape", ["3", "112", "112"]), r"field shape\.image_shape="),
    "image shape of 2 numbers": (_set("shape", "image_shape", [3, 112]), r"field shape\.image_shape=\[3, 112\]"),
    "image shape too large": (_set("shape", "image_shape", [3, 10 ** 6, 10 ** 6]), r"field shape\.image_shape="),
    "zero channels": (_set("shape", "image_shape", [0, 8, 8]), r"field shape\.image_shape=\[0, 8, 8\]"),
    "embedding size 0": (_set("shape", "embedding_size", 0), r"field shape\.embedding_size=0"),
    "a backbone name with a path": (_set("shape", "backbone", "../x"), r"field shape\.backbone='\.\./x'"),
    "missing step": (lambda s: s.pop("step"), r"is not a trainer checkpoint \(missing \['step'\]"),
    "not a mapping": (None, r"is not a trainer checkpoint \(a list"),
}


@pytest.mark.parametrize("case", sorted(TRAINER_CASES))
def test_a_crafted_trainer_state_names_the_field(checkpoint, tmp_path, case):
    edit, message = TRAINER_CASES[case]
    if edit is None:
        copy = _edited(checkpoint, tmp_path, lambda state: None)
        torch.save([1, 2], copy / "trainer.pt")
    else:
        copy = _edited(checkpoint, tmp_path, edit)
    with pytest.raises(ckpt.CheckpointError, match=rf"trainer\.pt {message}" if edit else message):
        ckpt.verify_checkpoint(copy)
    with pytest.raises(ExportError, match=message):
        load_backbone(copy)


RNG_CASES = {
    "rank negative": (_set("rank", -1), r"field rank=-1"),
    "world size a string": (_set("world_size", "2"), r"field world_size='2'"),
    "torch state of floats": (_set("rng", "torch", torch.zeros(3)), r"field rng\.torch"),
    "numpy keys short": (_set("rng", "numpy", "keys", torch.zeros(3, dtype=torch.int64)), r"field rng\.numpy"),
    "numpy position past the keys": (_set("rng", "numpy", "position", 10 ** 9), r"field rng\.numpy"),
    "python words out of range": (_set("rng", "python", "internal", torch.full((625,), -5, dtype=torch.int64)),
                                  r"field rng\.python"),
    "an extra field": (_set("payload", 1), r"has an unknown field 'payload'"),
}


@pytest.mark.parametrize("case", sorted(RNG_CASES))
def test_a_crafted_rng_file_names_the_field(checkpoint, tmp_path, case):
    edit, message = RNG_CASES[case]
    copy = _edited(checkpoint, tmp_path, edit, name="rng-rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match=rf"rng-rank0\.pt {message}"):
        ckpt.verify_checkpoint(copy)


def test_the_resume_reports_a_crafted_checkpoint_in_one_line(checkpoint, tmp_path, capsys):
    copy = _edited(checkpoint, tmp_path, _set("global_batch", 0))
    assert main(TINY + ["--output", str(tmp_path / "run"), "--steps", "2", "--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "field global_batch=0 is invalid" in err
