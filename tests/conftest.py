"""Shared fixtures: real models built offline, a real local Ray cluster, a real S3 (moto) server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from scalequest_ray.models import build_scorer_model, build_tiny_model, cache_dir, fetch_demo_model

REPO = Path(__file__).resolve().parents[1]
# A distinctive secret: tests assert it never shows up in outputs or logs.
S3_SECRET = "sq-test-secret-never-logged-7f3a"


def _models_lock():
    """The test workers (pytest-xdist) share the model cache: one builds a model, the others wait."""
    from filelock import FileLock

    (cache_dir() / "models").mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / "models" / ".build.lock"))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    with _models_lock():
        return fetch_demo_model()


@pytest.fixture(scope="session")
def tiny_model(demo_model) -> Path:
    with _models_lock():
        return build_tiny_model(cache_dir() / "models" / "tiny-llama-test", tokenizer_from=demo_model)


@pytest.fixture(scope="session")
def tiny_reward(tiny_model) -> Path:
    """A tiny random one-output sequence-classification model (the test reward model)."""
    with _models_lock():
        return build_scorer_model(cache_dir() / "models" / "tiny-llama-reward-test", tiny_model)


@pytest.fixture(scope="session")
def demo_reward(demo_model) -> Path:
    """SmolLM2 with an untrained one-output head (the demo's reward model, built by fetch-demo)."""
    from scalequest_ray.models import DEMO_MODEL_NAME

    with _models_lock():
        return build_scorer_model(cache_dir() / "models" / f"{DEMO_MODEL_NAME}-reward-init", demo_model)


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


def start_local_ray() -> None:
    import ray

    # More logical CPUs than cores: the engine actor holds one for the whole stage.
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray for the session (test_cluster.py swaps it for a multi-node cluster and back)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
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
        "report": False,  # the HTML report is built and tested on the full pipeline's root only
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


# Hand-made questions for the filtering chain: kept ones, and ones each filter must drop.
CHAIN_QUESTIONS = [
    ("k1", "A farmer has 12 cows and buys 5 more. How many cows does the farmer have now?"),
    ("k2", "What is the area of a circle with radius 3 cm, in terms of \u03c0?"),
    ("k3", "A train travels at 60 km per hour for 2.5 hours. How far does it go?"),
    ("k4", "The angle between two lines is 35\u00b0. What is its supplement, in degrees?"),
    ("k5", "Solve for x: 3x + 7 = 22. What is the value of x?"),
    ("k6", "Tom\u2019s garden has 8 rows of 14 tomato plants. How many plants are there in total?"),
    ("k7", "If a rectangle has a perimeter of 30 and a width of 6, what is its length?"),
    ("k8", "How many positive divisors does 360 have?"),
    ("x-dup", "A farmer has 12 cows and buys 5 more.  How many cows does the farmer have now ?"),
    ("x-near", "A farmer has 40 cows and buys 9 more. How many cows does the farmer have now?"),
    ("de", "Wie viele \u00c4pfel hat Anna, wenn sie 3 \u00c4pfel kauft und 2 davon isst?"),
    ("zh", "\u5c0f\u660e\u6709\u4e09\u4e2a\u82f9\u679c\uff0c\u4ed6\u53c8\u4e70\u4e86\u4e24\u4e2a\uff0c\u73b0\u5728\u4ed6\u6709\u51e0\u4e2a\u82f9\u679c\uff1f"),
    ("code", "def area(r):\n    return 3.14 * r * r\nprint(area(2))"),
    ("empty", "   "),
    ("bench", "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May?"),
]


def write_chain_inputs(folder: Path) -> tuple[Path, Path]:
    """(questions.parquet, benchmark.parquet) for the filtering chain."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    questions = folder / "questions.parquet"
    pd.DataFrame([{"query_id": i, "query": q, "generator": "hand"} for i, q in CHAIN_QUESTIONS]).to_parquet(questions)
    bench = folder / "benchmark.parquet"
    pd.DataFrame({"question": [CHAIN_QUESTIONS[-1][1], "An unrelated benchmark question about 7 apples?"]}).to_parquet(bench)
    return questions, bench


def full_config(model: Path, reward: Path, root: str, questions: str, bench: str) -> dict:
    """The whole pipeline on the tiny models, from a file of hand-made questions."""
    cfg = tiny_config(model, root)
    cfg["models"]["reward"] = {"path": str(reward), "engine": {"dtype": "float32"}, "scale": {"batch_size": 4}}
    cfg["models"]["scorer"] = {"path": "stage:difficulty_scorer", "scale": {"batch_size": 4},
                               "engine": {"dtype": "float32", "enforce_eager": True, "cpu_kv_cache_gib": 1, "max_model_len": 512}}
    cfg["stages"].update({
        "language": {"input": questions},
        "dedup": {"decontaminate": [{"name": "gsm8k_test", "path": bench}]},
        # Constrained (vLLM structured outputs): even the random model ends with a verdict line.
        "solvability": {"model": "tiny", "sampling": {"temperature": 0.0, "max_tokens": 24}, "reasoning_max_chars": 8},
        "difficulty_labels": {"model": "tiny", "k": 2, "max_problems": 12, "sampling": {"max_tokens": 16}},
        "difficulty_scorer": {"model": "tiny", "workers": 2, "batch_size": 4, "per_device_batch_size": 2,
                              "epochs": 1, "max_length": 64, "save_steps": 2, "holdout": 0.25},
        # The trained scorer on vLLM's classify task (auto), the reward model on the HF actor pool.
        "difficulty": {"model": "scorer", "drop_easiest": 0.25},
        "reward": {"model": "reward", "max_length": 256, "engine": "hf"},
        "selection": {"min_reward": -1.0e9},
    })
    cfg["pipeline"] = ["language", "dedup", "solvability", "difficulty_labels", "difficulty_scorer", "difficulty",
                       "responses", "reward", "selection"]
    cfg["report"] = True
    return cfg


# Which test worker runs what (`make test`: pytest-xdist, --dist loadfile, 2 workers). The six
# files that start engines or Ray Train take ~95% of the non-cluster time. Plain loadfile hands
# files out by their number of tests, so the e2e and QPO-chain files (3 and 2 tests, ~10 min
# each) went last and one worker ran them alone for minutes while the other idled. On two
# workers the six are two work units of about equal time (CI's per-file times, 2 cores), which
# the two workers take up as soon as the unit-test files drain; other files stay one unit each,
# so a module's fixtures (a pipeline run) are still built once. (Not `--dist loadgroup` with
# xdist_group marks: xdist 3.8 renames the tests through `Item._nodeid`, which pytest 9 no
# longer reads, so the marks group nothing.)
HEAVY_GROUPS = {"test_e2e.py": "heavy-a", "test_integration.py": "heavy-a", "test_train.py": "heavy-a",
                "test_pipeline.py": "heavy-b", "test_qpo_pairs.py": "heavy-b", "test_scoring.py": "heavy-b"}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist must not reject it
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile" or config.getvalue("numprocesses") != 2:
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadFileScheduling

    class HeavyPairs(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return HEAVY_GROUPS.get(Path(file).name, file)

    return HeavyPairs(config, log)
