"""Running statistics of the specs that keep some (AdaFace's feature-norm mean and std).

A spec is a frozen dataclass: its formula and parameters never change. What changes
from step to step -- a moving average of the batch -- lives in a
:class:`RunningStatistics` beside it, owned by the head that uses the spec:
``PartialFC`` keeps one (saved with its checkpoints, frozen in eval mode); a caller of
``margin_cross_entropy`` may pass one, else each call starts from a fresh copy of the
authors' initial values. Every rank of a sharded head updates its copy from the same
global batch with the same operations, so the copies stay equal.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch


class RunningStatistics:
    """A few named float32 scalars, each an exponential moving average of a batch statistic.

    ``update(name, batch_value, momentum)`` sets value = momentum * batch + (1 - momentum) * value,
    in float32 as the authors' buffers. ``frozen`` (False by default) makes
    ``margin_cross_entropy`` use the values without updating them (evaluation).
    """

    def __init__(self, **initial: float):
        self._values: Dict[str, torch.Tensor] = {name: torch.tensor(float(v), dtype=torch.float32)
                                                 for name, v in initial.items()}
        self.frozen = False

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._values[name]

    def update(self, name: str, batch_value: torch.Tensor, momentum: float) -> None:
        old = self._values[name].to(batch_value.device)
        self._values[name] = momentum * batch_value.detach().float() + (1.0 - momentum) * old

    def state_dict(self) -> Dict[str, float]:
        return {name: float(v.item()) for name, v in self._values.items()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        if set(state) != set(self._values):
            raise ValueError(f"running statistics {sorted(state)} do not fit these, {sorted(self._values)}")
        for name, value in state.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"running statistic {name}={value!r} is invalid: expected a finite number")
        for name, value in state.items():
            self._values[name] = torch.tensor(float(value), dtype=torch.float32, device=self._values[name].device)

    def copy(self) -> "RunningStatistics":
        other = RunningStatistics()
        other._values = dict(self._values)
        other.frozen = self.frozen
        return other

    def __eq__(self, other) -> bool:
        return isinstance(other, RunningStatistics) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value:.6g}" for name, value in self.state_dict().items())
        return f"RunningStatistics({inner}{', frozen' if self.frozen else ''})"


def batch_mean_std(values: torch.Tensor, counted: Optional[torch.Tensor] = None):
    """Mean and unbiased standard deviation (torch.std's) of ``values`` over the ``counted``
    rows (a bool mask; None: all), without data-dependent shapes. The std of fewer than
    two rows is NaN, as torch.std's."""
    weight = torch.ones_like(values) if counted is None else counted.to(values.dtype)
    n = weight.sum()
    mean = (values * weight).sum() / n
    var = ((values - mean).square() * weight).sum() / (n - 1)
    return mean, var.sqrt()


def batch_state(spec, state: Optional[RunningStatistics], norm: torch.Tensor, target_cos: torch.Tensor,
                update: bool, counted: Optional[torch.Tensor] = None) -> Optional[RunningStatistics]:
    """``state`` (or a fresh one) with this batch folded in when ``update``; None for a
    stateless spec. Every rank sees the same global batch, so every rank's copy stays equal."""
    if state is None:
        state = spec.initial_state()
    if state is not None and update:
        spec.update_state(state, norm.detach(), target_cos.detach(), counted)
    return state
