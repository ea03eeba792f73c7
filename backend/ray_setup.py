"""Joining a Ray cluster, and the worker actors to start on it: one per device.

    started = connect("local")        # or "auto", "10.0.0.5:6379"; ClusterError: one line saying what to do
    plans = plan_workers(ray.nodes(), device="auto", cpu_workers_per_node=1)

backend/cluster.py starts the workers of the plans and dispatches jobs to them (docs/SCALING.md).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# What the workers need of this checkout (shipped to every node by Ray's runtime_env working_dir).
NOT_SHIPPED = ["tests/", "docs/", "tools/", "outputs/", "assets/screenshots/", ".git/"]
NPU_RESOURCE = "NPU"             # the Ray resource of an Ascend NPU (the ray-ascend plugin's name)
TOKEN_FILE = Path.home() / ".ray" / "auth_token"   # where `ray start` keeps the cluster's token


class ClusterError(RuntimeError):
    """The cluster cannot be used: one line for people, saying what to do."""


START_HINT = ("start one with `ray start --head` (then `ray start --address=HEAD:6379` on each worker machine; "
              "docs/SCALING.md), or use --ray local to start one on this machine")


def runtime_env() -> dict:
    """Ray's runtime_env that ships this checkout's code to every worker (Ray takes a folder only in
    ray.init: a process that calls ray.init itself passes this)."""
    return {"working_dir": str(REPO_ROOT), "excludes": NOT_SHIPPED}


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at `address`: "auto" (the one running on this machine),
    "local" (start one here) or HOST:PORT / ray://HOST:PORT. True when it started one here."""
    if address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(f"--ray: expected auto, local or HOST:PORT (e.g. 10.0.0.5:6379); got {address!r}")
        try:  # Ray would retry for a minute; an address nobody answers at fails now
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as error:
            raise ClusterError(f"--ray {address}: no Ray cluster answers there ({error.strerror or error}); "
                               f"{START_HINT}") from None
    if address != "local" and "RAY_AUTH_MODE" not in os.environ and TOKEN_FILE.is_file():
        # Ray 2.60 starts clusters with token authentication on and keeps the token there, but a driver
        # joining one at an address sends it only in token mode, read when Ray is imported
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():  # this process is connected already (a test that called ray.init)
        return False
    if address == "local":
        ray.init(include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env())
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env())
    except (ConnectionError, RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        token = (" (a cluster with token authentication, Ray's default, also needs its token in "
                 f"{TOKEN_FILE}: `ray get-auth-token` on the head)") if not TOKEN_FILE.is_file() else ""
        raise ClusterError(f"--ray {address}: cannot connect ({first_line}){token}; {START_HINT}") from None
    return False


# ----------------------------------------------------------------------------------- workers

@dataclass(frozen=True)
class WorkerPlan:
    """One worker actor to start: where, on which device, with what Ray resources."""

    name: str
    node_id: str
    node: str                                        # the node's address, for people
    device: str                                      # EngineConfig.device: cpu | gpu | ascend
    num_cpus: float = 0
    num_gpus: float = 0
    resources: dict = field(default_factory=dict)    # e.g. {"NPU": 1}
    memory_share: int = 1                            # workers sharing this node's memory


def plan_workers(nodes: list[dict], device: str = "auto", cpu_workers_per_node: int = 1) -> list[WorkerPlan]:
    """One worker per GPU, per Ascend NPU, or per CPU node (its cores, split among `cpu_workers_per_node`
    workers), from `ray.nodes()`. `device` (EngineConfig.device) limits the kinds; auto prefers a
    node's accelerators to its cores. ClusterError when no node has a device the models can use."""
    plans: list[WorkerPlan] = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        cpus, gpus, npus = (int(resources.get(kind, 0)) for kind in ("CPU", "GPU", NPU_RESOURCE))
        where = dict(node_id=node["NodeID"], node=node.get("NodeManagerAddress", "?"))
        if gpus and device in ("auto", "gpu"):
            plans += [WorkerPlan("", device="gpu", num_gpus=1, memory_share=gpus, **where) for _ in range(gpus)]
        elif npus and device in ("auto", "ascend"):
            plans += [WorkerPlan("", device="ascend", resources={NPU_RESOURCE: 1}, memory_share=npus, **where)
                      for _ in range(npus)]
        elif cpus and device in ("auto", "cpu"):
            count = max(1, min(cpu_workers_per_node, cpus))
            plans += [WorkerPlan("", device="cpu", num_cpus=cpus // count, memory_share=count, **where)
                      for _ in range(count)]
    if not plans:
        seen = "; ".join(f"{n.get('NodeManagerAddress', '?')}: {int(n['Resources'].get('CPU', 0))} CPU, "
                         f"{int(n['Resources'].get('GPU', 0))} GPU, {int(n['Resources'].get(NPU_RESOURCE, 0))} NPU"
                         for n in nodes if n.get("Alive")) or "no live node"
        raise ClusterError(f"the Ray cluster has no device the models can use with --device {device} ({seen}); "
                           f"add a node with CPUs, GPUs or Ascend NPUs (`ray start --address=HEAD:6379`, "
                           f"docs/SCALING.md)")
    return [dataclasses.replace(plan, name=f"worker-{i}") for i, plan in enumerate(plans, 1)]
