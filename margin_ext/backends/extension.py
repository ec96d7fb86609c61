"""The compiled extension's kernels: "cpp" on CPU tensors, "cuda" on CUDA tensors.

The Python face of ``margin_ext._C`` (sources in ``csrc/``), which defines these ops:

* ``torch.ops.margin_ext.head_forward(x_hat, weight, labels, row_terms, target_centre,
  nontarget_kind, nontarget_coeffs, chunk_size) -> (lse, target_logit)``
* ``torch.ops.margin_ext.head_backward(<the same>, lse, grad_lse, grad_target)
  -> (grad_x, grad_weight, grad_scale)``
* ``torch.ops.margin_ext.head_forward_backward(<head_forward's>, grad_lse, grad_target,
  logits_budget, min_row_block) -> (lse, target_logit, grad_x, grad_weight, grad_scale)``
  (CPU only): both at once for per-row weights known before the forward, 3 GEMMs per
  chunk instead of 4 where ``logits_budget`` bytes hold a block of rows' cosines over
  every class (csrc/README.md, "The CPU sweep").

``row_terms`` is (5, B): the scale s_i, the target logit t_i, its derivative d_i, the
non-target kind's row value (InterFace's theta_y, CurricularFace's threshold) and its
coefficient (CurricularFace's running t, the same on every row: a tensor, never read on
the host); ``nontarget_kind`` and ``nontarget_coeffs`` are the spec's
:class:`~margin_ext.margins.NonTargetParams` (its constants).
:func:`op_args` builds them, the one place that does. This module gives the ops fake
implementations (shapes, for torch.compile), makes ``head_forward`` differentiable (its
backward is ``head_backward``) and wraps them in the
:class:`~margin_ext.backends.base.Kernels` contract for ``backends.resolve``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..margins import NonTargetParams
from ..rows import RowInputs
from .base import BackendUnavailable, Kernels

_MODULE = "margin_ext._C"
_BUILD_HINT = ("build it from the source tree with `pip install --no-build-isolation -e .`; the CUDA kernels "
               "need a CUDA build of torch and nvcc (MARGIN_EXT_CUDA=1 forces them, see csrc/README.md)")


def _import_extension() -> Optional[str]:
    """Loads the compiled ops; returns why not when the module is not built at all.

    Only the compiled module's own absence counts as "not built": any other import
    error (an undefined symbol, a torch ABI mismatch) is a broken build and surfaces.
    """
    try:
        importlib.import_module(_MODULE)
    except ModuleNotFoundError as error:
        if error.name != _MODULE:
            raise
        return f"the compiled extension {_MODULE} is not built"
    return None


_MISSING = _import_extension()


def is_built() -> bool:
    """Whether the CPU kernels are built (they always are when the extension is)."""
    return _MISSING is None


def cuda_is_built() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return is_built() and torch._C._dispatch_has_kernel_for_dispatch_key("margin_ext::head_forward", "CUDA")


#: The rows of the ops' row_terms tensor.
ROW_TERMS = ("scale", "target_logit", "target_grad", "nontarget_row", "nontarget_coeff")


def op_args(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs, params: NonTargetParams) -> tuple:
    """The arguments every op starts with, in schema order: x_hat, weight, labels,
    row_terms (5, B) in x_hat's dtype, target_centre, nontarget_kind, nontarget_coeffs, subcenters."""
    zero = rows.target_logit.new_zeros(())
    terms = [rows.scale, rows.target_logit, rows.target_grad, rows.nontarget_row, rows.nontarget_coeff]
    row_terms = torch.stack([(zero if t is None else t).to(device=x_hat.device, dtype=x_hat.dtype)
                             .expand(rows.labels.shape) for t in terms])
    return (x_hat, weight, rows.labels, row_terms, rows.target_centre, int(params.kind),
            [float(c) for c in params.coeffs], int(params.subcenters))


def head_forward(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs, params: NonTargetParams,
                 chunk_size: int):
    """(lse, target_logit) per row."""
    return torch.ops.margin_ext.head_forward(*op_args(x_hat, weight, rows, params), chunk_size)


