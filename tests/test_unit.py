"""Fast unit tests: config, prompts, seeds, answer extraction, storage. No model, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from scalequest_ray.config import ConfigError, apply_overrides, load_config
from scalequest_ray.storage import Storage
from scalequest_ray.text import derive_seed, extract_answer, extract_boxed, finish_reason, turn_template

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def _demo_raw(tmp_path) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    raw["models"]["smollm2"]["path"] = str(model_dir)
    return raw


def _load(tmp_path, raw, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, list(overrides))


# --- config -----------------------------------------------------------------------------------

def test_demo_and_paper_configs_load(tmp_path):
    cfg = _load(tmp_path, _demo_raw(tmp_path))
    assert cfg.stages.questions.sampling.temperature == 1.0 and cfg.stages.responses.n == 3
    paper = load_config(REPO / "configs" / "paper_gpu.yaml")
    assert paper.models["qwen2-math-instruct"].scale.gpus_per_replica == 1
    assert paper.models["qwen2-math-instruct"].scale.replicas == (1, 16)
    assert paper.root.startswith("s3://")


@pytest.mark.parametrize("override, expected", [
    (["models.smollm2.engine.bogus=1"], "models.smollm2.engine.bogus: unknown field"),
    (["models.smollm2.scale.batch_size=lots"], "models.smollm2.scale.batch_size: Input should be a valid integer"),
    (["models.smollm2.path=/does/not/exist"], "models.smollm2.path: local model directory /does/not/exist does not exist"),
    (["stages.responses.model=ghost"], "stages.responses.model: model 'ghost' is not defined under models"),
    (["models.smollm2.scale.replicas=[3, 1]"], "replicas must be (min, max) with 1 <= min <= max"),
    (["storage.stage_rows_per_file={responses: 0}"], "stage_rows_per_file.responses must be > 0"),
    (["storage.stage_rows_per_file={respones: 10}"], "storage.stage_rows_per_file.respones"),
])
def test_config_errors_are_one_clear_line(tmp_path, override, expected):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, _demo_raw(tmp_path), override)
    message = str(err.value)
    assert expected in message and "\n" not in message


def test_missing_model_section(tmp_path):
    raw = _demo_raw(tmp_path)
    del raw["models"]["smollm2"]["path"]
    with pytest.raises(ConfigError, match=r"models\.smollm2\.path: required field is missing"):
        _load(tmp_path, raw)


def test_overrides_parse_yaml_values_and_list_indices(tmp_path):
    cfg = _load(tmp_path, _demo_raw(tmp_path), [
        "stages.questions.generators.0.num_questions=7", "models.smollm2.scale.replicas=[1, 4]",
        "stages.responses.sampling.temperature=0.5", "root=s3://bucket/x",
    ])
    assert cfg.stages.questions.generators[0].num_questions == 7
    assert cfg.models["smollm2"].scale.replicas == (1, 4)
    assert cfg.stages.responses.sampling.temperature == 0.5 and cfg.root == "s3://bucket/x"
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"a": [1]}, ["a.5=2"])


def test_fingerprint_ignores_scale_but_not_sampling(tmp_path):
    raw = _demo_raw(tmp_path)
    base = _load(tmp_path, raw).stage_fingerprint("questions")
    assert _load(tmp_path, raw, ["models.smollm2.scale.replicas=[1, 8]"]).stage_fingerprint("questions") == base
    assert _load(tmp_path, raw, ["stages.questions.sampling.top_p=0.9"]).stage_fingerprint("questions") != base
    assert _load(tmp_path, raw).stage_fingerprint("responses", "questions:a") != \
        _load(tmp_path, raw).stage_fingerprint("responses", "questions:b")


def test_cli_rejects_bad_config_fast_before_ray(tmp_path):
    raw = _demo_raw(tmp_path)
    raw["stages"]["questions"]["sampling"]["temprature"] = 1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "scalequest_ray.cli", "run", str(path)],
                          capture_output=True, text=True)
    elapsed = time.time() - start
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: stages.questions.sampling.temprature: unknown field"]
    assert elapsed < 3.0  # includes interpreter start; the check itself is well under a second


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


# --- prompts ----------------------------------------------------------------------------------

class _Tok:
    """Just enough of a tokenizer to render a chat template (no model files needed)."""

    def __init__(self, template, specials, eos):
        from jinja2 import Template

        self.chat_template, self._t, self.all_special_tokens, self.eos_token = template, Template(template), specials, eos

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self._t.render(messages=messages, add_generation_prompt=add_generation_prompt)


CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_turn_template_chatml_with_system_prompt():
    t = turn_template(_Tok(CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"))
    assert t.prefix == "<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\n"
    assert t.suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert t.end_of_turn == "<|im_end|>"
    assert t.wrap("What is 2+2?") == t.prefix + "What is 2+2?" + t.suffix


def test_turn_template_llama3():
    t = turn_template(_Tok(LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"], "<|eot_id|>"))
    assert t.prefix == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert t.end_of_turn == "<|eot_id|>"
    assert t.suffix.startswith("<|eot_id|><|start_header_id|>assistant")


def test_turn_template_requires_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        turn_template(NoTemplate())


# --- seeds, answers ---------------------------------------------------------------------------

def test_seeds_are_deterministic_distinct_and_in_range():
    seeds = [derive_seed(1234, "questions", "gen", i) for i in range(100_000)]
    assert seeds == [derive_seed(1234, "questions", "gen", i) for i in range(100_000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "a", 0) != derive_seed(2, "a", 0) != derive_seed(1, "b", 0)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{ 2 }", "2"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{a^{b^{c}}} and \fbox{7}", "7"),
    (r"\boxed{unclosed", None),
    ("no box here", None),
    ("", None),
    (None, None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    # boxes: the last one wins, nesting handled, content kept as LaTeX
    (r"\boxed{3}, so the answer is 4.", ("3", "boxed")),
    (r"First \boxed{3} then \boxed{\sqrt{2}}", (r"\sqrt{2}", "boxed")),
    (r"so \boxed{\frac{\sqrt{3}}{2}}.", (r"\frac{\sqrt{3}}{2}", "boxed")),
    (r"The final answer is $\boxed{(2, 3)}$", ("(2, 3)", "boxed")),
    (r"The answer is \boxed{10\%}", (r"10\%", "boxed")),
    (r"\boxed{\pi}", (r"\pi", "boxed")),
    # stated answers, extracted by math-verify after an anchor
    ("Adding them, the answer is 17.", ("17", "answer_is")),
    ("The answer is $\\frac{1}{2}$.", (r"\frac{1}{2}", "answer_is")),
    ("Final answer: $x = 2$\n", ("x = 2", "answer_is")),
    ("Therefore the answer is 150 km.", ("150", "answer_is")),
    ("The answer is 1,000 apples", ("1000", "answer_is")),
    ("**Answer:** 25", ("25", "answer_is")),
    ("Answer: $5\\sqrt{2}$ cm", (r"5\sqrt{2}", "answer_is")),
    # non-answers are null, never a string
    ("She has 5 apples and buys more. I think this is a nice problem.", (None, None)),
    ("I do not know", (None, None)),
    ("the answer is that we cannot know", (None, None)),
    (r"It is \boxed{}.", (None, None)),
    (r"It is \boxed{ }, the answer is 4.", (None, None)),
    (r"\boxed{:}", (None, None)),
    ("- The answer is:", (None, None)),
    ("The answer is: ```python\nprint(1)\n```", (None, None)),
    ("```", (None, None)),
    ("", (None, None)),
    (None, (None, None)),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_finish_reason():
    assert finish_reason(10, 10, 5, [2]) == "length"
    assert finish_reason(10, 10, 2, [2]) == "stop"
    assert finish_reason(3, 10, 2, [2]) == "stop"


# --- storage ----------------------------------------------------------------------------------

def test_manifest_counts_from_footers_and_commit_is_last(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    assert storage.manifest("s") is None
    for i, n in enumerate([3, 4]):
        path = Path(storage.path("s", "data", f"part-{i}.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"x": list(range(n))}), path)
    m = storage.commit_stage("s", "abc", time.time(), {"uri": storage.uri("s")})
    assert m["rows"] == 7 and m["excluded_rows"] == 0 and len(m["files"]) == 2
    on_disk = json.loads(Path(storage.path("s", "_manifest.json")).read_text())
    assert on_disk["config_hash"] == "abc" and storage.manifest("s")["rows"] == 7


def test_no_manifest_over_missing_shards(tmp_path):
    """The commit re-counts data/ + exclusions/ from the footers: a shard missing from what was
    staged (a lost write) stops the commit, and the old state (no manifest) stays."""
    storage = Storage(str(tmp_path / "root"))
    path = Path(storage.path("s", "data", "part-0.parquet"))
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    with pytest.raises(RuntimeError, match="3 \\+ 0 rows, 5 were staged; not committing"):
        storage.commit_stage("s", "abc", time.time(), {}, expect_rows=5)
    assert storage.manifest("s") is None
    assert storage.commit_stage("s", "abc", time.time(), {}, expect_rows=3)["rows"] == 3


def test_commit_sums_the_stats_each_file_carries_in_its_footer(tmp_path):
    """The one-pass runner's bookkeeping: each written file records its rows by reason, tokens
    and the stage's counters in its footer; the commit sums them without reading any row."""
    from scalequest_ray.runner import file_stats
    from scalequest_ray.storage import STATS_KEY, sum_counts

    storage = Storage(str(tmp_path / "root"))
    table = pa.table({"q": ["a", "b", "c", "d"], "exclude_reason": [None, "empty", "empty", "code"],
                      "tok": [3, 1, None, 5], "ok": [True, None, False, True]})
    counters = lambda t: {"verdicts": {"yes": t["ok"].to_pylist().count(True)}}  # noqa: E731
    kept, dropped = table.slice(0, 1).drop_columns(["exclude_reason"]), table.slice(1)
    assert file_stats(dropped, True, "tok", counters) == {
        "excluded_by_reason": {"empty": 2, "code": 1}, "output_tokens": 6, "counters": {"verdicts": {"yes": 1}}}
    for sub, part, excluded in (("data", kept, False), ("exclusions", dropped, True)):
        path = Path(storage.path("s", sub, "part-0.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        stats = file_stats(part, excluded, "tok", counters)
        pq.write_table(part.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()}), path)
    m = storage.commit_stage("s", "abc", time.time(), {}, expect_rows=4)
    assert (m["rows"], m["excluded_rows"]) == (1, 3)
    assert m["excluded_by_reason"] == {"empty": 2, "code": 1}
    assert m["output_tokens"] == 9 and m["verdicts"] == {"yes": 2}
    assert sum_counts([{"a": 1, "b": {"c": 2}}, {"a": 2, "b": {"c": 1, "d": 4}}]) == {"a": 3, "b": {"c": 3, "d": 4}}


