"""Shared fixtures: real models built offline, a real local Ray cluster, a real S3 (moto) server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from scalequest_ray.models import build_tiny_model, cache_dir, fetch_demo_model

REPO = Path(__file__).resolve().parents[1]
# A distinctive secret: tests assert it never shows up in outputs or logs.
S3_SECRET = "sq-test-secret-never-logged-7f3a"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return fetch_demo_model()


@pytest.fixture(scope="session")
def tiny_model(demo_model) -> Path:
    return build_tiny_model(cache_dir() / "models" / "tiny-llama-test", tokenizer_from=demo_model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 endpoint on 127.0.0.1. Credentials go in the environment BEFORE Ray starts, so
    Ray's workers inherit them the way cluster nodes get them from their instance role."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "sq-test-key",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": "us-east-1",
    })
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    import ray

    # More logical CPUs than cores: the engine actor holds one for the whole stage.
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def write_config(tmp_path):
    """Write a run config built from a dict; returns its path."""

    def _write(cfg: dict, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return _write


def tiny_config(model: Path, root: str, **over) -> dict:
    cfg = {
        "name": "tiny",
        "root": root,
        "seed": 7,
        "storage": {"rows_per_file": 8},
        "models": {"tiny": {
            "path": str(model),
            "engine": {"max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 1, "max_num_seqs": 64},
            "scale": {"batch_size": 8},
        }},
        "stages": {
            "questions": {
                "generators": [{"name": "tiny", "model": "tiny", "num_questions": 24}],
                "sampling": {"temperature": 1.0, "top_p": 0.99, "max_tokens": 24},
                "min_chars": 1,
            },
            "responses": {"model": "tiny", "n": 3, "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 16}},
        },
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg
