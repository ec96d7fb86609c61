"""The heads the benchmark compares, each as ``build(x, w, y) -> step``.

A step runs one forward and one backward of the head on fixed inputs and returns the
loss. Every head sees the same raw (not normalized) embeddings ``x`` (B, D), class
centres ``w`` (C, D) and labels ``y`` (B,); the margin is ArcFace s = 64, m = 0.5
wherever the head has one.

Families:
    margin_ext  the library's backends ("cuda", "cpp", "triton", "torch") and its
                "reference", which materializes the B x C logits on purpose;
    baseline    the materializing heads people train with today (a naive
                F.linear + F.cross_entropy head, and arcface_torch's Partial FC on one shard);
    peer        other libraries: pytorch-metric-learning's ArcFaceLoss, and the fused
                plain cross-entropies of Liger-Kernel and Cut Cross-Entropy (no margin
                and no normalization: they show what a fused CE costs, not an ArcFace);
    floor       the bare GEMMs of the same shapes, the time no head can beat.

``available(head, device)`` says why a head cannot run here (None when it can), and
``estimate_bytes`` is a rough upper bound of its peak memory so the sweep can skip
what would not fit instead of crashing the machine.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import margin_ext as mx
from margin_ext.backends import REGISTRY, BackendUnavailable, resolve

S, M = 64.0, 0.5
SPEC = mx.ArcFace(s=S, m=M)
ARCFACE = f"ArcFace s={S:g} m={M:g}"
PLAIN_CE = "none (plain CE)"


@dataclass(frozen=True)
class Head:
    name: str  # what --backends takes
    label: str  # what tables and plots show
    family: str
    margin: str
    build: Callable  # (x, w, y) -> step() -> loss
    #: peak bytes ~ logits_copies * B * C * 4 + grad_copies * C * D * 4 (+ inputs' dtype
    #: copies); the factors come from measurements at small sizes, rounded up
    logits_copies: float
    grad_copies: float = 1.0


def _autograd_step(x, w, loss_fn, extra_params=()):
    params = (x, w, *extra_params)

    def step():
        loss = loss_fn()
        loss.backward()
        for p in params:
            p.grad = None  # free the gradients so the next step starts from the same state
        return loss.detach()

    return step


# --- margin_ext ---------------------------------------------------------------------------

def _margin_ext(backend):
    def build(x, w, y):
        return _autograd_step(x, w, lambda: mx.margin_cross_entropy(x, w, y, SPEC, backend=backend))

    return build


# --- baselines ----------------------------------------------------------------------------

def _naive(x, w, y):
    """F.normalize + F.linear, ArcFace on the target column, F.cross_entropy.

    The margin math is the common ``ArcMarginProduct`` (cos(theta + m) by the angle-sum
    formula, the ``th``/``mm`` fallback), applied to the gathered target column only.
    """
    cos_m, sin_m = math.cos(M), math.sin(M)
    th, mm = math.cos(math.pi - M), math.sin(math.pi - M) * M
    col = y.unsqueeze(1)

    def loss_fn():
        cos = F.linear(F.normalize(x), F.normalize(w))
        cos_y = cos.gather(1, col)
        sin_y = (1.0 - cos_y * cos_y).clamp(0, 1).sqrt()
        phi = torch.where(cos_y > th, cos_y * cos_m - sin_y * sin_m, cos_y - mm)
        logits = cos.scatter(1, col, phi.to(cos.dtype)) * S
        return F.cross_entropy(logits, y)

    return _autograd_step(x, w, loss_fn)


class _ShardCrossEntropy(torch.autograd.Function):
    """arcface_torch's DistCrossEntropyFunc on one shard (its all-reduces are identities).

    In-place softmax over the logits it is handed; the softmax is saved for backward.
    """

    @staticmethod
    def forward(ctx, logits, label):
        batch_size = logits.size(0)
        max_logits, _ = torch.max(logits, dim=1, keepdim=True)
        logits.sub_(max_logits)
        logits.exp_()
        sum_logits_exp = torch.sum(logits, dim=1, keepdim=True)
        logits.div_(sum_logits_exp)
        index = torch.where(label != -1)[0]
        loss = torch.zeros(batch_size, 1, device=logits.device)
        loss[index] = logits[index].gather(1, label[index]).to(loss.dtype)
        ctx.save_for_backward(index, logits, label)
        return loss.clamp_min_(1e-30).log_().mean() * (-1)

    @staticmethod
    def backward(ctx, loss_gradient):
        index, logits, label = ctx.saved_tensors
        batch_size = logits.size(0)
        one_hot = torch.zeros(size=[index.size(0), logits.size(1)], device=logits.device, dtype=logits.dtype)
        one_hot.scatter_(1, label[index], 1)
        logits[index] -= one_hot
        logits.div_(batch_size)
        return logits * loss_gradient.item(), None


def _partial_fc(x, w, y):
    """insightface arcface_torch (PartialFC_V2 + CombinedMarginLoss), one shard, sample_rate 1.

    normalize, linear, clamp; the ArcFace margin applied in place on the logits under
    no_grad (so its gradient is the identity), scale, then the in-place softmax CE.
    Low-precision logits are cast to float32 first, as its fp16 path does.
    """
    label = y.unsqueeze(1)

    def loss_fn():
        logits = F.linear(F.normalize(x), F.normalize(w))
        if logits.dtype != torch.float32:
            logits = logits.float()
        logits = logits.clamp(-1, 1)
        index_positive = torch.where(label.view(-1) != -1)[0]
        target_logit = logits[index_positive, label[index_positive].view(-1)]
        with torch.no_grad():
            target_logit.arccos_()
            logits.arccos_()
            logits[index_positive, label[index_positive].view(-1)] = target_logit + M
            logits.cos_()
        logits = logits * S
        return _ShardCrossEntropy.apply(logits, label)

    return _autograd_step(x, w, loss_fn)


# --- peers --------------------------------------------------------------------------------

def _pml(x, w, y):
    from pytorch_metric_learning.losses import ArcFaceLoss

    # its class centres are its own (D, C) parameter: give it the same values
    loss = ArcFaceLoss(num_classes=w.shape[0], embedding_size=w.shape[1], margin=math.degrees(M), scale=S)
    loss.W = torch.nn.Parameter(w.detach().T.contiguous())
    return _autograd_step(x, w, lambda: loss(x, y), extra_params=(loss.W,))


def _liger(x, w, y):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _autograd_step(x, w, lambda: loss(w, x, y))


def _cce(x, w, y):
    from cut_cross_entropy import linear_cross_entropy

    return _autograd_step(x, w, lambda: linear_cross_entropy(x, w, y, impl="cce"))


# --- floor --------------------------------------------------------------------------------

def _floor(x, w, y):
    """The head's GEMMs and nothing else: x @ w.T forward, G @ w and G.T @ x backward."""
    grad_logits = torch.randn(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    xd, wd = x.detach(), w.detach()

    def step():
        with torch.no_grad():
            logits = xd @ wd.T
            grad_x = grad_logits @ wd
            grad_w = grad_logits.T @ xd
        del logits, grad_x, grad_w
        return None

    return step


# --- the list -----------------------------------------------------------------------------

HEADS = [
    *(Head(name, f"margin_ext {name}", "margin_ext", ARCFACE, _margin_ext(name), 0.0, 2.0) for name in REGISTRY),
    Head("reference", "margin_ext reference", "margin_ext", ARCFACE, _margin_ext("reference"), 6.0, 2.0),
    Head("naive", "naive (F.linear + F.cross_entropy)", "baseline", ARCFACE, _naive, 6.0),
    Head("partial_fc", "arcface_torch Partial FC (1 shard)", "baseline", ARCFACE + " (straight-through grad)",
         _partial_fc, 5.0),
    Head("pml", "pytorch-metric-learning ArcFaceLoss", "peer", ARCFACE, _pml, 6.0, 2.0),
    Head("liger", "Liger-Kernel fused linear CE", "peer", PLAIN_CE, _liger, 0.0, 2.0),
    Head("cce", "Cut Cross-Entropy", "peer", PLAIN_CE, _cce, 0.0, 2.0),
    Head("floor", "floor (bare GEMMs)", "floor", "-", _floor, 2.0),
]
BY_NAME = {h.name: h for h in HEADS}

_PEER_MODULES = {
    "pml": ("pytorch_metric_learning", "pip install --no-deps pytorch-metric-learning (and scipy)"),
    "liger": ("liger_kernel", "pip install --no-deps liger-kernel"),
    "cce": ("cut_cross_entropy", "pip install --no-deps cut-cross-entropy"),
}


def available(head: Head, device: torch.device) -> Optional[str]:
    """None when ``head`` can run on ``device``, else why not."""
    if head.family == "margin_ext" and head.name != "reference":
        if head.name == "triton" and device.type != "cuda":
            return ("Triton runs on CUDA; on the CPU only under TRITON_INTERPRET=1, an interpreter "
                    "for tests, not for timing")
        devices = REGISTRY[head.name].devices
        if device.type not in devices:
            return f"backend {head.name!r} runs on {' or '.join(d.upper() for d in devices)} tensors"
        try:
            resolve(head.name, device)
        except BackendUnavailable as exc:
            return str(exc)
        return None
    if head.name in _PEER_MODULES:
        module, how = _PEER_MODULES[head.name]
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({how})"
        if head.name in ("liger", "cce") and device.type != "cuda":
            return f"{module}'s kernels are Triton, CUDA only"
    return None


def estimate_bytes(head: Head, batch: int, classes: int, dim: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """A rough upper bound of the head's peak memory during one forward + backward."""
    item = torch.empty((), dtype=dtype).element_size()
    # the naive head's logits stay in the inputs' dtype; the others' are counted as float32
    logits = head.logits_copies * batch * classes * (item if head.name == "naive" else 4)
    if head.name == "floor":
        logits = batch * classes * item * 2  # the output and the incoming gradient
    grads = head.grad_copies * classes * dim * 4 + 2 * batch * dim * 4
    extra = 0
    if head.logits_copies == 0:  # the fused heads' chunk temporaries (their budget)
        extra = (1 << 30) if device.type == "cuda" else (64 << 20)
    if head.name == "cpp":  # a mean loss: head_forward_backward's stored cosines, at most its budget
        from margin_ext.backends.extension import LOGITS_BUDGET

        extra += LOGITS_BUDGET
    if head.name == "pml":
        extra = classes * dim * item  # its own (D, C) copy of the class centres
    return int(logits + grads + extra)
