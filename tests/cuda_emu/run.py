"""make cuda-emu: the CUDA kernels of csrc/cuda/ run under the emulator, compared with
a float64 reference.

Each case builds the op inputs of one head call (x_hat, the centres as stored, labels
with ignored rows (-1) and another shard's classes (>= C), per-row scale, target logit and its derivative (from the spec's formula),
InterFace's theta_y and target centre), runs the host sequence of csrc/ops_cuda.cpp
(host_sequence.cpp) on the emulated kernels -- the fused kernels for bfloat16, float16
and float32-on-TF32 centres, the chunk loop for float32 and float64 -- and compares
(lse, target_logit, grad_x, grad_w, grad_scale) with the float64 reference, which
differentiates the readable margin formulas of margins.py by autograd.

Bound of each output: 2 x the reference's own error in that dtype -- the float64
reference against the same reference with its operands rounded as the kernels round
them (x_hat cast to the centres' 16-bit dtype, or x and w to TF32; dL/dcos stored in the
centres' dtype, or rounded to TF32, and the centres normalized and rounded so for grad_x's
product; grad_w stored in the centres' dtype, saturated; the chunk loop: the reference
in float32) -- plus a float32 floor of 4 ulps of the logit scale (tests/cases.py's rule).
The degenerate cases put zero, tiny, subnormal and huge rows among the centres
(tests/cases.py's DEGENERATE_CENTRES); the float64 reference's weight gradient is
saturated into the centres' dtype there (a zero centre's g / 1e-12 is past float16's
range: margin_ext/saturate.py).

With --permuted, every case runs again with the blocks and the threads of each block in
another order (reversed, or shuffled, case by case) and the buffers against the guard
page before them instead of after: the results must be bit-identical. Last line: ``cuda-emu: N cases, M failures ...``.
Usage: python tests/cuda_emu/run.py [--lib PATH] [--permuted] [--quick] [-k SUBSTRING] [--fail-fast]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]
from build_emulated import build  # noqa: E402
from cases import SPEC_CASES as FAMILY_CASES, SUBCENTER_CASES, make_inputs, round_to_tf32  # noqa: E402
from margin_ext.margins import CurricularFace, NonTargetKind, TargetRow  # noqa: E402
from margin_ext.rows import NORM_EPS, normalize, target_terms  # noqa: E402
from cases import DEGENERATE_CENTRES, with_degenerate_centres  # noqa: E402
from margin_ext.saturate import saturate  # noqa: E402

WEIGHT_TYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# CurricularFace with about half of the non-target classes hard: the features of the
# cases lie near their centres (theta_y ~ 0.6), so a margin of 1 puts the threshold
# cos(theta_y + m) near 0, the middle of the other classes' cosines. With m = 0.5 (the
# default) few classes are hard at these D; those cases check the easy side.
CURRICULAR_HALF_HARD = {"curricularface_half_hard": CurricularFace(s=30.0, m=1.0)}
# every spec case; the sub-centre ones (k centres per class) run the chunk loop only
SPEC_CASES = {**FAMILY_CASES, **SUBCENTER_CASES, **CURRICULAR_HALF_HARD}


class EmuHeadCall(ctypes.Structure):
    """host_sequence.cpp's EmuHeadCall, field by field."""

    _fields_ = [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("dim", ctypes.c_int64),
                ("w_type", ctypes.c_int32), ("splits", ctypes.c_int32), ("chunk", ctypes.c_int64)]
    _fields_ += [(n, ctypes.c_void_p) for n in ("x", "w", "labels", "scale", "row_target", "row_target_grad",
                                                 "theta_y", "coeff", "target_centre", "grad_lse", "grad_target")]
    _fields_ += [(n, ctypes.c_int32) for n in ("nontarget", "inter_dynamic")]
    _fields_ += [(n, ctypes.c_double) for n in ("inter_mu", "inter_alpha")]
    _fields_ += [(n, ctypes.c_void_p) for n in ("lse", "target_logit", "grad_x", "grad_w", "grad_scale")]
    _fields_ += [("subcenters", ctypes.c_int64)]


