"""The training run: data, backbone under DDP, PartialFC head, the loop, evaluation, resume.

One optimizer step reads straight down (:meth:`Trainer._train_step`): backbone forward
(under autocast when --amp asks), head loss over the global batch, backward, gradient
clipping, the two optimizers (backbone, head shard), the lr schedule. Around it:
logging every ``--log-every`` steps, verification after every epoch, an atomic
checkpoint every ``--checkpoint-every`` steps and at the end.

Exact resume. A checkpoint is taken after a step; it holds everything that decides
the following steps: weights, optimizer and scheduler states, the GradScaler, every
rank's RNG states, and the data position (epoch, samples of the epoch's permutation
already consumed). Resumed with the same number of processes, the run continues
bit for bit (on the CPU; CUDA kernels may be nondeterministic). With another number
of processes the head reshards (``load_head``), the epoch's remaining samples are
dealt to the new ranks, and every rank reseeds its RNGs from
``derive_seed(seed, "resume", step, rank)``, since the old ranks' streams do not map
to the new ones. Random augmentation drawn inside DataLoader workers
(``--num-workers`` > 0) is reproducible per epoch but not across a mid-epoch resume.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from margin_ext import PartialFC
from margin_ext.train.backbones import build_backbone
from margin_ext.train.data import (
    DataError,
    ImageFolderDataset,
    RecordIODataset,
    SyntheticIdentities,
    compute_embeddings,
    evaluate_verification,
    load_verification_bin,
    synthetic_verification_pairs,
)
from margin_ext.train.data.synthetic import derive_seed

from . import checkpointing as ckpt
from .distributed_launch import DistributedContext
from .logging import RunLog, format_duration
from .options import OptionError, lr_milestones, margin_spec, weight_decay

VERIFICATION_FOLDS = 10
SYNTHETIC_EPOCHS = 7  # about 3 minutes with 2 processes on 2 CPU cores
DEFAULT_EPOCHS = 20


# ----------------------------------------------------------------------------- data

def check_output_folder(output) -> Path:
    """Create ``output`` and prove it is writable, before anything is trained."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OptionError(f"--output {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OptionError(f"--output {path}: cannot write there ({error.strerror or error})") from None
    return path


def build_train_set(options):
    """(dataset, number of classes) for --data, checked against --num-classes."""
    if options.data == "synthetic":
        dataset = SyntheticIdentities(options.synthetic_identities, options.synthetic_samples,
                                      seed=options.synthetic_seed)
        where = "the synthetic set"
    else:
        path = Path(options.data)
        where = str(path)
        if not path.exists():
            raise DataError(f"--data {path}: no such file or folder")
        if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
            dataset = _open_recordio(path if path.suffix == ".rec" else path / "train.rec")
        elif path.is_dir():
            dataset = _open_image_folder(path)
        else:
            raise DataError(f"--data {path}: expected 'synthetic', an image folder or a .rec file")
    if len(dataset) == 0:
        raise DataError(f"--data {options.data}: holds no images")
    declared = dataset.num_classes
    if options.num_classes is not None and options.num_classes != declared:
        raise DataError(f"--num-classes {options.num_classes} disagrees with {where}, which has {declared} identities")
    # A RecordIO set declares its identities in its header; reading every record's label to
    # check them would cost a pass over the file: the head rejects a label out of range.
    if not isinstance(dataset, RecordIODataset):
        top_label = int(dataset.labels.max())
        if top_label >= declared:
            raise DataError(f"{where} has label {top_label}, outside [0, {declared}) of its {declared} identities")
    return dataset, declared


def _open_recordio(path: Path):
    index = path.with_suffix(".idx")
    if not index.is_file():
        raise DataError(f"--data {path}: its index {index} is missing (a .rec file needs the .idx beside it)")
    try:
        # faces are mirror-symmetric: flipping is InsightFace's one training augmentation
        return RecordIODataset(path, random_flip=True)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise DataError(f"--data {path}: not a readable RecordIO dataset ({error})") from None


def _open_image_folder(path: Path):
    try:
        return ImageFolderDataset(path, random_flip=True)
    except (OSError, ValueError) as error:
        raise DataError(f"--data {path}: not a usable image folder ({error})") from None


def build_val_sets(options, image_shape) -> dict:
    """name -> (images_a, images_b, issame, flip): held-out synthetic identities and/or .bin files."""
    channels, height, width = image_shape
    if options.val == "none":
        return {}
    if options.val == "synthetic":
        images_a, images_b, issame = synthetic_verification_pairs(
            options.synthetic_val_identities, options.synthetic_val_pairs, image_size=height,
            channels=channels, seed=options.synthetic_seed)
        # the synthetic images are not mirror-symmetric: no flip test
        return {"synthetic": (images_a, images_b, issame, False)}
    sets = {}
    for item in options.val.split(","):
        path = Path(item.strip())
        if not path.is_file():
            raise DataError(f"--val {path}: no such verification file")
        try:
            # kept as uint8 (a quarter of float32) and normalised batch by batch at evaluation
            images, issame = load_verification_bin(path, image_size=(height, width), as_uint8=True)
        except Exception as error:  # a pickle can fail in many ways; all mean "not a .bin"
            raise DataError(f"--val {path}: not a readable verification .bin file ({error})") from None
        if images.shape[1] != channels:
            raise DataError(f"--val {path}: {images.shape[1]}-channel images, the training data has {channels}")
        if len(issame) < VERIFICATION_FOLDS:
            raise DataError(f"--val {path}: {len(issame)} pairs, {VERIFICATION_FOLDS}-fold verification needs "
                            f"at least {VERIFICATION_FOLDS}")
        sets[path.stem] = (images[0::2], images[1::2], issame, True)
    return sets


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


class _Batches(Sampler):
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
        n = len(self.sampler)
        count = math.ceil(n / self.batch_size)
        return count - 1 if count > 1 and n % self.batch_size == 1 else count


# ----------------------------------------------------------------------------- schedule

class LrSchedule:
    """lr factor of step i (0-based): linear warm-up, then cosine, step or constant.

    A callable object rather than a closure so that LambdaLR saves its fields.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, milestones, gamma: float):
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        self.milestones, self.gamma = list(milestones), gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            progress = step / max(self.total_steps, 1)
            return self.gamma ** sum(progress >= m for m in self.milestones)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _sum_gradients_hook(process_group, bucket):
    """DDP communication hook that sums the ranks' gradients instead of averaging them.

    The head's loss is already the mean over the global batch, and the gather's backward
    hands each rank the gradient of its own rows only: the backbone's true gradient is
    the sum of the ranks' gradients, so it does not depend on the number of processes.
    (InsightFace's default averaging trains the backbone with 1 / world_size of it.)
    """
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _agree_on_overflow(scaler, optimizers, ctx: DistributedContext) -> None:
    """Make every rank skip or take the step together under fp16 loss scaling.

    Each rank checks only its own head shard for inf/NaN gradients; without agreement
    one rank could skip a step that another takes, and their scales would drift apart.
    Reaches into GradScaler's per-optimizer record, its only handle on the decision.
    """
    if not scaler.is_enabled() or not ctx.distributed:
        return
    records = [scaler._per_optimizer_states[id(opt)]["found_inf_per_device"] for opt in optimizers]
    found = torch.zeros(1, device=ctx.device)
    for record in records:
        for value in record.values():
            found += value.to(found.device)
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    for record in records:
        for value in record.values():
            value.copy_(found.to(value.device).view_as(value).clamp(max=1))


# ----------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, options, ctx: DistributedContext):
        self.options, self.ctx = options, ctx
        self.device = ctx.device
        self.output = check_output_folder(options.output)
        self.margin = margin_spec(options)

        resume_path = ckpt.open_run_folder(ctx, self.output, options.resume)

        ckpt.seed_everything(options.seed)
        self.train_set, self.num_classes = build_train_set(options)
        if len(self.train_set) < 2 * ctx.world_size:
            raise DataError(f"--data {options.data}: {len(self.train_set)} images are too few for "
                            f"{ctx.world_size} processes (BatchNorm needs 2 per process)")
        sample, _ = self.train_set[0]
        self.image_shape = tuple(sample.shape)
        if sample.dim() != 3 or sample.shape[1] != sample.shape[2]:
            raise DataError(f"--data {options.data}: expected square C x H x W images, got {tuple(sample.shape)}")
        self.val_sets = self._val_sets_on_rank0()
        self.sampler = ResumableDistributedSampler(self.train_set, ctx.world_size, ctx.rank, options.seed)

        # same seed on every rank: identical backbones (DDP would broadcast rank 0's anyway)
        name = "smallcnn" if options.backbone == "small" else options.backbone
        self.backbone = build_backbone(name, options.embedding_size, in_channels=self.image_shape[0],
                                       image_size=self.image_shape[1], dropout=options.dropout).to(self.device)
        self.head = PartialFC(options.embedding_size, self.num_classes, margin=self.margin,
                                 sample_rate=options.sample_rate, backend=options.backend,
                                 seed=options.seed).to(self.device)
        self.backbone_optimizer = self._optimizer(self.backbone.parameters())
        self.head_optimizer = self._optimizer(self.head.parameters())
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[options.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=options.amp == "fp16")

        self.step, self.epoch, self.consumed = 0, 0, 0
        state = ckpt.load_trainer_state(resume_path) if resume_path is not None else None
        if state is not None:
            self._check_compatible(state, resume_path)
            self.step, self.epoch, self.consumed = state["step"], state["epoch"], state["consumed"]
            self.backbone.load_state_dict(state["backbone"])
            self.backbone_optimizer.load_state_dict(state["backbone_optimizer"])
            ckpt.load_head_state(resume_path, self.head, self.head_optimizer)
            self.scaler.load_state_dict(state["scaler"])
        self.lineage = ckpt.start_branch(ctx, self.output, resume_path)

        self.total_steps = self._plan_total_steps()
        warmup = options.warmup_steps if options.warmup_steps is not None else self.total_steps // 20
        self.schedule = LrSchedule(options.lr_schedule, self.total_steps, warmup, lr_milestones(options),
                                   options.lr_gamma)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
                           for opt in (self.backbone_optimizer, self.head_optimizer)]
        if state is not None:
            for scheduler, saved in zip(self.schedulers, state["schedulers"]):
                scheduler.load_state_dict(saved)
            self._set_schedule_length(self.total_steps)

        self.model = self.backbone
        if ctx.distributed:
            self.model = DistributedDataParallel(
                self.backbone, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.model.register_comm_hook(None, _sum_gradients_hook)

        self.log = RunLog(self.output, ctx.is_main, self.total_steps, options.progress, self.step)
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
        self.resumed_from = resume_path

    # -- setup helpers ---------------------------------------------------------------------

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

    def _optimizer(self, parameters):
        parameters = [p for p in parameters if p.requires_grad]
        decay = weight_decay(self.options)
        if self.options.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.options.lr, weight_decay=decay)
        return torch.optim.SGD(parameters, lr=self.options.lr, momentum=self.options.momentum, weight_decay=decay)

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
        batches = math.ceil(per_rank / self.options.batch_size)
        return batches - 1 if batches > 1 and per_rank % self.options.batch_size == 1 else batches

    def _plan_total_steps(self) -> int:
        """The run's last step: --steps, or the end of the last epoch at this world size."""
        if self.options.steps is not None:
            return self.options.steps
        epochs = self.options.epochs or (SYNTHETIC_EPOCHS if self.options.data == "synthetic" else DEFAULT_EPOCHS)
        if self.epoch >= epochs:
            return self.step
        rest = self._steps_per_epoch(self.consumed) + (epochs - self.epoch - 1) * self._steps_per_epoch()
        return self.step + rest

    def _set_schedule_length(self, total_steps: int) -> None:
        # after a resume on another world size the run's length in steps may differ
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
        return DataLoader(self.train_set, batch_sampler=_Batches(self.sampler, self.options.batch_size),
                          num_workers=self.options.num_workers, pin_memory=self.device.type == "cuda",
                          generator=generator)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        options, ctx = self.options, self.ctx
        global_batch = options.batch_size * ctx.world_size
        self.log.print(f"training {options.backbone} + PartialFC({self.margin!r}) on {len(self.train_set)} images of "
                       f"{self.num_classes} identities; {ctx.world_size} process(es) on {self.device}, "
                       f"global batch {global_batch}, {self.total_steps} steps")
        started = time.perf_counter()
        interval_start, interval_steps, interval_samples = started, 0, 0
        loss_sum = torch.zeros((), device=self.device)
        last_eval_step = max((row["step"] for row in self.log.val), default=-1)
        last_checkpoint_step = self.step if self.resumed_from is not None else -1
        steps_this_run = 0

        while self.step < self.total_steps:
            loader = self._loader()
            batches_left = len(loader)
            if batches_left == 0:  # the epoch was used up at the checkpoint
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            for batch_index, (images, labels) in enumerate(loader):
                lr = self.backbone_optimizer.param_groups[0]["lr"]  # the lr this step uses
                loss, embeddings, labels = self._train_step(images, labels)
                self.step += 1
                steps_this_run += 1
                self.consumed = min(self.consumed + labels.shape[0] * ctx.world_size, len(self.train_set))
                loss_sum += loss
                interval_steps += 1
                interval_samples += labels.shape[0] * ctx.world_size
                self.log.advance()

                if self.step % options.log_every == 0 or self.step == self.total_steps:
                    top1 = self.head.top1_accuracy(embeddings, labels)
                    mean_loss = (loss_sum / interval_steps).item()
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"the loss is {mean_loss} at step {self.step}: lower --lr, "
                                                 f"or use --amp none")
                    now = time.perf_counter()
                    rate = interval_samples / max(now - interval_start, 1e-9)
                    eta = (now - started) / steps_this_run * (self.total_steps - self.step)
                    self.log.log_train(self.step, self.epoch, mean_loss, lr, top1, rate, eta)
                    interval_start, interval_steps, interval_samples = now, 0, 0
                    loss_sum.zero_()

                if batch_index == batches_left - 1:  # the epoch is over
                    self.evaluate()
                    last_eval_step = self.step
                    self.epoch, self.consumed = self.epoch + 1, 0
                done = self.step >= self.total_steps
                if done and last_eval_step != self.step:
                    self.evaluate()
                    last_eval_step = self.step
                if options.checkpoint_every and self.step % options.checkpoint_every == 0 or done:
                    self.save()
                    last_checkpoint_step = self.step
                if options.stop_after_steps is not None and self.step >= options.stop_after_steps and not done:
                    self.log.print(f"stopping after step {self.step} as asked (--stop-after-steps)")
                    self.log.close()
                    return {"step": self.step, "stopped": True}
                if done:
                    break

        if last_checkpoint_step != self.step:  # e.g. resumed from the final checkpoint
            self.save()
        return self._finish(time.perf_counter() - started)

    def _train_step(self, images, labels):
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        self.head.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        # the head accumulates in fp32 whatever the backbone's dtype
        loss = self.head(embeddings.float(), labels)

        self.backbone_optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.backbone_optimizer)
        self.scaler.unscale_(self.head_optimizer)
        _agree_on_overflow(self.scaler, (self.backbone_optimizer, self.head_optimizer), self.ctx)
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
        return loss.detach(), embeddings.detach().float(), labels

    # -- evaluation, checkpoints, the end --------------------------------------------------

    def evaluate(self) -> dict:
        """10-fold verification accuracy of every validation set (rank 0 computes, logs)."""
        if not self.ctx.is_main or not self.val_sets:
            return {}
        results = {}
        for name, (images_a, images_b, issame, flip) in self.val_sets.items():
            if flip:
                a, a_flipped = self._embed(images_a, flip=True)
                b, b_flipped = self._embed(images_b, flip=True)
                result = evaluate_verification(a, b, issame, flipped_a=a_flipped, flipped_b=b_flipped)
            else:
                result = evaluate_verification(self._embed(images_a), self._embed(images_b), issame)
            results[name] = (result.accuracy, result.std)
        self.log.log_val(self.step, self.epoch, results)
        return results

    def _embed(self, images, flip=False, chunk=2048):
        """Embeddings (and those of the mirrored images) of float or uint8 images, chunk by chunk."""
        parts = []
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            if batch.dtype == torch.uint8:
                batch = (batch.float() / 255.0 - 0.5) / 0.5  # InsightFace's input normalisation
            parts.append(compute_embeddings(self.backbone, batch, flip=flip))
        if flip:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)

    def save(self) -> Path:
        state = None
        if self.ctx.is_main:
            state = {
                "format": 1,
                "step": self.step,
                "epoch": self.epoch,
                "consumed": self.consumed,
                "world_size": self.ctx.world_size,
                "shape": self._shape(),
                "backbone": self.backbone.state_dict(),
                "backbone_optimizer": self.backbone_optimizer.state_dict(),
                "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
                "scaler": self.scaler.state_dict(),
                "history": self.log.state_dict(),
            }
        return ckpt.save_checkpoint(self.ctx, self.output, self.step, state, self.head, self.head_optimizer,
                                    self.options.keep_checkpoints, lineage=self.lineage)

    def _finish(self, seconds: float) -> dict:
        results = self.log.final_results()
        summary = {"steps": self.step, "epochs_completed": self.epoch, "seconds": seconds,
                   "world_size": self.ctx.world_size,
                   "final_verification": {name: {"accuracy": acc, "std": std} for name, (acc, std) in results.items()},
                   "final_loss": self.log.train[-1]["loss"] if self.log.train else float("nan")}
        self.log.close()
        if self.ctx.is_main:
            self.log.write_json(options=vars(self.options), summary=summary)
            if not self.options.no_plot:
                try:
                    self.log.plot()
                except ImportError:
                    self.log.print("no plot: matplotlib is not installed (pip install matplotlib)")
            verification = ", ".join(f"{name} {acc:.4f} ± {std:.4f}" for name, (acc, std) in results.items())
            self.log.print(f"done: {self.step} steps in {format_duration(seconds)} on {self.ctx.world_size} "
                           f"process(es); final loss {summary['final_loss']:.4f}; final verification accuracy "
                           f"{verification or 'not evaluated'}; logs in {self.output}")
        return summary


def train(options, ctx: DistributedContext) -> dict:
    return Trainer(options, ctx).fit()
