"""Run storage: a local directory or s3://bucket/prefix on any S3-compatible endpoint.

Layout of a stage:
    <root>/<stage>/data/*.parquet          the stage's rows
    <root>/<stage>/exclusions/*.parquet    rows dropped, each with `exclude_reason`
    <root>/<stage>/_manifest.json          written LAST, only after every shard is written

A stage is finished if and only if its manifest exists; data without a manifest is a stage that
died half-way and is cleared before the stage runs again.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
# Parquet footer key under which the runner records a file's stats (rows by reason, tokens, counters).
STATS_KEY = b"scalequest_ray.stats"


def sum_counts(parts: list[dict]) -> dict:
    """Sum nested dicts of counts ({"a": 1, "b": {"c": 2}} + ...) key by key."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict):
                out[k] = sum_counts([out.get(k, {}), v])
            else:
                out[k] = out.get(k, 0) + v
    return out


class InputError(ValueError):
    """Input data that a stage cannot use; the message is one line for the user."""


def endpoint_url(configured: Optional[str] = None) -> Optional[str]:
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def arrow_s3(endpoint: Optional[str] = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem; credentials come from the AWS default chain only."""
    endpoint = endpoint_url(endpoint)
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    # Transient 5xx/throttling from the endpoint are retried by the AWS SDK itself.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=8)
    return pafs.S3FileSystem(**kwargs)


def s3fs_filesystem(endpoint: Optional[str] = None):
    import s3fs

    endpoint = endpoint_url(endpoint)
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})


def storage_options(endpoint: Optional[str] = None) -> dict:
    """fsspec options for reading our outputs with `datasets`/pandas."""
    endpoint = endpoint_url(endpoint)
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def resolve(uri: str, endpoint: Optional[str] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3:// URI."""
    if uri.startswith("s3://"):
        return arrow_s3(endpoint), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@dataclass
class Storage:
    root: str
    endpoint: Optional[str] = None

    def __post_init__(self):
        self.fs, self.base = resolve(self.root, self.endpoint)
        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.base, exist_ok=True)

    # paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def uri(self, *parts: str) -> str:
        p = self.path(*parts)
        return "s3://" + p if self.root.startswith("s3://") else p

    # primitives ----------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_json(self, path: str) -> dict:
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def write_json(self, path: str, payload: dict) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            # Atomic on local disks: a reader never sees a half-written manifest.
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:  # an S3 PUT is atomic by itself
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def files(self, path: str) -> list[str]:
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def parquet_files(self, path: str) -> list[str]:
        return [f for f in self.files(path) if f.endswith(".parquet")]

    def count_rows(self, files: list[str]) -> int:
        """Row count from Parquet footers only (no data read)."""
        return sum(rows for rows, _ in self.footers(files))

    def footers(self, files: list[str]) -> list[tuple[int, dict]]:
        """(rows, the stage's own stats) of each file, from its Parquet footer only. Footers are
        fetched in parallel: on S3 each is a round trip, and a large stage has thousands."""
        from concurrent.futures import ThreadPoolExecutor

        def read(f: str) -> tuple[int, dict]:
            with self.fs.open_input_file(f) as fh:
                meta = pq.ParquetFile(fh).metadata
            kv = meta.metadata or {}
            return meta.num_rows, json.loads(kv[STATS_KEY]) if STATS_KEY in kv else {}

        if len(files) < 8 or isinstance(self.fs, pafs.LocalFileSystem):
            return [read(f) for f in files]
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(read, files))

    # stages --------------------------------------------------------------------------------
    def manifest(self, stage: str) -> Optional[dict]:
        path = self.path(stage, MANIFEST)
        return self.read_json(path) if self.exists(path) else None

    def commit_stage(self, stage: str, fingerprint: str, started: float, extra: dict,
                     expect_rows: Optional[int] = None) -> dict:
        """Write the manifest after every shard is on storage; return it. With `expect_rows`,
        data/ + exclusions/ must hold exactly that many rows (read from the shards' footers as
        listed now), or nothing is committed. The stats the runner wrote into each footer
        (rows by reason, tokens, the stage's counters) are summed into the manifest."""
        data_files = self.parquet_files(self.path(stage, "data"))
        excl_files = self.parquet_files(self.path(stage, "exclusions"))
        data, excl = self.footers(data_files), self.footers(excl_files)
        rows, excluded = sum(r for r, _ in data), sum(r for r, _ in excl)
        if expect_rows is not None and rows + excluded != expect_rows:
            raise RuntimeError(f"{stage}: data/ + exclusions/ hold {rows} + {excluded} rows, {expect_rows} were staged; "
                               "not committing the stage (run the same command again)")
        stats = sum_counts([s for _, s in data + excl])
        manifest = {
            "stage": stage,
            "config_hash": fingerprint,
            "rows": rows,
            "excluded_rows": excluded,
            "files": [self._rel(f) for f in data_files],
            "exclusion_files": [self._rel(f) for f in excl_files],
            "started_at": started,
            "finished_at": time.time(),
            "seconds": round(time.time() - started, 3),
            "excluded_by_reason": stats.get("excluded_by_reason", {}),
            "output_tokens": stats.get("output_tokens", 0),
            **stats.get("counters", {}),
            **extra,
        }
        self.write_json(self.path(stage, MANIFEST), manifest)
        return manifest

    def _rel(self, path: str) -> str:
        return posixpath.relpath(path, self.base)


def read_input(uri: str, endpoint: Optional[str] = None, required_column=None):
    """A Ray Dataset over a Parquet/JSONL file or folder (local or s3://), validated cheaply:
    raises InputError (one line) for a missing, empty or unreadable input or a missing column."""
    import ray
    from pyarrow.fs import FileSelector, FileType

    fs, path = resolve(uri, endpoint)

    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        raise InputError(f"input {uri} does not exist")
    names = [path] if info.type == FileType.File else [
        i.path for i in fs.get_file_info(FileSelector(path, recursive=True)) if i.type == FileType.File
    ]
    if any(n.endswith(".parquet") for n in names):
        reader, exts = ray.data.read_parquet, ["parquet"]
    elif any(n.endswith((".jsonl", ".json")) for n in names):
        reader, exts = ray.data.read_json, ["jsonl", "json"]
    else:
        raise InputError(f"input {uri} has no .parquet, .jsonl or .json files")
    if all(fs.get_file_info(n).size == 0 for n in names if n.endswith(tuple(exts))):
        raise InputError(f"input {uri} is empty")
    try:
        ds = reader(path, filesystem=fs, file_extensions=exts)
        columns = ds.schema().names
    except Exception as e:  # unreadable file: say which, in one line
        raise InputError(f"cannot read input {uri}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    for column in [required_column] if isinstance(required_column, str) else (required_column or []):
        if column not in columns:
            raise InputError(f"input {uri} has no '{column}' column (columns: {', '.join(columns)})")
    return ds