@dataclass(frozen=True)
class Case:
    path: str          # "fused" or "chunk"
    dtype: torch.dtype  # the centres' storage dtype (fused float32: TF32 products)
    spec: str          # a key of SPEC_CASES
    rows: int
    cols: int          # classes (the centres: cols * k rows, k the spec's sub-centres)
    dim: int
    splits: int = 0    # fused forward: class splits (0: ops_cuda.cpp's choice)
    chunk: int = 0     # fused: backward workspace bytes (0: the kernels' budget); chunk loop: classes per chunk
    compute: torch.dtype = torch.float32  # the chunk loop's compute dtype
    seed: int = 0
    degenerate: bool = False  # zero, tiny, subnormal and huge centres, each some row's target

    @property
    def subcenters(self) -> int:
        return SPEC_CASES[self.spec].subcenters

    @property
    def name(self) -> str:
        kind = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32" if self.path == "fused" else "f32",
                torch.float64: "f64"}[self.dtype]
        if self.path == "chunk" and self.compute == torch.float64:
            kind += "/f64"
        return (f"{self.path} {kind} {self.spec} B={self.rows} C={self.cols} D={self.dim}"
                f"{f' splits={self.splits}' if self.splits else ''}{f' chunk={self.chunk}' if self.chunk else ''}"
                f"{' degenerate centres' if self.degenerate else ''}")


# Workspace bytes that hold one class tile of G for B rows: chunks of 64 classes.
def one_tile_chunks(rows: int, dtype: torch.dtype) -> int:
    return 64 * (rows * dtype.itemsize + math.ceil(rows / 64) * 4) + rows * 4


COSINE_SPECS = [n for n, s in FAMILY_CASES.items() if s.nontarget_params().kind == NonTargetKind.COSINE]
FEW_SPECS = ["arcface", "cosface", "sphereface_norm_scale", "elastic_arcface_plus"]


def cases(quick: bool = False) -> list[Case]:
    """The case list: every spec on two shapes, every shape corner on a few specs."""
    out = []
    fused_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    # (B, C, D, splits, chunk): exactly one tile; B = 1 with C and D smaller than a tile;
    # B, C and D ending mid-tile (D % 8 == 0: 16-byte loads); D = 100 (scalar loads), 5
    # class tiles over 4 splits (the last owns none) and a backward of one-tile chunks;
    # 3 row tiles, a chunk of 2 tiles and one of 1, the last ending mid-tile; D = 512,
    # the largest fused D (the forward's shared memory past 48 KiB)
    shapes = [(64, 64, 64, 1, None), (1, 37, 16, 0, None), (70, 130, 72, 0, None), (33, 300, 100, 4, 1),
              (130, 190, 136, 3, 2), (5, 70, 512, 2, None)]
    for dtype in fused_dtypes:
        for index, (b, c, d, splits, tiles) in enumerate(shapes):
            # quick: one spec per shape, in turn (the norm scale's logits near 0 among them)
            for spec in (FEW_SPECS if not quick else [FEW_SPECS[index % len(FEW_SPECS)]]):
                chunk = tiles * one_tile_chunks(b, dtype) if tiles else 0
                out.append(Case("fused", dtype, spec, b, c, d, splits, chunk))
        for spec in (COSINE_SPECS if not quick else COSINE_SPECS[:3]):
            if spec not in FEW_SPECS:
                out.append(Case("fused", dtype, spec, 70, 130, 72, seed=1))
        # CurricularFace's kind (hard classes and easy ones in every case): B = 1 with C and
        # D under a tile, B, C and D ending mid-tile, D = 100 over 4 splits and one-tile
        # backward chunks, 3 row tiles over chunks of 2 tiles; the default m on the last
        if not quick:
            for b, c, d, splits, tiles in shapes[1:5]:
                chunk = tiles * one_tile_chunks(b, dtype) if tiles else 0
                out.append(Case("fused", dtype, "curricularface_half_hard", b, c, d, splits, chunk, seed=7))
            out.append(Case("fused", dtype, "curricularface", 70, 130, 72, seed=7))
    if quick:  # the mutation check's: CurricularFace's fused kind once
        out.append(Case("fused", torch.float16, "curricularface_half_hard", 33, 300, 100, 4,
                        one_tile_chunks(33, torch.float16), seed=7))
    # the chunk loop: every spec, InterFace included, over chunks ending mid-way
    for spec in (FAMILY_CASES if not quick else ["arcface", "interface"]):
        out.append(Case("chunk", torch.float32, spec, 9, 37, 24, chunk=16, seed=2))
        if not quick:
            out.append(Case("chunk", torch.float32, spec, 1, 5, 3, chunk=2, seed=3))
    # sub-centres (k = 3, 2, 1): a class's k columns reduced in the epilogues, odd shapes
    for spec in (SUBCENTER_CASES if not quick else ["subcenter"]):
        out.append(Case("chunk", torch.float32, spec, 9, 37, 24, chunk=16, seed=7))
        if not quick:
            out.append(Case("chunk", torch.float32, spec, 1, 5, 3, chunk=2, seed=8))
            out.append(Case("chunk", torch.float64, spec, 7, 11, 5, chunk=4, compute=torch.float64, seed=9))
            out.append(Case("chunk", torch.bfloat16, spec, 9, 37, 24, chunk=16, seed=10))
    for spec in ("interface", "arcface", "sphereface_norm_scale"):
        out.append(Case("chunk", torch.float64, spec, 9, 37, 24, chunk=16, compute=torch.float64, seed=4))
        out.append(Case("chunk", torch.bfloat16, spec, 9, 37, 24, chunk=16, seed=5))
    # zero, tiny, subnormal and huge centres (zero-initialised or padded classes, the dtype's
    # extremes), targets of some rows: every fused dtype, the chunk loop's 16 bits and float32
    for dtype in fused_dtypes:
        out.append(Case("fused", dtype, "arcface", 70, 130, 72, seed=6, degenerate=True))
    for spec in (("arcface", "cosface") if not quick else ("arcface",)):
        for dtype in fused_dtypes:
            out.append(Case("fused", dtype, spec, 9, 37, 24, seed=6, degenerate=True))
            out.append(Case("chunk", dtype, spec, 9, 37, 24, chunk=16, seed=6, degenerate=True))
    return out


