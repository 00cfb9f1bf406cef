"""The same stages against a real S3 protocol endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import json

import boto3
import pytest
import yaml

from conftest import S3_SECRET, tiny_config
from scalequest_ray import pipeline
from scalequest_ray.config import load_config
from scalequest_ray.storage import storage_options

pytestmark = pytest.mark.s3


def test_pipeline_on_s3(tiny_model, ray_cluster, s3_server, tmp_path, capfd):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="sq-runs")
    # The model itself is read from S3 too (Ray Data LLM downloads it on the replica's node).
    s3.create_bucket(Bucket="sq-models")
    for f in tiny_model.iterdir():
        s3.upload_file(str(f), "sq-models", f"tiny/{f.name}")
    cfg_dict = tiny_config("s3://sq-models/tiny", "s3://sq-runs/exp1", **{"storage.endpoint_url": s3_server})
    path = tmp_path / "s3.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(path)

    results = pipeline.run(cfg)
    assert [r.skipped for r in results] == [False, False]

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="sq-runs", Prefix="exp1/")["Contents"]}
    assert {"exp1/questions/_manifest.json", "exp1/responses/_manifest.json"} <= keys
    # The scratch of a finished run (expanded requests, Ray Data checkpoints) is gone.
    assert not any("/_work/" in k or "/_checkpoints/" in k or k.endswith("_started.json") for k in keys)
    q_manifest = json.loads(s3.get_object(Bucket="sq-runs", Key="exp1/questions/_manifest.json")["Body"].read())
    r_manifest = json.loads(s3.get_object(Bucket="sq-runs", Key="exp1/responses/_manifest.json")["Body"].read())
    assert q_manifest["rows"] + q_manifest["excluded_rows"] == 24
    assert r_manifest["rows"] == 3 * q_manifest["rows"] > 0
    assert {f"exp1/{f}" for f in r_manifest["files"]} <= keys

    # Users read the output with the `datasets` library straight from S3.
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files="s3://sq-runs/exp1/responses/data/*.parquet",
        storage_options=storage_options(s3_server), split="train", cache_dir=str(tmp_path / "hf"),
    )
    assert len(ds) == r_manifest["rows"]
    assert {"query_id", "sample_idx", "query", "response", "answer", "finish_reason"} <= set(ds.column_names)
    assert len(set(zip(ds["query_id"], ds["sample_idx"]))) == len(ds)
    assert set(ds["solver_model"]) == {"s3://sq-models/tiny"}

    # Re-running against S3 skips both finished stages.
    assert [r.skipped for r in pipeline.run(cfg)] == [True, True]

    # The secret key never reaches outputs or logs.
    out, err = capfd.readouterr()
    assert S3_SECRET not in out + err
    for key in keys:
        if key.endswith(".json"):
            assert S3_SECRET not in s3.get_object(Bucket="sq-runs", Key=key)["Body"].read().decode()