def test_per_stage_shard_sizes(tmp_path):
    cfg = _load(tmp_path, _demo_raw(tmp_path), ["storage.stage_rows_per_file={responses: 20000}"])
    assert cfg.storage.rows_for("responses") == 20000 and cfg.storage.rows_for("questions") == cfg.storage.rows_per_file


# --- QPO rewrite parsing ----------------------------------------------------------------------

from scalequest_ray.prompts import OPTIMIZER_PROMPTS, REWRITE_MARKER  # noqa: E402
from scalequest_ray.text import choose_direction, parse_rewrite  # noqa: E402


@pytest.mark.parametrize("reply, expected", [
    ("Missing units.\nFinal question: A car drives 60 km in 2 hours. What is its speed in km/h?",
     ("A car drives 60 km in 2 hours. What is its speed in km/h?", None)),
    ("I'll end with 'Final question:' as asked.\n**Final question:** \"How many 3-digit multiples of 7 are there?\"",
     ("How many 3-digit multiples of 7 are there?", None)),           # last marker wins, quotes/bold stripped
    ("Here is a harder version: What is 2+3+4?", (None, "missing_marker")),
    ("Final question:\n   ", (None, "empty_rewrite")),
    ("", (None, "empty_output")),
    (None, (None, "empty_output")),
    ("Nothing to fix.\nFINAL QUESTION:  what is 2 + 3?  ", (None, "identical")),
])
def test_parse_rewrite(reply, expected):
    assert parse_rewrite(reply, "What is 2 + 3?", REWRITE_MARKER) == expected


