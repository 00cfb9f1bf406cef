"""The configured sequence of stages, each committed by its manifest before the next starts."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .chain import resolve_input
from .config import CHAIN, TRAINING_STAGES, ConfigError, RunConfig, stage_kind
from .runner import run_stage
from .stages import registry
from .storage import InputError, Storage, read_input


def _resolve_stage_models(cfg: RunConfig, storage: Storage, stage: str, declared: dict) -> list[str]:
    """Point `stage:qft`-style model paths used by `stage` at the exported checkpoints; returns
    the hashes of those training stages (they are part of what the stage depends on)."""
    section = cfg.section(stage)
    names = [g.model for g in getattr(section, "generators", [])] + [
        getattr(section, k) for k in ("model", "generator", "optimizer_model") if getattr(section, k, None)]
    hashes = []
    for name in names:
        path = declared[name]  # as written in the config: an earlier stage may have resolved it
        if path.startswith("stage:"):
            producer = path[len("stage:"):]
            manifest = storage.manifest(producer)
            if manifest is None:
                raise InputError(f"models.{name}.path is {path}, but the {producer} stage has not finished in this run root")
            cfg.models[name].__dict__["path"] = manifest["model"]  # resolved, bypassing the validator
            hashes.append(f"{producer}:{manifest['config_hash']}")
    return hashes


def funnel(cfg: RunConfig, storage: Storage, stages: list[str]) -> list[dict]:
    """Rows in, kept and dropped by reason for every finished data stage (from manifests)."""
    specs = registry()
    out = []
    for stage in stages:
        m = storage.manifest(stage)
        if m is None or stage_kind(stage) in TRAINING_STAGES:
            continue
        rows_in = m.get("rows_in")
        row = {"stage": stage, "unit": specs[stage_kind(stage)].unit,
               "rows_in": m["rows"] + m["excluded_rows"] if rows_in is None else rows_in,
               "kept": m["rows"], "dropped": m["excluded_rows"], "dropped_by_reason": m.get("excluded_by_reason", {})}
        quality = m.get("question_quality")
        if quality:
            total = sum(quality.values())
            row["wellformed"] = {"share": round(quality.get("wellformed", 0) / max(total, 1), 4), "of": total, **quality}
        out.append(row)
    return out


def format_funnel(rows: list[dict]) -> str:
    lines = ["funnel: rows in -> kept (dropped by reason)"]
    for r in rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r["dropped_by_reason"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {r['stage']:<18}{r['rows_in']:>8} -> {r['kept']:<8}{r['unit']:<18}" + (f"({reasons})" if reasons else ""))
        if "wellformed" in r:
            w = r["wellformed"]
            lines.append(f"  {'':<18}well-formed math questions: {w.get('wellformed', 0)} of {w['of']} ({w['share']:.2f})")
    return "\n".join(lines)


def run(cfg: RunConfig, stages: Optional[list[str]] = None, force: bool = False, echo=print) -> list:
    """Run `stages` (default: cfg.pipeline) in order. Returns one entry per stage: a StageResult
    for data stages, the manifest dict for training stages."""
    from .engine import init_ray

    cfg = cfg.model_copy(deep=True)  # model paths get resolved below; the caller's config stays as written
    specs = registry()
    storage = Storage(cfg.root, cfg.storage.endpoint_url)
    selected = stages or cfg.pipeline
    for stage in selected:
        if stage_kind(stage) not in type(cfg.stages).model_fields:
            raise ConfigError(f"unknown stage '{stage}' (stages: {', '.join(type(cfg.stages).model_fields)})")
        if cfg.section(stage) is None:
            raise ConfigError(f"stages.{stage} is not configured")
    init_ray(cfg)
    # A unit of work no node can ever hold fails here, in one line, instead of waiting forever.
    from . import capacity

    capacity.check(cfg, selected, capacity.alive_nodes(), capacity.autoscaler_probe())
    # Cheap checks of the user's input file happen before any engine starts.
    for stage in selected:
        given = getattr(cfg.section(stage), "input", None)
        if given and stage in CHAIN:
            read_input(given, cfg.storage.endpoint_url, required_column="query")
    declared = {name: m.path for name, m in cfg.models.items()}
    results = []
    for stage in selected:
        trained = _resolve_stage_models(cfg, storage, stage, declared)
        kind = stage_kind(stage)
        if kind in TRAINING_STAGES:
            from .train import qft, qpo, scorer

            recipe = {"qft": qft, "qpo": qpo, "difficulty_scorer": scorer}[kind]
            results.append(recipe.run(cfg, storage, stage=stage, force=force, echo=echo, depends_on="|".join(trained)))
            continue
        given = resolve_input(cfg, storage, stage)
        if trained:  # the exported models it uses are part of what it depends on
            given = replace(given, upstream="|".join(filter(None, [given.upstream, *trained])))
        # A named instance (qpo_pairs@qwen) is its kind's stage under its own name: folder, manifest, resume.
        result = run_stage(cfg, storage, replace(specs[kind], name=stage), given, force=force, echo=echo,
                           fit=capacity.fit_to_cluster)
        echo(result.summary())
        results.append(result)
    rows = funnel(cfg, storage, cfg.pipeline)
    if any(r["stage"] in selected for r in rows):
        storage.write_json(storage.path("funnel.json"), {"stages": rows})
        echo(format_funnel(rows))
        views(cfg, storage, echo)
    return results


def views(cfg: RunConfig, storage: Storage, echo=print) -> None:
    """What a person opens after a run: the dataset card beside the final dataset (so that
    `datasets.load_dataset(<root>/selection)` loads it) and the HTML report of the whole run."""
    from . import card, cost, report

    with cost.endpoint(cfg.storage.endpoint_url):
        if cfg.stages.selection and storage.manifest("selection"):
            echo(f"dataset card: {card.write_card(cfg.root, cfg, license=cfg.stages.selection.license)}")
        if cfg.report:
            echo(f"report: {report.build_report(cfg.root, cfg=cfg)}")
