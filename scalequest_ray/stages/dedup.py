"""Dedup and decontamination (ScaleQuest has neither): over the whole run, never on the driver.

1. Contamination: a question sharing a word n-gram (default 13) with a benchmark question
   (GSM8K/MATH test from the hub, or user files) is dropped as `contaminated:<benchmark>`. The
   benchmarks' n-gram hashes are the only thing built on the driver (benchmarks are small).
2. Exact duplicates: rows grouped by the hash of their normalised text (a distributed hash
   shuffle); the smallest query_id of each group is kept, the rest are `duplicate`.
3. Near duplicates: MinHash (datasketch) over word shingles of the normalised text with
   numbers masked, cut into LSH bands. Rows sharing a band bucket are candidates; in each
   bucket every row but the smallest query_id is dropped as `near_duplicate` (so no two kept
   rows share a bucket; chains drop at most what connected components would). Buckets are
   grouped by a shuffle and the verdicts joined back by query_id (Ray Data's hash join).
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from ..columns import REASON, set_columns, with_ids
from ..config import RunConfig
from ..filters import MinHasher, ngram_hashes, normalize_text, stable_hash
from .. import shuffle
from ..stage import Stage, StageInput
from ..storage import Storage, read_input

_EXACT, _BANDS, _DUP, _DUP_OF = "_exact_key", "_band_keys", "_dup_reason", "duplicate_of"


def benchmark_ngrams(cfg: RunConfig) -> dict[str, frozenset]:
    from .seed_problems import _source_dataset

    dcfg = cfg.stages.dedup
    out = {}
    for src in dcfg.decontaminate:
        ds, _, column = _source_dataset(src, cfg.storage.endpoint_url)
        grams: set[int] = set()
        for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=4096):
            for q in batch[column].to_pylist():
                grams |= ngram_hashes(q or "", dcfg.ngram)
        out[src.name] = frozenset(grams)
    return out


# Per worker process: the benchmarks' n-grams and the MinHash permutations are built once and
# reused by every batch that process runs. Tasks, not an actor pool: an actor pool starts new
# processes for every stage (seconds on a small run) and holds a CPU each for the whole stage,
# which on 1-CPU nodes leaves the shuffles that follow nothing to run on.
_CACHE: dict = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        if len(_CACHE) >= 8:  # a long-lived worker serves many stages: keep the newest few
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make()
    return _CACHE[key]


def _keys(table: pa.Table, benchmarks_ref, num_perm: int, threshold: float, shingle_words: int, ngram: int,
          near: bool) -> pa.Table:
    """Contamination verdict, exact key and LSH band keys per row."""
    import ray

    key = (benchmarks_ref.hex() if benchmarks_ref is not None else None, num_perm, threshold, shingle_words, near)
    benchmarks, hasher = _cached(key, lambda: (ray.get(benchmarks_ref) if benchmarks_ref is not None else {},
                                               MinHasher(num_perm, threshold, shingle_words) if near else None))
    table = with_ids(table)
    reasons, exact, bands = [], [], []
    for q in table["query"].to_pylist():
        q = q or ""
        grams = ngram_hashes(q, ngram) if benchmarks else set()
        hit = next((name for name, bench in benchmarks.items() if grams & bench), None)
        reasons.append(f"contaminated:{hit}" if hit else None)
        exact.append(str(stable_hash(normalize_text(q))))
        bands.append([] if hit or hasher is None else hasher.band_keys(normalize_text(q, mask_numbers=True)))
    return set_columns(table, {REASON: pa.array(reasons, pa.string()), _EXACT: pa.array(exact, pa.string()),
                               _BANDS: pa.array(bands, pa.list_(pa.string()))})


def _mark_exact(group: pa.Table) -> pa.Table:
    """One exact-key group: the smallest query_id among usable rows stays, the rest are duplicates."""
    reasons = group[REASON].to_pylist()
    ids = group["query_id"].to_pylist()
    usable = [i for i, r in enumerate(reasons) if r is None]
    dup_of = [None] * len(ids)
    if len(usable) > 1:
        keep = min(usable, key=lambda i: ids[i])
        for i in usable:
            if i != keep:
                reasons[i], dup_of[i] = "duplicate", ids[keep]
    return set_columns(group, {REASON: pa.array(reasons, pa.string()), _DUP_OF: pa.array(dup_of, pa.string())})


def _no_dup(table: pa.Table) -> pa.Table:
    return set_columns(table, {_DUP_OF: pa.nulls(table.num_rows, pa.string())})


def _shared_keys(ds, column: str, partitions: int) -> list:
    """Object-store refs of the values of `column` that occur in more than one row. Only those
    rows go through the per-group step: a group is one Python call, and most rows (unique
    questions, unique LSH buckets) are alone in theirs. The counting is Ray Data's vectorised
    aggregation."""
    from ray.data.expressions import col

    shared = shuffle.groupby(ds, column, partitions).count().filter(expr=col("count()") >= 2).select_columns([column]).materialize()
    return shared.to_arrow_refs() if shared.count() else []


def _with_key(table: pa.Table, column: str, refs: list, shared: bool) -> pa.Table:
    """The rows whose `column` value is (shared=True) or is not (False) among `refs`' values."""
    import pyarrow.compute as pc

    values = _lookup(refs, column)
    mask = pc.is_in(table[column], value_set=values)
    return table.filter(mask if shared else pc.invert(mask))


