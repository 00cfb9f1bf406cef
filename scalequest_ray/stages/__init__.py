"""One module per pipeline stage; each declares its `STAGE` (scalequest_ray.stage.Stage)."""

from __future__ import annotations


def registry() -> dict:
    """Stage name -> Stage, for every data stage (training stages are Ray Train recipes, in
    scalequest_ray.train). Stage modules import neither Ray nor vLLM at import time."""
    from . import (dedup, difficulty, difficulty_labels, language, qpo_pairs, questions, responses, reward,
                   seed_problems, selection, solvability)

    modules = (seed_problems, qpo_pairs, questions, language, dedup, solvability, difficulty_labels, difficulty,
               responses, reward, selection)
    return {m.STAGE.name: m.STAGE for m in modules}
