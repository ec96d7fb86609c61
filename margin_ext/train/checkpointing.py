"""Whole-run checkpoints, written atomically, their lineage, and the random-number state they carry.

Layout of ``<output>/checkpoints/step-00000200/``:

    trainer.pt         rank 0: backbone (unwrapped from DDP), its optimizer, the lr
                       schedulers, the GradScaler, step / epoch / sampler position,
                       the logged curves, the run's shape (classes, embedding size,
                       margin, data source ...)
    rng-rank<r>.pt     every rank: torch (CPU and CUDA), numpy and python RNG states
    lineage.json       the branch history of the run that wrote it (see below)
    head/              the sharded head and its optimizer (margin_ext.checkpoint.save_head)

Crash safety. Every rank writes into a folder that rank 0 created exclusively under a fresh
name, ``.step-00000200.<random>.tmp``, and rank 0 renames it once all are done, so a folder
named ``step-*`` is always complete. Saving a step again
swaps the older copy out to ``.step-00000200.old`` first; a folder is deleted by
renaming it to ``.trash-*`` first. So whenever a run is killed, the last complete copy
of every step is either ``step-*`` or ``.step-*.old``: the next start
(:func:`recover_checkpoints`) renames an orphaned ``.old`` back and clears ``.tmp`` and
``.trash-*`` folders.

Lineage. Each run start writes ``checkpoints/branch.json``: the list of
[branch id, first step] of the run's history, a new branch whenever a run restarts from
a checkpoint that is not the newest of its run folder. Checkpoints outside that history
(the newer steps of an abandoned branch) are moved to ``checkpoints/abandoned/<id>/``
with a warning, so that retention and ``--resume auto`` see only the current branch.
A branch id read from ``branch.json`` or ``lineage.json`` must be a plain name (it names a
folder there); nothing is ever deleted in ``abandoned/``, and retention deletes only
checkpoints of the current branch.

Loading reads no pickle that can run code: ``trainer.pt`` and ``rng-rank*.pt`` with
``torch.load(weights_only=True)``, the head through margin_ext.checkpoint; only regular files
are opened (a FIFO would block), and every field is checked (:mod:`.trainer_state`). A checkpoint
that cannot be read raises :class:`CheckpointError`; ``--resume auto`` then falls back
to the newest checkpoint that can, with a warning.
The output folder must be shared by all ranks (one machine, or a shared file system).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

# CheckpointError is also the trainer's: one class for every unusable checkpoint
from margin_ext.checkpoint import CheckpointError, load_head, read_index, save_head
from margin_ext.safe_files import open_regular, plain_name, read_regular, write_atomically

from .distributed_launch import DistributedContext
from .trainer_state import MAX_STEP, check_rng_file, check_trainer_state

CHECKPOINTS = "checkpoints"
ABANDONED = "abandoned"
BRANCH_FILE = "branch.json"
LINEAGE_FILE = "lineage.json"
_NAME = re.compile(r"^step-(\d{8,})$")
_LINEAGE_BYTES = 1 << 20  # a branch history is a few hundred bytes
#: what may differ between a checkpoint and the run that resumes it, with --force-resume
FORCEABLE = ("margin", "data")


class CheckpointWarning(UserWarning):
    """A checkpoint skipped, recovered or moved aside."""


def checkpoint_root(output) -> Path:
    return Path(output) / CHECKPOINTS


def checkpoint_step(path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(output) -> list:
    """Complete checkpoints of a run folder, oldest first (real folders only: a symlink is no run's own)."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := _NAME.match(path.name)) and path.is_dir() and not path.is_symlink()]
    return [path for _, path in sorted(found)]


def check_checkpoint_root(output) -> None:
    """CheckpointError when ``<output>/checkpoints`` exists but is no folder."""
    root = checkpoint_root(output)
    if (root.exists() or root.is_symlink()) and not root.is_dir():
        raise CheckpointError(f"--output {output}: {root} exists and is not a folder; move it away, "
                              f"or choose another --output")


def open_run_folder(ctx: DistributedContext, output, resume: Optional[str], overwrite: bool = False) -> Optional[Path]:
    """Recover the run folder after a crash (rank 0), then find the checkpoint --resume names.

    Without --resume, a folder that already holds checkpoints is refused, unless ``overwrite``
    (its checkpoints then move to ``checkpoints/abandoned/``, see :func:`start_branch`).
    """
    check_checkpoint_root(output)
    if ctx.is_main:
        recover_checkpoints(output)
    ctx.barrier()
    if resume is None:
        found = list_checkpoints(output)
        if found and not overwrite:
            raise CheckpointError(f"--output {output} already holds checkpoints (latest {found[-1].name}): "
                                  f"pass --resume auto to continue that run, or choose another --output")
        return None
    return find_checkpoint(resume, output)


def find_checkpoint(resume: str, output) -> Optional[Path]:
    """The checkpoint folder that --resume names.

    "auto": the newest loadable checkpoint of the current branch in ``output``, or None
    (start fresh). A run folder: its newest loadable checkpoint. Both skip, with a
    warning, checkpoints that cannot be read. A checkpoint folder: itself, checked.
    """
    if resume == "auto":
        return _newest_loadable(output, f"--resume auto ({checkpoint_root(output)})", required=False)
    path = Path(resume)
    if _NAME.match(path.name) or (path / "trainer.pt").exists():
        verify_checkpoint(path)
        return path
    if path.is_dir() and list_checkpoints(path):
        return _newest_loadable(path, f"--resume {resume}", required=True)
    raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a folder holding trainer.pt, "
                          f"or a run folder with {CHECKPOINTS}/step-*)")


