"""Tiny random model through real Ray Data + vLLM (CPU): the two stages, manifests, re-runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import tiny_config
from scalequest_ray import pipeline
from scalequest_ray.config import load_config
from scalequest_ray.storage import InputError

pytestmark = pytest.mark.integration


def _read(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) if files else pd.DataFrame()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, ray_cluster):
    """One full questions -> responses run, shared by the tests below (engines are slow to start)."""
    root = tmp_path_factory.mktemp("tiny_run") / "root"
    cfg_path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_model, str(root))))
    cfg = load_config(cfg_path)
    results = pipeline.run(cfg)
    return cfg_path, root, results


def test_questions_stage_rows_ids_seeds(tiny_run):
    _, root, results = tiny_run
    q = root / "questions"
    manifest = json.loads((q / "_manifest.json").read_text())
    kept, excluded = _read(q / "data"), _read(q / "exclusions")
    # every generated row is accounted for: kept or excluded with a reason
    assert len(kept) + len(excluded) == 24
    assert manifest["rows"] == len(kept) and manifest["excluded_rows"] == len(excluded)
    assert sum(manifest["excluded_by_reason"].values()) == len(excluded)
    everything = pd.concat([kept, excluded.drop(columns=["exclude_reason"])], ignore_index=True)
    assert everything["query_id"].is_unique and set(everything["query_id"]) == {f"tiny-{i:09d}" for i in range(24)}
    assert everything["seed"].is_unique
    # distinct seeds really give distinct samples
    assert everything["query"].nunique() > 18
    assert set(excluded["exclude_reason"]) <= {"truncated", "empty", "engine_error"}
    assert (excluded[excluded.exclude_reason == "truncated"]["finish_reason"] == "length").all()
    assert (kept["finish_reason"] == "stop").all() and (kept["query"].str.len() > 0).all()
    assert (kept["num_output_tokens"] <= 24).all()
    sampling = json.loads(kept["sampling"].iloc[0])
    assert sampling["temperature"] == 1.0 and sampling["top_p"] == 0.99 and sampling["max_tokens"] == 24
    assert kept["generator_model"].iloc[0].endswith("tiny-llama-test")
    assert len(manifest["files"]) >= 1 and manifest["stage"] == "questions"
    # The quality of everything the generator wrote, counted in the write tasks, in the funnel.
    from collections import Counter

    from scalequest_ray.quality import wellformed_reason

    expected = Counter(wellformed_reason(q) or "wellformed" for q in everything["query"])
    assert manifest["question_quality"] == dict(expected) and sum(expected.values()) == 24
    row = json.loads((root / "funnel.json").read_text())["stages"][0]
    assert row["stage"] == "questions" and row["wellformed"]["of"] == 24
    assert row["wellformed"]["share"] == round(expected["wellformed"] / 24, 4)


def test_responses_stage_n_candidates_per_question(tiny_run):
    _, root, _ = tiny_run
    questions = _read(root / "questions" / "data")
    responses = _read(root / "responses" / "data")
    assert len(responses) == 3 * len(questions)
    assert set(responses["query_id"]) == set(questions["query_id"])
    assert (responses.groupby("query_id")["sample_idx"].apply(sorted).map(list) == [[0, 1, 2]] * len(questions)).all()
    assert responses["seed"].is_unique
    assert responses["response"].nunique() > len(responses) // 2
    assert set(responses["finish_reason"]) <= {"stop", "length"}
    assert {"answer", "answer_format", "solver_model", "num_input_tokens"} <= set(responses.columns)


def test_manifest_is_written_after_every_shard(tiny_run):
    _, root, _ = tiny_run
    for stage in ("questions", "responses"):
        manifest = root / stage / "_manifest.json"
        shards = list((root / stage).rglob("*.parquet"))
        assert shards and all(s.stat().st_mtime <= manifest.stat().st_mtime for s in shards)
        listed = json.loads(manifest.read_text())["files"]
        assert sorted(str(s.relative_to(root)) for s in (root / stage / "data").glob("*.parquet")) == sorted(listed)
        assert not (root / stage / "_work").exists() and not (root / "_checkpoints" / stage).exists()


def test_rerun_skips_finished_stages_and_half_written_stage_reruns(tiny_run):
    cfg_path, root, _ = tiny_run
    cfg = load_config(cfg_path)
    before = {s: (root / s / "_manifest.json").read_text() for s in ("questions", "responses")}
    results = pipeline.run(cfg)
    assert [r.skipped for r in results] == [True, True]
    assert {s: (root / s / "_manifest.json").read_text() for s in before} == before

    # A stage whose manifest is missing is unfinished: its leftovers are cleared and it reruns.
    # The rerun reproduces the same rows (same seeds).
    old_questions = _read(root / "questions" / "data").sort_values("query_id").reset_index(drop=True)
    (root / "questions" / "_manifest.json").unlink()
    stray = root / "questions" / "data" / "stray-half-written.parquet"
    stray.write_bytes(b"PAR1 not really")
    results = pipeline.run(cfg, stages=["questions"])
    assert not results[0].skipped and not stray.exists()
    new_questions = _read(root / "questions" / "data").sort_values("query_id").reset_index(drop=True)
    pd.testing.assert_series_equal(old_questions["query"], new_questions["query"])
    # The downstream stage depends on the upstream COMMIT, so it is due to rerun too.
    from scalequest_ray.chain import resolve_input
    from scalequest_ray.storage import Storage

    recorded = json.loads((root / "responses" / "_manifest.json").read_text())["upstream"]
    assert recorded.startswith("questions:") and resolve_input(cfg, Storage(cfg.root), "responses").upstream != recorded


def test_responses_from_user_file_with_bad_rows(tiny_run, tmp_path):
    cfg_path, root, _ = tiny_run
    rows = [
        {"query": "What is 12 * 7?"},
        {"query": "A train travels 60 km in 1.5 hours. What is its average speed in km/h?"},
        {"query": "x" * 50_000},                         # 50k characters: excluded, not a crash
        {"query": "   "},                                # blank
        {"query": " ".join(["seven"] * 600)},            # under the char limit but over the context
    ]
    src = tmp_path / "user_questions.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(cfg_path, [f"stages.responses.input={src}", f"root={tmp_path / 'user_run'}",
                                 "stages.responses.n=2"])
    result = pipeline.run(cfg, stages=["responses"])[0]
    out = tmp_path / "user_run" / "responses"
    kept, excluded = _read(out / "data"), _read(out / "exclusions")
    assert len(kept) == 4 and kept["query_id"].nunique() == 2
    reasons = excluded.groupby("exclude_reason")["query_id"].nunique().to_dict()
    assert reasons == {"query_too_long": 1, "empty_query": 1, "engine_error": 1}
    engine_errors = excluded[excluded.exclude_reason == "engine_error"]
    assert engine_errors["error"].str.contains("context length|maximum", case=False).all()
    assert len(engine_errors) == 2  # both sampled candidates of the over-long question
    assert result.manifest["excluded_by_reason"] == {"query_too_long": 1, "empty_query": 1, "engine_error": 2}
    # Exactly once, by id: every input question's n candidates (or its one rejected row).
    from scalequest_ray.stages.responses import stable_query_id

    qids = {r["query"]: stable_query_id(r["query"]) for r in rows}
    expected = {f"{qids[r['query']]}#{k}" for r in rows[:2] + rows[4:] for k in range(2)} | {
        f"{qids[r['query']]}#-" for r in rows[2:4]}
    written = list(kept["response_id"]) + list(excluded["response_id"])
    assert len(written) == len(set(written)) and set(written) == expected


@pytest.mark.parametrize("content, message", [
    ('{"question": "What is 1+1?"}\n', "has no 'query' column (columns: question)"),
    ("", "is empty"),
])
def test_bad_input_file_fails_before_engines(tiny_run, tmp_path, content, message):
    cfg_path, _, _ = tiny_run
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    cfg = load_config(cfg_path, [f"stages.responses.input={src}", f"root={tmp_path / 'r'}"])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipeline.run(cfg, stages=["responses"])
    assert not (tmp_path / "r" / "responses").exists()


def test_empty_parquet_input(tiny_run, tmp_path):
    import pyarrow as pa

    cfg_path, _, _ = tiny_run
    src = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"query": pa.array([], pa.string())}), src)
    cfg = load_config(cfg_path, [f"stages.responses.input={src}", f"root={tmp_path / 'r'}"])
    with pytest.raises(InputError, match="has no rows"):
        pipeline.run(cfg, stages=["responses"])


def test_responses_need_finished_questions(tiny_run, tmp_path):
    cfg_path, _, _ = tiny_run
    cfg = load_config(cfg_path, [f"root={tmp_path / 'fresh'}"])
    with pytest.raises(InputError, match="questions stage has not finished"):
        pipeline.run(cfg, stages=["responses"])
