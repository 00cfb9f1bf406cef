"""`scalequest-ray plan CONFIG`: what a run would do, without starting Ray or any engine.

For each stage of the pipeline: what runs it (vLLM replica pool, scoring actor pool, Ray Train
workers, CPU tasks / shuffles), the model, the replica range and what each replica or worker
needs, where it reads and writes, and whether the run root already has it finished.
"""

from __future__ import annotations

from .chain import previous_stage
from .config import CHAIN, TRAINING_STAGES, RunConfig, instance_suffix, stage_kind
from .scoring import scoring_engine
from .stages import registry

RUNS_ON = {"engine": "vLLM replica pool", "scoring": "scoring actor pool", "cpu": "Ray Data tasks",
           "classify": "vLLM replica pool (classify)"}


def _models(cfg: RunConfig, stage: str) -> list[str]:
    section = cfg.section(stage)
    names = [g.model for g in getattr(section, "generators", [])]
    names += [getattr(section, k) for k in ("model", "generator", "optimizer_model") if getattr(section, k, None)]
    return names


def _input(cfg: RunConfig, stage: str) -> str:
    section = cfg.section(stage)
    if getattr(section, "input", None):
        return section.input
    if stage in CHAIN and stage != "questions":
        prev = previous_stage(cfg, stage)
        return f"{cfg.root}/{prev}/data" if prev else "(none: set input)"
    return {"qft": f"{cfg.root}/seed_problems/data", "qpo": f"{cfg.root}/qpo_pairs{instance_suffix(stage)}/data",
            "difficulty_scorer": f"{cfg.root}/difficulty_labels/data",
            "questions": "(prompts from the generators' chat templates)",
            "qpo_pairs": "(questions its generator writes from its chat template)"}.get(stage_kind(stage), "(the sources in its config)")


def plan(cfg: RunConfig, check_storage: bool = True) -> list[dict]:
    from .storage import Storage

    storage = None
    if check_storage:
        try:
            storage = Storage(cfg.root, cfg.storage.endpoint_url)
        except Exception:  # unreachable store: the plan still prints, status unknown
            storage = None
    specs = registry()
    rows = []
    for stage in cfg.pipeline:
        entry = {"stage": stage, "input": _input(cfg, stage), "output": f"{cfg.root}/{stage}"}
        kind = stage_kind(stage)
        runs_on = "training" if kind in TRAINING_STAGES else specs[kind].runs_on
        if runs_on == "scoring":
            section = cfg.section(stage)
            method = getattr(section, "method", "sequence_classification")
            if scoring_engine(method, section.engine, cfg.models[section.model]) == "vllm":
                runs_on = "classify"
        if runs_on == "training":
            t = cfg.section(stage)
            entry.update(runs_on="Ray Train workers", model=cfg.models[t.model].path, replicas=f"{t.workers}",
                         each=f"{t.cpus_per_worker:g} CPU" + (f", {t.gpus_per_worker:g} GPU" if t.gpus_per_worker else ""),
                         detail=f"deepspeed {t.deepspeed}, {t.precision}, batch {t.batch_size}")
        elif runs_on in ("engine", "scoring", "classify"):
            names = _models(cfg, stage)
            http = getattr(cfg.section(stage), "optimizer_http", None)
            if http:
                names = names[:1]
            parts = []
            for name in names:
                m = cfg.models[name]
                s = m.scale
                parts.append(f"{name}={m.path} x{s.replicas[0]}-{s.replicas[1]} "
                             f"({s.cpus_per_replica:g} CPU" + (f", {s.gpus_per_replica:g} GPU" if s.gpus_per_replica else "")
                             + "".join(f", {v:g} {k}" for k, v in s.resources.items())
                             + f", batch {s.batch_size})")
            entry.update(runs_on=RUNS_ON[runs_on], model="; ".join(parts))
            if http:
                entry["detail"] = f"optimizer: {http.model} at {http.base_url} (HTTP, key from ${http.api_key_env})"
        else:
            entry.update(runs_on=RUNS_ON[runs_on] + (" + shuffles" if kind in ("dedup", "selection", "seed_problems") else ""))
        if storage is not None:
            m = storage.manifest(stage)
            entry["status"] = "has a manifest" if m else "to run"
        rows.append(entry)
    return rows


def format_plan(cfg: RunConfig, rows: list[dict]) -> str:
    lines = [f"run '{cfg.name}', root {cfg.root}, {len(rows)} stages, {cfg.storage.rows_per_file} rows per Parquet file"]
    for i, r in enumerate(rows, 1):
        status = f" [{r['status']}]" if "status" in r else ""
        lines.append(f"{i:>2}. {r['stage']}{status}: {r['runs_on']}")
        if r.get("model"):
            lines.append(f"      model: {r['model']}")
        if r.get("replicas"):
            lines.append(f"      workers: {r['replicas']} x ({r['each']})")
        if r.get("detail"):
            lines.append(f"      {r['detail']}")
        lines.append(f"      in:  {r['input']}")
        lines.append(f"      out: {r['output']}")
    return "\n".join(lines)