def _newest_loadable(output, what: str, required: bool) -> Optional[Path]:
    branch = read_branch(output)
    problems = []
    for path in reversed(list_checkpoints(output)):
        try:
            if branch is not None and not in_lineage(read_lineage(path), checkpoint_step(path), branch):
                raise CheckpointError(f"{path} belongs to an abandoned branch of the run")
            verify_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            warnings.warn(f"{what}: skipping {path.name}: {error}", CheckpointWarning, stacklevel=3)
            continue
        return path
    if required or problems:
        detail = "; ".join(problems) if problems else "none found"
        raise CheckpointError(f"{what}: no loadable checkpoint ({detail})")
    return None


def verify_checkpoint(path) -> None:
    """Raise CheckpointError unless ``path`` holds every file of a checkpoint, readable and whole.

    Reads trainer.pt and the RNG files (safely) and the head's index, and checks that
    the head's data files hold every byte the index names; the tensors are read at load.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint folder")
    state = load_trainer_state(path)
    for rank in range(int(state["world_size"])):
        _load_rng_file(path / f"rng-rank{rank}.pt")
    read_index(str(path / "head"))


def load_trainer_state(path: Path) -> dict:
    """trainer.pt of a checkpoint, every field checked (:mod:`.trainer_state`)."""
    file = Path(path) / "trainer.pt"
    state = _safe_load(file)
    problem = check_trainer_state(state)
    if problem:
        raise CheckpointError(f"--resume {path}: trainer.pt {problem}")
    return state


def load_rank_rng(path: Path, rank: int, world_size: int) -> Optional[dict]:
    """This rank's saved RNG states, or None when the checkpoint came from another world size."""
    file = Path(path) / f"rng-rank{rank}.pt"
    if not file.exists():
        return None
    saved = _load_rng_file(file)
    return saved["rng"] if saved["world_size"] == world_size else None


def _load_rng_file(file: Path) -> dict:
    saved = _safe_load(file)
    problem = check_rng_file(saved)
    if problem:
        raise CheckpointError(f"--resume {file.parent}: {file.name} {problem}")
    return saved


def _safe_load(file: Path):
    """torch.load of a regular file of the checkpoint: tensors and plain containers only, never code."""
    try:
        with open_regular(file) as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--resume {file.parent}: {file.name} is missing") from None
    except Exception as error:  # weights_only refusals, truncated zips, FIFOs, garbage: all mean "unreadable"
        first = str(error).strip().splitlines()
        raise CheckpointError(f"--resume {file.parent}: cannot read {file.name} ({type(error).__name__}: "
                              f"{first[0] if first else ''})") from None


def check_compatible(saved: dict, current: dict, path, force: bool = False) -> None:
    """Raise CheckpointError where the checkpoint's shape differs from this run's.

    ``force``: the margin and the data source may differ (each difference is a warning).
    """
    for key, value in current.items():
        if saved.get(key) == value:
            continue
        message = f"--resume {path}: the checkpoint has {key}={saved.get(key)!r}, this run has {key}={value!r}"
        if key not in FORCEABLE:
            raise CheckpointError(message)
        if not force:
            raise CheckpointError(f"{message} (pass --force-resume to continue with this run's {key})")
        warnings.warn(f"{message}; continuing as --force-resume asks", CheckpointWarning, stacklevel=2)


