"""Whole-run checkpoints, written atomically, and the random-number state they carry.

Layout of ``<output>/checkpoints/step-00000200/``:

    trainer.pt         rank 0: backbone (unwrapped from DDP), its optimizer, the lr
                       schedulers, the GradScaler, step / epoch / sampler position,
                       the logged curves, the run's shape (classes, embedding size ...)
    rng-rank<r>.pt     every rank: torch (CPU and CUDA), numpy and python RNG states
    head/              the sharded head and its optimizer (margin_ext.checkpoint.save_head)

Every rank writes into ``.step-00000200.tmp`` and rank 0 renames it once all are
done, so a folder named ``step-*`` is always complete: a run killed while saving
leaves only a ``.tmp`` folder, which is ignored and cleared at the next start.
The output folder must be shared by all ranks (one machine, or a shared file system).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from margin_ext.checkpoint import load_head, save_head

from .distributed_launch import DistributedContext

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or does not fit this run."""


def checkpoint_root(output) -> Path:
    return Path(output) / CHECKPOINTS


def list_checkpoints(output) -> list:
    """Complete checkpoints of a run folder, oldest first."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _NAME.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(found)]


def find_checkpoint(resume: str, output) -> Optional[Path]:
    """The checkpoint folder that --resume names.

    "auto": the latest complete checkpoint in ``output``, or None (start fresh).
    A run folder: its latest checkpoint. A checkpoint folder: itself.
    """
    if resume == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if (path / "trainer.pt").is_file():
        return path
    if path.is_dir():
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a folder holding trainer.pt, "
                          f"or a run folder with {CHECKPOINTS}/step-*)")


def clear_partial_checkpoints(output) -> None:
    """Remove the ``.tmp`` folders that a killed save left behind (rank 0, at start)."""
    root = checkpoint_root(output)
    if root.is_dir():
        for path in [*root.glob(".step-*.tmp"), *root.glob(".step-*.old")]:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(ctx: DistributedContext, output, step: int, trainer_state: dict, head, head_optimizer,
                    keep: int) -> Path:
    """Collective: every rank calls it with its own head shard; rank 0's ``trainer_state`` is kept."""
    root = checkpoint_root(output)
    final = root / f"step-{step:08d}"
    temporary = root / f".step-{step:08d}.tmp"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    ctx.barrier()

    _save_file({"rank": ctx.rank, "world_size": ctx.world_size, "step": step, "rng": rng_state()},
               temporary / f"rng-rank{ctx.rank}.pt")
    save_head(str(temporary / "head"), head, head_optimizer)
    if ctx.is_main:
        _save_file(trainer_state, temporary / "trainer.pt")
    ctx.barrier()

    if ctx.is_main:
        _replace_folder(temporary, final)
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def load_trainer_state(path: Path) -> dict:
    try:
        return torch.load(Path(path) / "trainer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"--resume {path}: cannot read trainer.pt ({error})") from None


def load_rank_rng(path: Path, rank: int, world_size: int) -> Optional[dict]:
    """This rank's saved RNG states, or None when the checkpoint came from another world size."""
    file = Path(path) / f"rng-rank{rank}.pt"
    if not file.is_file():
        return None
    saved = torch.load(file, map_location="cpu", weights_only=True)
    return saved["rng"] if saved["world_size"] == world_size else None


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
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_folder(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``; an older ``target`` (same step saved again) is swapped out first."""
    if target.exists():
        stale = target.with_name(f".{target.name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(source, target)
