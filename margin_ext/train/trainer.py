"""The training run: backbone under DDP, PartialFC head, the loop, checkpoints, resume.

One optimizer step reads straight down (:meth:`Trainer._train_step`): backbone forward
(under autocast when --amp asks), head loss over the global batch, the batch's top-1
on a logging step (from the same embeddings and centres, before the update),
backward, gradient clipping, the two optimizers (backbone, head shard), the lr
schedule. Around it: logging every ``--log-every`` steps, verification after every
epoch and every ``--val-every`` steps (:mod:`.evaluation`), an atomic checkpoint every
``--checkpoint-every`` steps and at the end, and ``model.pt`` (the backbone with its
architecture, :mod:`.model_file`) when the run is done. :func:`train` holds the run
folder's lock (:mod:`.run_folder`) for the whole run.

Non-finite state is never saved. Each step's loss is checked on the device (no sync:
the first bad step is kept), read at every log line and before every checkpoint, which
also checks the weights and BatchNorm's statistics; a bad one stops every rank with
:class:`TrainingDiverged`, every checkpoint kept finite. A resume takes this run's
``--lr``, so a diverged run continues with a lower one. A step that does not finish
within ``--dist-timeout`` ends the process (:mod:`.watchdog`).

Exact resume. A checkpoint is taken after a step; it holds everything that decides
the following steps: weights, optimizer and scheduler states, the GradScaler, every
rank's RNG states, the data position (epoch, samples of the epoch's permutation
already consumed) and the global batch. Resumed with the same number of processes,
the run continues bit for bit (on the CPU; CUDA kernels may be nondeterministic).
With another number of processes the global batch stays: each process takes
global / world samples (an error if that does not divide); the lr schedule continues
from the checkpoint's, step for step; the head reshards (``load_head``); the epoch's
remaining samples are dealt to the new ranks, and every rank reseeds its RNGs from
``derive_seed(seed, "resume", step, rank)``, since the old ranks' streams do not map
to the new ones. Random augmentation drawn inside DataLoader workers
(``--num-workers`` > 0) is reproducible per epoch but not across a mid-epoch resume.
"""

from __future__ import annotations

import itertools
import math
import re
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from margin_ext import PartialFC, RowSparseAdamW, RowSparseSGD
from margin_ext.backends import BackendUnavailable, resolve
from margin_ext.safe_files import fresh_temporary
from margin_ext.train.backbones import build_backbone
from margin_ext.train.data.errors import DataError
from margin_ext.train.data.sampling import Batches, ResumableDistributedSampler, batch_count
from margin_ext.train.data.sources import build_train_set
from margin_ext.train.data.synthetic import derive_seed

from . import checkpointing as ckpt
from .config import NOT_RECORDED, resolved_options, write_config
from .ddp import agree_on_overflow, sum_gradients_hook
from .distributed_launch import DistributedContext
from .evaluation import build_val_sets, missing_val_files, verify
from .logging import RunLog, format_duration
from .model_file import MODEL_FILE, ModelInfo, default_normalization, save_model
from .options import OptionError, lr_milestones, margin_spec, weight_decay
from .run_folder import claim_run_folder
from .schedule import LrSchedule
from .watchdog import StepWatchdog

SYNTHETIC_EPOCHS = 7  # 4-8 minutes with 2 processes on 2 idle CPU cores
DEFAULT_EPOCHS = 20
CONFIG_FILE = "config.yaml"

