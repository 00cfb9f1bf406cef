"""The configured sequence of stages, each committed by its manifest before the next starts."""

from __future__ import annotations

from typing import Optional

from .config import ConfigError, RunConfig
from .runner import run_stage
from .storage import InputError, Storage, read_input


def _resolve_stage_models(cfg: RunConfig, storage: Storage, stage: str, declared: dict) -> list[str]:
    """Point `stage:qft`-style model paths used by `stage` at the exported checkpoints; returns
    the hashes of those training stages (they are part of what the stage depends on)."""
    section = getattr(cfg.stages, stage)
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


def _upstream(cfg: RunConfig, storage: Storage, stage: str) -> Optional[str]:
    """What a stage's output depends on besides its own config: the upstream stage's hash."""
    if stage in ("qft", "qpo"):
        return None  # the training recipes work out their own upstream (data stage or a file)
    if stage == "responses":
        if cfg.stages.responses.input:
            return "input:" + cfg.stages.responses.input
        m = storage.manifest("questions")
        return "questions:" + m["config_hash"] if m else None
    return None


def run(cfg: RunConfig, stages: Optional[list[str]] = None, force: bool = False, echo=print) -> list:
    """Run `stages` (default: cfg.pipeline) in order. Returns one entry per stage: a StageResult
    for data stages, the manifest dict for training stages."""
    from .engine import init_ray
    from .stages import qpo_pairs, questions, responses, seed_problems

    cfg = cfg.model_copy(deep=True)  # model paths get resolved below; the caller's config stays as written
    builders = {"seed_problems": seed_problems.build, "qpo_pairs": qpo_pairs.build, "questions": questions.build,
                "responses": responses.build}
    storage = Storage(cfg.root, cfg.storage.endpoint_url)
    selected = stages or cfg.pipeline
    for stage in selected:
        if getattr(cfg.stages, stage) is None:
            raise ConfigError(f"stages.{stage} is not configured")
    init_ray(cfg)
    # Cheap checks of the user's input file happen before any engine starts.
    if "responses" in selected and cfg.stages.responses.input:
        read_input(cfg.stages.responses.input, cfg.storage.endpoint_url, required_column="query")
    declared = {name: m.path for name, m in cfg.models.items()}
    results = []
    for stage in selected:
        trained = _resolve_stage_models(cfg, storage, stage, declared)
        if stage in ("qft", "qpo"):
            from .train import qft, qpo

            recipe = {"qft": qft, "qpo": qpo}[stage]
            results.append(recipe.run(cfg, storage, force=force, echo=echo, depends_on="|".join(trained)))
            continue
        upstream = "|".join(filter(None, [_upstream(cfg, storage, stage), *trained])) or None
        result = run_stage(cfg, storage, stage, lambda s=stage: builders[s](cfg, storage),
                           upstream=upstream, force=force)
        echo(result.summary())
        results.append(result)
    return results
