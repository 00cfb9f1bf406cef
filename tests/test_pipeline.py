"""The whole ScaleQuest pipeline on the tiny models through real Ray Data, vLLM and Ray Train:
filters, dedup, solvability, difficulty labels -> scorer -> scoring, responses, reward,
selection; the funnel; re-runs skip; a deleted manifest re-runs that stage and those after it.

The run root, the inputs AND the generator model are on the moto S3 server (127.0.0.1): the full
run against S3 is the storage test (Ray Data LLM and Ray Train download the model themselves;
the secret key never reaches outputs or logs), and local storage is covered by the other
integration and e2e tests."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import CHAIN_QUESTIONS, S3_SECRET, full_config, write_chain_inputs
from scalequest_ray import pipeline
from scalequest_ray.config import load_config
from scalequest_ray.storage import Storage, storage_options

# The module's tests share one whole pipeline run on S3 (the fixture): about 5 minutes on CI's 2 cores.
pytestmark = [pytest.mark.integration, pytest.mark.s3]
STAGES = ["language", "dedup", "solvability", "difficulty_labels", "difficulty_scorer", "difficulty", "responses",
          "reward", "selection"]


class Root:
    """Reads a run root on S3 with pyarrow (no local copy)."""

    def __init__(self, uri: str, endpoint: str):
        self.storage = Storage(uri, endpoint)

    def manifest(self, stage: str) -> dict:
        return self.storage.manifest(stage)

    def read(self, stage: str, sub: str = "data") -> pd.DataFrame:
        files = self.storage.parquet_files(self.storage.path(stage, sub))
        if not files:
            return pd.DataFrame({"query_id": [], "exclude_reason": []})
        return pa.concat_tables([pq.read_table(f, filesystem=self.storage.fs) for f in files]).to_pandas()

    def excluded(self, stage: str) -> dict:
        df = self.read(stage, "exclusions")
        return dict(zip(df["query_id"], df["exclude_reason"]))


@contextlib.contextmanager
def captured_fds(path: Path):
    """stdout and stderr at the file-descriptor level (Ray's and the engine's lines too) into
    `path`: what capfd does for one test, for a module fixture."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, tiny_reward, ray_cluster, s3_server):
    import boto3

    work = tmp_path_factory.mktemp("full")
    questions, bench = write_chain_inputs(work / "inputs")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="sq-full")
    for f in (questions, bench):
        s3.upload_file(str(f), "sq-full", f"inputs/{f.name}")
    s3.create_bucket(Bucket="sq-models")
    for f in tiny_model.iterdir():
        s3.upload_file(str(f), "sq-models", f"tiny/{f.name}")
    cfg = full_config("s3://sq-models/tiny", tiny_reward, "s3://sq-full/run", f"s3://sq-full/inputs/{questions.name}",
                      f"s3://sq-full/inputs/{bench.name}")
    cfg["storage"]["endpoint_url"] = s3_server
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lines: list[str] = []
    console = work / "console.txt"
    with captured_fds(console):
        results = pipeline.run(load_config(path), echo=lines.append)
    return path, Root("s3://sq-full/run", s3_server), results, lines + [console.read_text(errors="replace")]


def test_filters_drop_with_reasons(full_run):
    _, root, _, _ = full_run
    lang = root.excluded("language")
    assert lang == {"de": "language_de", "zh": "language_zh", "code": "code", "empty": "empty"}
    kept = set(root.read("language")["query_id"])
    assert {"k1", "k2", "k4", "k6"} <= kept  # pi, degree sign, curly quote: kept
    dedup = root.excluded("dedup")
    assert dedup == {"x-dup": "duplicate", "x-near": "near_duplicate", "bench": "contaminated:gsm8k_test"}
    data = root.read("dedup")
    assert sorted(data["query_id"]) == sorted(i for i, _ in CHAIN_QUESTIONS if i.startswith("k"))
    m = root.manifest("dedup")
    assert m["rows_in"] == len(kept) and m["excluded_by_reason"] == {
        "duplicate": 1, "near_duplicate": 1, "contaminated:gsm8k_test": 1}


