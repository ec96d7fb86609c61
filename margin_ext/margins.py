"""Margin specs: one small frozen dataclass per loss.

A spec says how the logit of the target class (and, for InterFace, of the other
classes) is bent away from the plain scaled cosine. Each spec carries

* its parameters, validated at construction;
* ``target(cos_y, row_margin)``: the target logit divided by the scale, written as
  readable torch; ``target_logit(cos_y, row)`` multiplies it by the row's scale (a spec
  whose target needs more per row, such as the feature norm, overrides this one);
* ``row_margins(...)``: the per-row margin (a constant, or the random draw of ElasticFace);
* ``nontarget_params()``: what the kernels need for the other classes
  (:class:`NonTargetParams`: a kind and a few constant coefficients; plain cosines by
  default), with ``nontarget_row`` and ``nontarget_coeff`` the kind's per-row values.

The target logit is needed once per row: :mod:`margin_ext.target_terms` evaluates
``target_logit`` on each row's target cosine and takes its derivative by autograd; the
kernels receive both and know nothing of the target formula.

Target cosine semantics: c_y is the plain dot product of the normalized feature and the
normalized target centre, never clamped (rounding may push it past +-1, e.g. at D = 1),
like every other column's cosine. A formula that goes through the angle takes it with
:func:`margin_ext.angles.clamped_acos`, which clamps c_y into [-1, 1] inside the acos and
keeps its derivative finite at the poles (see ``SIN_EPS`` there); a formula linear in c_y
(CosFace) stays linear past +-1.

Notation: c = cos(theta) between the normalized feature and a class centre, y the
target class, s the scale.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .angles import clamped_acos
from .running_stats import RunningStatistics, batch_mean_std


class NonTargetKind(enum.IntEnum):
    """How the kernels transform the cosine of a class that is not the row's target."""

    COSINE = 0  # c
    INTERFACE = 1  # cos(theta - mhat), mhat from the angle between target and class centres
    CURRICULAR = 2  # c (t + c) where c > the row's cos(theta_y + m), else c


@dataclass(frozen=True)
class NonTargetParams:
    """The non-target margin as the kernels see it: a kind and its coefficients.

    ``coeffs`` is the packed list every backend reads by position; its layout per kind
    is fixed by the spec that builds it (InterFace: mu, alpha, dynamic as 0 or 1;
    CurricularFace: none). Constants of the spec only: a value that changes from step to
    step (CurricularFace's running t) reaches the kernels as a tensor
    (``MarginSpec.nontarget_coeff``), so that no step reads it back to the host.
    """

    kind: NonTargetKind = NonTargetKind.COSINE
    coeffs: Tuple[float, ...] = ()
    #: k, the weight's rows per class (sub-centre q of class j at row j * k + q): a class's
    #: cosine, its target's included, is the max over its k rows, and its gradient goes to
    #: the arg-max row (the lowest q among ties); 1 for every spec but SubCenterArcFace
    subcenters: int = 1


@dataclass
class TargetRow:
    """What a spec's target formula may read of each row besides c_y ((B,) tensors)."""

    #: r_i: the constant margin, or ElasticFace's draw
    margin: torch.Tensor
    #: s_i: the constant scale, or SphereFace's feature norm (differentiable)
    scale: torch.Tensor
    #: |x_i|: the feature norm before normalization (differentiable)
    norm: torch.Tensor
    #: the spec's running statistics, already updated with this batch (None: stateless spec)
    state: Optional[RunningStatistics] = None