def data_source(options, dataset) -> dict:
    """What identifies the training data of a run, for the resume check: the synthetic
    set's parameters, or the data's file or folder name and its numbers of images and classes."""
    if options.data == "synthetic":
        return {"kind": "synthetic", "identities": options.synthetic_identities,
                "samples": options.synthetic_samples, "seed": options.synthetic_seed}
    return {"kind": "path", "name": Path(options.data).resolve().name, "images": len(dataset),
            "classes": int(dataset.num_classes)}


# ----------------------------------------------------------------------------- lineage

def read_branch(output) -> Optional[list]:
    """The current branch history of a run folder, or None when none was recorded."""
    file = checkpoint_root(output) / BRANCH_FILE
    if not (file.exists() or file.is_symlink()):
        return None
    return _read_lineage_file(file)


def read_lineage(path) -> Optional[list]:
    """The branch history a checkpoint was written in (None for a checkpoint without one)."""
    file = Path(path) / LINEAGE_FILE
    return _read_lineage_file(file) if file.exists() or file.is_symlink() else None


def _read_lineage_file(file: Path) -> list:
    """[[branch id, first step], ...]: each id a plain name (it names a folder of abandoned/), each step
    a step number; CheckpointError for anything else."""
    try:
        lineage = json.loads(read_regular(file, _LINEAGE_BYTES, text=True))["lineage"]
        if not (isinstance(lineage, list) and lineage and all(
                isinstance(b, list) and len(b) == 2 and type(b[1]) is int and 0 <= b[1] <= MAX_STEP
                for b in lineage)):
            raise ValueError("not a list of [branch, first step] pairs")
        for branch, _ in lineage:
            plain_name(branch, "branch id")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{file}: unreadable lineage ({error})") from None
    return lineage


def in_lineage(lineage: Optional[list], step: int, branch: list) -> bool:
    """Whether a checkpoint of ``lineage`` at ``step`` lies on the history ``branch``."""
    if lineage is None:  # written before lineages existed: it belongs to no recorded history
        return False
    depth = len(lineage)
    if lineage != branch[:depth]:
        return False
    return depth == len(branch) or step <= branch[depth][1]


def start_branch(ctx: DistributedContext, output, resume_path: Optional[Path]) -> list:
    """The branch history of this run (the same on every rank), recorded in the run folder.

    A run that continues from the newest checkpoint of its folder continues its branch;
    a fresh run, or a restart from any other checkpoint, starts a new one. Checkpoints of
    the folder outside the new history are moved to ``checkpoints/abandoned/``, with a warning.
    """
    lineage = None
    if ctx.is_main:
        lineage = _choose_lineage(output, resume_path)
        root = checkpoint_root(output)
        root.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(root / BRANCH_FILE, {"lineage": lineage})
        _move_abandoned(output, lineage)
    return ctx.broadcast_object(lineage)


def _choose_lineage(output, resume_path: Optional[Path]) -> list:
    new_branch = uuid.uuid4().hex[:12]
    if resume_path is None:
        return [[new_branch, 0]]
    parent = read_lineage(resume_path) or [["unrecorded", 0]]
    found = list_checkpoints(output)
    if found and _same_folder(found[-1], resume_path):
        return parent  # the newest checkpoint of the folder: the branch goes on
    return parent + [[new_branch, int(load_trainer_state(resume_path)["step"])]]


