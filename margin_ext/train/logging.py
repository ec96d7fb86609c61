"""What a run reports: progress lines or a bar, CSV and JSON curves, TensorBoard events, a PNG plot.

Only rank 0 writes; every other rank holds a :class:`RunLog` with ``enabled=False``
so that the trainer calls it unconditionally. The curves are kept in memory and go
into each checkpoint, so a resumed run rewrites the files from the checkpoint's
history and the curves carry no steps from after the checkpoint; the TensorBoard
writer purges the events of steps after the checkpoint for the same reason.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional

from margin_ext.safe_files import read_regular, write_atomically, write_text_atomically

TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "top1", "samples_per_s")
VAL_FIELDS = ("step", "epoch", "set", "accuracy", "std")
TENSORBOARD_FOLDER = "tensorboard"
_LOG_JSON_BYTES = 256 << 20  # the curves of a very long run are tens of MB


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


class RunLog:
    def __init__(self, output: Path, enabled: bool, total_steps: int, progress: str = "auto", initial_step: int = 0,
                 tensorboard: bool = False):
        self.output = Path(output)
        self.enabled = enabled
        self.total_steps = total_steps
        self.train = []  # one dict per logged interval
        self.val = []  # one dict per (evaluation, set)
        self._bar = self._make_bar(progress, initial_step) if enabled else None
        self._events = self._make_event_writer(initial_step) if enabled and tensorboard else None

    def _make_event_writer(self, initial_step):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.print("no TensorBoard logs: tensorboard is not installed (pip install 'margin_ext[train]'; "
                       "--no-tensorboard silences this)")
            return None
        # a resumed run drops the events that the interrupted one wrote after its checkpoint
        return SummaryWriter(str(self.output / TENSORBOARD_FOLDER),
                             purge_step=initial_step + 1 if initial_step > 0 else None)

    # -- console ---------------------------------------------------------------------------

    def _make_bar(self, progress, initial_step):
        wants_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if not wants_bar:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            if progress == "bar":
                print("--progress bar needs tqdm (pip install tqdm); printing log lines instead", flush=True)
            return None
        return tqdm(total=self.total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._events is not None:
            self._events.close()
            self._events = None

    # -- curves ----------------------------------------------------------------------------

    def log_train(self, step: int, epoch: int, loss: float, lr: float, top1: float,
                  samples_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "top1": top1, "samples_per_s": samples_per_s}
        self.train.append(row)
        self._append_csv("train.csv", TRAIN_FIELDS, row)
        if self._events is not None:
            for key in ("loss", "lr", "top1", "samples_per_s"):
                self._events.add_scalar(f"train/{key}", row[key], step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.3f}", lr=f"{lr:.2e}", refresh=False)
        else:
            self.print(f"step {step:>6d}/{self.total_steps} epoch {epoch:>3d} | loss {loss:8.4f} | "
                       f"top1 {top1:6.3f} | lr {lr:.3e} | {samples_per_s:8.1f} samples/s | "
                       f"ETA {format_duration(eta_s)}")

    def log_val(self, step: int, epoch: int, results: dict) -> None:
        """``results``: set name -> (accuracy, std)."""
        if not self.enabled or not results:
            return
        parts = []
        for name, (accuracy, std) in results.items():
            row = {"step": step, "epoch": epoch, "set": name, "accuracy": accuracy, "std": std}
            self.val.append(row)
            self._append_csv("val.csv", VAL_FIELDS, row)
            if self._events is not None:
                self._events.add_scalar(f"verification/{name}", accuracy, step)
            parts.append(f"{name} {accuracy:.4f} ± {std:.4f}")
        if self._events is not None:
            self._events.flush()
        self.print(f"eval  step {step:>6d} epoch {epoch:>3d} | verification (10-fold): " + ", ".join(parts))
        self.write_json()

    def final_results(self) -> dict:
        """The last evaluation of each set: name -> (accuracy, std)."""
        return {row["set"]: (row["accuracy"], row["std"]) for row in self.val}

    def state_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's history: the files are rewritten to match it."""
        self.train = list(state.get("train", []))
        self.val = list(state.get("val", []))
        if self.enabled:
            self._rewrite_csv("train.csv", TRAIN_FIELDS, self.train)
            self._rewrite_csv("val.csv", VAL_FIELDS, self.val)
            self.write_json()

    def start_fresh(self) -> None:
        if self.enabled:
            self._rewrite_csv("train.csv", TRAIN_FIELDS, [])
            self._rewrite_csv("val.csv", VAL_FIELDS, [])

    # -- files -----------------------------------------------------------------------------

    def _append_csv(self, name, fields, row):
        # the file was written afresh (atomically) when the run started: a link planted since is not followed
        descriptor = os.open(self.output / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with os.fdopen(descriptor, "w", newline="") as handle:
            csv.DictWriter(handle, fieldnames=fields).writerow(row)

    def _rewrite_csv(self, name, fields, rows):
        def write(handle):
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

        write_atomically(self.output / name, write, binary=False)

    def write_json(self, options: Optional[dict] = None, summary: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        path = self.output / "log.json"
        document = {}
        if path.exists():
            try:
                document = json.loads(read_regular(path, _LOG_JSON_BYTES, text=True))
            except (OSError, ValueError):
                document = {}
        document.update({"train": self.train, "val": self.val})
        if options is not None:
            document["options"] = options
        if summary is not None:
            document["summary"] = summary
        write_text_atomically(path, json.dumps(document, indent=1, default=_jsonable))

    def plot(self, path: Optional[Path] = None) -> Optional[Path]:
        """The curves (:meth:`figure`) as a PNG, ``curves.png`` of the run folder by default."""
        if not self.enabled:
            return None
        import matplotlib.pyplot as plt

        path = Path(path or self.output / "curves.png")
        figure = self.figure()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path

    def figure(self):
        """Loss and top-1, the learning rate, and verification accuracy over steps: three panels."""
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        figure, (loss_axis, lr_axis, val_axis) = plt.subplots(1, 3, figsize=(16, 4))
        steps = [row["step"] for row in self.train]
        loss_axis.plot(steps, [row["loss"] for row in self.train], color="tab:blue", label="loss")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("training loss", color="tab:blue")
        top1_axis = loss_axis.twinx()
        top1_axis.plot(steps, [row["top1"] for row in self.train], color="tab:orange", label="top-1")
        top1_axis.set_ylabel("training top-1 (batch)", color="tab:orange")
        top1_axis.set_ylim(0, 1)
        loss_axis.set_title("training")

        lr_axis.plot(steps, [row["lr"] for row in self.train], color="tab:green")
        lr_axis.set_xlabel("step")
        lr_axis.set_ylabel("learning rate (at the logged step)")
        lr_axis.set_ylim(bottom=0)
        lr_axis.set_title("schedule")

        for name in dict.fromkeys(row["set"] for row in self.val):
            rows = [row for row in self.val if row["set"] == name]
            val_axis.errorbar([row["step"] for row in rows], [row["accuracy"] for row in rows],
                              yerr=[row["std"] for row in rows], marker="o", capsize=3, label=name)
        val_axis.axhline(0.5, color="grey", linestyle=":", label="chance")
        val_axis.set_xlabel("step")
        val_axis.set_ylabel("verification accuracy (10-fold)")
        val_axis.set_ylim(0.4, 1.0)
        val_axis.legend(loc="lower right")
        val_axis.set_title("verification")
        figure.tight_layout()
        return figure


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)