def _check(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


#: the largest scale s: the float32 logits s*cos carry an error of about s * 6e-8 (6e-4 here), and far
#: beyond it the backward overflows (at s = 1e10 the torch backend gives NaN gradients, cpp a NaN loss)
MAX_SCALE = 1e4


def _check_scale(s) -> None:
    _check("s", s, isinstance(s, (int, float)) and math.isfinite(s) and 0 < s <= MAX_SCALE,
           f"a finite number in (0, {MAX_SCALE:g}]")


def _check_finite(name: str, value, low: float = -math.inf, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high
    _check(name, value, ok, f"a finite number in [{low}, {high}]")


class MarginSpec:
    """Behaviour shared by every spec; subclasses are frozen dataclasses."""

    #: whether ``row_margins`` draws random numbers
    is_random: bool = False
    #: rows of the weight per class (SubCenterArcFace's k)
    subcenters: int = 1

    def nontarget_params(self) -> NonTargetParams:
        """The non-target kind and constant coefficients the kernels apply to the other classes."""
        return NonTargetParams()

    def margin_value(self) -> float:
        """The per-row margin r handed to the kernels for a deterministic spec."""
        raise NotImplementedError

    def row_margins(self, num_rows: int, target_cos: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-row margins (float32, CPU) for ``num_rows`` non-ignored rows, in row order."""
        return torch.full((num_rows,), float(self.margin_value()), dtype=torch.float32)

    def row_scale(self, embeddings: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-row scale as a differentiable tensor, or None when it is the constant ``s``."""
        return None

    def target(self, cos_y: torch.Tensor, row_margin: torch.Tensor) -> torch.Tensor:
        """Target logit / s, differentiable."""
        raise NotImplementedError

    def target_logit(self, cos_y: torch.Tensor, row: TargetRow) -> torch.Tensor:
        """The target logit s_i * phi(c_y) of each row, differentiable in c_y and in ``row``."""
        return row.scale * self.target(cos_y, row.margin)

    def nontarget_row(self, target_cos: torch.Tensor) -> Optional[torch.Tensor]:
        """A detached per-row value the non-target kind reads (InterFace: theta_y;
        CurricularFace: cos(theta_y + m)), or None."""
        return None

    def nontarget_coeff(self, state: Optional[RunningStatistics] = None) -> Optional[torch.Tensor]:
        """A detached tensor the non-target kind reads per row, broadcast over the rows
        (CurricularFace: t, a 0-d tensor from ``state``, the running statistics after this
        batch; None: the initial ones), or None. Never read on the host."""
        return None

    def nontarget(self, cos: torch.Tensor, target_cos: torch.Tensor, class_cos: Optional[torch.Tensor],
                  state: Optional[RunningStatistics] = None) -> torch.Tensor:
        """Non-target logits / s for a (rows x classes) block. Plain cosine by default.

        ``target_cos`` is cos(theta_y) per row; ``class_cos`` the cosine between each
        row's target centre and each class centre (only InterFace reads them); ``state``
        the running statistics after this batch (CurricularFace's t).
        """
        return cos

    def extra_loss(self, target_cos: torch.Tensor, row: Optional[TargetRow] = None) -> Optional[torch.Tensor]:
        """A per-row term added to the cross-entropy, or None."""
        return None

    def initial_state(self) -> Optional[RunningStatistics]:
        """A fresh copy of the authors' initial running statistics; None for a stateless spec."""
        return None

    def update_state(self, state: RunningStatistics, norm: torch.Tensor, target_cos: torch.Tensor,
                     counted: Optional[torch.Tensor] = None) -> None:
        """Fold this batch into ``state`` (before the target formula reads it): ``norm`` the
        detached feature norms, ``target_cos`` the detached target cosines, ``counted`` a
        bool mask of the rows that count (None: all)."""


def arcface_target(cos_y, m):
    """cos(theta_y + m) if c_y > cos(pi - m), else c_y - m * sin(m) (ArcFace's classic
    fallback); differentiable in c_y and in ``m`` (a per-row tensor for MagFace)."""
    return torch.where(cos_y > torch.cos(math.pi - m), torch.cos(clamped_acos(cos_y) + m), cos_y - m * torch.sin(m))


def _angular(cos_y, m1, m2, m3):
    return torch.cos(m1 * clamped_acos(cos_y) + m2) - m3


class _AdditiveAngularMargin(MarginSpec):
    """The checks and the margin of the specs whose target is cos(theta_y + m) with a
    constant m in [0, pi) (ArcFace, InterFace, CurricularFace, SubCenterArcFace): frozen
    dataclasses with fields s, m."""

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m", self.m, 0.0, math.pi - 1e-6)

    def margin_value(self):
        return self.m


@dataclass(frozen=True)
class ArcFace(_AdditiveAngularMargin):
    """Additive angular margin (ArcFace, Deng et al., CVPR 2019, arXiv 1801.07698).

    target / s = cos(theta_y + m)       if c_y > cos(pi - m)
               = c_y - m * sin(m)       otherwise (theta_y + m would pass pi, where
                                         cos stops decreasing; InsightFace's
                                         ``th``/``mm`` rule, also pytorch-metric-learning)
    With ``easy_margin``: cos(theta_y + m) if c_y > 0, else c_y.
    With ``straight_through``: the same forward, but d target / d c_y = 1, as today's
    insightface ``arcface_torch`` (CombinedMarginLoss computes the angle under
    ``no_grad``), so its training runs can be reproduced exactly.
    Defaults s = 64, m = 0.5 (the paper and insightface).
    """

    s: float = 64.0
    m: float = 0.5
    easy_margin: bool = False
    straight_through: bool = False

    def target(self, cos_y, row_margin):
        m = row_margin
        if self.easy_margin:
            value = torch.where(cos_y > 0, torch.cos(clamped_acos(cos_y) + m), cos_y)
        else:
            value = arcface_target(cos_y, m)
        if self.straight_through:
            # forward value of the margin, gradient of the identity
            value = cos_y + (value - cos_y).detach()
        return value


@dataclass(frozen=True)
class CosFace(MarginSpec):
    """Additive cosine margin (CosFace, Wang et al., CVPR 2018, arXiv 1801.09414).

    target / s = c_y - m. Defaults s = 64, m = 0.4 (insightface uses 0.4 for cosface
    in ``arcface_torch``; the paper's best is 0.35).
    """

    s: float = 64.0
    m: float = 0.4

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m", self.m, 0.0, 2.0)

    def margin_value(self):
        return self.m


    def target(self, cos_y, row_margin):
        return cos_y - row_margin


@dataclass(frozen=True)
class CombinedMargin(MarginSpec):
    """InsightFace's combined margin (MXNet ``get_symbol``, the m1/m2/m3 form).

    target / s = cos(m1 * theta_y + m2) - m3, with no fallback (as the MXNet code).
    Presets: arcface (1, 0.5, 0), cosface (1, 0, 0.35), combined (1, 0.3, 0.2).
    When m1 = 1 and m2 = 0 the angle is not formed at all (target = c_y - m3), so the
    gradient is exactly 1 even at c_y = +-1.
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m1", self.m1, 1e-6, 10.0)
        _check_finite("m2", self.m2, 0.0, math.pi)
        _check_finite("m3", self.m3, 0.0, 2.0)

    @property
    def _is_cosine_only(self):
        return self.m1 == 1.0 and self.m2 == 0.0

    def margin_value(self):
        return self.m3 if self._is_cosine_only else self.m2


    def target(self, cos_y, row_margin):
        if self._is_cosine_only:
            return cos_y - row_margin
        return _angular(cos_y, self.m1, row_margin, self.m3)


def sphereface_lambda(step: int, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
                      lambda_min: float = 5.0) -> float:
    """A-Softmax's annealed lambda: max(base * (1 + gamma * step) ** -power, lambda_min).

    Defaults from wy1iu/sphereface's prototxt (base 1000, gamma 0.12, power 1, min 5).
    Use ``dataclasses.replace(spec, lambda_=sphereface_lambda(step))`` each step.
    """
    if step < 0:
        raise ValueError(f"step={step!r} is invalid: expected an integer >= 0")
    return max(base * (1.0 + gamma * step) ** (-power), lambda_min)


@dataclass(frozen=True)
class SphereFace(MarginSpec):
    """Multiplicative angular margin (A-Softmax, SphereFace, Liu et al., CVPR 2017).

    psi(theta) = (-1)^k cos(m * theta) - 2k, k = floor(m * theta / pi)   (monotonic in theta)
    target / s = (psi(theta_y) + lambda * c_y) / (1 + lambda)
    ``s=None``: the original A-Softmax of wy1iu/sphereface: the scale is the feature
    norm |x_i| (features are not normalized, weights are), and the gradient flows
    through |x_i| too. ``s=float``: normalized features with a fixed scale, as
    OpenSphere's SphereFace (s = 30, m = 1.7; a non-integer m is allowed there).
    ``lambda_`` is the annealing weight; :func:`sphereface_lambda` gives its schedule.
    """

    m: float = 4.0
    s: Optional[float] = None
    lambda_: float = 0.0

    def __post_init__(self):
        if self.s is not None:
            _check_scale(self.s)
        _check_finite("m", self.m, 1.0, 16.0)
        _check_finite("lambda_", self.lambda_, 0.0, math.inf)

    def margin_value(self):
        return self.m


    def row_scale(self, embeddings):
        if self.s is not None:
            return None
        features = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
        return features.norm(dim=1)

    def target(self, cos_y, row_margin):
        m = row_margin
        theta = clamped_acos(cos_y)
        k = torch.floor(m * theta.detach() / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        psi = sign * torch.cos(m * theta) - 2.0 * k
        return (psi + self.lambda_ * cos_y) / (1.0 + self.lambda_)


@dataclass(frozen=True)
class ElasticArcFace(MarginSpec):
    """ArcFace with a random margin per row (ElasticFace, Boutros et al., CVPRW 2022).

    target / s = cos(theta_y + m_i), m_i ~ N(m, std) drawn per call for every
    non-ignored row (no fallback, as fdbtrs/ElasticFace ``utils/losses.py``).
    ``plus=True`` (ElasticFace+): the drawn margins are sorted ascending and row i gets
    ``sorted[argsort(c_y, descending)[i]]``, the official line as written (it indexes
    the sorted margins by the rank order, it does not invert the permutation).
    Defaults s = 64, m = 0.5, std = 0.05 (ElasticFace-Arc); the official plus uses
    std = 0.0175.
    """

    s: float = 64.0
    m: float = 0.5
    std: float = 0.05
    plus: bool = False
    is_random = True

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m", self.m, 0.0, math.pi - 1e-6)
        _check_finite("std", self.std, 0.0, 1.0)

    def row_margins(self, num_rows, target_cos=None, generator=None):
        return _draw_elastic(self.m, self.std, self.plus, num_rows, target_cos, generator)


    def target(self, cos_y, row_margin):
        return torch.cos(clamped_acos(cos_y) + row_margin)


@dataclass(frozen=True)
class ElasticCosFace(MarginSpec):
    """CosFace with a random margin per row (ElasticFace-Cos): target / s = c_y - m_i.

    Margins drawn as :class:`ElasticArcFace`. Defaults s = 64, m = 0.35, std = 0.05;
    the official plus uses std = 0.02.
    """

    s: float = 64.0
    m: float = 0.35
    std: float = 0.05
    plus: bool = False
    is_random = True

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m", self.m, 0.0, 2.0)
        _check_finite("std", self.std, 0.0, 1.0)

    def row_margins(self, num_rows, target_cos=None, generator=None):
        return _draw_elastic(self.m, self.std, self.plus, num_rows, target_cos, generator)


    def target(self, cos_y, row_margin):
        return cos_y - row_margin


def _draw_elastic(mean, std, plus, num_rows, target_cos, generator):
    # Drawn on the CPU in row order so that a seed gives the same margins on every backend.
    margins = torch.normal(mean, std, size=(num_rows,), generator=generator, dtype=torch.float32)
    if plus:
        if target_cos is None:
            raise ValueError("ElasticFace plus needs the target cosines to order the margins")
        order = torch.argsort(target_cos.detach().float().cpu(), descending=True)
        margins = torch.sort(margins).values[order]
    return margins


@dataclass(frozen=True)
class InterFace(_AdditiveAngularMargin):
    """InterFace (Sang et al.): an ArcFace target plus a margin on every other class.

    target / s     = cos(theta_y + m)   (no fallback)
    non-target / s = cos(theta_j - mhat_yj),
        mhat_yj = alpha * (exp(-mu / phi_yj) - exp(-theta_y / phi_yj)),
        phi_yj  = angle(W_y, W_j) clamped to [0.01, pi]   (dynamic=True)
    ``dynamic=False``: phi = pi / 2 and the first term is exp(-mu).
    theta_y and phi are detached (no gradient flows through mhat), as the official
    ``losses.py`` ("InterFace&dd" configuration). Needs cos(W_y, W_j) for every class:
    the kernels form a second product per tile.
    """

    s: float = 64.0
    m: float = 0.5
    mu: float = math.pi / 18
    alpha: float = 0.1
    dynamic: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_finite("mu", self.mu, 0.0, math.pi)
        _check_finite("alpha", self.alpha, 0.0, 10.0)

    def target(self, cos_y, row_margin):
        return torch.cos(clamped_acos(cos_y) + row_margin)

    def nontarget_params(self):
        # the packed layout the kernels read: mu, alpha, dynamic
        return NonTargetParams(NonTargetKind.INTERFACE, (float(self.mu), float(self.alpha), float(self.dynamic)))

    def nontarget_row(self, target_cos):
        return torch.acos(target_cos.detach().clamp(-1, 1))  # theta_y, detached

    def nontarget(self, cos, target_cos, class_cos, state=None):
        theta_y = self.nontarget_row(target_cos).unsqueeze(1)
        if self.dynamic:
            phi = torch.acos(class_cos.detach().clamp(-1, 1)).clamp(0.01, math.pi)
            first = torch.exp(-self.mu / phi)
        else:
            phi = torch.full_like(cos, math.pi / 2)
            first = math.exp(-self.mu)
        mhat = self.alpha * (first - torch.exp(-theta_y / phi))
        return torch.cos(clamped_acos(cos) - mhat)


@dataclass(frozen=True)
class AdaFace(MarginSpec):
    """Margin adapted to the feature norm as an image-quality proxy (AdaFace, Kim et al.,
    CVPR 2022, arXiv 2204.00964; read from mk-minchul/AdaFace ``head.py``).

    n_i = clip(|x_i|, 0.001, 100), detached
    g_i = clip(h * (n_i - mean) / (std + eps), -1, 1)
    target / s = cos(clip(theta_y - m * g_i, eps, pi - eps)) - (m + m * g_i),
        theta_y = acos(clamp(c_y, -1 + eps, 1 - eps))
    non-target / s = c_j

    ``mean`` and ``std`` are running statistics of the batch's n_i (initially 20 and 100,
    the authors' buffers), updated with the batch before use:
    stat = t_alpha * batch + (1 - t_alpha) * stat, the batch std unbiased (torch.std); a
    batch of one row leaves the std as it is (its std is undefined; the authors' code
    would turn it into NaN). The batch is the rows that count (ignored rows are not in
    it) and, under PartialFC, the global batch. g_i carries no gradient (the norms are
    detached); the clamp of c_y and the clip of the angle give zero gradient outside
    their ranges, as autograd of the authors' code. Deviation: the authors clamp every
    cosine to [-1 + eps, 1 - eps] "for stability" of the acos; here the non-target
    cosines, which go through no acos, are not clamped, so a class within 2.6 degrees
    of a feature keeps its gradient (the logits differ by at most s * eps there).
    Defaults s = 64, m = 0.4, h = 0.333, t_alpha = 0.01, eps = 1e-3 (the authors' config).
    """

    s: float = 64.0
    m: float = 0.4
    h: float = 0.333
    t_alpha: float = 0.01
    eps: float = 1e-3

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("m", self.m, 0.0, math.pi / 2)
        _check_finite("h", self.h, 0.0, 100.0)
        _check("t_alpha", self.t_alpha, isinstance(self.t_alpha, (int, float)) and 0.0 < self.t_alpha <= 1.0,
               "a number in (0, 1]")
        _check("eps", self.eps, isinstance(self.eps, (int, float)) and 0.0 < self.eps <= 0.1, "a number in (0, 0.1]")

    def margin_value(self):
        return self.m

    def initial_state(self):
        return RunningStatistics(mean=20.0, std=100.0)

    def update_state(self, state, norm, target_cos, counted=None):
        n = norm.detach().clamp(0.001, 100.0)
        mean, std = batch_mean_std(n, counted)
        rows = n.new_tensor(n.numel()) if counted is None else counted.sum()
        state.update("mean", mean, self.t_alpha)
        state.update("std", torch.where(rows >= 2, std, state["std"].to(std)), self.t_alpha)

    def margin_scaler(self, norm: torch.Tensor, state: RunningStatistics) -> torch.Tensor:
        """g_i of every row, detached."""
        n = norm.detach().clamp(0.001, 100.0)
        mean, std = state["mean"].to(n), state["std"].to(n)
        return (self.h * (n - mean) / (std + self.eps)).clamp(-1.0, 1.0)

    def target_logit(self, cos_y, row):
        # a row built by hand without statistics reads the authors' initial ones
        g = self.margin_scaler(row.norm, row.state or self.initial_state())
        theta = torch.acos(cos_y.clamp(-1.0 + self.eps, 1.0 - self.eps))
        angle = (theta - self.m * g).clamp(self.eps, math.pi - self.eps)
        return row.scale * (torch.cos(angle) - (self.m + self.m * g))


@dataclass(frozen=True)
class MagFace(MarginSpec):
    """ArcFace whose margin grows with the feature magnitude (MagFace, Meng et al., CVPR
    2021, arXiv 2103.06627; read from IrvingMeng/MagFace ``models/magface.py``).

    a_i = clamp(|x_i|, l_a, u_a)            (differentiable inside [l_a, u_a])
    m_i = l_m + (u_m - l_m) * (a_i - l_a) / (u_a - l_a)
    target / s = ArcFace's with m_i: cos(theta_y + m_i) if c_y > cos(pi - m_i),
                 else c_y - m_i * sin(m_i)
    loss_i += lambda_g * (a_i / u_a^2 + 1 / a_i)   (the magnitude regularizer g; its mean
              over the batch comes with the loss's mean)
    The gradient reaches the feature norm through m_i and through the regularizer, as
    autograd of the authors' code. Defaults s = 64, l_a = 10, u_a = 110, l_m = 0.45,
    u_m = 0.8, lambda_g = 35 (the authors' iResNet100 recipe).
    """

    s: float = 64.0
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0

    def __post_init__(self):
        _check_scale(self.s)
        _check_finite("l_a", self.l_a, 1e-6, math.inf)
        _check("u_a", self.u_a, isinstance(self.u_a, (int, float)) and math.isfinite(self.u_a) and self.u_a > self.l_a,
               f"a finite number > l_a={self.l_a!r}")
        _check_finite("l_m", self.l_m, 0.0, math.pi - 1e-6)
        _check_finite("u_m", self.u_m, self.l_m, math.pi - 1e-6)
        _check_finite("lambda_g", self.lambda_g, 0.0, math.inf)

    def margin_value(self):
        return self.l_m  # not read: the margin comes from each row's feature norm

    def magnitude(self, norm: torch.Tensor) -> torch.Tensor:
        """a_i = clamp(|x_i|, l_a, u_a), differentiable."""
        return norm.clamp(self.l_a, self.u_a)

    def row_margin(self, norm: torch.Tensor) -> torch.Tensor:
        """m_i of every row, differentiable in the norm."""
        a = self.magnitude(norm)
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def target_logit(self, cos_y, row):
        return row.scale * arcface_target(cos_y, self.row_margin(row.norm).to(cos_y.dtype))

    def extra_loss(self, target_cos, row=None):
        a = self.magnitude(row.norm)
        return self.lambda_g * (a / self.u_a ** 2 + 1.0 / a)


@dataclass(frozen=True)
class CurricularFace(_AdditiveAngularMargin):
    """Adaptive curriculum learning on the hard non-target classes (CurricularFace, Huang
    et al., CVPR 2020, arXiv 2004.00288; read from HuangYG123/CurricularFace ``head/metrics.py``).

    target / s     = cos(theta_y + m) if c_y > cos(pi - m), else c_y - m * sin(m)
                     (ArcFace's classic fallback, as the authors' ``threshold``/``mm``)
    non-target / s = c_j * (t + c_j)   where c_j > cos(theta_y + m)   (a "hard" class)
                   = c_j               elsewhere
    The threshold cos(theta_y + m) is the row's angle-sum value without the fallback, as
    the authors' mask; it and t carry no gradient, so d/dc_j = t + 2 c_j on the hard
    classes. t is a running mean of the batch's target cosines (clamped to [-1, 1]),
    initially 0, updated with the batch before use: t = 0.01 * mean + 0.99 * t (the rows
    that count; under PartialFC the global batch). Deviation: the authors clamp every
    cosine to [-1, 1]; the non-target cosines here are not clamped (they pass 1 only by
    rounding). Defaults s = 64, m = 0.5 (the paper).
    """

    s: float = 64.0
    m: float = 0.5

    def target(self, cos_y, row_margin):
        return arcface_target(cos_y, row_margin)

    def initial_state(self):
        return RunningStatistics(t=0.0)

    def update_state(self, state, norm, target_cos, counted=None):
        cos = target_cos.detach().clamp(-1.0, 1.0)
        weight = torch.ones_like(cos) if counted is None else counted.to(cos.dtype)
        state.update("t", (cos * weight).sum() / weight.sum(), 0.01)

    def nontarget_params(self):
        return NonTargetParams(NonTargetKind.CURRICULAR)

    def nontarget_coeff(self, state=None):
        return (state or self.initial_state())["t"].detach()  # t as a tensor: no host read

    def nontarget_row(self, target_cos):
        return torch.cos(torch.acos(target_cos.detach().clamp(-1, 1)) + self.m)  # cos(theta_y + m), detached

    def nontarget(self, cos, target_cos, class_cos, state=None):
        t = self.nontarget_coeff(state).to(cos)
        hard = cos > self.nontarget_row(target_cos).to(cos).unsqueeze(1)
        return torch.where(hard, cos * (t + cos), cos)


#: the most sub-centres per class: the kernels keep a class's arg-max in a byte and the
#: Triton kernels unroll the loop over a class's rows
MAX_SUBCENTERS = 32


@dataclass(frozen=True)
class SubCenterArcFace(_AdditiveAngularMargin):
    """ArcFace over k sub-centres per class (Sub-center ArcFace, Deng et al., ECCV 2020;
    read from deepinsight/insightface ``recognition/SubCenter-ArcFace``).

    The weight holds k rows per class, sub-centre q of class j at row j * k + q (the
    layout of pytorch-metric-learning's SubCenterArcFaceLoss), so it has C * k rows.
    c_j = max_q cos(x, w_{j k + q})        (every class, the target included)
    target / s     = cos(theta_y + m)  if c_y > cos(pi - m), else c_y - m * sin(m)
                     (ArcFace's classic fallback), theta_y = acos(c_y)
    non-target / s = c_j
    The gradient of c_j reaches only its arg-max sub-centre (ties: the lowest q), as
    autograd of the authors' max pooling; the other sub-centres of the class get none
    from that row. Defaults s = 64, m = 0.5, k = 3 (the paper). After training,
    :func:`margin_ext.subcenter_drop` keeps each class's dominant sub-centre and reports
    the samples far from it (the paper's cleaning step).
    """

    s: float = 64.0
    m: float = 0.5
    k: int = 3

    def __post_init__(self):
        super().__post_init__()
        _check("k", self.k, isinstance(self.k, int) and not isinstance(self.k, bool) and 1 <= self.k <= MAX_SUBCENTERS,
               f"an integer in [1, {MAX_SUBCENTERS}]")

    @property
    def subcenters(self) -> int:
        return self.k

    def target(self, cos_y, row_margin):
        return arcface_target(cos_y, row_margin)

    def nontarget_params(self):
        return NonTargetParams(subcenters=self.k)


@dataclass(frozen=True)
class IntraLoss(MarginSpec):
    """A base margin plus an intra-class gradient-enhancing term (after arXiv 2107.03352).

    loss_i = base_loss_i + weight * theta_y_i

    Only the paper's abstract is available to us, so this is our own term, not the
    paper's: its derivative with respect to theta_y is the constant ``weight``, so the
    pull of a sample towards its class centre does not vanish once the softmax term
    saturates (p_y -> 1). Whether the paper's term has this form is unverified; no
    published numbers are claimed for it. theta_y goes through the clamped acos.
    """

    base: MarginSpec = field(default_factory=ArcFace)
    weight: float = 1.0

    def __post_init__(self):
        _check("base", self.base, isinstance(self.base, MarginSpec) and not isinstance(self.base, IntraLoss),
               "a margin spec other than IntraLoss")
        _check_finite("weight", self.weight, 0.0, math.inf)

    @property
    def s(self):
        return self.base.s

    @property
    def is_random(self):
        return self.base.is_random

    @property
    def subcenters(self):
        return self.base.subcenters

    def margin_value(self):
        return self.base.margin_value()

    def row_margins(self, num_rows, target_cos=None, generator=None):
        return self.base.row_margins(num_rows, target_cos, generator)

    def row_scale(self, embeddings):
        return self.base.row_scale(embeddings)

    def nontarget_params(self):
        return self.base.nontarget_params()

    def nontarget_coeff(self, state=None):
        return self.base.nontarget_coeff(state)

    def target(self, cos_y, row_margin):
        return self.base.target(cos_y, row_margin)

    def target_logit(self, cos_y, row):
        return self.base.target_logit(cos_y, row)

    def nontarget(self, cos, target_cos, class_cos, state=None):
        return self.base.nontarget(cos, target_cos, class_cos, state)

    def nontarget_row(self, target_cos):
        return self.base.nontarget_row(target_cos)

    def extra_loss(self, target_cos, row=None):
        own = self.weight * clamped_acos(target_cos)
        base = self.base.extra_loss(target_cos, row)
        return own if base is None else own + base

    def initial_state(self):
        return self.base.initial_state()

    def update_state(self, state, norm, target_cos, counted=None):
        self.base.update_state(state, norm, target_cos, counted)


#: The specs by the name a command line uses for them.
SPECS = {
    "arcface": ArcFace,
    "cosface": CosFace,
    "combined": CombinedMargin,
    "sphereface": SphereFace,
    "elastic_arcface": ElasticArcFace,
    "elastic_cosface": ElasticCosFace,
    "interface": InterFace,
    "intraloss": IntraLoss,
    "adaface": AdaFace,
    "magface": MagFace,
    "curricularface": CurricularFace,
    "subcenter": SubCenterArcFace,
}
