"""The learning-rate schedule: a linear warm-up, then polynomial, cosine, step or constant."""

from __future__ import annotations

import math

SCHEDULES = ("polynomial", "cosine", "step", "constant")


class LrSchedule:
    """lr factor of step i (0-based): a linear warm-up, then the decay of ``kind``.

    The warm-up of w steps rises in equal parts towards 1: step i < w runs at (i + 1) / (w + 1)
    of the peak, so its first step already moves (arcface_torch's starts at exactly 0) and
    step w is the first at the peak.

    polynomial: (1 - progress) ** power over the steps after the warm-up (arcface_torch's
    PolyScheduler, power 2). cosine: half a cosine over the same steps. step: times
    ``gamma`` at each milestone (fractions of the whole run). constant: 1.

    A callable object rather than a closure so that LambdaLR saves its fields: a
    resumed run reads them back from the checkpoint and continues the same curve.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, milestones=(), gamma: float = 0.1,
                 power: float = 2.0):
        if kind not in SCHEDULES:
            raise ValueError(f"kind={kind!r} is invalid: expected one of {SCHEDULES}")
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        self.milestones, self.gamma, self.power = list(milestones), gamma, power

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            progress = step / max(self.total_steps, 1)
            return self.gamma ** sum(progress >= m for m in self.milestones)
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "polynomial":
            return (1.0 - progress) ** self.power
        return 0.5 * (1.0 + math.cos(math.pi * progress))