def test_solvability_and_difficulty(full_run):
    _, root, _, _ = full_run
    judged = pd.concat([root.read("solvability", d) for d in ("data", "exclusions")])
    judged = judged[judged["query_id"].notna()]
    assert len(judged) == 8 and judged["judgement"].notna().all()
    assert judged["judge_output_tokens"].sum() == root.manifest("solvability")["output_tokens"] > 0
    verdicts = root.manifest("solvability")["verdicts"]
    # The constrained judge: every reply is at most 8 characters of reasoning, then a verdict line.
    assert judged["solvable"].notna().all()
    solvable = judged["solvable"].astype(bool)
    assert verdicts == {"yes": int(solvable.sum()), "no": int((~solvable).sum()), "unparseable": 0, "not_judged": 0}
    last_lines = judged["judgement"].str.rsplit("\n", n=1)
    assert (last_lines.str.len() == 2).all() and (last_lines.str[0].str.len() <= 8).all()
    assert last_lines.str[-1].map({"Verdict: Yes": True, "Verdict: No": False}).tolist() == solvable.tolist()
    assert (judged.loc[~solvable, "exclude_reason"] == "unsolvable").all()
    labels = root.read("difficulty_labels")
    assert len(labels) == 12 and (labels["k"] == 2).all()
    assert labels["fail_rate"].between(0, 1).all() and labels["reference_answer"].notna().all()
    scorer = root.manifest("difficulty_scorer")
    assert root.storage.exists(root.storage.path("difficulty_scorer", "model", "model.safetensors"))
    assert scorer["model"] == "s3://sq-full/run/difficulty_scorer/model"
    assert scorer["metrics"]["holdout"] >= 1
    diff = root.manifest("difficulty")
    assert diff["rows_in"] == root.manifest("solvability")["rows"]
    assert diff["excluded_by_reason"].get("too_easy", 0) >= 1  # drop_easiest 0.25
    scored = root.read("difficulty")
    dropped = root.read("difficulty", "exclusions")
    assert scored["difficulty"].min() >= dropped["difficulty"].max()
    # The trained scorer ran on vLLM (classify): it ranks the questions like the HF forward.
    from test_scoring import assert_same_ranking

    from scalequest_ray.models import s3_snapshot
    from scalequest_ray.scoring import Scorer

    both = pd.concat([scored, dropped]).sort_values("query_id")
    scorer_dir = s3_snapshot(scorer["model"], root.storage.endpoint)
    hf = Scorer(model_path=scorer_dir, endpoint=None, out="difficulty", pairs=False, method="sequence_classification",
                max_length=512, dtype="float32", trust_remote_code=False).score(both["query"].tolist())
    assert_same_ranking(hf, both["difficulty"].tolist())


