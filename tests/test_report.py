"""The run report, the cost table and estimate, and the dataset card, on a small run root written
by hand (manifests, funnel.json and Parquet shaped like the runner's): no Ray, no model."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scalequest_ray import card, cost, report
from scalequest_ray.config import RunConfig
from scalequest_ray.stages.selection import SCHEMA as SELECTION_SCHEMA

pytestmark = pytest.mark.unit

SCRIPT = "<script>alert('x')</script>"
LONG = "How many " + "very " * 200 + "long questions are there?"


def run_config(root, num_questions=40, n=2) -> RunConfig:
    gpu = {"replicas": [1, 2], "gpus_per_replica": 1, "cpus_per_replica": 4, "accelerator_type": "A100"}
    return RunConfig.model_validate({
        "name": "tiny-report", "root": str(root), "seed": 7,
        "models": {"gen": {"path": "Qwen/Qwen2-Math-7B-Instruct", "scale": gpu},
                   "scorer": {"path": "org/difficulty-scorer", "scale": gpu},
                   "rm": {"path": "internlm/internlm2-7b-reward", "scale": gpu}},
        "stages": {
            "questions": {"generators": [{"name": "g1", "model": "gen", "num_questions": num_questions // 2},
                                         {"name": "g2", "model": "gen", "num_questions": num_questions // 2}]},
            "language": {}, "difficulty": {"model": "scorer", "drop_easiest": 0.1},
            "responses": {"model": "gen", "n": n}, "reward": {"model": "rm"}, "selection": {},
            "qft": {"model": "gen", "gpus_per_worker": 1, "resources": {"accelerator_type:H100": 0.001}},
        },
        "pipeline": ["qft", "questions", "language", "difficulty", "responses", "reward", "selection"],
    })


def _resources(gpu_s: float, cpu_only_s: float, node_seconds=None) -> dict:
    pools = {"Tokenize": {"replicas": {"min": 1, "mean": 1.0, "max": 1}, "cpus_each": 1, "gpus_each": 0,
                          "cpu_seconds": cpu_only_s, "gpu_seconds": 0.0}}
    if gpu_s:
        pools["vLLMEngineStageUDF"] = {"replicas": {"min": 1, "mean": 1.5, "max": 2}, "cpus_each": 4, "gpus_each": 1,
                                       "cpu_seconds": 4 * gpu_s, "gpu_seconds": gpu_s}
    out = {"window_seconds": 100.0, "pools": pools, "cpu_seconds": cpu_only_s + 4 * gpu_s, "gpu_seconds": gpu_s}
    return {**out, "node_seconds": node_seconds} if node_seconds else out


def _write(root: Path, stage: str, kept: list[dict], excluded: list[dict], cfg: RunConfig, rows_in=None,
           tokens=None, gpu_s=0.0, schema=None, split=1, **extra) -> dict:
    for sub, rows in (("data", kept), ("exclusions", excluded)):
        if rows:
            (root / stage / sub).mkdir(parents=True, exist_ok=True)
            step = -(-len(rows) // (split if sub == "data" else 1))
            for i in range(0, len(rows), step):
                part = rows[i:i + step]
                table = pa.Table.from_pylist(part, schema=None if sub == "exclusions" or schema is None else schema)
                pq.write_table(table, root / stage / sub / f"part-{i:03d}.parquet")
    reasons: dict = {}
    for r in excluded:
        reasons[r["exclude_reason"]] = reasons.get(r["exclude_reason"], 0) + 1
    m = {"stage": stage, "rows": len(kept), "excluded_rows": len(excluded), "excluded_by_reason": reasons,
         "output_tokens": sum(r.get(tokens, 0) for r in kept + excluded) if tokens else 0, "seconds": 120.0,
         "started_at": 1.0, "finished_at": 121.0, "config_hash": f"hash-{stage}", "upstream": None,
         "rows_in": rows_in, "config": cfg.section(stage).model_dump(mode="json"),
         "resources": _resources(gpu_s, 36.0, extra.pop("node_seconds", None)), **extra}
    (root / stage).mkdir(parents=True, exist_ok=True)
    (root / stage / "_manifest.json").write_text(json.dumps(m))
    return m


@pytest.fixture
def run_root(tmp_path) -> Path:
    root = tmp_path / "run"
    cfg = run_config(root)
    gen = "Qwen/Qwen2-Math-7B-Instruct"
    qs = [{"query_id": f"g{i % 2 + 1}-{i:09d}", "query": f"Tom has {i} apples and buys {i + 3} more. How many now?",
           "generator": f"g{i % 2 + 1}", "generator_model": gen, "seed": 100 + i, "sampling": "{}",
           "finish_reason": "stop", "num_input_tokens": 12, "num_output_tokens": 20 + i % 5} for i in range(40)]
    bad = {0: ("truncated", LONG), 1: ("truncated", SCRIPT), 2: ("empty", ""), 3: ("empty", "Hm")}
    q_excl = [{**q, "query": bad[i][1], "exclude_reason": bad[i][0]} for i, q in enumerate(qs[:4])]
    q_kept = qs[4:]
    manifests = [_write(root, "questions", q_kept, q_excl, cfg, rows_in=40, tokens="num_output_tokens", gpu_s=360.0,
                        question_quality={"wellformed": 30, "no_question": 10}, node_seconds={"gpu-a100": 400.0, "head": 400.0})]
    lang_excl = [{**q, "exclude_reason": "not_english"} for q in q_kept[:4]]
    lang_excl[0]["query"] = "Quelle est la " + SCRIPT
    lang = q_kept[4:]
    manifests.append(_write(root, "language", lang, lang_excl, cfg, rows_in=36))
    scored = [{**q, "difficulty": round(0.02 * i, 3)} for i, q in enumerate(lang)]
    diff_excl = [{**q, "exclude_reason": "too_easy"} for q in scored[:3]]
    diff = scored[3:]
    manifests.append(_write(root, "difficulty", diff, diff_excl, cfg, rows_in=32, gpu_s=72.0))
    cands = [{"query_id": q["query_id"], "response_id": f"{q['query_id']}#{k}", "sample_idx": k, "query": q["query"],
              "response": f"We add. The answer is \\boxed{{{i + k % 2}}}.", "answer": None if (i + k) % 7 == 0 else str(i + k % 2),
              "solver_model": gen, "finish_reason": "stop", "num_input_tokens": 40, "num_output_tokens": 100 + k}
             for i, q in enumerate(diff) for k in range(2)]
    resp_excl = [{**c, "exclude_reason": "no_answer"} for c in cands if c["answer"] is None][:4]
    resp = [c for c in cands if c["response_id"] not in {e["response_id"] for e in resp_excl}]
    manifests.append(_write(root, "responses", resp, resp_excl, cfg, rows_in=len(diff), tokens="num_output_tokens", gpu_s=720.0))
    rewarded = [{**c, "reward": 0.1 * (i % 10) - 0.3, "reward_model": "internlm/internlm2-7b-reward"} for i, c in enumerate(resp)]
    manifests.append(_write(root, "reward", rewarded, [], cfg, rows_in=len(resp), gpu_s=180.0))
    final = [{"query_id": qid, "query": c["query"], "response": c["response"], "answer": c["answer"], "reward": c["reward"],
              "majority_answer": c["answer"], "agreement": 0.5 if c["answer"] is None else 1.0,
              "agrees_with_majority": None if c["answer"] is None else True, "num_candidates": 2, "sample_idx": c["sample_idx"],
              "solver_model": gen, "reward_model": c["reward_model"], "seed": 7, "sampling": '{"temperature": 0.7}'}
             for qid, c in {c["query_id"]: c for c in rewarded}.items()]
    sel_excl = [{**r, "exclude_reason": "low_agreement"} for r in final[:2]]
    sel = final[2:]
    assert any(r["answer"] is None for r in sel)
    schema = pa.schema([f for f in SELECTION_SCHEMA if f.name != "exclude_reason"])
    manifests.append(_write(root, "selection", sel, sel_excl, cfg, rows_in=len(rewarded), schema=schema, split=2))
    (root / "selection" / "jsonl").mkdir()
    (root / "selection" / "jsonl" / "part-000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sel))
    (root / "qft").mkdir()
    (root / "qft" / "_manifest.json").write_text(json.dumps({
        "stage": "qft", "model": str(root / "qft" / "model"), "config_hash": "hash-qft", "seconds": 50.0, "finished_at": 0.5,
        "metrics": {"steps": 10, "first_loss": 2.51234567, "final_loss": 1.2}, "config": cfg.section("qft").model_dump(mode="json"),
        "resources": _resources(90.0, 0.0)}))
    funnel = [{"stage": m["stage"], "unit": "candidates" if m["stage"] in ("responses", "reward") else "questions",
               "rows_in": m["rows_in"], "kept": m["rows"], "dropped": m["excluded_rows"],
               "dropped_by_reason": m["excluded_by_reason"]} for m in manifests]
    funnel[0]["wellformed"] = {"share": 0.75, "of": 40, "wellformed": 30, "no_question": 10}
    (root / "funnel.json").write_text(json.dumps({"stages": funnel}))
    return root


class _Collect(HTMLParser):
    """Attributes of the rows of <table id="funnel">."""

    def __init__(self):
        super().__init__()
        self.table, self.rows = None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
        elif tag == "tr" and self.table == "funnel" and "data-stage" in attrs:
            self.rows.append(attrs)


def test_report_is_one_offline_page_with_charts_and_the_funnel(run_root):
    path = report.build_report(str(run_root))
    assert path == str(run_root / "report" / "index.html")
    html = Path(path).read_text()
    assert not re.search(r"https?://", html)  # nothing fetched, not even a namespace or DTD URL
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html) and "<script" not in html
    figures = re.findall(r'<figure class="chart" data-chart="([\w-]+)">(.*?)</figure>', html, re.S)
    assert {n for n, _ in figures} == {"funnel", "question_length", "difficulty", "reward", "agreement", "answer_presence"}
    for name, body in figures:
        svg = re.search(r"<svg\b[^>]*>(.*)</svg>", body, re.S)
        assert svg and "<path" in svg.group(1), name
    parser = _Collect()
    parser.feed(html)
    funnel = json.loads((run_root / "funnel.json").read_text())["stages"]
    assert [(r["data-stage"], int(r["data-rows-in"]), int(r["data-kept"]), int(r["data-dropped"])) for r in parser.rows] == \
        [(r["stage"], r["rows_in"], r["kept"], r["dropped"]) for r in funnel]
    assert "10 steps, loss 2.512 -&gt; 1.200" in html  # the note is text: autoescaped
    assert "<td>30 of 40 (0.75)</td>" in html  # well-formed questions, as the console prints them


def test_report_escapes_and_cuts_example_text(run_root, tmp_path):
    html = Path(report.build_report(str(run_root), out_dir=str(tmp_path / "out"))).read_text()
    assert SCRIPT not in html and "&lt;script&gt;alert(" in html
    assert "Quelle est la &lt;script&gt;" in html  # language's not_english examples
    assert LONG not in html and LONG[:report.CUT] in html
    assert "truncated (2)" in html and "no_answer (" in html  # reasons with their counts
    assert html.count("<tr><td><pre>") >= 2  # final pairs shown


def test_report_with_prices_and_a_partial_run(run_root, tmp_path):
    html = Path(report.build_report(str(run_root), prices={"A100": 1.30, "default": 2.0},
                                    cfg=run_config(run_root))).read_text()
    assert "$0.13" in html  # questions: 0.1 A100-hours x $1.30
    assert "vLLMEngineStageUDF: 1/1.5/2" in html and "10 steps" in html
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("questions", "funnel.json"):
        src = run_root / name
        (partial / name).write_bytes(src.read_bytes()) if src.is_file() else __import__("shutil").copytree(src, partial / name)
    page = Path(report.build_report(str(partial))).read_text()
    assert re.findall(r'data-chart="(\w+)"', page) == ["funnel", "question_length"]
    assert 'data-skipped-chart="reward"' in page and "no reward stage" in page


def test_cost_table_sums_held_resources(run_root):
    prices = {"A100": 1.30, "H100": 3.0, "cpu": 0.05, "default": 2.0}
    rows = cost.cost_table(str(run_root), prices, cfg=run_config(run_root))
    by = {r["stage"]: r for r in rows}
    assert list(by) == ["qft", "questions", "language", "difficulty", "responses", "reward", "selection"]
    assert sum(r["gpu_hours"] for r in rows) == pytest.approx((90 + 360 + 72 + 720 + 180) / 3600)
    assert by["qft"]["accelerator"] == "H100" and by["responses"]["accelerator"] == "A100"
    assert by["responses"]["cost"] == pytest.approx(0.2 * 1.30 + 36 / 3600 * 0.05)
    assert by["language"]["cost"] == pytest.approx(36 / 3600 * 0.05)  # CPU only
    assert by["questions"]["node_hours"] == {"gpu-a100": pytest.approx(400 / 3600), "head": pytest.approx(400 / 3600)}
    # every node type priced: billed per node-hour instead
    node_priced = cost.cost_table(str(run_root), {**prices, "gpu-a100": 4.0, "head": 0.5})
    assert {r["stage"]: r for r in node_priced}["questions"]["cost"] == pytest.approx(400 / 3600 * 4.5)
    assert cost.cost_table(str(run_root), {"A100": 1.0})[3]["cost"] is None  # no price for a stage without a known accelerator
    text = cost.format_cost(rows)
    total = text.splitlines()[-1].split()
    assert total[0] == "total" and total[3] == f"{1422 / 3600:.3f}"
    assert total[-1] == f"${sum(r['cost'] for r in rows):,.2f}"


def test_estimate_scales_with_the_config_and_prints_table4(run_root):
    small = cost.estimate(run_config(run_root), str(run_root))
    big = cost.estimate(run_config(run_root, num_questions=400_000, n=4), str(run_root))
    s, b = {r["stage"]: r for r in small}, {r["stage"]: r for r in big}
    q = s["questions"]
    assert q["target_rows"] == 40 and q["tok_s"] == cost.THROUGHPUT["generate"]["A100"]
    assert q["gpu_hours"] == pytest.approx(sum(20 + i % 5 for i in range(40)) / 3800 / 3600)
    assert b["questions"]["gpu_hours"] == pytest.approx(10_000 * q["gpu_hours"])
    # downstream stages follow the questions; from responses on, also n 2 -> 4
    for stage, factor in (("language", 10_000), ("difficulty", 10_000), ("responses", 20_000), ("reward", 20_000)):
        assert b[stage]["target_rows"] == factor * s[stage]["target_rows"], stage
    for stage, factor in (("difficulty", 10_000), ("responses", 20_000), ("reward", 20_000)):
        assert b[stage]["gpu_hours"] == pytest.approx(factor * s[stage]["gpu_hours"]) and s[stage]["gpu_hours"] > 0
    # a scorer reads the question (difficulty), the question and the response (reward)
    assert s["reward"]["tokens_per_row"] == pytest.approx(s["responses"]["tokens_per_row"] + q["tokens_per_row"])
    assert s["language"]["gpu_hours"] == 0 and s["qft"]["gpu_hours"] is None
    paper = cost.estimate(run_config(run_root), str(run_root), throughput=cost.PAPER_THROUGHPUT)
    assert paper[1]["gpu_hours"] == pytest.approx(q["gpu_hours"] * 3800 / 2200)
    text = cost.format_estimate(big)
    assert "522.9" in text and "$681" in text and "response generation" in text
    assert re.search(r"solvability \+ difficulty\s+110\.6\s+difficulty\s", text)


def test_size_categories_are_the_hub_labels():
    assert [card.size_category(n) for n in (0, 999, 1000, 9999, 10_000, 999_999, 1_000_000, 2 * 10**12)] == \
        ["n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "n>1T"]


def test_card_loads_with_datasets(run_root, tmp_path, monkeypatch):
    path = card.write_card(str(run_root), run_config(run_root).model_dump(mode="json"), license="cc-by-4.0")
    text = Path(path).read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    assert front["license"] == "cc-by-4.0" and front["size_categories"] == ["n<1K"] and front["language"] == ["en"]
    assert front["task_categories"] == ["question-answering", "text-generation"]
    assert set(front["tags"]) == {"math", "synthetic", "scalequest"}
    assert "Run seed: 7" in text and "hash-responses" in text and "gen (Qwen/Qwen2-Math-7B-Instruct)" in text
    assert "| language | questions | 36 | 32 | not_english: 4 |" in text
    assert "| language | - |" in text  # rows carry the generator's model on: not language's

    import datasets

    # Offline for this test only: datasets reads HF_HUB_OFFLINE once, when first imported, so the
    # environment variable set here stayed set for every later test in the same worker (the S3
    # pipeline test's load_dataset from s3:// then failed as "offline").
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    ds = datasets.load_dataset(str(run_root / "selection"), cache_dir=str(tmp_path / "hf" / "datasets"))
    assert list(ds) == ["train"]
    expected = pq.read_table(run_root / "selection" / "data").to_pylist()
    got = ds["train"].to_list()
    assert len(got) == len(expected) == 27
    assert sorted(got, key=lambda r: r["query_id"]) == sorted(expected, key=lambda r: r["query_id"])
    assert any(r["answer"] is None and r["agrees_with_majority"] is None for r in got)
    features = ds["train"].features
    assert (features["answer"].dtype, features["reward"].dtype, features["num_candidates"].dtype,
            features["agrees_with_majority"].dtype) == ("string", "float64", "int64", "bool")


def test_publish_dry_run_and_missing_token(run_root, monkeypatch):
    card.write_card(str(run_root), None)
    files = card.publish(str(run_root), "someone/tiny", dry_run=True)
    assert files == ["README.md", "data/part-000.parquet", "data/part-014.parquet", "jsonl/part-000.jsonl"]
    monkeypatch.delenv("SQ_TEST_HF_TOKEN", raising=False)
    with pytest.raises(ValueError) as err:
        card.publish(str(run_root), "someone/tiny", token_env="SQ_TEST_HF_TOKEN")
    assert "SQ_TEST_HF_TOKEN" in str(err.value) and "\n" not in str(err.value)


def test_estimate_labels_every_problem_of_known_splits():
    """With no max_problems the labels stage reads its whole sources: the paper's GSM8K + MATH
    algebra train splits are 7,473 + 1,744 problems, against the 8 a demo run labelled (k 3 -> 8)."""
    measured = {"rows": 8, "excluded_rows": 0, "config": {"k": 3, "max_problems": 8}}
    paper = {"k": 8, "max_problems": None, "sources": [
        {"hub": "openai/gsm8k", "subset": "main", "split": "train"},
        {"hub": "EleutherAI/hendrycks_math", "subset": "algebra", "split": "train"}]}
    assert cost._scale("difficulty_labels", paper, measured, 1.0) == pytest.approx(8 / 3 * (7473 + 1744) / 8)
    assert cost._scale("difficulty_labels", {**paper, "max_problems": 100}, measured, 1.0) == pytest.approx(8 / 3 * 100 / 8)
    unknown = {**paper, "sources": [{"path": "my.parquet"}]}
    assert cost._scale("difficulty_labels", unknown, measured, 1.0) == pytest.approx(8 / 3)  # no size known: as measured