def test_directions_are_seeded_and_both_used():
    picks = [choose_direction(7, f"q-{i}") for i in range(200)]
    assert picks == [choose_direction(7, f"q-{i}") for i in range(200)]
    assert 60 < picks.count("difficulty") < 140
    assert picks != [choose_direction(8, f"q-{i}") for i in range(200)]
    for prompt in OPTIMIZER_PROMPTS.values():
        assert "{query}" in prompt and REWRITE_MARKER in prompt


# --- question quality checks ------------------------------------------------------------------

from scalequest_ray.quality import distinct_ngram_ratio, summarize, wellformed_reason  # noqa: E402


@pytest.mark.parametrize("text, reason", [
    ("A train travels 120 km in 2 hours. What is its average speed in km/h?", None),
    ("A circle has radius 3 cm. What is its area in cm², using π ≈ 3.14 for “pi”?", None),
    ("Find the sum of all two-digit positive integers divisible by 7.", None),
    ("Wie viele Äpfel hat Anna, wenn sie drei Tüten mit je 5 Äpfeln kauft?", "not_english"),
    ("一个三角形的三个内角分别是多少度，如果其中两个角是 30 度和 60 度？", "too_short"),
    ("Could you write a function?\n```python\ndef f(x):\n    return x ** 2\n```", "code"),
    ("How can I create a community where everyone feels welcome and supported at work?", "no_number"),
    ("The weather today is sunny with 3 clouds and a light breeze from the west.", "no_question"),
    ("What is 2+2?", "too_short"),
    ("", "empty"),
])
def test_wellformed_reason(text, reason):
    assert wellformed_reason(text) == reason