__all__ = ["DataError", "Trainer", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; nothing of that state was saved."""


def check_output_folder(output) -> Path:
    """Create ``output`` and prove it is writable, before anything is trained."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OptionError(f"--output {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fresh_temporary(path / ".write-test").unlink()  # created exclusively: no planted link is followed
    except OSError as error:
        raise OptionError(f"--output {path}: cannot write there ({error.strerror or error})") from None
    return path


def epochs_of(options) -> int | None:
    """--epochs, or its default when neither --epochs nor --steps is given."""
    if options.steps is not None:
        return None
    return options.epochs or (SYNTHETIC_EPOCHS if options.data == "synthetic" else DEFAULT_EPOCHS)


class Trainer:
    def __init__(self, options, ctx: DistributedContext):
        self.options, self.ctx = options, ctx
        self.device = ctx.device
        self.output = check_output_folder(options.output)
        ckpt.check_checkpoint_root(self.output)
        self.margin = margin_spec(options)
        try:
            self.head_kernels = resolve(options.backend, self.device).name  # what --backend auto picks here
        except BackendUnavailable as error:
            raise OptionError(f"--backend {options.backend} on {self.device.type}: {error}") from None

        resume_path = ckpt.open_run_folder(ctx, self.output, options.resume, overwrite=options.overwrite)
        state = ckpt.load_trainer_state(resume_path) if resume_path is not None else None
        notes = self._adopt_checkpoint_run(state) if state is not None else []

        ckpt.seed_everything(options.seed)
        # every size problem at once, the --val files' included, before anything is built
        self.train_set, self.num_classes = build_train_set(options, missing_val_files(options))
        if len(self.train_set) < 2 * ctx.world_size:
            raise DataError(f"--data {options.data}: {len(self.train_set)} images are too few for "
                            f"{ctx.world_size} processes (BatchNorm needs 2 per process)")
        sample, _ = self.train_set[0]
        self.image_shape = tuple(sample.shape)
        if sample.dim() != 3 or sample.shape[1] != sample.shape[2]:
            raise DataError(f"--data {options.data}: expected square C x H x W images, got {tuple(sample.shape)}")
        self.val_sets = self._val_sets_on_rank0()
        self.sampler = ResumableDistributedSampler(self.train_set, ctx.world_size, ctx.rank, options.seed)

        self.train_set.expected_shape = self.image_shape  # every other image must match it
        self.backbone, self.head = self._build_model()
        self.backbone_optimizer = self._optimizer(self.backbone.parameters())
        self.head_optimizer = self._optimizer(self.head.parameters(), row_sparse=True)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[options.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.amp == "fp16")

        self.step, self.epoch, self.consumed, self.elapsed_before = 0, 0, 0, 0.0
        self.head_bytes = None  # per rank, measured after this run's first step
        if state is not None:
            self._check_compatible(state, resume_path)
            self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            self.backbone.load_state_dict(state["backbone"])
            self.backbone_optimizer.load_state_dict(state["backbone_optimizer"])
            ckpt.load_head_state(resume_path, self.head, self.head_optimizer)
            self.scaler.load_state_dict(state["scaler"])
        self.lineage = ckpt.start_branch(ctx, self.output, resume_path)

        self.total_steps = self._plan_total_steps()
        self.schedule = LrSchedule(options.lr_schedule, self.total_steps, self._warmup_steps(),
                                   lr_milestones(options), options.lr_gamma, options.lr_power)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
                           for opt in (self.backbone_optimizer, self.head_optimizer)]
        if state is not None:
            for scheduler, saved in zip(self.schedulers, state["schedulers"]):
                scheduler.load_state_dict(saved)  # the schedule's fields too: the same curve goes on
            notes += self._continue_schedule(state)
        else:
            notes += self._settings_not_meant()

        self.model = self.backbone
        if ctx.distributed:
            self.model = DistributedDataParallel(
                self.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.model.register_comm_hook(None, sum_gradients_hook)

        self.log = RunLog(self.output, ctx.is_main, self.total_steps, options.progress, self.step,
                          tensorboard=not options.no_tensorboard)
        self.watchdog = StepWatchdog(options.dist_timeout, ctx.rank, enabled=ctx.distributed)
        # the first step whose loss was not finite (-1: none), kept on the device: no sync per step
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._nonfinite_loss = torch.zeros((), device=self.device)
        if state is not None:
            self.log.load_state_dict(state["history"])
            rng = ckpt.load_rank_rng(resume_path, ctx.rank, ctx.world_size)
            if rng is not None:
                ckpt.restore_rng_state(rng)
            else:
                ckpt.seed_everything(derive_seed(options.seed, "resume", self.step, ctx.rank))
            self.log.print(f"resumed from {resume_path} at step {self.step} (epoch {self.epoch}, "
                           f"saved by {state['world_size']} process(es), now {ctx.world_size})")
        else:
            self.log.start_fresh()
            # ranks draw their own streams from here on (dropout, augmentation)
            ckpt.seed_everything(derive_seed(options.seed, "rank", ctx.rank))
        for note in notes:
            self.log.print(f"warning: {note}")
        self.resumed_from = resume_path
        if ctx.is_main:
            write_config(self.output / CONFIG_FILE, self.recorded_options(),
                         header="resolved options of this run: python -m margin_ext.train --config "
                                "config.yaml --output NEW_FOLDER runs it again")

    # -- setup helpers ---------------------------------------------------------------------

    def recorded_options(self) -> dict:
        """Every option of the run as config keys, defaults that the run resolves put in."""
        return resolved_options(self.options, epochs=epochs_of(self.options),
                                weight_decay=weight_decay(self.options))

    def _adopt_checkpoint_run(self, state) -> list:
        """Keep the checkpoint's global batch; list what differs from the checkpoint's run."""
        options, world = self.options, self.ctx.world_size
        saved = state.get("options") or {}
        notes = [f"--{key.replace('_', '-')} is {getattr(options, key)!r}, the checkpoint's run had {value!r}"
                 for key, value in saved.items()
                 if key not in NOT_RECORDED + ("output", "batch_size") and hasattr(options, key)
                 and getattr(options, key) != value]
        global_batch = state.get("global_batch", state["world_size"] * saved.get("batch_size", options.batch_size))
        if global_batch % world:
            raise OptionError(f"--resume: the checkpoint's global batch of {global_batch} does not divide "
                              f"over {world} processes: resume on a number of processes that divides it")
        per_process = global_batch // world
        if per_process != options.batch_size:
            notes.append(f"each of the {world} process(es) takes {per_process} samples per step instead of "
                         f"--batch-size {options.batch_size}, to keep the checkpoint's global batch of "
                         f"{global_batch}")
            options.batch_size = per_process
        if state["world_size"] != world:
            notes.append(f"{state['world_size']} process(es) wrote the checkpoint, {world} resume it: the "
                         f"random streams (dropout, augmentation) are reseeded and differ from an "
                         f"uninterrupted run")
        return notes

    def _continue_schedule(self, state) -> list:
        """After loading the schedulers: the same curve, unless the run's length was changed."""
        saved = state.get("options")
        before = self.schedule.total_steps
        if saved is not None and all(saved.get(key) == getattr(self.options, key) for key in ("epochs", "steps")):
            # the same length in steps, even where another world size pads the epochs differently
            self.total_steps = before
        # LambdaLR's state holds the checkpoint's base lr: this run's --lr decides (lowered after a divergence)
        for scheduler in self.schedulers:
            scheduler.base_lrs = [self.options.lr] * len(scheduler.base_lrs)
            for group in scheduler.optimizer.param_groups:
                group["initial_lr"] = self.options.lr
        # LambdaLR's state holds the step, not the optimizers' lr: set it from the schedule
        self._set_schedule_length(self.total_steps)
        if self.total_steps == before:
            return []
        return [f"the run now ends at step {self.total_steps} instead of {before}: the lr schedule is "
                f"stretched to the new length"]

    def _settings_not_meant(self) -> list:
        """Settings that run, but hardly as the user meant: said once, when a run starts."""
        notes = []
        images, global_batch = len(self.train_set), self.options.batch_size * self.ctx.world_size
        if global_batch > images:
            notes.append(f"--batch-size {self.options.batch_size} x {self.ctx.world_size} process(es) = "
                         f"{global_batch} images per step, more than the {images} of the dataset: each step "
                         f"takes the whole dataset once")
        warmup = self.schedule.warmup_steps
        if warmup >= self.total_steps:
            notes.append(f"the warm-up of {warmup} steps is not shorter than the run of {self.total_steps}: "
                         f"the lr never reaches --lr {self.options.lr:g}")
        if self.num_classes == 1:
            notes.append("the dataset has a single identity: the margin softmax has no other class to tell it "
                         "from, the loss is 0 and nothing is learnt")
        return notes

    def _val_sets_on_rank0(self) -> dict:
        """Only rank 0 evaluates, so only it holds the pairs; a bad file stops every rank."""
        sets, problem = {}, None
        if self.ctx.is_main:
            try:
                sets = build_val_sets(self.options, self.image_shape)
            except DataError as error:
                problem = str(error)
        problem = self.ctx.broadcast_object(problem)
        if problem is not None:
            raise DataError(problem)
        return sets

    def _build_model(self):
        """The backbone (the same seed on every rank: DDP would broadcast rank 0's anyway) and the head;
        an OptionError naming --embedding-size where the allocator cannot hold them."""
        options = self.options
        try:
            backbone = build_backbone(options.backbone, options.embedding_size, in_channels=self.image_shape[0],
                                      image_size=self.image_shape[1], dropout=options.dropout).to(self.device)
            head = PartialFC(options.embedding_size, self.num_classes, margin=self.margin,
                             sample_rate=options.sample_rate, backend=options.backend,
                             seed=options.seed, sparse_grad=True).to(self.device)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(error, MemoryError) and "alloc" not in str(error).lower() \
                    and "out of memory" not in str(error).lower():
                raise
            centres = self.num_classes * self.margin.subcenters * options.embedding_size * 4
            raise OptionError(f"--embedding-size {options.embedding_size} with {self.num_classes} classes: "
                              f"the model does not fit in memory on {self.device} (the centres alone take "
                              f"{centres / 2**30:.3g} GiB, and the allocator refused)") from None
        return backbone, head

    def _optimizer(self, parameters, row_sparse: bool = False):
        """The --optimizer; ``row_sparse``: its variant that updates only the sampled centres
        (margin_ext.row_sparse: unsampled centres and their state wait until sampled again)."""
        parameters = [p for p in parameters if p.requires_grad]
        decay = weight_decay(self.options)
        if self.options.optimizer == "adamw":
            adamw = RowSparseAdamW if row_sparse else torch.optim.AdamW
            return adamw(parameters, lr=self.options.lr, weight_decay=decay)
        sgd = RowSparseSGD if row_sparse else torch.optim.SGD
        return sgd(parameters, lr=self.options.lr, momentum=self.options.momentum, weight_decay=decay)

    def _shape(self) -> dict:
        """What a checkpoint must agree on to be loadable into this run."""
        return {"num_classes": self.num_classes, "embedding_size": self.options.embedding_size,
                "backbone": self.options.backbone, "image_shape": list(self.image_shape),
                "optimizer": self.options.optimizer, "amp_scaler": self.options.amp == "fp16",
                "margin": repr(self.margin), "data": ckpt.data_source(self.options, self.train_set)}

    def _check_compatible(self, state, path) -> None:
        ckpt.check_compatible(state["shape"], self._shape(), path, force=self.options.force_resume)

    def _steps_per_epoch(self, skip: int = 0) -> int:
        per_rank = math.ceil((len(self.train_set) - skip) / self.ctx.world_size)
        return batch_count(per_rank, self.options.batch_size)

    def _plan_total_steps(self) -> int:
        """The run's last step: --steps, or the end of the last epoch at this world size."""
        if self.options.steps is not None:
            return self.options.steps
        epochs = epochs_of(self.options)
        if self.epoch >= epochs:
            return self.step
        rest = self._steps_per_epoch(self.consumed) + (epochs - self.epoch - 1) * self._steps_per_epoch()
        return self.step + rest

    def _warmup_steps(self) -> int:
        if self.options.warmup_steps is not None:
            return self.options.warmup_steps
        if self.options.warmup_epochs is not None:
            return round(self.options.warmup_epochs * self._steps_per_epoch())
        return self.total_steps // 20

    def _set_schedule_length(self, total_steps: int) -> None:
        self.schedule.total_steps = total_steps
        for scheduler in self.schedulers:
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * self.schedule(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def _loader(self) -> DataLoader:
        self.sampler.set_position(self.epoch, self.consumed)
        # a generator of the loader's own keeps the global RNG untouched when an iterator starts
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.options.seed, "loader", self.epoch, self.ctx.rank))
        return DataLoader(self.train_set, batch_sampler=Batches(self.sampler, self.options.batch_size),
                          num_workers=self.options.num_workers, pin_memory=self.device.type == "cuda",
                          generator=generator)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        options, ctx = self.options, self.ctx
        global_batch = options.batch_size * ctx.world_size
        self.log.print(f"training {options.backbone} + PartialFC({self.margin!r}, {self.head_kernels} kernels) on "
                       f"{len(self.train_set)} images of {self.num_classes} identities; {ctx.world_size} process(es) "
                       f"on {self.device}, "
                       f"global batch {global_batch}, {self.total_steps} steps")
        self.started = time.perf_counter()
        interval_start, interval_steps, interval_samples, paused = self.started, 0, 0, 0.0
        loss_sum = torch.zeros((), device=self.device)
        last_eval_step = max((row["step"] for row in self.log.val), default=-1)
        last_checkpoint_step = self.step if self.resumed_from is not None else -1
        steps_this_run, training_seconds, trained_samples = 0, 0.0, 0

        while self.step < self.total_steps:
            loader = self._loader()
            batches_left = len(loader)
            if batches_left == 0:  # the epoch was used up at the checkpoint
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            self.watchdog.arm(self.step + 1)  # the batch's read counts as part of its step
            for batch_index, (images, labels) in enumerate(loader):
                lr = self.backbone_optimizer.param_groups[0]["lr"]  # the lr this step uses
                logging_step = (self.step + 1) % options.log_every == 0 or self.step + 1 == self.total_steps
                loss, top1, batch = self._train_step(images, labels, measure_top1=logging_step)
                self.step += 1
                steps_this_run += 1
                self._note_nonfinite(loss)
                self.consumed = min(self.consumed + batch * ctx.world_size, len(self.train_set))
                loss_sum += loss
                interval_steps += 1
                interval_samples += batch * ctx.world_size
                self.log.advance()
                if steps_this_run == 1:
                    pause_start = time.perf_counter()
                    self._report_head_memory()
                    paused += time.perf_counter() - pause_start

                self.watchdog.disarm()
                if logging_step:
                    self._stop_if_diverged(check_weights=False)
                    mean_loss = (loss_sum / interval_steps).item()
                    now = time.perf_counter()
                    # samples/s and the ETA count training only: verification and checkpoints are paused time
                    seconds = max(now - interval_start - paused, 1e-9)
                    training_seconds += seconds
                    trained_samples += interval_samples
                    eta = training_seconds / steps_this_run * (self.total_steps - self.step)
                    self.log.log_train(self.step, self.epoch, mean_loss, lr, top1, interval_samples / seconds, eta)
                    interval_start, interval_steps, interval_samples, paused = now, 0, 0, 0.0
                    loss_sum.zero_()

                pause_start = time.perf_counter()
                epoch_over = batch_index == batches_left - 1
                done = self.step >= self.total_steps
                periodic = options.val_every and self.step % options.val_every == 0
                if (epoch_over or done or periodic) and last_eval_step != self.step:
                    self.evaluate()
                    ctx.barrier()  # the others wait here, not inside the next step's watched collectives
                    last_eval_step = self.step
                if epoch_over:
                    self.epoch, self.consumed = self.epoch + 1, 0
                if options.checkpoint_every and self.step % options.checkpoint_every == 0 or done:
                    self.save()
                    last_checkpoint_step = self.step
                paused += time.perf_counter() - pause_start
                if options.stop_after_steps is not None and self.step >= options.stop_after_steps and not done:
                    self.log.print(f"stopping after step {self.step} as asked (--stop-after-steps)")
                    self.log.close()
                    return {"step": self.step, "stopped": True}
                if done:
                    break
                self.watchdog.arm(self.step + 1)

        if last_checkpoint_step != self.step:  # e.g. resumed from the final checkpoint
            self.save()
        return self._finish(self._elapsed(), trained_samples / training_seconds if training_seconds else None)

    def _report_head_memory(self) -> None:
        """What the head holds on each rank once a step has run: centres, gradient, optimizer state."""
        parameters = list(self.head.parameters())
        tensors = parameters + [p.grad for p in parameters if p.grad is not None]
        tensors += [value for state in self.head_optimizer.state.values() for value in state.values()
                    if torch.is_tensor(value)]
        mine = (self.head.num_local, sum(_tensor_bytes(t) for t in tensors))
        per_rank = self.ctx.gather_object(mine)
        self.head_bytes = [nbytes for _, nbytes in per_rank]
        self.log.print("head memory per rank (centres, their gradient, optimizer state): " + "; ".join(
            f"rank {rank}: {classes:,} classes, {nbytes / 2**20:,.0f} MiB"
            for rank, (classes, nbytes) in enumerate(per_rank)))

    def _note_nonfinite(self, loss) -> None:
        bad = ~torch.isfinite(loss) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, self.step, self._first_nonfinite)
        self._nonfinite_loss = torch.where(bad, loss.float(), self._nonfinite_loss)

    def _stop_if_diverged(self, check_weights: bool) -> None:
        """TrainingDiverged on every rank once a step's loss was not finite, or (``check_weights``,
        before a save) where a weight is not; a collective."""
        first = int(self._first_nonfinite)
        weights_bad = check_weights and not all(  # BatchNorm's running statistics too
            bool(torch.isfinite(t).all()) for module in (self.backbone, self.head)
            for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point())
        if not self.ctx.any(first >= 0 or weights_bad):
            return
        saved = ckpt.list_checkpoints(self.output)
        kept = (f"the last checkpoint, {saved[-1].name}, and every one before it hold finite weights"
                if saved else "no checkpoint was written")
        what = (f"the loss became {float(self._nonfinite_loss)} at step {first}" if first >= 0
                else f"the weights became non-finite by step {self.step}")
        self.log.close()
        raise TrainingDiverged(f"{what}: stopped without saving; {kept}: lower --lr and continue "
                               f"with --resume auto")

    def _train_step(self, images, labels, measure_top1: bool):
        """One optimizer step; (loss, top-1 of the batch before the update or None, rows on this rank)."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        self.head.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        # the head accumulates in fp32 whatever the backbone's dtype
        loss = self.head(embeddings.float(), labels)
        # the step's own embeddings against the centres it updates, before the update (a collective)
        top1 = self.head.top1_accuracy(embeddings.detach().float(), labels) if measure_top1 else None

        self.backbone_optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.backbone_optimizer)
        self.scaler.unscale_(self.head_optimizer)
        agree_on_overflow(self.scaler, (self.backbone_optimizer, self.head_optimizer), self.ctx)
        if self.options.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.options.clip_grad)
        self.scaler.step(self.backbone_optimizer)
        self.scaler.step(self.head_optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # a step the GradScaler skipped (inf gradients) still counts as a step of the schedule
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            for scheduler in self.schedulers:
                scheduler.step()
        return loss.detach(), top1, labels.shape[0]

    # -- evaluation, checkpoints, the end --------------------------------------------------

    def evaluate(self) -> dict:
        """10-fold verification accuracy of every validation set (rank 0 computes, logs)."""
        if not self.ctx.is_main or not self.val_sets:
            return {}
        results = verify(self.backbone, self.val_sets)
        self.log.log_val(self.step, self.epoch, results)
        return results

    def _elapsed(self) -> float:
        """Seconds of the whole run so far, across resumes (up to each checkpoint that was resumed)."""
        return self.elapsed_before + time.perf_counter() - self.started

    def save(self) -> Path:
        self._stop_if_diverged(check_weights=True)  # a checkpoint never holds a non-finite state
        state = None
        if self.ctx.is_main:
            state = {
                "format": 1,
                "step": self.step,
                "epoch": self.epoch,
                "consumed": self.consumed,
                "world_size": self.ctx.world_size,
                "global_batch": self.options.batch_size * self.ctx.world_size,
                "elapsed_s": self._elapsed(),
                "options": {key: value for key, value in vars(self.options).items() if key not in NOT_RECORDED},
                "shape": self._shape(),
                "backbone": self.backbone.state_dict(),
                "backbone_optimizer": self.backbone_optimizer.state_dict(),
                "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
                "scaler": self.scaler.state_dict(),
                "history": self.log.state_dict(),
            }
        return ckpt.save_checkpoint(self.ctx, self.output, self.step, state, self.head, self.head_optimizer,
                                    self.options.keep_checkpoints, lineage=self.lineage)

    def _finish(self, seconds: float, samples_per_s) -> dict:
        """``samples_per_s``: this run's training throughput (None when it took no step)."""
        results = self.log.final_results()
        summary = {"steps": self.step, "epochs_completed": self.epoch, "seconds": seconds,
                   "world_size": self.ctx.world_size, "head_bytes_per_rank": self.head_bytes,
                   "train_samples_per_s": samples_per_s,
                   "final_verification": {name: {"accuracy": acc, "std": std} for name, (acc, std) in results.items()},
                   "final_loss": self.log.train[-1]["loss"] if self.log.train else float("nan")}
        self.log.close()
        if self.ctx.is_main:
            self._write_model()
            self.log.write_json(options=vars(self.options), summary=summary)
            if not self.options.no_plot:
                try:
                    self.log.plot()
                except ImportError:
                    self.log.print("no plot: matplotlib is not installed (pip install 'margin_ext[train]')")
            verification = ", ".join(f"{name} {acc:.4f} ± {std:.4f}" for name, (acc, std) in results.items())
            throughput = f" ({samples_per_s:,.0f} samples/s training)" if samples_per_s else ""
            self.log.print(f"done: {self.step} steps in {format_duration(seconds)}{throughput} on "
                           f"{self.ctx.world_size} process(es); final loss {summary['final_loss']:.4f}; final verification accuracy "
                           f"{verification or 'not evaluated'}; logs in {self.output}")
        return summary

    def _write_model(self) -> Path:
        """The backbone and its architecture (:mod:`.model_file`; python -m margin_ext.export converts it)."""
        channels, height, _ = self.image_shape
        info = ModelInfo(self.options.backbone, self.options.embedding_size, channels, height,
                         default_normalization(channels), self.step)
        return save_model(self.output / MODEL_FILE, self.backbone, info)

    def close(self) -> None:
        self.watchdog.close()
        self.log.close()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a sparse one (the sampled centres' gradient) only its indices and values."""
    if tensor.is_sparse:
        return _tensor_bytes(tensor._indices()) + _tensor_bytes(tensor._values())
    return tensor.numel() * tensor.element_size()


def train(options, ctx: DistributedContext) -> dict:
    """One run: its folder locked (:mod:`.run_folder`) from before the first read of it to the end."""
    lock = claim_run_folder(ctx, check_output_folder(options.output), options.resume, options.overwrite)
    try:
        trainer = Trainer(options, ctx)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        if lock is not None:
            lock.release()