def test_selection_final_dataset_and_funnel(full_run, tmp_path):
    _, root, _, lines = full_run
    responses = root.read("responses")
    rewards = root.read("reward")
    no_response = root.read("reward", "exclusions")
    assert len(rewards) + len(no_response) == len(responses) and rewards["reward"].notna().all()
    assert set(no_response["exclude_reason"]) <= {"no_response"}
    final = root.read("selection")
    questions = set(root.read("difficulty")["query_id"])
    # every question is in the final set, unless all its candidates were dropped (with a reason)
    no_candidate = questions - set(rewards["query_id"])
    assert set(final["query_id"]) == questions - no_candidate
    if no_candidate:
        assert set(no_response["query_id"]) >= no_candidate
    # best-of-n: the chosen candidate has the highest reward of its question
    best = rewards.groupby("query_id")["reward"].max()
    assert (final.set_index("query_id")["reward"] == best.loc[final["query_id"]].values).all()
    assert {"query", "response", "answer", "reward", "majority_answer", "agreement", "solver_model"} <= set(final.columns)
    import datasets

    manifest = root.manifest("selection")
    assert manifest["jsonl_files"]
    ds = datasets.load_dataset("json", data_files=[f"s3://sq-full/run/{f}" for f in manifest["jsonl_files"]],
                               storage_options=storage_options(root.storage.endpoint), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(final) and set(ds["query_id"]) == set(final["query_id"])
    # Missing values are real nulls in Parquet and in JSON Lines, never the string "<NA>".
    table = pa.concat_tables([pq.read_table(f, filesystem=root.storage.fs)
                              for f in root.storage.parquet_files(root.storage.path("selection", "data"))])
    for name in table.column_names:
        assert "<NA>" not in table[name].cast(pa.string()).to_pylist(), name
    parquet_answers = dict(zip(table["query_id"].to_pylist(), table["answer"].to_pylist()))
    assert {q: a for q, a in zip(ds["query_id"], ds["answer"])} == parquet_answers
    assert all(a is None or a.strip() for a in parquet_answers.values())
    funnel = root.storage.read_json(root.storage.path("funnel.json"))["stages"]
    assert [f["stage"] for f in funnel] == [s for s in STAGES if s != "difficulty_scorer"]
    assert funnel[0] == {"stage": "language", "unit": "questions", "rows_in": 15, "kept": 11, "dropped": 4,
                         "dropped_by_reason": {"code": 1, "empty": 1, "language_de": 1, "language_zh": 1}}
    assert any(line.startswith("funnel:") for line in lines)
    by_stage = {f["stage"]: f for f in funnel}
    assert by_stage["responses"]["rows_in"] == len(questions) and by_stage["responses"]["unit"] == "candidates"
    assert by_stage["selection"]["rows_in"] == by_stage["selection"]["kept"] + by_stage["selection"]["dropped"]


def test_rerun_skips_and_deleted_manifest_reruns_from_there(full_run):
    path, root, _, _ = full_run
    cfg = load_config(path)
    before = {s: root.manifest(s)["finished_at"] for s in STAGES}
    again = pipeline.run(cfg, echo=lambda _: None)
    assert all((r.skipped if hasattr(r, "skipped") else True) for r in again)
    assert {s: root.manifest(s)["finished_at"] for s in STAGES} == before
    root.storage.fs.delete_file(root.storage.path("reward", "_manifest.json"))
    pipeline.run(cfg, echo=lambda _: None)
    after = {s: root.manifest(s)["finished_at"] for s in STAGES}
    rerun = [s for s in STAGES if after[s] != before[s]]
    assert rerun == ["reward", "selection"]


def test_run_root_on_s3_is_clean_readable_and_keeps_the_secret(full_run, s3_server, tmp_path):
    import boto3
    import datasets

    _, root, results, console = full_run
    assert not any(r.skipped for r in results if hasattr(r, "skipped"))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="sq-full", Prefix="run/")
            for o in page.get("Contents", [])}
    assert {f"run/{s}/_manifest.json" for s in STAGES} <= keys
    # The scratch of a finished run (expanded requests, Ray Data checkpoints) is gone.
    assert [k for k in keys if "/_work/" in k or "/_checkpoints/" in k or k.endswith("_started.json")] == []
    responses = root.manifest("responses")
    assert {f"run/{f}" for f in responses["files"]} <= keys
    # `run` wrote the dataset card beside the final dataset, with its YAML header.
    assert "run/selection/README.md" in keys
    assert any(line.startswith("dataset card: s3://sq-full/run/selection/README.md") for line in console)
    card_text = s3.get_object(Bucket="sq-full", Key="run/selection/README.md")["Body"].read().decode()
    assert card_text.startswith("---\n") and "size_categories:" in card_text

    # Users read the output with the `datasets` library straight from S3.
    ds = datasets.load_dataset(
        "parquet", data_files="s3://sq-full/run/responses/data/*.parquet",
        storage_options=storage_options(s3_server), split="train", cache_dir=str(tmp_path / "hf"),
    )
    assert len(ds) == responses["rows"] > 0
    assert {"query_id", "sample_idx", "query", "response", "answer", "finish_reason"} <= set(ds.column_names)
    assert len(set(zip(ds["query_id"], ds["sample_idx"]))) == len(ds)
    assert set(ds["solver_model"]) == {"s3://sq-models/tiny"}  # the model was read from S3

    # The secret key never reaches outputs or logs.
    assert any("[responses] done" in line for line in console)
    assert not any(S3_SECRET in line for line in console)
    for key in keys:
        if key.endswith((".json", ".jsonl")):
            assert S3_SECRET not in s3.get_object(Bucket="sq-full", Key=key)["Body"].read().decode()
    assert all(S3_SECRET not in json.dumps(r.manifest if hasattr(r, "manifest") else r) for r in results)


