"""Autotuning tables of the Triton kernels and the launch geometry derived from them.

A table row is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Each kernel has a
table per operand width -- "16" for bfloat16 / float16 operands, "32" for float32 ones
(ieee, tf32x3 or tf32 products) -- per architecture ("hopper" from sm_90 up, "ampere"
below) and per feature dimension: ``TABLES`` for D a multiple of 16, ``RAGGED_TABLES``
for any other D. Triton specializes a launch on whether D (and so the row strides) is a
multiple of 16; when it is not, no load along the features can be vectorized and every
element of a tile carries its own 64-bit address, so those launches take smaller tiles
over 8 warps. The autotuning key holds D and the pruning hook (:func:`tuning`) offers a
launch only the rows of its own table.

Every row compiles for its architecture with no register spill and within the shared
memory of the part (227 KiB on sm_90, 163 KiB on sm_80) in every specialization that
``margin_cross_entropy`` launches: ``make triton-resources``
(margin_ext.backends.triton_resources) records those launches and compiles them,
writing docs/triton_resources.md; tests/test_triton_resources.py keeps that table
honest. A row that spills is taken out here, not left for the autotuner.

Split counts (class splits of the forward, K splits of the two gradient GEMMs) are
computed inside the launch grid from the config the autotuner picked and the number
of SMs, and recorded by :class:`SplitGrid` for the host code that merges the parts.
"""

from __future__ import annotations

import os

import torch
import triton


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: Whether the kernels were built for the interpreter (decided when this module is
#: first imported, as triton.jit decides).
INTERPRETED = _interpreting()

# Interpreter: BLOCK_M = 8 so that a 9-row test batch spans two row blocks.
INTERPRETER_CONFIG = (8, 16, 16, 1, 1)

_SUBCENTER_TILES = {"16": {"hopper": [(32, 64, 32, 4, 3)], "ampere": [(32, 64, 32, 4, 3)]},
                    "32": {"hopper": [(32, 32, 32, 4, 3)], "ampere": [(32, 32, 16, 8, 1)]}}

_FORWARD_16 = {"hopper": [(128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4)],
               "ampere": [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4)]}
_LOGIT_GRADS_16 = {"hopper": [(64, 64, 64, 4, 4), (64, 128, 64, 8, 3)],
                   "ampere": [(64, 128, 32, 8, 3), (64, 64, 32, 4, 4)]}

# forward / logit_grads: M = rows, N = classes, K = features.
# grad_features: M = rows, N = features, K = classes. grad_weight: M = classes, N = features, K = rows.
TABLES = {
    "forward": {
        "16": _FORWARD_16,
        # sm_90 over 8 warps: over 4, ptxas held the tf32 tile to 128 registers and spilled
        "32": {"hopper": [(32, 64, 32, 8, 3)],
               "ampere": [(32, 64, 32, 4, 3)]},
    },
    # InterFace's second product (the rows' target centres) holds a second accumulator
    "forward_interface": {
        "16": {"hopper": [(64, 64, 64, 4, 4), (64, 128, 64, 8, 3)],
               "ampere": [(64, 64, 32, 4, 4)]},
        "32": {"hopper": [(32, 64, 32, 8, 3), (32, 32, 32, 4, 3)],
               "ampere": [(32, 64, 32, 8, 2)]},
    },
    "logit_grads": {
        "16": _LOGIT_GRADS_16,
        "32": {"hopper": [(64, 64, 32, 4, 3)],
               "ampere": [(64, 64, 32, 8, 3), (32, 64, 32, 4, 3)]},
    },
    "logit_grads_interface": {
        "16": {"hopper": [(64, 64, 64, 8, 3), (64, 64, 32, 8, 3)],
               "ampere": [(32, 32, 32, 4, 3)]},
        "32": {"hopper": [(64, 64, 32, 8, 3), (32, 32, 32, 4, 3)],
               "ampere": [(32, 32, 32, 4, 3)]},
    },
    # CurricularFace's epilogue (the row's threshold and t; a compare, a multiply-add and a
    # select per element): the cosine tiles but for sm_90's float32 ones, where 32 x 64 over
    # 8 warps spilled 8-32 B in the forward (32 x 32 over 4, 8 B; 64 x 32 over 8, 24 B) and
    # 64 x 64 over 4 warps 60 B in logit_grads
    "forward_curricular": {
        "16": _FORWARD_16,
        "32": {"hopper": [(64, 64, 32, 8, 3), (32, 32, 32, 8, 3)],
               "ampere": [(32, 64, 32, 4, 3)]},
    },
    "logit_grads_curricular": {
        "16": _LOGIT_GRADS_16,
        "32": {"hopper": [(64, 64, 32, 8, 3), (32, 32, 32, 4, 3)],
               "ampere": [(64, 64, 32, 8, 3), (32, 64, 32, 4, 3)]},
    },
    # sub-centres: k products per tile, each beside the running max cosine and its arg-max
    # (the 128 x 128 forward and the 64 x 64 logit_grads tiles spilled on sm_80): small
    # tiles, one row each (every k is a specialization of its own)
    "forward_subcenters": _SUBCENTER_TILES,
    "logit_grads_subcenters": _SUBCENTER_TILES,
    # grad_features reads its float32 output back once per chunk: one tile less in flight
    "grad_features": {
        "16": {"hopper": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)],
               "ampere": [(64, 128, 32, 4, 4), (128, 128, 32, 8, 4), (64, 256, 32, 8, 3)]},
        "32": {"hopper": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 64, 32, 4, 3)],
               "ampere": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 64, 32, 4, 3)]},
    },
    # the epilogue holds a tile of w besides the accumulator: on sm_80 the 8-warp tiles
    # are taller than wide (128x256 and, in float32, 128x64 spilled 8-16 B at 255 registers)
    "grad_weight": {
        "16": {"hopper": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
               "ampere": [(128, 128, 32, 4, 4), (256, 128, 32, 8, 3), (64, 128, 32, 4, 4)]},
        "32": {"hopper": [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (32, 64, 32, 4, 3)],
               "ampere": [(64, 128, 32, 8, 3), (32, 64, 32, 4, 3)]},
    },
}

