"""Can this cluster run a stage at all? Checked before any stage starts, so that a request no node
can ever satisfy fails in seconds with one line instead of waiting forever (Ray queues an
infeasible actor or task without end).

What a stage needs is one bundle per unit of its work: a vLLM replica (its placement bundle), a
scoring actor, a Ray Train worker, or a Ray Data task (1 CPU). A bundle fits a node whose total
resources cover it. The nodes that can exist are the alive ones plus, on an autoscaling cluster,
whatever node type Ray's autoscaler (v2) says it can launch for the bundle
(`autoscaler_probe`).
"""

from __future__ import annotations

from typing import Optional

from .config import TRAINING_STAGES, ModelConfig, RunConfig, stage_kind
from .storage import InputError


def replica_bundles(model: ModelConfig) -> list[dict]:
    """The placement bundles of one vLLM replica, as engine.build_llm asks Ray Data LLM for them."""
    s = model.scale
    extra = dict(s.resources)
    if s.accelerator_type:
        extra[f"accelerator_type:{s.accelerator_type}"] = 0.001
    if s.gpus_per_replica > 0 and s.tensor_parallel_size > 1:
        return [{"CPU": max(s.cpus_per_replica / s.tensor_parallel_size, 1), "GPU": 1, **extra}] * s.tensor_parallel_size
    bundle = {"CPU": s.cpus_per_replica, **extra}
    if s.gpus_per_replica > 0:
        bundle["GPU"] = s.gpus_per_replica
    return [bundle]


def actor_bundle(model: ModelConfig) -> dict:
    """What one HF scoring actor asks for (scoring.actor_options)."""
    s = model.scale
    bundle = {"CPU": s.cpus_per_replica, **s.resources}
    if s.gpus_per_replica:
        bundle["GPU"] = s.gpus_per_replica
    if s.accelerator_type:
        bundle[f"accelerator_type:{s.accelerator_type}"] = 0.001
    return bundle


def stage_pools(cfg: RunConfig, stage: str) -> list[tuple[str, str, list[dict]]]:
    """(what one unit is, model name, bundles of one unit) for every actor pool of a data stage:
    its vLLM replica pools and HF scoring actor pools, sized by models.<name>.scale.replicas."""
    from .scoring import scoring_engine
    from .stages import registry

    kind, section = stage_kind(stage), cfg.section(stage)
    if kind in TRAINING_STAGES:
        return []
    runs_on = registry()[kind].runs_on
    if runs_on == "engine":
        names = [g.model for g in getattr(section, "generators", [])] + [
            getattr(section, k) for k in ("model", "generator", "optimizer_model") if getattr(section, k, None)]
        return [(f"vLLM replica of models.{name}", name, replica_bundles(cfg.models[name]))
                for name in dict.fromkeys(names)]
    if runs_on == "scoring":
        model = cfg.models[section.model]
        method = getattr(section, "method", "sequence_classification")
        if scoring_engine(method, section.engine, model) == "vllm":
            return [(f"vLLM replica of models.{section.model}", section.model, replica_bundles(model))]
        return [(f"scoring actor of models.{section.model}", section.model, [actor_bundle(model)])]
    return []


def stage_needs(cfg: RunConfig, stage: str) -> list[tuple[str, dict]]:
    """(what, bundle) for every kind of unit the stage schedules."""
    kind, section = stage_kind(stage), cfg.section(stage)
    if kind in TRAINING_STAGES:
        worker = {"CPU": section.cpus_per_worker, **section.resources}
        if section.gpus_per_worker:
            worker["GPU"] = section.gpus_per_worker
        return [("a Ray Train worker", worker)]
    return [("a Ray Data task", {"CPU": 1})] + [
        (f"a {what}", b) for what, _, bundles in stage_pools(cfg, stage) for b in bundles]


