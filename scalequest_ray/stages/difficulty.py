"""Difficulty (ScaleQuest stage 3, parts c and d): the trained scorer predicts each question's
fail rate (on vLLM replicas, or the HF actor pool with `engine: hf`; scoring.score); then a configurable share of the easiest questions is dropped
per generator (`drop_easiest`, reason `too_easy`), or the set is sampled to a target histogram
(`target_histogram`, reason `histogram_sample`). The cut-offs come from per-block histograms
summed on the driver (bins x generators numbers, never rows)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..filters import stable_hash
from ..scoring import score
from ..stage import Stage, StageInput
from ..storage import Storage, read_input

SCORE = "difficulty"


def _scored_only(table: pa.Table) -> pa.Table:
    """Rows the scorer failed on (their reason is scoring_error) take no part in the cut-offs."""
    import pyarrow.compute as pc

    return table.filter(pc.is_null(table[REASON]))


def _group(table: pa.Table, per_generator: bool) -> list[str]:
    if per_generator and "generator" in table.column_names:
        return [g or "" for g in table["generator"].to_pylist()]
    return [""] * table.num_rows


def _bins(table: pa.Table, per_generator: bool, ranges: Optional[dict], bins: int) -> tuple[list[str], list[int]]:
    """Group and bin of each row; bins span the group's [low, high] (None: the fail-rate range 0..1)."""
    groups = _group(table, per_generator)
    scores = np.nan_to_num(table[SCORE].to_numpy(zero_copy_only=False).astype(float))
    out = []
    for g, s in zip(groups, scores):
        lo, hi = ranges[g] if ranges else (0.0, 1.0)
        frac = 0.0 if hi <= lo else (min(max(s, lo), hi) - lo) / (hi - lo)
        out.append(min(int(frac * bins), bins - 1))
    return groups, out


def _range(table: pa.Table, per_generator: bool) -> pa.Table:
    table = _scored_only(table)
    groups = _group(table, per_generator)
    scores = table[SCORE].to_pylist()
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for g, s in zip(groups, scores):
        lo[g], hi[g] = min(lo.get(g, s), s), max(hi.get(g, s), s)
    return pa.table({"group": list(lo), "low": list(lo.values()), "high": [hi[g] for g in lo]})


def _histogram(table: pa.Table, bins: int, per_generator: bool, ranges: Optional[dict]) -> pa.Table:
    table = _scored_only(table)
    out: dict[tuple[str, int], int] = {}
    for g, b in zip(*_bins(table, per_generator, ranges, bins)):
        out[(g, b)] = out.get((g, b), 0) + 1
    return pa.table({"group": [k[0] for k in out], "bin": [k[1] for k in out], "count": list(out.values())})


def cutoffs(counts: dict[str, list[int]], drop: float) -> dict[str, int]:
    """Per group: the first bin that is kept, so that about `drop` of the group falls below it."""
    out = {}
    for g, hist in counts.items():
        target, seen = drop * sum(hist), 0
        for b, c in enumerate(hist):
            if seen + c > target:
                out[g] = b
                break
            seen += c
        else:
            out[g] = len(hist)
    return out


def keep_probabilities(counts: dict[str, list[int]], target: list[tuple[float, float, float]], bins: int) -> dict:
    """Per group, per target range: the keep probability that shapes the kept set like `target`
    while keeping as many rows as possible (the scarcest range keeps all of its rows)."""
    out = {}
    for g, hist in counts.items():
        have = [sum(hist[b] for b in range(bins) if lo <= (b + 0.5) / bins < hi) for lo, hi, _ in target]
        ratios = [share / n for (_, _, share), n in zip(target, have) if n > 0 and share > 0]
        scale = 1 / max(ratios) if ratios else 0
        out[g] = [min(1.0, share * scale / n) if n > 0 else 0.0 for (_, _, share), n in zip(target, have)]
    return out


def _select(table: pa.Table, bins: int, per_generator: bool, ranges: Optional[dict], cut: Optional[dict],
            probs: Optional[dict], target: Optional[list], seed: int) -> pa.Table:
    groups, binned = _bins(table, per_generator, ranges, bins)
    reasons = []
    for g, b, qid, before in zip(groups, binned, table["query_id"].to_pylist(), table[REASON].to_pylist()):
        if before:
            reasons.append(before)
        elif cut is not None:
            reasons.append("too_easy" if b < cut.get(g, 0) else None)
        elif probs is not None:
            r = next((i for i, (lo, hi, _) in enumerate(target) if lo <= (b + 0.5) / bins < hi), None)
            u = stable_hash(f"{seed}:{qid}") / 2 ** 63  # deterministic per question
            reasons.append(None if r is not None and u < probs[g][r] else "histogram_sample")
        else:
            reasons.append(None)
    return set_columns(table, {REASON: pa.array(reasons, pa.string())})


def _errors(table: pa.Table) -> pa.Table:
    reasons = ["scoring_error" if e else None for e in table["score_error"].to_pylist()]
    return set_columns(table, {REASON: pa.array(reasons, pa.string())})


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    dcfg = cfg.stages.difficulty
    model = cfg.models[dcfg.model]
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column="query").map_batches(with_ids, batch_format="pyarrow")
    scored = score(source, model, out=SCORE, pairs=False, method="sequence_classification", max_length=dcfg.max_length,
                   engine=dcfg.engine, endpoint=cfg.storage.endpoint_url).map_batches(_errors, batch_format="pyarrow")
    if not dcfg.drop_easiest and not dcfg.target_histogram:
        return scored
    # Scores are read three times (range, histogram, selection): computed once, kept in the
    # object store (which spills to disk); the driver only sums a few numbers per block.
    scored = scored.materialize()
    ranges = None
    if dcfg.drop_easiest:  # bins over each group's observed score range: a fine cut anywhere
        ranges = {}
        for row in scored.map_batches(_range, batch_format="pyarrow", fn_kwargs={"per_generator": dcfg.per_generator}).iter_rows():
            lo, hi = ranges.get(row["group"], (row["low"], row["high"]))
            ranges[row["group"]] = (min(lo, row["low"]), max(hi, row["high"]))
    counts: dict[str, list[int]] = {}
    for row in scored.map_batches(_histogram, batch_format="pyarrow", fn_kwargs={
            "bins": dcfg.histogram_bins, "per_generator": dcfg.per_generator, "ranges": ranges}).iter_rows():
        counts.setdefault(row["group"], [0] * dcfg.histogram_bins)[row["bin"]] += row["count"]
    cut = cutoffs(counts, dcfg.drop_easiest) if dcfg.drop_easiest else None
    probs = keep_probabilities(counts, dcfg.target_histogram, dcfg.histogram_bins) if dcfg.target_histogram else None
    return scored.map_batches(_select, batch_format="pyarrow", fn_kwargs=dict(
        bins=dcfg.histogram_bins, per_generator=dcfg.per_generator, ranges=ranges, cut=cut, probs=probs,
        target=dcfg.target_histogram, seed=cfg.seed))


STAGE = Stage("difficulty", build, runs_on="scoring", tokens_column=None)
