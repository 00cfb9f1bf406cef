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

import pyarrow as pa

from ..chain import set_columns, stage_input, with_ids
from ..config import RunConfig
from ..filters import MinHasher, ngram_hashes, normalize_text, stable_hash
from ..runner import REASON
from ..storage import Storage, read_input

TOKENS_COLUMN = None
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


class _Keys:
    """Contamination verdict, exact key and LSH band keys per row."""

    def __init__(self, benchmarks_ref, num_perm: int, threshold: float, shingle_words: int, ngram: int, near: bool):
        import ray

        self.benchmarks = ray.get(benchmarks_ref) if benchmarks_ref is not None else {}
        self.hasher = MinHasher(num_perm, threshold, shingle_words) if near else None
        self.ngram = ngram

    def __call__(self, table: pa.Table) -> pa.Table:
        table = with_ids(table)
        reasons, exact, bands = [], [], []
        for q in table["query"].to_pylist():
            q = q or ""
            grams = ngram_hashes(q, self.ngram) if self.benchmarks else set()
            hit = next((name for name, bench in self.benchmarks.items() if grams & bench), None)
            reasons.append(f"contaminated:{hit}" if hit else None)
            exact.append(str(stable_hash(normalize_text(q))))
            bands.append([] if hit or self.hasher is None else self.hasher.band_keys(normalize_text(q, mask_numbers=True)))
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


def _finalize(table: pa.Table) -> pa.Table:
    reasons = table[REASON].to_pylist()
    dup_of = table[_DUP_OF].to_pylist()
    if "near_of" in table.column_names:
        for i, near in enumerate(table["near_of"].to_pylist()):
            if near is not None and reasons[i] is None:
                reasons[i], dup_of[i] = "near_duplicate", near
        table = table.drop_columns(["near_of"])
    table = set_columns(table, {REASON: pa.array(reasons, pa.string()), _DUP_OF: pa.array(dup_of, pa.string())})
    return table.drop_columns([c for c in (_EXACT, _BANDS) if c in table.column_names])


def build(cfg: RunConfig, storage: Storage):
    import ray

    dcfg = cfg.stages.dedup
    uri, _ = stage_input(cfg, storage, "dedup")
    source = read_input(uri, cfg.storage.endpoint_url, required_column="query")
    partitions = dcfg.num_partitions or max(2, int(ray.cluster_resources().get("CPU", 2)))
    benchmarks = benchmark_ngrams(cfg)
    ref = ray.put(benchmarks) if benchmarks else None
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)
    keyed = source.map_batches(
        _Keys, batch_format="pyarrow", concurrency=(1, cpus),
        fn_constructor_kwargs=dict(benchmarks_ref=ref, num_perm=dcfg.num_perm, threshold=dcfg.threshold,
                                   shingle_words=dcfg.shingle_words, ngram=dcfg.ngram, near=dcfg.near))
    if dcfg.exact:
        rows = keyed.groupby(_EXACT, num_partitions=partitions).map_groups(_mark_exact, batch_format="pyarrow")
    else:
        rows = keyed.map_batches(lambda t: set_columns(t, {_DUP_OF: pa.nulls(t.num_rows, pa.string())}),
                                 batch_format="pyarrow")
    if not dcfg.near:
        return rows.map_batches(_finalize, batch_format="pyarrow")
    # Used twice (bucket keys, then the join): computed once, held in the object store (which
    # spills to disk), never on the driver.
    rows = rows.materialize()
    near = (rows.map_batches(_explode, batch_format="pyarrow")
            .groupby("key", num_partitions=partitions).map_groups(_bucket_dups, batch_format="pyarrow")
            .groupby("query_id", num_partitions=partitions).map_groups(_first, batch_format="pyarrow")
            .materialize())  # one row per near-duplicate: small
    if near.count() == 0:
        return rows.map_batches(_finalize, batch_format="pyarrow")
    joined = rows.join(near, join_type="left_outer", num_partitions=partitions, on=("query_id",))
    return joined.map_batches(_finalize, batch_format="pyarrow")