def head_backward(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs, params: NonTargetParams,
                  chunk_size: int, lse: torch.Tensor, grad_lse: torch.Tensor, grad_target: torch.Tensor):
    """(grad_x_hat, grad_weight in the weight's dtype, grad_scale) from the saved lse."""
    return torch.ops.margin_ext.head_backward(*op_args(x_hat, weight, rows, params), chunk_size, lse, grad_lse,
                                              grad_target)


#: Bytes of stored cosines head_forward_backward may hold (a block of rows over every
#: class). 256 MiB: four times the CPU chunk temporaries' budget (backends.default_chunk_size);
#: one block then holds 512 rows over up to 131k float32 classes, and blocks of
#: MIN_ROW_BLOCK rows reach 2M classes per process.
LOGITS_BUDGET = 256 << 20
#: Fewer rows per block than this run the op pair's sweeps instead: each block reads the
#: centres twice and grad_weight once more, ~16 C D bytes in float32 for 6 Bb C D flops,
#: so at 32 rows a block does ~12 flops per byte, about what a CPU core's FMA units and
#: its share of memory bandwidth balance at; thinner blocks are bound by memory traffic.
MIN_ROW_BLOCK = 32


def head_forward_backward(x_hat: torch.Tensor, weight: torch.Tensor, rows: RowInputs, params: NonTargetParams,
                          chunk_size: int, grad_lse: torch.Tensor, grad_target: torch.Tensor,
                          logits_budget: Optional[int] = None, min_row_block: Optional[int] = None):
    """(lse, target_logit, grad_x_hat, grad_weight in the weight's dtype, grad_scale) for
    the per-row weights grad_lse / grad_target of a loss sum_i grad_lse_i lse_i +
    grad_target_i target_logit_i, known before the forward. None: LOGITS_BUDGET, MIN_ROW_BLOCK."""
    budget = LOGITS_BUDGET if logits_budget is None else logits_budget
    min_block = MIN_ROW_BLOCK if min_row_block is None else min_row_block
    return torch.ops.margin_ext.head_forward_backward(*op_args(x_hat, weight, rows, params), chunk_size, grad_lse,
                                                      grad_target, budget, min_block)


def row_block_rows(x_hat: torch.Tensor, weight: torch.Tensor, params: NonTargetParams,
                   logits_budget: Optional[int] = None, min_row_block: Optional[int] = None) -> int:
    """Rows per block head_forward_backward takes for these inputs; 0 where it runs the
    op pair's sweeps (4 GEMMs per chunk)."""
    budget = LOGITS_BUDGET if logits_budget is None else logits_budget
    min_block = MIN_ROW_BLOCK if min_row_block is None else min_row_block
    return torch.ops.margin_ext.row_block_rows(x_hat, weight, int(params.kind), budget, min_block)


def tile_kernels(tile_m: int, tile_n: int, splits: int, chunk_cols: int = 0, tf32: bool = False) -> Kernels:
    """The fused CUDA kernels' tile loop run on the CPU (ops ``tile_forward`` /
    ``tile_backward``) with the given tile sizes, class splits (forward) and classes per
    backward chunk (a multiple of tile_n; 0: the CUDA kernels' choice); chunk_size is unused.
    ``tf32``: every product operand rounded to TF32 as the kernels for float32 weights
    round it (float32 weights only).

    Everything the CUDA kernels do but the tensor-core product, which is a plain dot
    product over the same operands here: the tests' view of the GPU's tile logic.
    """
    def forward(x_hat, weight, rows, params, chunk_size):
        return torch.ops.margin_ext.tile_forward(*op_args(x_hat, weight, rows, params), [tile_m, tile_n, splits],
                                                 tf32)

    def backward(x_hat, weight, rows, params, chunk_size, lse, grad_lse, grad_target):
        return torch.ops.margin_ext.tile_backward(*op_args(x_hat, weight, rows, params),
                                                  [tile_m, tile_n, chunk_cols], tf32, lse, grad_lse, grad_target)

    name = f"tile({tile_m}x{tile_n}, {splits} splits, chunks of {chunk_cols or 'auto'}{', tf32' if tf32 else ''})"
    return Kernels(name, forward, backward)


