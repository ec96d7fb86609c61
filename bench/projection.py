"""Projected per-step head cost on 8 and 64 H100s, from the simulator and published figures.

    python -m bench.projection          # simulates, projects, writes bench/results/projection/

Nothing here is measured on a GPU. Memory and bytes per collective are the simulator's
(``bench.scale_sim``: the real PartialFC step for rank 0, scaled exactly in the
classes); times are those figures divided by published or stated rates, each listed in
``ASSUMPTIONS`` with its source. arcface_torch's Partial FC (partial_fc_v2.py) is
projected the same way from a count of what its code holds and sends, beside its own
published measurements (V100, which this projection does not model).

Time of one collective: latency + size x bus factor / busbw, nccl-tests' definition of
bus bandwidth (bench.collective_log). Head compute: the GEMM-equivalents of 2 x rows x
sampled classes x D flops each (4 for margin_ext's fused step, which recomputes the
logits once; 3 for arcface_torch, which keeps them) at a stated fraction of the dense
BF16 peak. Scaling efficiency: compute / (compute + communication), the share of the
head's step spent computing when nothing overlaps the collectives.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from .collective_log import bus_factor

RESULTS = Path(__file__).resolve().parent / "results" / "projection"
GB = 1e9

ASSUMPTIONS = {
    "h100_bf16_dense_flops": {
        "value": 989e12,
        "source": "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, BF16 Tensor Core 1,979 TFLOPS with "
                  "sparsity, 989 TFLOPS dense"},
    "fraction_of_peak": {"value": 0.5, "source": "stated assumption for the head's GEMMs and their epilogues"},
    "gpu_memory_bytes": {"value": 80e9, "source": "H100 SXM 80 GB"},
    "nvlink_busbw": {
        "value": 450 * GB,
        "source": "nccl-tests on 8x H100 SXM5 (NVLink 4, NVSwitch): all_reduce busbw 460-480 GB/s at large "
                  "sizes, 450 GB/s unidirectional NVLink ('NCCL-tests in practice', "
                  "docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests); taken as 450 GB/s for every "
                  "collective"},
    "infiniband_busbw": {
        "value": 45 * GB,
        "source": "400 Gb/s = 50 GB/s line rate, 90% of it, as if a node's traffic crossed one NIC "
                  "(conservative: a node with a 400 Gb/s NIC per GPU can carry several times this); a "
                  "published 2-node example: ~35 GB/s all_reduce busbw on 8x H200 nodes with 4 ConnectX-7 "
                  "RoCE NICs (kubernetes.recipes, 'NCCL All-Reduce Benchmarking on Multi-Node GPUs')"},
    "nvlink_latency_s": {"value": 15e-6, "source": "stated assumption: one small NCCL collective inside a node"},
    "infiniband_latency_s": {"value": 40e-6, "source": "stated assumption: one small NCCL collective across nodes"},
    "batch_per_gpu": {"value": 128, "source": "arcface_torch's configs (batch_size 128 per GPU)"},
}

CLUSTERS = {
    "8x H100 (NVLink)": {"gpus": 8, "busbw": "nvlink_busbw", "latency": "nvlink_latency_s"},
    "64x H100 (8 nodes, 400 Gb/s InfiniBand)": {"gpus": 64, "busbw": "infiniband_busbw",
                                               "latency": "infiniband_latency_s"},
}
IDENTITIES = [2_000_000, 10_000_000, 29_000_000, 100_000_000]
SAMPLE_RATES = [1.0, 0.1]
DIM = 512

# arcface_torch's published GPU memory (MB per GPU, whole training process: backbone included),
# Partial FC 0.1 on 8x Tesla V100 32GB: its README's "GPU Memory Utilization" table
ARCFACE_TORCH_PUBLISHED = {
    "source": "deepinsight/insightface recognition/arcface_torch/README.md (commit 0159b24), 'GPU Memory "
              "Utilization of Various Parallel Techniques (MB per GPU) on a Tesla V100 32GB x 8 System', column "
              "'Partial FC 0.1'; the batch of that run is not stated there (128 per GPU assumed)",
    "gpus": 8, "sample_rate": 0.1,
    "mb_per_gpu": {125_000: 4868, 1_400_000: 6056, 5_500_000: 9854, 8_000_000: 12310, 16_000_000: 19950,
                   29_000_000: 32324},
}


def _value(name):
    return ASSUMPTIONS[name]["value"]


def collective_seconds(collectives, busbw: float, latency: float) -> float:
    return sum(latency + c["size_bytes"] * c["bus_factor"] / busbw for c in collectives)


def arcface_torch_step(world: int, identities: int, batch: int, dim: int, sample_rate: float) -> dict:
    """What partial_fc_v2.py holds and sends per step on rank 0 (fp16 autocast, SGD), counted from its code.

    Centres: fp32 weight, its full-size gradient (the index's backward) and momentum, 12
    bytes per class and dimension; the sampled copy weight[index], its normalized fp32
    copy, the fp16 cast and the sampled gradient, 14 bytes per sampled class and dimension.
    Logits: rows x sampled classes, held as fp16 and about three fp32 copies at once
    (float(), clamp/margin, the softmax kept for backward and its gradient): 14 bytes each.
    Collectives: all_gather of fp32 embeddings and int64 labels, three all_reduce of one
    fp32 per row (max, sum, loss), and in the backward one reduce per rank of B x D fp32.
    """
    local = identities // world + (identities % world > 0)
    sampled = local if sample_rate >= 1 else int(sample_rate * local)
    rows = world * batch
    collectives = [
        {"op": "all_gather", "size_bytes": rows * dim * 4}, {"op": "all_gather", "size_bytes": rows * 8},
        *[{"op": "all_reduce", "size_bytes": rows * 4} for _ in range(3)],
        *[{"op": "reduce", "size_bytes": batch * dim * 4} for _ in range(world)],
    ]
    for c in collectives:
        c["bus_factor"] = bus_factor(c["op"], world)
    return {
        "classes_per_rank": local, "sampled_classes_per_rank": sampled,
        "memory_bytes_per_rank": 12 * local * dim + 14 * sampled * dim + 14 * rows * sampled,
        "collectives": collectives,
        "comm_bytes_per_step_per_rank": round(sum(c["size_bytes"] * c["bus_factor"] for c in collectives)),
        "head_flops_per_step_per_rank": 3 * 2 * rows * sampled * dim,
    }


def project(sim: dict, cluster: dict) -> dict:
    busbw, latency = _value(cluster["busbw"]), _value(cluster["latency"])
    rate = _value("h100_bf16_dense_flops") * _value("fraction_of_peak")
    ours_memory = sim["head_bytes_per_rank"]
    ours_comm = collective_seconds(sim["collectives"], busbw, latency)
    ours_compute = sim["head_flops_per_step_per_rank"] / rate
    theirs = arcface_torch_step(sim["world"], sim["identities"], sim["batch_per_rank"], sim["dim"],
                                sim["sample_rate"])
    theirs_comm = collective_seconds(theirs["collectives"], busbw, latency)
    theirs_compute = theirs["head_flops_per_step_per_rank"] / rate
    capacity = _value("gpu_memory_bytes")
    return {
        "identities": sim["identities"], "sample_rate": sim["sample_rate"], "gpus": sim["world"],
        "ours": {"memory_bytes": ours_memory, "fits": ours_memory <= capacity,
                 "comm_bytes": sim["comm_bytes_per_step_per_rank"], "n_collectives": sim["n_collectives"],
                 "comm_s": ours_comm, "compute_s": ours_compute,
                 "efficiency": ours_compute / (ours_compute + ours_comm)},
        "arcface_torch": {"memory_bytes": theirs["memory_bytes_per_rank"],
                          "fits": theirs["memory_bytes_per_rank"] <= capacity,
                          "comm_bytes": theirs["comm_bytes_per_step_per_rank"],
                          "n_collectives": len(theirs["collectives"]),
                          "comm_s": theirs_comm, "compute_s": theirs_compute,
                          "efficiency": theirs_compute / (theirs_compute + theirs_comm)},
    }


def published_comparison(simulate) -> list:
    """arcface_torch's published V100 memory beside both heads' counted/simulated head memory."""
    rows = []
    batch = _value("batch_per_gpu")
    for identities, mb in ARCFACE_TORCH_PUBLISHED["mb_per_gpu"].items():
        sim = simulate(ARCFACE_TORCH_PUBLISHED["gpus"], identities, batch, DIM, ARCFACE_TORCH_PUBLISHED["sample_rate"],
                       "fp32")
        theirs = arcface_torch_step(ARCFACE_TORCH_PUBLISHED["gpus"], identities, batch, DIM,
                                    ARCFACE_TORCH_PUBLISHED["sample_rate"])
        rows.append({"identities": identities, "published_bytes": mb * 2**20,
                     "arcface_torch_counted_bytes": theirs["memory_bytes_per_rank"],
                     "ours_simulated_fp32_bytes": sim["head_bytes_per_rank"]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projection", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's section")
    args = parser.parse_args(argv)
    from .scale_sim import simulate

    batch = _value("batch_per_gpu")
    simulated, projected = [], []
    for name, cluster in CLUSTERS.items():
        for identities in IDENTITIES:
            for rate in SAMPLE_RATES:
                print(f"{name}: {identities:,} identities, r={rate} ...", flush=True)
                sim = simulate(cluster["gpus"], identities, batch, DIM, rate, "bf16")
                simulated.append(sim)
                projected.append(dict(project(sim, cluster), cluster=name))
    data = {
        "command": "python -m bench.projection",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dim": DIM, "batch_per_gpu": batch, "dtype": "bf16",
        "assumptions": ASSUMPTIONS,
        "simulated": simulated,
        "projected": projected,
        "arcface_torch_published": {**ARCFACE_TORCH_PUBLISHED,
                                    "mb_per_gpu": {str(k): v for k, v in ARCFACE_TORCH_PUBLISHED["mb_per_gpu"].items()},
                                    "comparison": published_comparison(simulate)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "projection.json").write_text(json.dumps(data, indent=1) + "\n")
    from . import scaling_report

    for path in scaling_report.write_projection(args.out, readme=not args.no_readme):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
