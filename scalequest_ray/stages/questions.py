"""Question generation (ScaleQuest stage 3): a generator model writes the user turn itself.

The prompt is only the generator's chat template up to where the user's text starts; the model
continues with a question and stops at the end-of-turn marker. Diversity comes from sampling
alone, so every row gets its own seed derived from (run seed, generator, row index).
"""

from __future__ import annotations

import pyarrow as pa

from ..config import RunConfig
from ..generation import generate_questions
from ..stage import Stage, StageInput
from ..storage import Storage


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    qcfg = cfg.stages.questions
    parts, offset = [], 0
    for gen in qcfg.generators:
        parts.append(generate_questions(cfg, gen.name, cfg.models[gen.model], gen.num_questions, qcfg.sampling,
                                        qcfg.min_chars, offset=offset)[0])
        offset += gen.num_questions
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def question_quality(table: pa.Table) -> dict:
    """How many generated questions (kept AND excluded: everything the generator wrote) are
    well-formed English math questions (quality.wellformed_reason), and why the others are not.
    Summed over the written files into the manifest; the funnel prints the share."""
    from ..quality import wellformed_reason

    counts: dict = {}
    for text in table["query"].to_pylist():
        key = wellformed_reason(text) or "wellformed"
        counts[key] = counts.get(key, 0) + 1
    return {"question_quality": counts}


# `id` numbers the rows over all generators: the resume id, dropped from the output.
STAGE = Stage("questions", build, runs_on="engine", resume_id="id", private_columns=("id",),
              counters=question_quality)