CPP_KERNELS = Kernels("cpp", head_forward, head_backward, head_forward_backward)
CUDA_KERNELS = Kernels("cuda", head_forward, head_backward)


def load(name: str, device) -> Kernels:
    """The compiled kernels of backend ``name`` ("cpp" or "cuda") for tensors on ``device``."""
    device = torch.device(device)
    if name not in ("cpp", "cuda"):
        raise ValueError(f"backend={name!r} is not a compiled backend: expected 'cpp' or 'cuda'")
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailable(f"backend='cpp' runs the compiled CPU kernels, but the tensors are on {device}: "
                                 "use backend='cuda' (or 'auto') for CUDA tensors")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"backend='cuda' runs the compiled CUDA kernels, but the tensors are on {device}: "
                                 "use backend='cpp' (or 'auto') for CPU tensors")
    if _MISSING is not None:
        raise BackendUnavailable(f"backend={name!r}: {_MISSING}; {_BUILD_HINT}")
    if name == "cuda" and not cuda_is_built():
        raise BackendUnavailable(f"backend='cuda': {_MODULE} was built without its CUDA kernels "
                                 f"(torch.version.cuda={torch.version.cuda}); {_BUILD_HINT}")
    return CPP_KERNELS if name == "cpp" else CUDA_KERNELS


# ---- fake implementations (torch.compile, meta tensors) and autograd ----
# Every op starts with op_args' eight arguments; the fakes name the ones they read.

def _check_shapes(x_hat, weight, labels):
    torch._check(x_hat.dim() == 2 and weight.dim() == 2, lambda: "x_hat and weight must be 2-D")
    torch._check(x_hat.shape[1] == weight.shape[1], lambda: "x_hat and weight must have the same D")
    torch._check(labels.shape == (x_hat.shape[0],), lambda: "labels must be (B,)")


def _head_forward_fake(x_hat, weight, labels, *_):
    _check_shapes(x_hat, weight, labels)
    rows = x_hat.shape[0]
    return x_hat.new_empty(rows), x_hat.new_empty(rows)


def _head_backward_fake(x_hat, weight, labels, *_):
    _check_shapes(x_hat, weight, labels)
    return x_hat.new_empty(x_hat.shape), weight.new_empty(weight.shape), x_hat.new_empty(x_hat.shape[0])


def _head_forward_backward_fake(x_hat, weight, labels, *_):
    return (*_head_forward_fake(x_hat, weight, labels), *_head_backward_fake(x_hat, weight, labels))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[0])
    ctx.other_args = tuple(inputs[5:])  # nontarget kind, coeffs, subcenters and chunk_size


def _head_forward_backward(ctx, grad_lse, grad_target):
    x_hat, weight, labels, row_terms, target_centre, lse = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_target = torch.zeros_like(lse) if grad_target is None else grad_target
    grad_x, grad_w, grad_scale = torch.ops.margin_ext.head_backward(
        x_hat, weight, labels, row_terms, target_centre, *ctx.other_args, lse, grad_lse, grad_target)
    grads = [None] * (5 + len(ctx.other_args))
    grads[0] = grad_x if ctx.needs_input_grad[0] else None
    grads[1] = grad_w if ctx.needs_input_grad[1] else None
    if ctx.needs_input_grad[3]:
        # the scale's row and the target logit's (dL/dt = grad_lse * p_y + grad_target where owned)
        from ..head_function import target_logit_grad

        grad_t = target_logit_grad(labels, row_terms[1], lse, grad_lse, grad_target)
        zero = torch.zeros_like(grad_t)
        grads[3] = torch.stack([grad_scale.to(lse.dtype), grad_t, zero, zero, zero]).to(row_terms.dtype)
    return tuple(grads)


if _MISSING is None:
    torch.library.register_fake("margin_ext::head_forward", _head_forward_fake)
    torch.library.register_fake("margin_ext::head_backward", _head_backward_fake)
    torch.library.register_fake("margin_ext::head_forward_backward", _head_forward_backward_fake)
    torch.library.register_autograd("margin_ext::head_forward", _head_forward_backward,
                                    setup_context=_setup_context)