# ---- inputs ----

def op_inputs(case: Case) -> dict:
    """The op's inputs (float64 values of what the kernels receive) and the loss weights."""
    spec = SPEC_CASES[case.spec]
    g = torch.Generator().manual_seed(100 + case.seed)
    labels = torch.randint(0, case.cols, (case.rows,), generator=g)
    # tile edges and the last class
    for i, label in enumerate([case.cols - 1, 0, 63, 64, case.cols - 2]):
        if i < case.rows and label < case.cols:
            labels[i] = label
    if case.degenerate:
        labels[2:2 + len(DEGENERATE_CENTRES)] = torch.tensor(list(DEGENERATE_CENTRES.values()))
    k = case.subcenters
    x, w, labels = make_inputs(case.rows, case.cols, case.dim, torch.float64, seed=case.seed, labels=labels,
                               subcenters=k)
    # ignored rows (-1) and rows whose target is another shard's class (>= C)
    if case.rows > 2:
        labels[1] = -1
        labels[case.rows // 2] = case.cols + 3
    compute = case.compute
    x_hat = normalize(x).to(compute).double()  # the op receives float32 x_hat (float64 in f64 runs)
    w_stored = with_degenerate_centres(w, case.dtype) if case.degenerate else w.to(case.dtype)
    w_values = w_stored.double()
    has_target = (labels >= 0) & (labels < case.cols)
    target_centre = torch.zeros_like(x_hat)
    # the target class's nearest sub-centre (k = 1: its centre)
    own = normalize(w_values[(labels[has_target].unsqueeze(1) * k + torch.arange(k)).view(-1)]).view(-1, k, case.dim)
    nearest = (x_hat[has_target].unsqueeze(1) * own).sum(dim=2).argmax(dim=1)
    target_centre[has_target] = own[torch.arange(own.shape[0]), nearest]
    target_cos = (x_hat * target_centre).sum(dim=1)
    scale = spec.row_scale(x_hat * (0.5 + x.norm(dim=1, keepdim=True)))
    scale = torch.full((case.rows,), float(spec.s), dtype=torch.float64) if scale is None else scale
    margin = spec.row_margins(case.rows, target_cos, g).double()
    # the target terms, once per row from the spec's formula (margin_ext.rows.target_terms)
    t, d = target_terms(spec, target_cos, TargetRow(margin=margin, scale=scale, norm=x.norm(dim=1)))
    grad_lse = (0.2 + torch.rand(case.rows, generator=g, dtype=torch.float64)) / case.rows
    grad_target = -(0.2 + torch.rand(case.rows, generator=g, dtype=torch.float64)) / case.rows
    inputs = dict(x_hat=x_hat, w=w_stored, labels=labels, scale=scale.detach().to(compute).double(),
                  row_target=t.detach().to(compute).double(), row_target_grad=d.to(compute).double(),
                  grad_lse=grad_lse.to(compute).double(),
                  grad_target=grad_target.to(compute).double(), theta_y=None, coeff=None, target_centre=None)
    if spec.nontarget_params().kind == NonTargetKind.INTERFACE:
        inputs["theta_y"] = torch.acos(target_cos.clamp(-1, 1)).to(compute).double()
        inputs["target_centre"] = target_centre.to(compute).double()
    if spec.nontarget_params().kind == NonTargetKind.CURRICULAR:
        threshold = spec.nontarget_row(target_cos).to(compute).double()
        inputs["theta_y"] = threshold
        inputs["coeff"] = spec.nontarget_coeff(curricular_state(spec)).to(compute).double().expand(case.rows)
        if case.spec == "curricularface_half_hard":
            check_hard_and_easy(case, x_hat, w_values, labels, has_target, threshold)
    return inputs


# CurricularFace's running t as after some training (0 would hide the t in c (t + c))
CURRICULAR_T = 0.25


def curricular_state(spec):
    """CurricularFace's running statistics with t = CURRICULAR_T."""
    state = spec.initial_state()
    state.load_state_dict({"t": CURRICULAR_T})
    return state


def check_hard_and_easy(case: Case, x_hat, w, labels, has_target, threshold) -> None:
    """A CurricularFace case must hold hard and easy non-target classes among its rows
    with a target, else it would not test the kind's two branches."""
    cos = x_hat @ normalize(w).T
    rows = has_target.nonzero().squeeze(1)
    other = torch.ones_like(cos, dtype=torch.bool)
    other[rows, labels[rows]] = False
    hard = (cos > threshold.unsqueeze(1))[rows][other[rows]]
    if not 0 < int(hard.sum()) < hard.numel():
        raise ValueError(f"{case.name}: {int(hard.sum())} of {hard.numel()} non-target classes are hard")


# ---- the reference ----

def reference(spec, inp: dict, x_product=None, w_product=None, dtype=torch.float64):
    """(lse, target_logit, grad_x, grad_w, grad_scale) by autograd in `dtype`, and dL/dcos,
    cos, |w|. x_product / w_product: the operands of x . w (rounded copies); the norms
    always come from w as stored."""
    x = inp["x_hat"].to(dtype).requires_grad_(True)
    w = inp["w"].to(dtype).requires_grad_(True)
    scale = inp["scale"].to(dtype).requires_grad_(True)
    labels = inp["labels"]
    xp = x if x_product is None else x + (x_product.to(dtype) - x).detach()
    wp = w if w_product is None else w + (w_product.to(dtype) - w).detach()
    # |w| of rows whose squares overflow in `dtype`: summed divided by a power of two (exact)
    peak = w.detach().abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(peak > torch.finfo(dtype).max ** 0.25, torch.exp2(torch.floor(torch.log2(peak))),
                            torch.ones_like(peak))
    norm = torch.linalg.vector_norm(w / row_scale, dim=1) * row_scale.squeeze(1)
    cos = (xp @ wp.T) / norm.clamp_min(NORM_EPS)
    spec_ = SPEC_CASES[spec]
    k = spec_.subcenters
    per_class = cos.view(cos.shape[0], -1, k).max(dim=2).values if k > 1 else cos  # the max over sub-centres
    n_cols = w.shape[0] // k
    hit = ((labels >= 0) & (labels < n_cols)).nonzero().squeeze(1)
    params = spec_.nontarget_params()
    if params.kind == NonTargetKind.INTERFACE:
        w_hat = (w / norm.clamp_min(NORM_EPS).unsqueeze(1)).detach()
        class_cos = inp["target_centre"].to(dtype) @ w_hat.T
        logits_over_s = spec_.nontarget(cos, torch.cos(inp["theta_y"].to(dtype)), class_cos)
    elif params.kind == NonTargetKind.CURRICULAR:  # the kernels' threshold, as they receive it
        hard = per_class > inp["theta_y"].to(dtype).unsqueeze(1)
        t = inp["coeff"].to(dtype).unsqueeze(1)
        logits_over_s = torch.where(hard, per_class * (t + per_class), per_class)
    else:
        logits_over_s = spec_.nontarget(per_class, None, None)
    # the target column: the row's t, with dL/dcos_y through d (the kernels' inputs)
    cos_y = per_class[hit, labels[hit]]
    target_logit = inp["row_target"].to(dtype)[hit] + inp["row_target_grad"].to(dtype)[hit] * (cos_y - cos_y.detach())
    logits = (logits_over_s * scale.unsqueeze(1)).index_put((hit, labels[hit]), target_logit)
    lse = torch.logsumexp(logits, dim=1)
    target = torch.zeros_like(lse).index_put((hit,), logits[hit, labels[hit]])
    loss = (inp["grad_lse"].to(dtype) * lse + inp["grad_target"].to(dtype) * target).sum()
    gx, gw, gs, gcos = torch.autograd.grad(loss, (x, w, scale, cos))
    return [t.detach() for t in (lse, target, gx, gw, gs)], gcos, cos.detach(), norm.detach()


def rounded_reference(case: Case, inp: dict):
    """The reference with the kernels' roundings (see the module docstring)."""
    if case.path == "chunk":
        if case.compute == torch.float64:
            return None
        ref32 = reference(case.spec, inp, dtype=torch.float32)[0]
        ref32[3] = saturate(ref32[3], case.dtype)  # grad_w stored in the centres' dtype
        return ref32
    w = inp["w"].double()
    if case.dtype == torch.float32:  # TF32 products
        x_p, w_p = round_to_tf32(inp["x_hat"]).double(), round_to_tf32(w).double()
        round_op = lambda t: round_to_tf32(t.float()).double()  # noqa: E731
    else:
        x_p, w_p = inp["x_hat"].to(case.dtype).double(), w
        round_op = lambda t: saturate(t.float(), case.dtype).double()  # noqa: E731
    (lse, target, _, _, grad_scale), gcos, cos, norm = reference(case.spec, inp, x_p, w_p)
    inv = 1 / norm.float().clamp_min(NORM_EPS).unsqueeze(1)  # the kernels' float32 norms
    g = round_op(gcos)
    grad_x = g @ round_op(inp["w"].float() * inv)  # the centres normalized as staged
    h = g.T @ x_p
    radial = torch.where(norm > NORM_EPS, (gcos * cos).sum(dim=0), 0).unsqueeze(1)
    grad_w = (h - w * inv.double() * radial) * inv.double()
    return [lse, target, grad_x, saturate(grad_w, case.dtype).double(), grad_scale]


# ---- running a case ----

def _pointer(t):
    return None if t is None else t.data_ptr()


def run_emulated(lib, case: Case, inp: dict):
    """The five outputs of the emulated kernels (as float64), or the emulator's error."""
    compute = case.compute
    fused = case.path == "fused"
    x = inp["x_hat"].to(compute).to(case.dtype if fused else compute).contiguous()
    keep = dict(x=x, w=inp["w"].contiguous(), labels=inp["labels"].contiguous())
    for name in ("scale", "row_target", "row_target_grad", "theta_y", "coeff", "target_centre", "grad_lse",
                 "grad_target"):
        keep[name] = None if inp[name] is None else inp[name].to(compute).contiguous()
    b, c, d = case.rows, case.cols, case.dim
    out = dict(lse=torch.empty(b, dtype=compute), target_logit=torch.empty(b, dtype=compute),
               grad_x=torch.empty(b, d, dtype=compute), grad_w=torch.empty(c * case.subcenters, d, dtype=case.dtype),
               grad_scale=torch.empty(b, dtype=compute))
    p = SPEC_CASES[case.spec].nontarget_params()
    mu, alpha, dynamic = p.coeffs if p.kind == NonTargetKind.INTERFACE else (0.0, 0.0, 0.0)
    call = EmuHeadCall(rows=b, cols=c, dim=d, w_type=WEIGHT_TYPES[case.dtype], splits=case.splits, chunk=case.chunk,
                       nontarget=int(p.kind), inter_dynamic=int(dynamic), inter_mu=mu, inter_alpha=alpha,
                       subcenters=case.subcenters)
    for name, t in list(keep.items()) + list(out.items()):
        setattr(call, name, _pointer(t))
    error = ctypes.create_string_buffer(2048)
    if fused:
        status = lib.emu_fused_head(ctypes.byref(call), error, len(error))
    else:
        status = lib.emu_chunk_loop(ctypes.byref(call), int(compute == torch.float64), error, len(error))
    if status != 0:
        return with_source_line(error.value.decode(errors="replace"))
    return [out[n] for n in ("lse", "target_logit", "grad_x", "grad_w", "grad_scale")]


def with_source_line(message: str) -> str:
    """A sanitizer trap's address in the library, with the source line addr2line gives."""
    m = re.search(r" at (\S+\.so)\+(0x[0-9a-f]+)", message)
    if not m:
        return message
    try:
        where = subprocess.run(["addr2line", "-e", m.group(1), "-i", m.group(2)], capture_output=True,
                               text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return message
    return message + (f" ({' <- '.join(where)})" if where else "")


OUTPUTS = ("lse", "target_logit", "grad_x", "grad_w", "grad_scale")


def compare(case: Case, got, ref64, ref_low, scale: float) -> tuple[list[str], dict]:
    """Failures (one line each) and the error / bound of each output."""
    failures, report = [], {}
    eps = torch.finfo(torch.float64 if case.compute == torch.float64 else torch.float32).eps
    for name, a, r, low in zip(OUTPUTS, got, ref64, ref_low or [None] * 5):
        a = a.double()
        magnitude = max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        floor = (64 if case.compute == torch.float64 else 4) * eps * scale * magnitude
        own = (low - r).abs().max().item() if low is not None and r.numel() else 0.0
        bound = 2 * own + floor
        err = (a - r).abs().max().item() if r.numel() else 0.0
        report[name] = (err, bound)
        if not torch.isfinite(a).all():
            failures.append(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values")
        elif not err <= bound:
            failures.append(f"{name}: error {err:.3g} > bound {bound:.3g} (2 x own {own:.3g} + floor {floor:.3g})")
    return failures, report


def identical(a, b) -> bool:
    """Bit for bit (NaN payloads included)."""
    return all(torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)) for x, y in zip(a, b))


def main() -> int:
    parser = argparse.ArgumentParser(description="the CUDA kernels under the emulator vs the float64 reference")
    parser.add_argument("--lib", type=Path, help="a built libcuda_emu.so (default: build it)")
    parser.add_argument("--permuted", action="store_true", help="rerun each case in permuted orders: bit-identical")
    parser.add_argument("--quick", action="store_true", help="a short case list (the mutation check's)")
    parser.add_argument("-k", default="", help="only the cases whose name contains this")
    parser.add_argument("--fail-fast", action="store_true")
    parser.add_argument("-v", action="store_true", help="one line per case")
    args = parser.parse_args()
    start = time.time()
    lib = ctypes.CDLL(str(args.lib or build()))
    torch.manual_seed(0)
    selected = [c for c in cases(args.quick) if args.k in c.name]
    n_failures, worst = 0, {}
    for index, case in enumerate(selected):
        inp = op_inputs(case)
        scale = float(inp["scale"].abs().max())
        lib.emu_configure(0, 0, 0)
        got = run_emulated(lib, case, inp)
        failures = []
        if isinstance(got, str):
            failures = [f"emulator: {got}"]
        else:
            ref64 = reference(case.spec, inp)[0]
            ref64[3] = saturate(ref64[3], case.dtype).double()  # grad_w as the centres' dtype holds it
            failures, report = compare(case, got, ref64, rounded_reference(case, inp), scale)
            kind = " ".join(case.name.split(" ")[:2])
            for name, (err, bound) in report.items():
                key = (kind, name)
                if key not in worst or err / max(bound, 1e-300) > worst[key][0] / max(worst[key][1], 1e-300):
                    worst[key] = (err, bound)
            if args.permuted and not failures:
                seed = 1 if index % 2 == 0 else 2 + index  # reversed, or shuffled
                lib.emu_configure(seed, seed, 1)
                again = run_emulated(lib, case, inp)
                if isinstance(again, str):
                    failures.append(f"permuted run (order seed {seed}): emulator: {again}")
                elif not identical(got, again):
                    diff = [n for n, a, b in zip(OUTPUTS, got, again) if not torch.equal(a, b)]
                    failures.append(f"permuted run (order seed {seed}) differs in {diff}")
        if failures:
            n_failures += 1
            print(f"FAIL {case.name}: " + "; ".join(failures), flush=True)
            if args.fail_fast:
                break
        elif args.v:
            print(f"ok   {case.name}", flush=True)
    kinds = sorted({k for k, _ in worst})
    for kind in kinds:
        parts = [f"{name} {worst[(kind, name)][0]:.2g}/{worst[(kind, name)][1]:.2g}" for name in OUTPUTS
                 if (kind, name) in worst]
        print(f"worst error/bound {kind}: " + ", ".join(parts))
    permuted = " (each also in a permuted order, bit-identical)" if args.permuted else ""
    print(f"cuda-emu: {len(selected)} cases, {n_failures} failures{permuted}, {time.time() - start:.0f} s")
    return 1 if n_failures else 0


if __name__ == "__main__":
    sys.exit(main())
