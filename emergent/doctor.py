"""The ``doctor`` job: what a cluster can run, read from inside it.

Users run it first on a new cluster. It lists Ray's nodes and resources, then runs one probe
task pinned to each alive node that reports that node's GPUs (as torch sees them), the versions
of the stack, and whether DeepSpeed's ops (fused Adam, CPU Adam, async I/O, ...) can be built or
are prebuilt there. The report is written to ``<run>/doctor/report.json`` and ``report.md``.
It always probes afresh (a cluster changes between runs), but still writes a completion record.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import socket
from dataclasses import dataclass

from emergent.config import RayConfig, RunConfig, config
from emergent.runs import RunDir, versions
from emergent.runtime import ray_session

log = logging.getLogger(__name__)


@config
class DoctorJob:
    """Cluster report."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    deepspeed_ops: bool = True
    """Check DeepSpeed op compatibility on every node (imports deepspeed there, ~2 s)."""


@dataclass
class DoctorResult:
    nodes: int
    """Alive Ray nodes."""
    cpus: float
    """CPUs in the cluster."""
    gpus: float
    """GPUs in the cluster (Ray's resource count)."""
    report: str
    """Path of report.json."""


def probe_node(deepspeed_ops: bool) -> dict:
    """Runs on one node: its host, GPUs, stack versions and DeepSpeed op support."""
    import torch

    info = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(),
            }
            for i in range(torch.cuda.device_count())
        ],
    }
    if deepspeed_ops:
        info["deepspeed"] = deepspeed_report()
    return info


def deepspeed_report() -> dict:
    """DeepSpeed's accelerator, comm backend and, per op, prebuilt / buildable (as ds_report)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as exc:  # an unusable deepspeed is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    acc = get_accelerator()
    ops = {}
    for name, builder in sorted(ALL_OPS.items()):
        try:
            ok = bool(builder.is_compatible(verbose=False))
        except Exception:
            ok = False
        ops[name] = {"compatible": ok, "prebuilt": bool(installed_ops.get(name, False))}
    fused = ops.get("fused_adam", {})
    return {
        "accelerator": acc.device_name(),
        "comm_backend": acc.communication_backend_name(),
        "fused_adam_usable": bool(fused.get("compatible") or fused.get("prebuilt")),
        "ops": ops,
    }


def to_markdown(report: dict) -> str:
    lines = [
        "# emergent doctor",
        "",
        f"Ray {report['ray_version']}: {len(report['nodes'])} alive "
        f"node(s); cluster resources: {report['cluster_resources']}",
        "",
    ]
    for node in report["nodes"]:
        p = node["probe"]
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in p["gpus"]) or "none"
        lines += [
            f"## {p['hostname']} ({node['node_ip']})",
            "",
            f"- resources: {node['resources']}",
            f"- GPUs (torch): {gpus}",
            f"- torch CUDA: {p['torch_cuda']}, python {p['python']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
        ]
        ds = p.get("deepspeed")
        if ds and "error" not in ds:
            usable = [k for k, v in ds["ops"].items() if v["compatible"] or v["prebuilt"]]
            lines += [
                f"- DeepSpeed: accelerator {ds['accelerator']}, comm {ds['comm_backend']}, "
                f"fused Adam usable: {ds['fused_adam_usable']}; ops usable: {', '.join(usable)}"
            ]
        elif ds:
            lines += [f"- DeepSpeed: {ds['error']}"]
        lines.append("")
    return "\n".join(lines)


def main(cfg: DoctorJob) -> DoctorResult:
    run = RunDir.from_config(cfg.run)
    stage = run.stage("doctor", cfg)
    with ray_session(cfg.ray) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = [n for n in ray.nodes() if n["Alive"]]
        probe = ray.remote(num_cpus=0)(probe_node)
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(cfg.deepspeed_ops)
            for n in alive
        ]
        probes = ray.get(refs)
        report = {
            "ray_version": ray.__version__,
            "cluster_resources": ray.cluster_resources(),
            "nodes": [
                {
                    "node_id": n["NodeID"],
                    "node_ip": n["NodeManagerAddress"],
                    "resources": n["Resources"],
                    "probe": p,
                }
                for n, p in zip(alive, probes)
            ],
        }
    path = stage.write_json("report.json", report)
    stage.write_bytes("report.md", to_markdown(report).encode())
    res = report["cluster_resources"]
    result = DoctorResult(len(alive), res.get("CPU", 0.0), res.get("GPU", 0.0), path)
    stage.complete(outputs={"report": path}, metrics=dataclasses.asdict(result))
    log.info(
        "doctor: %d node(s), %s CPUs, %s GPUs; report at %s",
        result.nodes,
        result.cpus,
        result.gpus,
        path,
    )
    return result
