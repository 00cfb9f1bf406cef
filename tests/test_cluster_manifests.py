"""The cluster files cannot be applied here (no Kubernetes, no AWS): parse them and check that
what a cluster needs is there and agrees with the package and configs/."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from scalequest_ray.config import load_config

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY = re.search(r"ray\[[^\]]*\]==([\d.]+)", " ".join(PYPROJECT["project"]["dependencies"])).group(1)


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if str(quantity).endswith("m") else float(quantity)


@pytest.fixture(params=["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def cluster_spec(request) -> dict:
    doc = _load(request.param)
    assert doc["apiVersion"] == "ray.io/v1"
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def test_kuberay_cluster_shape(cluster_spec):
    spec = cluster_spec
    assert spec["rayVersion"] == RAY
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # CPU-only head that runs no tasks
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # never a public LoadBalancer
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 < g["maxReplicas"]  # autoscale from zero
        assert g["template"]["spec"]["serviceAccountName"]  # S3 through workload identity
    gpu = groups["gpu"]["template"]["spec"]
    res = gpu["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"]) and gpu["nodeSelector"]
    for c in _containers(spec):
        assert c["image"].endswith(f":{VERSION}-gpu"), c["image"]  # pinned, the package version
        assert c["resources"]["requests"] == c["resources"]["limits"]


def test_rayjob_runs_an_existing_entrypoint_and_config_and_cleans_up():
    job = _load("cluster/kuberay/rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / config, sets)
    assert cfg.root.startswith("s3://")
    # The job's cluster is the standalone one's.
    assert job["rayClusterSpec"] == _load("cluster/kuberay/raycluster.yaml")["spec"]

    # Every GPU replica / training worker of the config fits one GPU worker pod.
    gpu = next(g for g in job["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    pod_cpus = _cpus(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    pod_gpus = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    for name, model in cfg.models.items():
        if model.scale.gpus_per_replica:
            assert model.scale.cpus_per_replica <= pod_cpus and model.scale.gpus_per_replica <= pod_gpus, name
    for stage in ("qft", "qpo", "difficulty_scorer"):
        train = getattr(cfg.stages, stage)
        if train and train.gpus_per_worker:
            assert train.cpus_per_worker <= pod_cpus and train.gpus_per_worker <= pod_gpus, stage


def test_aws_launcher_matches_and_is_closed():
    c = _load("cluster/aws/cluster.yaml")
    types = c["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and c["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_worker"]["min_workers"] == types["cpu_worker"]["min_workers"] == 0
    assert c["idle_timeout_minutes"] > 0
    assert c["docker"]["image"].endswith(f":{VERSION}-gpu")
    head_cmd = " ".join(c["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_cmd and "--dashboard-host=127.0.0.1" in head_cmd
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in c["worker_start_ray_commands"] if "ray start" in cmd)
    assert "~/.ray/auth_token" in c["file_mounts"]
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"]  # S3 from the instance role


def test_no_secret_in_any_cluster_file_and_image_pins_ray():
    for path in (REPO / "cluster").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|aws_secret|AKIA[0-9A-Z]{16}", text), path
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY}-" in dockerfile and '".[gpu]"' in dockerfile