def _lookup(refs: list, column: str):
    import ray

    def make():
        tables = [t for t in ray.get(refs) if t.num_rows]
        return pa.concat_tables(tables)[column].combine_chunks() if tables else pa.array([], pa.string())

    return _cached(("set", column) + tuple(r.hex() for r in refs), make)


def _explode(table: pa.Table) -> pa.Table:
    keys, ids = [], []
    for qid, reason, bands in zip(table["query_id"].to_pylist(), table[REASON].to_pylist(), table[_BANDS].to_pylist()):
        if reason is None:
            for b in bands or []:
                keys.append(b)
                ids.append(qid)
    return pa.table({"key": pa.array(keys, pa.string()), "query_id": pa.array(ids, pa.string())})


def _bucket_dups(group: pa.Table) -> pa.Table:
    ids = sorted(set(group["query_id"].to_pylist()))
    return pa.table({"query_id": pa.array(ids[1:], pa.string()), "near_of": pa.array([ids[0]] * (len(ids) - 1), pa.string())})


def _first(group: pa.Table) -> pa.Table:
    return group.sort_by([("near_of", "ascending")]).slice(0, 1)


def _finalize(table: pa.Table, near_refs: Optional[list] = None) -> pa.Table:
    """Verdicts into reasons. `near_refs`: the near-duplicate verdicts (query_id -> near_of) as
    object-store tables, when few enough to be looked up in every task instead of joined."""
    reasons = table[REASON].to_pylist()
    dup_of = table[_DUP_OF].to_pylist()
    if near_refs is not None:
        near_of = _near_lookup(near_refs)
        near = [near_of.get(q) for q in table["query_id"].to_pylist()]
    else:
        near = table["near_of"].to_pylist() if "near_of" in table.column_names else []
    for i, n in enumerate(near):
        if n is not None and reasons[i] is None:
            reasons[i], dup_of[i] = "near_duplicate", n
    table = set_columns(table, {REASON: pa.array(reasons, pa.string()), _DUP_OF: pa.array(dup_of, pa.string())})
    return table.drop_columns([c for c in (_EXACT, _BANDS, "near_of") if c in table.column_names])


def _near_lookup(refs: list) -> dict:
    import ray

    def make():
        lookup: dict = {}
        for t in ray.get(refs):
            lookup.update(zip(t["query_id"].to_pylist(), t["near_of"].to_pylist()))
        return lookup

    return _cached(("near",) + tuple(r.hex() for r in refs), make)


# Up to this many near duplicates, their verdicts are broadcast to the tasks (a few tens of MB
# per worker at most) instead of joined: Ray Data's join is a hash shuffle whose aggregator
# actors cost seconds to start per run; beyond it the join's shuffle is the cheaper way.
BROADCAST_MAX_ROWS = 500_000


def build(cfg: RunConfig, storage: Storage, given: StageInput):
    import ray

    dcfg = cfg.stages.dedup
    source = read_input(given.uri, cfg.storage.endpoint_url, required_column="query")
    partitions = shuffle.partitions(dcfg.num_partitions)
    benchmarks = benchmark_ngrams(cfg)
    ref = ray.put(benchmarks) if benchmarks else None
    keyed = source.map_batches(
        _keys, batch_format="pyarrow",
        fn_kwargs=dict(benchmarks_ref=ref, num_perm=dcfg.num_perm, threshold=dcfg.threshold,
                       shingle_words=dcfg.shingle_words, ngram=dcfg.ngram, near=dcfg.near)).materialize()
    shared = _shared_keys(keyed, _EXACT, partitions) if dcfg.exact else []
    if shared:
        rows = shuffle.groupby(keyed.map_batches(_with_key, batch_format="pyarrow",
                                                 fn_kwargs=dict(column=_EXACT, refs=shared, shared=True)),
                               _EXACT, partitions).map_groups(_mark_exact, batch_format="pyarrow") \
            .union(keyed.map_batches(_with_key, batch_format="pyarrow",
                                     fn_kwargs=dict(column=_EXACT, refs=shared, shared=False))
                   .map_batches(_no_dup, batch_format="pyarrow"))
    else:
        rows = keyed.map_batches(_no_dup, batch_format="pyarrow")
    if not dcfg.near:
        return rows.map_batches(_finalize, batch_format="pyarrow")
    # Used twice (bucket keys, then the verdicts): computed once, held in the object store
    # (which spills to disk), never on the driver.
    rows = rows.materialize()
    keys = rows.map_batches(_explode, batch_format="pyarrow").materialize()
    buckets = _shared_keys(keys, "key", partitions)
    if not buckets:
        return rows.map_batches(_finalize, batch_format="pyarrow")
    in_buckets = keys.map_batches(_with_key, batch_format="pyarrow", fn_kwargs=dict(column="key", refs=buckets, shared=True))
    # (the second grouping's input is the first's output: already `partitions` blocks)
    near = (shuffle.groupby(in_buckets, "key", partitions).map_groups(_bucket_dups, batch_format="pyarrow")
            .groupby("query_id", num_partitions=partitions).map_groups(_first, batch_format="pyarrow")
            .materialize())  # one row per near-duplicate: small
    found = near.count()
    if found == 0:
        return rows.map_batches(_finalize, batch_format="pyarrow")
    if found <= BROADCAST_MAX_ROWS:
        return rows.map_batches(_finalize, batch_format="pyarrow", fn_kwargs={"near_refs": near.to_arrow_refs()})
    joined = rows.join(near, join_type="left_outer", num_partitions=partitions, on=("query_id",))
    return joined.map_batches(_finalize, batch_format="pyarrow")


STAGE = Stage("dedup", build, tokens_column=None)
