"""What a stage held while it ran, from the GCS's own tables (not from our logs): per pool of
actors (vLLM replicas, scoring actors, Ray Train workers), the replicas alive (min, time-weighted
mean, max over the pool's active window) and the CPU- and GPU-seconds they reserved; and, on a
cluster whose nodes carry a node type (an autoscaler's), node-seconds per node type.

Read once, after the stage's work: the actor table keeps start and end times of every actor of
the job (dead ones too) with the resources each one required, and the node table the start and
end of every node. The cost table (`scalequest-ray cost`) is built from these figures.
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Optional

# Ray Data and Ray Train bookkeeping actors hold no CPU or GPU: only actors that reserve some are
# counted. A pool is named after the operator or class its actors run.
_POOL = re.compile(r"MapWorker\((?P<op>.+)\)$")


def pool_name(class_name: str, repr_name: str = "") -> str:
    m = _POOL.match(repr_name or "") or _POOL.match(class_name or "")
    return m["op"] if m else (class_name or repr_name or "actor")


def _resource(required: dict, kind: str) -> float:
    """CPU or GPU an actor requires, also when it runs in a placement group bundle (there Ray
    renames the resource CPU_group_<pg> / CPU_group_<i>_<pg>; the wildcard form counts once)."""
    plain = required.get(kind)
    if plain:
        return float(plain)
    wildcard = [v for k, v in required.items() if re.fullmatch(rf"{kind}_group_[0-9a-f]+", k)]
    return float(wildcard[0]) if wildcard else 0.0


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def replica_stats(intervals: list[tuple[float, float]], window: tuple[float, float]) -> dict:
    """Alive count over time of a pool (its actors' [start, end] intervals) inside `window`:
    min / time-weighted mean / max, over the part of the window where the pool existed."""
    w0, w1 = window
    clipped = [(max(s, w0), min(e, w1)) for s, e in intervals if min(e, w1) > max(s, w0)]
    if not clipped:
        return {"min": 0, "mean": 0.0, "max": 0}
    active0, active1 = min(s for s, _ in clipped), max(e for _, e in clipped)
    events = sorted([(s, 1) for s, _ in clipped] + [(e, -1) for _, e in clipped], key=lambda x: (x[0], x[1]))
    alive, last, area, counts = 0, active0, 0.0, []
    for t, d in events:
        if t > last:
            area += alive * (t - last)
            counts.append(alive)
            last = t
        alive += d
    span = active1 - active0
    counts = [c for c in counts] or [alive]
    return {"min": min(counts), "mean": round(area / span, 3) if span > 0 else float(max(counts)), "max": max(counts)}


def ledger_from_tables(actors: Iterable[dict], nodes: Iterable[dict], window: tuple[float, float]) -> dict:
    """The ledger from plain rows (pure; tested without Ray):
    actors: {pool, start, end, cpu, gpu}; nodes: {node_type, start, end}; times in seconds."""
    w0, w1 = window
    pools: dict[str, dict] = {}
    for a in actors:
        if a["cpu"] <= 0 and a["gpu"] <= 0:
            continue
        held = overlap(a["start"], a["end"], w0, w1)
        if held <= 0:
            continue
        p = pools.setdefault(a["pool"], {"intervals": [], "cpu_s": 0.0, "gpu_s": 0.0, "cpus_each": a["cpu"],
                                         "gpus_each": a["gpu"]})
        p["intervals"].append((a["start"], a["end"]))
        p["cpu_s"] += a["cpu"] * held
        p["gpu_s"] += a["gpu"] * held
    out: dict = {"pools": {}}
    for name, p in sorted(pools.items()):
        out["pools"][name] = {"replicas": replica_stats(p["intervals"], window), "cpus_each": p["cpus_each"],
                              "gpus_each": p["gpus_each"], "cpu_seconds": round(p["cpu_s"], 3),
                              "gpu_seconds": round(p["gpu_s"], 3)}
    out["cpu_seconds"] = round(sum(p["cpu_s"] for p in pools.values()), 3)
    out["gpu_seconds"] = round(sum(p["gpu_s"] for p in pools.values()), 3)
    typed: dict[str, float] = {}
    for n in nodes:
        if not n.get("node_type"):
            continue
        held = overlap(n["start"], n["end"], w0, w1)
        if held > 0:
            typed[n["node_type"]] = typed.get(n["node_type"], 0.0) + held
    if typed:
        out["node_seconds"] = {k: round(v, 3) for k, v in sorted(typed.items())}
    return out


def _gcs_rows(now: float) -> tuple[list[dict], list[dict]]:
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    accessor = state._connect_and_get_accessor()
    job = ray.get_runtime_context().get_job_id()
    actors = []
    for raw in accessor.get_actor_table(None, None):
        a = gcs_pb2.ActorTableData.FromString(raw)
        if a.job_id.hex() != job:
            continue
        required = dict(a.required_resources)
        start = a.start_time / 1000 if a.start_time else None
        if start is None:
            continue
        end = a.end_time / 1000 if a.end_time else now
        actors.append({"pool": pool_name(a.class_name, a.repr_name), "start": start, "end": end,
                       "cpu": _resource(required, "CPU"), "gpu": _resource(required, "GPU")})
    nodes = []
    for n in ray._private.worker.global_worker.gcs_client.get_all_node_info().values():
        start = n.start_time_ms / 1000 if n.start_time_ms else None
        if start is None:
            continue
        end = n.end_time_ms / 1000 if n.end_time_ms else now
        nodes.append({"node_type": n.node_type_name, "start": start, "end": end})
    return actors, nodes


def stage_ledger(started: float, ended: Optional[float] = None) -> dict:
    """The ledger of the window [started, ended] for this driver's job, or {} when the tables
    cannot be read (e.g. Ray not initialized): the figures are bookkeeping, never a reason to fail
    a stage that wrote its rows."""
    ended = ended or time.time()
    try:
        actors, nodes = _gcs_rows(ended)
    except Exception:  # noqa: BLE001 - see the docstring
        return {}
    return {"window_seconds": round(ended - started, 3), **ledger_from_tables(actors, nodes, (started, ended))}