def test_s3_model_snapshots_follow_the_files(tiny_model, s3_server):
    """An s3:// model is copied to a cache folder named after its files (name, size, ETag): a
    tokenizer-only copy is never taken for the model, and a model written again at the same URI
    (a retrained stage's export) is fetched again, never served stale."""
    import boto3

    from scalequest_ray.models import s3_snapshot

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="sq-snap")
    for f in tiny_model.iterdir():
        s3.upload_file(str(f), "sq-snap", f"m/{f.name}")
    tokenizer = Path(s3_snapshot("s3://sq-snap/m", s3_server, suffixes=(".json", ".jinja")))
    model = Path(s3_snapshot("s3://sq-snap/m", s3_server))
    assert tokenizer != model and not (tokenizer / "model.safetensors").exists()
    assert (model / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert s3_snapshot("s3://sq-snap/m", s3_server) == str(model)  # cached
    s3.put_object(Bucket="sq-snap", Key="m/model.safetensors", Body=b"retrained")
    again = Path(s3_snapshot("s3://sq-snap/m", s3_server))
    assert again != model and (again / "model.safetensors").read_bytes() == b"retrained"
    assert not list(again.parent.glob("*.partial-*"))


def test_report_opens_in_headless_chromium(full_run, tmp_path):
    """The run's report (written by `run` to <root>/report/index.html on S3) opened in Debian's
    Chromium through Selenium and chromedriver, off the network: no console errors, every chart
    an SVG with a real size on the page, the funnel numbers on the page equal funnel.json; a
    screenshot is saved beside the report."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, root, _, lines = full_run
    assert any(line.startswith("report: s3://sq-full/run/report/index.html") for line in lines)
    page = tmp_path / "report" / "index.html"
    page.parent.mkdir()
    with root.storage.fs.open_input_stream(root.storage.path("report", "index.html")) as f:
        page.write_bytes(f.read())
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,2400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        charts = driver.execute_script(
            "return [...document.querySelectorAll('figure.chart')].map(f => {"
            " const s = f.querySelector('svg'); const r = s ? s.getBoundingClientRect() : null;"
            " return [f.dataset.chart, s ? s.childElementCount : 0, r ? r.width : 0, r ? r.height : 0]; })")
        assert len(charts) >= 5, charts  # funnel, lengths, difficulty, reward, agreement, answers
        assert all(n > 0 and w > 100 and h > 50 for _, n, w, h in charts), charts
        shown = driver.execute_script(
            "return [...document.querySelectorAll('#funnel tr[data-stage]')].map(r =>"
            " [r.dataset.stage, +r.dataset.rowsIn, +r.dataset.kept, +r.dataset.dropped])")
        funnel = root.storage.read_json(root.storage.path("funnel.json"))["stages"]
        assert shown == [[f["stage"], f["rows_in"], f["kept"], f["dropped"]] for f in funnel]
        shot = page.parent / "screenshot.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        with root.storage.fs.open_output_stream(root.storage.path("report", "screenshot.png")) as f:
            f.write(shot.read_bytes())  # beside the report
    finally:
        driver.quit()


def test_grouping_shuffles_at_most_the_partition_count_of_blocks(ray_cluster):
    """Ray Data's sort shuffle gives a groupby as many outputs as inputs (num_partitions is read
    for the hash shuffle only): n input blocks, n^2 pieces owned by the driver. shuffle.groupby
    coalesces to the partition count first. At 1M questions that took dedup's driver from 816 to
    261 MiB (README, "The rehearsal"); the counts must not change."""
    import ray

    from scalequest_ray import shuffle
    from scalequest_ray.engine import configure_data_context

    configure_data_context()
    ds = ray.data.range(3000, override_num_blocks=30).map_batches(lambda b: {"k": b["id"] % 300})
    # The behaviour the helper works around: one output block per input block.
    assert ds.groupby("k", num_partitions=3).count().materialize().num_blocks() == 30
    counted = shuffle.groupby(ds, "k", 3).count().materialize()
    assert counted.num_blocks() <= 3
    assert dict(zip(*(counted.to_pandas()[c].tolist() for c in ("k", "count()")))) == {k: 10 for k in range(300)}