# D not a multiple of 16: every load along the features is a scalar load with its own
# address, so 8 warps share the tile's addresses and K chunks are 32 wide (D = 100 takes
# 4 of them). The InterFace tiles, with their second product, and float32 tiles hold half
# the rows; sm_80's float32 cosine tiles spilled with every pipelined config tried, so
# they take 16-wide K chunks over 8 warps, unpipelined (over 4, ptxas held some to 128
# registers and spilled). InterFace's float32 cosine tiles, two accumulators and the
# margin's acos / exp / cos / sin, hold half the classes as well; on sm_80 16 x 32 over 4
# warps, unpipelined (static InterFace's 32 x 32 x 16 spilled 24 B, and 32 x 64 x 16, 8-32
# B). One row per table: each is a compile per specialization.
_RAGGED_16 = {"hopper": [(64, 64, 32, 8, 3)], "ampere": [(64, 64, 32, 8, 3)]}
_RAGGED_HALF = {"hopper": [(32, 64, 32, 8, 3)], "ampere": [(32, 64, 32, 8, 3)]}
_RAGGED_32_COSINES = {"hopper": [(32, 64, 32, 8, 3)], "ampere": [(32, 64, 16, 8, 1)]}
_RAGGED_32_INTERFACE = {"hopper": [(32, 32, 32, 8, 3)], "ampere": [(16, 32, 32, 4, 1)]}
# sub-centres' k products: 32 x 32 tiles over 8 warps; unpipelined 16-wide K chunks where a
# pipelined one spilled (sm_80 in both widths; float32 on sm_90, 32 B with tf32x3's split
# operands over 32-wide chunks)
_RAGGED_SUBCENTERS_16 = {"hopper": [(32, 32, 32, 8, 3)], "ampere": [(32, 32, 16, 8, 1)]}
_RAGGED_SUBCENTERS_32 = {"hopper": [(32, 32, 16, 8, 1)], "ampere": [(32, 32, 16, 8, 1)]}
RAGGED_TABLES = {
    "forward": {"16": _RAGGED_16, "32": _RAGGED_32_COSINES},
    "forward_interface": {"16": _RAGGED_HALF, "32": _RAGGED_32_INTERFACE},
    "logit_grads": {"16": _RAGGED_16, "32": _RAGGED_32_COSINES},
    "logit_grads_interface": {"16": _RAGGED_HALF, "32": _RAGGED_32_INTERFACE},
    "forward_curricular": {"16": _RAGGED_16, "32": _RAGGED_32_COSINES},
    "logit_grads_curricular": {"16": _RAGGED_16, "32": _RAGGED_32_COSINES},
    "forward_subcenters": {"16": _RAGGED_SUBCENTERS_16, "32": _RAGGED_SUBCENTERS_32},
    "logit_grads_subcenters": {"16": _RAGGED_SUBCENTERS_16, "32": _RAGGED_SUBCENTERS_32},
    "grad_features": {"16": _RAGGED_16, "32": _RAGGED_HALF},
    "grad_weight": {"16": _RAGGED_16, "32": _RAGGED_HALF},
}