def fit_pools(cfg: RunConfig, stage: str, cluster_cpus: float, filters: int = 0) -> tuple[RunConfig, list[str]]:
    """The config with the stage's actor pools shrunk to what a fixed-size cluster of
    `cluster_cpus` CPUs can hold all at once, and one line per pool that was shrunk.

    Ray Data starts every pool at its minimum and holds those CPUs for the whole stage; its read,
    map and write tasks need a CPU besides, and on a resumed run each read of the plan gets a
    checkpoint filter actor of 1 CPU (Ray Data's CheckpointFilter; its CPU is not configurable).
    Pools that take every CPU leave the tasks none, and the stage waits forever (a 4-CPU local
    Ray with 2 one-CPU replicas deadlocked on resume after a killed driver). Raises InputError
    (one line) when even one unit per pool leaves no CPU for a task."""
    pools = [(what, name, sum(b.get("CPU", 0) for b in bundles)) for what, name, bundles in stage_pools(cfg, stage)]
    fixed = 1 + filters  # one task at a time keeps data moving
    need = fixed + sum(cfg.models[name].scale.replicas[0] * cpus for _, name, cpus in pools)
    if need <= cluster_cpus:
        return cfg, []
    minimum = fixed + sum(cpus for _, _, cpus in pools)
    held = (f"{filters} checkpoint filter actor{'s' if filters != 1 else ''} of 1 CPU, " if filters else "")
    if minimum > cluster_cpus:
        raise InputError(f"stages.{stage}: needs {minimum:g} CPUs at once ({held}"
                         + ", ".join(f"{cpus:g} per {what}" for what, _, cpus in pools)
                         + f", 1 for a Ray Data task); this cluster has {cluster_cpus:g} and no autoscaler "
                         "(set ray.num_cpus, or fewer cpus_per_replica)")
    spare = cluster_cpus - minimum
    lines = []
    fitted = cfg.model_copy(deep=True)
    for what, name, cpus in pools:
        lo, hi = cfg.models[name].scale.replicas
        extra = min(lo - 1, int(spare // cpus)) if cpus else lo - 1
        spare -= extra * cpus
        new = (1 + extra, min(hi, 1 + extra + (int(spare // cpus) if cpus else hi)))
        if new != (lo, hi):
            fitted.models[name].scale.replicas = new
        if new[0] < lo:
            lines.append(f"stages.{stage}: {new[0]} {what} instead of {lo}: this cluster has {cluster_cpus:g} CPUs "
                         f"and no autoscaler, and {held}1 for a Ray Data task must fit beside the pools")
    return fitted, lines


def fits(bundle: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items() if v)


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if v and k != "object_store_memory"
                     and k != "memory" and not k.startswith("node:")) or "nothing"


def check(cfg: RunConfig, stages: list[str], nodes: list[dict], autoscaler=None) -> None:
    """Raise InputError (one line) for the first stage with a unit that no alive node can hold and
    (when an autoscaler runs) that the autoscaler calls infeasible. `nodes`: total resources of the
    alive nodes; `autoscaler`: None, or a callable bundle -> True (a node type can hold it) /
    False (none can) / None (the autoscaler did not say)."""
    verdicts: dict = {}  # one question to the autoscaler per distinct bundle
    for stage in stages:
        for what, bundle in stage_needs(cfg, stage):
            if any(fits(bundle, n) for n in nodes):
                continue
            key = tuple(sorted(bundle.items()))
            if autoscaler is not None and key not in verdicts:
                verdicts[key] = autoscaler(bundle)
            if autoscaler is not None and verdicts[key] is not False:
                continue
            where = "no node of this cluster, and no node type of its autoscaler," if autoscaler is not None else \
                "no node of this cluster (and no autoscaler adds nodes)"
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise InputError(f"stages.{stage}: {what} needs {_fmt(bundle)}; {where} has that "
                             f"(the largest node has {_fmt(largest)})")


def has_autoscaler(wait_s: float = 15.0) -> bool:
    """Whether an autoscaler that can add nodes publishes its state in this cluster's GCS.

    A plain `ray.init()` or `ray start --head` without a cluster file runs Ray's monitor too, with
    a read-only provider: it reports every node under a node type made up from the node's id
    (`format_readonly_node_type`) and never launches one. That cluster has a fixed size.

    Right after `ray.init()` the monitor has not listed any node yet; that cannot be told from an
    autoscaler that may still add nodes, and taking it as one made a local run whose unit no node
    can hold wait forever instead of failing (seen with accelerator_type on a local Ray). So this
    waits up to `wait_s` for the first report that lists nodes (the monitor reports every second
    or so)."""
    import json
    import time

    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.experimental.internal_kv import _internal_kv_get

    end = time.time() + wait_s
    while True:
        try:
            raw = _internal_kv_get("__autoscaling_status")
        except Exception:  # noqa: BLE001 - no GCS to ask: treat as a fixed cluster
            return False
        try:
            types = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {} if raw else {}
        except ValueError:
            return True
        if types:
            return any(t != format_readonly_node_type(n) for n, t in types.items())
        if time.time() >= end:
            # No report, or none that lists a node: a monitor that never reported is no autoscaler;
            # one that reported no node yet may still add some (a wrong "fixed" would fail a
            # stage that the autoscaler could have served).
            return bool(raw)
        time.sleep(0.25)


def fit_to_cluster(cfg: RunConfig, stage: str, filters: int) -> tuple[RunConfig, list[str]]:
    """fit_pools on this cluster's CPUs; unchanged under an autoscaler, which adds a
    node for the tasks that wait."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    try:
        fitted, lines = fit_pools(cfg, stage, cpus, filters)
    except InputError:
        if has_autoscaler():
            return cfg, []
        raise
    return (cfg, []) if lines and has_autoscaler() else (fitted, lines)


def alive_nodes() -> list[dict]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _same(a: dict, b: dict) -> bool:
    keys = {k for k, v in {**a, **b}.items() if v}
    return all(abs(float(a.get(k, 0)) - float(b.get(k, 0))) < 1e-9 for k in keys)


def _infeasible_v2(gcs_address: str) -> list[dict]:
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(gcs_address).get_cluster_status(timeout_s=10))
    state = reply.autoscaling_state
    return [dict(r.resources_bundle) for r in state.infeasible_resource_requests]


def _infeasible_v1(gcs_address: str) -> list[dict]:
    """Autoscaler v1 says what no node type can hold in a cluster event ("Error: No available node
    types can fulfill resource request {...}"), read through the dashboard's state API."""
    import ast
    import re

    from ray.util.state import list_cluster_events

    out = []
    for e in list_cluster_events(address=gcs_address, limit=1000, timeout=10, raise_on_missing_output=False):
        m = re.search(r"can fulfill resource request (\{[^}]*\})", str(getattr(e, "message", "")))
        if getattr(e, "source_type", "") == "AUTOSCALER" and m:
            out.append(ast.literal_eval(m.group(1)))
    return out


def autoscaler_probe(timeout: float = 30.0, give_up_s: float = 300.0):
    """A feasibility test by Ray's own autoscaler (v1 or v2), or None when none runs here.

    The node types are the autoscaler's: a task that needs exactly the bundle is submitted (a task,
    not a placement group: v1 reports infeasible tasks only), and either it runs (an alive node,
    or one the autoscaler launched for it, can hold the bundle) or the autoscaler reports the
    request as one no node type can fulfil (v2: its infeasible requests; v1: a cluster event).
    The task is cancelled right away; a node launched for it serves the stage that comes next."""
    if not has_autoscaler():
        return None
    import ray

    gcs_address = ray.get_runtime_context().gcs_address
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        infeasible = _infeasible_v2 if is_autoscaler_v2(fetch_from_server=True) else _infeasible_v1
    except Exception:  # noqa: BLE001 - an autoscaler state we cannot read: no verdict
        return lambda bundle: None

    def feasible(bundle: dict) -> Optional[bool]:
        import time

        want = {k: float(v) for k, v in bundle.items() if v}
        options = {"num_cpus": want.get("CPU", 0), "num_gpus": want.get("GPU", 0),
                   "resources": {k: v for k, v in want.items() if k not in ("CPU", "GPU")}}
        ref = ray.remote(**options)(_noop).remote()
        done = False
        try:
            # `timeout` counts only time in which the autoscaler is updating: its loop can stall
            # for a while (a provider launching a node synchronously), and a verdict it has not
            # had the chance to give is no verdict. `give_up_s` bounds the whole wait.
            start = time.time()
            end = start + timeout
            while time.time() < min(end, start + give_up_s):
                if time.time() - _last_update() > 3.0:
                    end += 1.0
                ready, _ = ray.wait([ref], timeout=1.0)
                if ready:
                    done = True
                    return True
                try:
                    if any(_same(r, want) for r in infeasible(gcs_address)):
                        return False
                except Exception:  # noqa: BLE001 - not readable now (a busy dashboard): ask again
                    pass
            return None
        finally:
            # Only a task still waiting for a node is cancelled, and without force: Ray 2.60's
            # driver aborts ("Tried to complete task that was not pending", task_manager.cc)
            # when a force-cancel races the task's completion (seen in a test run).
            if not done:
                ray.cancel(ref, force=False)

    return feasible


def _last_update() -> float:
    """When the autoscaler last finished an update (the time in its status; now when unknown)."""
    import json
    import time

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return float(json.loads(_internal_kv_get("__autoscaling_status"))["time"])
    except Exception:  # noqa: BLE001 - no status with a time: do not wait longer for one
        return time.time()


def _noop() -> int:
    return 0
