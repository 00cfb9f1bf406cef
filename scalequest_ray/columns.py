"""Columns every stage shares, and the helpers that set them. This module sits below the stages
and the runner: it imports none of them."""

from __future__ import annotations

import hashlib

# Every stage's rows carry these: null REASON = kept (the runner writes the row to data/), a
# reason = excluded (to exclusions/); TOKENS = tokens the stage generated for the row.
REASON = "exclude_reason"
TOKENS = "num_output_tokens"


def stable_query_id(query: str) -> str:
    """The id of a question that came without one: a hash of its text, so reruns agree."""
    return "q-" + hashlib.sha1(query.encode()).hexdigest()[:16]


def set_columns(table, columns: dict):
    """Add or replace columns (pyarrow arrays), keeping the others and their types as they are."""
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


def with_ids(table):
    """Give rows without a query_id the stable hash of their text."""
    import pyarrow as pa

    if "query_id" in table.column_names:
        ids = [str(i) if i is not None and str(i) else stable_query_id(q or "")
               for i, q in zip(table["query_id"].to_pylist(), table["query"].to_pylist())]
        return set_columns(table, {"query_id": pa.array(ids, pa.string())})
    ids = [stable_query_id(q or "") for q in table["query"].to_pylist()]
    return table.append_column("query_id", pa.array(ids, pa.string()))