def _move_abandoned(output, lineage: list) -> None:
    moved = []
    for path in list_checkpoints(output):
        theirs = read_lineage(path)
        if in_lineage(theirs, checkpoint_step(path), lineage):
            continue
        # the id was checked as a plain name when read: the target stays inside abandoned/
        target = checkpoint_root(output) / ABANDONED / (theirs[-1][0] if theirs else "unrecorded")
        target.mkdir(parents=True, exist_ok=True)
        os.replace(path, _free_name(target / path.name))  # never over an older copy: nothing is deleted
        moved.append(path.name)
    if moved:
        warnings.warn(f"{checkpoint_root(output)}: {', '.join(moved)} belong to an abandoned branch of the run "
                      f"(this run restarts from an older checkpoint): moved to {CHECKPOINTS}/{ABANDONED}/, "
                      f"where --resume auto and retention no longer see them", CheckpointWarning, stacklevel=3)


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... where ``path`` is taken."""
    candidate, number = path, 1
    while candidate.exists() or candidate.is_symlink():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _same_folder(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


# ----------------------------------------------------------------------------- saving and crash safety

def recover_checkpoints(output) -> None:
    """Undo what a killed save or retention left behind (rank 0, at start).

    An orphaned ``.step-*.old`` (killed between the two renames of a re-save) is the last
    complete copy of its step: renamed back, with a warning. ``.tmp`` folders (killed
    while writing) and ``.trash-*`` folders (killed while deleting) are removed.
    """
    root = checkpoint_root(output)
    if not root.is_dir():
        return
    for old in sorted(root.glob(".step-*.old")):
        final = root / old.name[1:-len(".old")]
        if final.exists():
            _discard(old)
        else:
            os.replace(old, final)
            warnings.warn(f"{final}: recovered from {old.name} (a save of that step was interrupted)",
                          CheckpointWarning, stacklevel=2)
    for partial in root.glob(".step-*.tmp"):
        _discard(partial)
    for trash in root.glob(".trash-*"):
        if trash.is_symlink():
            trash.unlink()
        else:
            shutil.rmtree(trash, ignore_errors=True)


clear_partial_checkpoints = recover_checkpoints


def save_checkpoint(ctx: DistributedContext, output, step: int, trainer_state: dict, head, head_optimizer,
                    keep: int, lineage: Optional[List] = None) -> Path:
    """Collective: every rank calls it with its own head shard; rank 0's ``trainer_state`` is kept.

    Retention deletes only checkpoints of this run's branch (others were moved aside when it started).
    """
    root = checkpoint_root(output)
    final = root / f"step-{step:08d}"
    temporary = None
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        # a fresh name, created exclusively: nothing planted at a predictable .tmp name is followed
        temporary = tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}.", suffix=".tmp")
    temporary = Path(ctx.broadcast_object(temporary))

    _save_file({"rank": ctx.rank, "world_size": ctx.world_size, "step": step, "rng": rng_state()},
               temporary / f"rng-rank{ctx.rank}.pt")
    save_head(str(temporary / "head"), head, head_optimizer)
    if ctx.is_main:
        _save_file(trainer_state, temporary / "trainer.pt")
        if lineage is not None:
            _write_json_atomically(temporary / LINEAGE_FILE, {"lineage": lineage, "step": step})
    ctx.barrier()

    if ctx.is_main:
        _replace_folder(temporary, final)
        current = [path for path in list_checkpoints(output)
                   if lineage is None or in_lineage(_lineage_or_none(path), checkpoint_step(path), lineage)]
        for old in current[:-keep]:
            _discard(old)
    ctx.barrier()
    return final


def _lineage_or_none(path):
    try:
        return read_lineage(path)
    except CheckpointError:
        return None


def load_head_state(path: Path, head, head_optimizer) -> None:
    load_head(str(Path(path) / "head"), head, head_optimizer)


def rng_state() -> dict:
    """Torch (CPU, CUDA), numpy and python states, in a form ``torch.load(weights_only=True)`` reads."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(_python_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _python_state_to_tensor(state):
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def _python_state_from_tensor(state):
    return state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]


def _save_file(obj, path: Path) -> None:
    write_atomically(path, lambda handle: torch.save(obj, handle))


def _write_json_atomically(file: Path, value) -> None:
    write_atomically(file, lambda handle: json.dump(value, handle), binary=False)


def _replace_folder(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an older ``target`` (same step saved again) is swapped out first.

    Between the two renames the older copy is ``.<target>.old``, which
    :func:`recover_checkpoints` renames back if the run dies there.
    """
    if target.exists():
        stale = target.with_name(f".{target.name}.old")
        if stale.exists():
            _discard(stale)
        os.replace(target, stale)
        os.replace(source, target)
        _discard(stale)
    else:
        os.replace(source, target)


def _discard(path: Path) -> None:
    """Delete a folder without ever leaving it half deleted under its own name: renamed to
    ``.trash-*`` first (one atomic step), then removed; a kill in between leaves only trash."""
    if path.is_symlink():  # planted: the link goes, never what it points to
        path.unlink()
        return
    trash = path.with_name(f".trash-{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