def test_distinct_ngrams_and_summary():
    assert distinct_ngram_ratio(["a b c d e", "a b c d e"]) == 0.5
    assert distinct_ngram_ratio(["a b c d e", "f g h i j"]) == 1.0
    s = summarize(["A train travels 120 km in 2 hours. What is its average speed in km/h?", "hello"])
    assert s["wellformed_share"] == 0.5 and s["rejected_by_reason"] == {"too_short": 1}


def test_plan_lists_stages_resources_and_paths_without_ray():
    import sys

    from scalequest_ray.plan import format_plan, plan

    cfg = load_config(REPO / "configs" / "paper_gpu.yaml")
    rows = plan(cfg, check_storage=False)
    assert [r["stage"] for r in rows] == cfg.pipeline
    by = {r["stage"]: r for r in rows}
    assert by["responses"]["runs_on"] == "vLLM replica pool" and "x1-16 (4 CPU, 1 GPU, batch 256)" in by["responses"]["model"]
    assert by["difficulty_scorer"]["each"] == "8 CPU, 1 GPU" and by["difficulty_scorer"]["replicas"] == "8"
    assert by["reward"]["runs_on"] == "scoring actor pool"
    assert by["language"]["input"] == f"{cfg.root}/questions/data" and by["selection"]["output"] == f"{cfg.root}/selection"
    text = format_plan(cfg, rows)
    assert text.splitlines()[0].startswith("run 'paper', root s3://my-bucket/scalequest/paper, 17 stages")
    # The CLI prints it without importing Ray (a dry run for a cluster config, from a laptop).
    code = ("import sys; from scalequest_ray import cli; rc = cli.main(['plan', 'configs/paper_gpu.yaml', '--offline']); "
            "assert rc == 0 and 'ray' not in sys.modules and 'vllm' not in sys.modules, sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "17. selection: Ray Data tasks + shuffles" in proc.stdout


@pytest.mark.unit
def test_selection_keeps_missing_answers_null():
    """A candidate without an answer (pandas' NA in a string column) gives a null answer, never the
    string "<NA>"; the majority ignores it."""
    import pandas as pd

    from scalequest_ray.stages.selection import select

    group = pd.DataFrame({
        "query_id": ["q", "q", "q"], "query": ["What is 2+2?"] * 3, "response": ["r0", "r1", "r2"],
        "answer": pd.array([None, "4", "4"], dtype="string"), "reward": [3.0, 1.0, 2.0],
        "sample_idx": pd.array([0, 1, 2], dtype="Int64"), "solver_model": ["m"] * 3,
        "seed": pd.array([None, 5, 6], dtype="Int64"), "sampling": ["{}"] * 3,
    })
    free = select(group, require_majority=False, min_reward=None, min_agreement=0.0).to_pylist()[0]
    assert free["sample_idx"] == 0 and free["answer"] is None and free["seed"] is None
    assert free["majority_answer"] == "4" and free["reward_model"] is None
    agreeing = select(group, require_majority=True, min_reward=None, min_agreement=0.0).to_pylist()[0]
    assert agreeing["sample_idx"] == 2 and agreeing["answer"] == "4" and agreeing["agrees_with_majority"]


@pytest.mark.unit
def test_auto_dtype_is_float32_on_cpus_without_native_bf16():
    from scalequest_ray.config import ModelConfig
    from scalequest_ray.engine import engine_dtype

    cpu = ModelConfig(path="org/m")  # dtype auto, a CPU replica
    assert engine_dtype(cpu, {"avx2", "fma", "avx512f"}) == "float32"
    assert engine_dtype(cpu, {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert engine_dtype(cpu, {"amx_bf16", "amx_tile"}) == "bfloat16"
    gpu = ModelConfig(path="org/m", scale={"gpus_per_replica": 1})
    assert engine_dtype(gpu, set()) == "auto"  # vLLM's own choice: the model's dtype
    assert engine_dtype(ModelConfig(path="org/m", engine={"dtype": "bfloat16"}), set()) == "bfloat16"


@pytest.mark.unit
def test_funnel_prints_the_share_of_wellformed_questions():
    from scalequest_ray.pipeline import format_funnel

    text = format_funnel([{"stage": "questions", "unit": "questions", "rows_in": 48, "kept": 40, "dropped": 8,
                           "dropped_by_reason": {"truncated": 8},
                           "wellformed": {"share": 0.8542, "of": 48, "wellformed": 41, "no_number": 7}}])
    assert text.splitlines()[-1].strip() == "well-formed math questions: 41 of 48 (0.85)"


@pytest.mark.unit
def test_verdict_counts_of_kept_and_excluded_files():
    import pyarrow as pa

    from scalequest_ray.stages.solvability import verdict_counts

    kept = pa.table({"solvable": [True, None], "judgement": ["a\nVerdict: Yes", "rambling"]})
    excluded = pa.table({"solvable": [False, None, None, None], "judgement": ["b\nVerdict: No", None, "boom", "x"],
                         "exclude_reason": ["unsolvable", "empty_query", "engine_error", "verdict_unparseable"]})
    assert verdict_counts(kept) == {"verdicts": {"yes": 1, "no": 0, "unparseable": 1, "not_judged": 0}}
    assert verdict_counts(excluded) == {"verdicts": {"yes": 0, "no": 1, "unparseable": 1, "not_judged": 2}}


@pytest.mark.unit
def test_ledger_counts_replicas_and_reserved_seconds_per_pool():
    from scalequest_ray.ledger import ledger_from_tables, pool_name

    assert pool_name("MapWorker", "MapWorker(MapBatches(vLLMEngineStageUDF))") == "MapBatches(vLLMEngineStageUDF)"
    actors = [  # one replica for the whole stage, a second one for its middle half, a 0-CPU helper
        {"pool": "engine", "start": 0, "end": 100, "cpu": 2, "gpu": 1},
        {"pool": "engine", "start": 25, "end": 75, "cpu": 2, "gpu": 1},
        {"pool": "stats", "start": 0, "end": 100, "cpu": 0, "gpu": 0},
        {"pool": "scorer", "start": 90, "end": 200, "cpu": 1, "gpu": 0},  # outlives the window
    ]
    nodes = [{"node_type": "gpu_worker", "start": 10, "end": 60}, {"node_type": "gpu_worker", "start": 20, "end": 500},
             {"node_type": "", "start": 0, "end": 500}]
    out = ledger_from_tables(actors, nodes, (0, 100))
    engine = out["pools"]["engine"]
    assert engine["replicas"] == {"min": 1, "mean": 1.5, "max": 2}
    assert engine["cpu_seconds"] == 300 and engine["gpu_seconds"] == 150
    assert "stats" not in out["pools"]
    assert out["pools"]["scorer"]["cpu_seconds"] == 10 and out["pools"]["scorer"]["replicas"]["max"] == 1
    assert out["cpu_seconds"] == 310 and out["gpu_seconds"] == 150
    assert out["node_seconds"] == {"gpu_worker": 130}
    assert "node_seconds" not in ledger_from_tables(actors, nodes[2:], (0, 100))


@pytest.mark.unit
def test_capacity_check_names_what_no_node_can_hold():
    from scalequest_ray import capacity
    from scalequest_ray.config import RunConfig
    from scalequest_ray.storage import InputError

    cfg = RunConfig.model_validate({
        "name": "cap", "root": "/tmp/cap",
        "models": {"gen": {"path": "org/gen", "scale": {"cpus_per_replica": 1, "accelerator_type": "A100"}},
                   "rm": {"path": "org/rm", "scale": {"cpus_per_replica": 4}}},
        "stages": {"questions": {"generators": [{"name": "g", "model": "gen", "num_questions": 8}]},
                   "language": {}, "reward": {"model": "rm", "engine": "hf"},
                   "qft": {"model": "gen", "workers": 2, "batch_size": 8, "per_device_batch_size": 4, "gpus_per_worker": 1}},
        "pipeline": ["questions", "language", "reward", "qft"]})
    head, gpu_node = {"CPU": 0}, {"CPU": 1, "GPU": 1, "accelerator_type:A100": 1}
    cpu_node = {"CPU": 1}
    with pytest.raises(InputError) as err:
        capacity.check(cfg, ["questions"], [head, cpu_node])
    assert str(err.value) == ("stages.questions: a vLLM replica of models.gen needs CPU 1, accelerator_type:A100 0.001; "
                              "no node of this cluster (and no autoscaler adds nodes) has that (the largest node has CPU 1)")
    asked = []

    def autoscaler(bundle):  # the autoscaler's node types: cpu_node and gpu_node
        asked.append(bundle)
        return capacity.fits(bundle, cpu_node) or capacity.fits(bundle, gpu_node)

    capacity.check(cfg, ["questions", "language", "qft"], [head], autoscaler)
    assert {"CPU": 1} in asked and len(asked) == 3  # asked only for what no alive node holds
    with pytest.raises(InputError, match=r"stages.reward: a scoring actor of models.rm needs CPU 4; no node of this "
                                         r"cluster, and no node type of its autoscaler, has that"):
        capacity.check(cfg, cfg.pipeline, [head], autoscaler)
    capacity.check(cfg, ["reward"], [head], lambda bundle: None)  # the autoscaler did not say: no verdict
    with pytest.raises(InputError, match=r"stages.language: a Ray Data task needs CPU 1"):
        capacity.check(cfg, ["language"], [head, {"CPU": 0, "GPU": 1}])


@pytest.mark.unit
def test_fit_pools_leaves_a_cpu_for_tasks_beside_pools_and_checkpoint_filters():
    """A 4-CPU fixed cluster, 2 one-CPU replicas: a fresh run fits; resuming adds a checkpoint
    filter actor per read (2 here), so the pool shrinks to 1 replica (it deadlocked at 2)."""
    from scalequest_ray import capacity
    from scalequest_ray.config import RunConfig
    from scalequest_ray.storage import InputError

    cfg = RunConfig.model_validate({
        "name": "fit", "root": "/tmp/fit",
        "models": {"solver": {"path": "org/s", "scale": {"replicas": [2, 3], "cpus_per_replica": 1}},
                   "rm": {"path": "org/rm", "scale": {"replicas": 2, "cpus_per_replica": 2}}},
        "stages": {"responses": {"model": "solver"}, "reward": {"model": "rm", "engine": "hf"}, "language": {}},
        "pipeline": ["responses", "reward", "language"]})
    assert capacity.fit_pools(cfg, "responses", 4) == (cfg, [])
    fitted, lines = capacity.fit_pools(cfg, "responses", 4, filters=2)
    assert fitted.models["solver"].scale.replicas == (1, 1) and cfg.models["solver"].scale.replicas == (2, 3)
    assert lines == ["stages.responses: 1 vLLM replica of models.solver instead of 2: this cluster has 4 CPUs and "
                     "no autoscaler, and 2 checkpoint filter actors of 1 CPU, 1 for a Ray Data task must fit beside "
                     "the pools"]
    assert capacity.fit_pools(cfg, "responses", 6, filters=2)[0].models["solver"].scale.replicas == (2, 3)
    fitted, _ = capacity.fit_pools(cfg, "reward", 4)  # 2 x 2 CPUs + 1 > 4
    assert fitted.models["rm"].scale.replicas == (1, 1)
    with pytest.raises(InputError) as err:
        capacity.fit_pools(cfg, "reward", 3, filters=1)
    assert str(err.value) == ("stages.reward: needs 4 CPUs at once (1 checkpoint filter actor of 1 CPU, 2 per "
                              "scoring actor of models.rm, 1 for a Ray Data task); this cluster has 3 and no "
                              "autoscaler (set ray.num_cpus, or fewer cpus_per_replica)")
    assert capacity.fit_pools(cfg, "language", 1) == (cfg, [])


@pytest.mark.unit
def test_console_drops_known_ray_noise_and_keeps_everything_else():
    """The console filter works on the file descriptors (Ray's C++ logs are not Python's): run in
    a child process whose C-level writes include Ray's known spurious ERROR line."""
    code = (
        "import os, sys; from scalequest_ray.console import filtered_console\n"
        "with filtered_console():\n"
        "    os.write(2, b'[2026-12-01 19:45:38,031 E 1 1] core_worker.cc:2465: Actor with class name: '\n"
        "             b\"'MapWorker(MapBatches(X))' and ID: 'ab' has constructor arguments in the object store and \"\n"
        "             b'max_restarts > 0. If the arguments ...\\n')\n"
        "    os.write(1, b'[questions] done: 8 rows kept\\n')\n"
        "    os.write(2, b'Running 0: 10%\\r')\n"
        "    print('ERROR: a real one', file=sys.stderr, flush=True)\n"
        "print('after', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO)  # bytes: keep the \r
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"[questions] done: 8 rows kept\nafter\n"
    assert b"constructor arguments" not in proc.stderr
    assert b"Running 0: 10%\r" in proc.stderr and b"ERROR: a real one\n" in proc.stderr


@pytest.mark.unit
def test_stage_progress_line():
    from scalequest_ray.console import StageProgress

    p = StageProgress("responses", lambda: (250, 5000), expected=1000, echo=lambda _: None)
    p.started -= 50  # 50 s in
    line = p.line()
    assert line.startswith("[responses] 250/1,000 rows, 5.0 rows/s, 100.0 tok/s, ETA 2m30s")
    assert StageProgress("language", lambda: (10, 0), expected=None).line().startswith("[language] 10 rows, ")


# --- lifeline (vLLM plugin) -------------------------------------------------------------------

_LIFELINE_PARENT = """
import multiprocessing, sys, time

def child(with_lifeline, ready):
    if with_lifeline:
        from scalequest_ray.lifeline import install
        install()
    ready.send(True)
    while True:  # a busy loop, as an orphaned EngineCore's was
        pass

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")  # what vLLM uses inside Ray actors
    ready, tell = ctx.Pipe(duplex=False)  # (a Pipe, not an Event: no semaphore left behind)
    p = ctx.Process(target=child, args=(sys.argv[1] == "1", tell), daemon=True)
    p.start()
    ready.recv()
    print(p.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("with_lifeline", [True, False])
def test_lifeline_ends_a_spawned_child_when_its_parent_is_killed(tmp_path, with_lifeline):
    """A vLLM-spawned process (EngineCore) with the plugin ends within seconds of its parent's
    SIGKILL; without it the child lives on (what the plugin is for: the test can fail)."""
    import os
    import signal

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(_LIFELINE_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), "1" if with_lifeline else "0"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        try:
            child.wait(timeout=10 if with_lifeline else 3)
            ended = True
        except psutil.TimeoutExpired:
            ended = False
        assert ended == with_lifeline
    finally:
        if child.is_running():
            child.kill()


_SHM_PROBE = """
import os, socket, sys, time
sys.path.insert(0, os.getcwd())
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
import deepspeed
from deepspeed.comm import comm
from scalequest_ray.train.common import skip_shm_comm_op
skip_shm_comm_op()
t0 = time.time()
deepspeed.init_distributed(dist_backend="gloo")
print(comm.cdb.shm_comm_op is None, f"{time.time() - t0:.0f}")
"""


def test_cpu_training_process_group_builds_no_shm_op(tmp_path):
    """DeepSpeed's gloo process group on CPU comes up without JIT-compiling the shared-memory op
    into an empty extensions folder (as on a fresh clone: 3 min of both cores before)."""
    import os

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, "-c", _SHM_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    no_op, seconds = out.stdout.split()[-2:]
    assert no_op == "True" and not (tmp_path / "ext" / "deepspeed_shm_comm").exists()
    assert int(seconds) < 30