ARCHITECTURES = {"hopper": 90, "ampere": 80}


def architecture() -> str:
    """The table column of the current CUDA device."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return "hopper"
    return "ampere"


def aligned(dim: int) -> bool:
    """Whether triton specializes a launch with this feature dimension as a multiple of 16."""
    return dim % 16 == 0


def table(kernel: str, width: str, arch: str | None = None, dim: int | None = None):
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows a launch with ``dim``
    features may use (None: the rows of every feature dimension)."""
    if INTERPRETED:
        return [INTERPRETER_CONFIG]
    arch = arch or architecture()
    tables = [TABLES, RAGGED_TABLES] if dim is None else [TABLES if aligned(dim) else RAGGED_TABLES]
    return list(dict.fromkeys(row for rows in tables for row in rows[kernel][width][arch]))


# Integer arguments the tile kernels do not let triton specialize (as a multiple of 16 or as
# 1): the row count, which only masks rows (never the contiguous axis of a load or
# store), the first class of a chunk (compared with labels) and the autotuning buckets,
# which no kernel reads. Each specialization is a compile of its own.
UNSPECIALIZED = ("B", "B_BIN", "C_BIN", "first_class")

# _centre_norms_kernel's (BLOCK_N, BLOCK_K) for D a multiple of 16 and for any other D
# (a memory-bound pass: the narrower K chunk keeps the scalar loads' addresses in
# registers; 64 x 128 spilled 8 B on sm_90 once the sum was scaled)
CENTRE_NORMS = {True: (64, 64), False: (64, 32)}


def centre_norm_blocks(dim: int):
    return (16, 16) if INTERPRETED else CENTRE_NORMS[aligned(dim)]


def _config(row):
    m, n, k, w, s = row
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _row(config):
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


def tuning(kernel: str, width: str) -> dict:
    """triton.autotune's configs and pruning hook: a launch benchmarks the rows of the
    table of its feature dimension ``D`` (an argument of every tile kernel, and a key)."""
    def prune(configs, named_args, **kwargs):
        rows = set(table(kernel, width, dim={**named_args, **kwargs}["D"]))
        return [config for config in configs if _row(config) in rows]

    return dict(configs=[_config(row) for row in table(kernel, width)], prune_configs_by={"early_config_prune": prune})


def bucket(n: int, cap: int) -> int:
    """Power-of-two bucket of a size for the autotuning key (``cap`` and above share one)."""
    return min(triton.next_power_of_2(max(n, 1)), cap)


def bucket_rows(n_rows: int) -> int:
    return bucket(n_rows, 16384)


def bucket_classes(n_classes: int) -> int:
    return bucket(n_classes, 1 << 20)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: more than one split where the shapes allow, so that the merges run


def split_count(programs: int, work_items: int, sms: int, cap: int) -> int:
    """Splits of a reduction so that ``programs`` x splits makes about two waves on
    ``sms`` SMs, each split keeping at least one work item; ``cap`` bounds the partial buffers."""
    wanted = -(-2 * sms // max(programs, 1))
    return max(1, min(wanted, work_items, cap))


class SplitGrid:
    """A launch grid (tiles along axis 0 and 1, splits along axis 2 when ``splits_axis``)
    computed from the config the autotuner runs; ``splits`` is that of the last launch,
    which is the chosen config's (the autotuner launches it after benchmarking)."""

    def __init__(self, shape_of, fixed_splits=None):
        self.shape_of = shape_of
        self.fixed_splits = fixed_splits
        self.splits = None
        self.meta = None

    def __call__(self, meta):
        grid, splits = self.shape_of(meta)
        if self.fixed_splits:
            splits = self.fixed_splits
        self.splits, self.meta = splits, meta
        return (*grid, splits)


def max_splits(kernel: str, width: str, splits_of) -> int:
    """The most splits any config of the tables can launch (to size a partial buffer)."""
    return max(splits_of(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k)) for m, n, k, _, _ in table(kernel, width))
