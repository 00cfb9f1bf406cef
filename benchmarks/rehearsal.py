"""The 1M rehearsal: the whole chain at the size the product exists for, on this machine, with the
tiny random model (1-4 output tokens per row), local storage, one run:

  N questions through questions -> language -> dedup, and M candidates (M / 5 questions x 5)
  through responses -> reward -> selection; the same at 100K first (the driver's memory at both
  sizes); the responses stage again with the driver killed (SIGKILL) once half of it is
  committed and the same command rerun (rows generated twice); and our responses stage against a
  bare `ray.data.llm` processor over the same 100,000 requests, side by side.

Per stage: rows, wall seconds, rows/s, the driver's peak RSS, object-store bytes spilled, files
written. The tiny model writes random text, so the language filter here keeps any language and
any form (the filters' quality is tested elsewhere; here they carry the rows).

    python benchmarks/rehearsal.py --questions 1000000 --candidates 1000000 [--root /tmp/sq-rehearsal] [--resume]

On 2 cores the whole of it takes longer than a machine may stay up (about 6 h at 1M on a 2-core
AMD EPYC). `--resume` continues an interrupted rehearsal with the product's own resume: stages
finished earlier are skipped and reported with the figures measured when they ran (kept in
<root>/figures.jsonl), the interrupted stage takes over its committed rows and generates the
rest, and the rows it generated again are counted as in the kill step. Driver peaks are then
per attempt: a big-size peak measured in a later driver did not carry the earlier stages'
memory, which the line before the result line says.

Last line: driver_peak_growth_pct=<from 100K to 1M> overhead_ratio=<ours/bare rows/s at 100K>
regenerated_after_resume=<rows generated again after the kill>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalequest_ray import pipeline  # noqa: E402
from scalequest_ray.config import RunConfig  # noqa: E402
from scalequest_ray.models import build_scorer_model, build_tiny_model, cache_dir, demo_model_dir  # noqa: E402

N_CANDIDATES = 5
ENGINE = {"max_model_len": 512, "enforce_eager": True, "cpu_kv_cache_gib": 2, "max_num_seqs": 256}
# The tests' tiny model gives EOS ~3% a token after the bare turn prefix: at 4 tokens 90% of its
# questions were cut (excluded as truncated), and 1M questions left ~70K for the second half. The
# questions come from a twin with EOS at ~30% a token there (eos_weight 1.1, measured with an HF
# forward): about half end on their own in 1-4 tokens. After a solver prompt that twin ends 97% of
# its replies at once (empty: the reward stage excludes them), so responses come from the tests'
# model (cut at 4 tokens, which responses keep).
EOS_WEIGHT = 1.1
# top_p < 1 makes vLLM sort the whole 49K vocabulary for each row at each step on CPU: a bare
# vllm.LLM generated 74 rows/s of the tiny model at top_p 0.99 and 449 at 1.0 (4 tokens, one
# thread, per-row seeds either way). The model is random, so nothing is lost.
QUESTION_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4}
RESPONSE_SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 4}


class PeakRSS:
    """This (driver) process's resident memory, sampled every 50 ms; `take()` returns the peak
    since the last take, and leaves in `own` the peak of its private part (RssAnon: its heap,
    not the object store's shared pages it has touched, which RSS counts too)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.peak_own, self.own = psutil.Process(), 0, 0, 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def anon() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.peak_own = max(self.peak_own, self.anon())
            time.sleep(0.05)

    def take(self) -> int:
        peak, self.peak = self.peak, self.proc.memory_info().rss
        self.own, self.peak_own = self.peak_own, self.anon()
        return peak

    def stop(self):
        self._stop.set()


def spilled_bytes() -> int:
    """Object-store bytes spilled to disk so far (Ray's own memory summary)."""
    import ray
    from ray._private.internal_api import memory_summary

    # (this cluster's address: without one, Ray asks the last `ray start` cluster of this machine)
    m = re.search(r"Spilled (\d+) MiB", memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True))
    return int(m.group(1)) * 2**20 if m else 0


def rows_per_file(candidates: int) -> int:
    """20,000-row shards at 1M (50 files a stage); smaller runs get smaller shards, so that the
    kill below still lands with part of the stage committed."""
    return max(500, min(20000, candidates // 50))


def config(root: Path, models: dict, questions: int, input_file: str | None, stages: list[str],
           per_file: int, replicas: int) -> dict:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    langs = sorted(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
    return {
        "name": "rehearsal", "root": str(root), "seed": 3, "report": False,
        "storage": {"rows_per_file": per_file},
        "models": {"writer": {"path": str(models["writer"]), "engine": ENGINE, "scale": scale(replicas)},
                   "solver": {"path": str(models["solver"]), "engine": ENGINE, "scale": scale(replicas)},
                   "reward": {"path": str(models["reward"]), "engine": {**ENGINE, "dtype": "float32"},
                              "scale": scale(replicas)}},
        "stages": {
            "questions": {"generators": [{"name": "tiny", "model": "writer", "num_questions": questions}],
                          "sampling": QUESTION_SAMPLING, "min_chars": 1},
            "language": {"languages": langs, "min_words": 1, "require_question": False},
            "dedup": {},
            "responses": {"model": "solver", "n": N_CANDIDATES, "sampling": RESPONSE_SAMPLING, "input": input_file},
            "reward": {"model": "reward", "max_length": 128},
            "selection": {},
        },
        "pipeline": stages,
    }


def scale(replicas: int) -> dict:
    """One engine thread per replica: the tiny model's steps are bound by vLLM's Python
    scheduling and sampling, not by matmuls, so two 1-thread replicas use the 2 cores better
    than one 2-thread replica."""
    return {"replicas": [replicas, replicas], "batch_size": 512, "cpus_per_replica": 1}


def first_rows(folder: Path, n: int, out: Path) -> int:
    """The first n rows (query_id, query) of a stage's data/ into one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    parts, have = [], 0
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f, columns=["query_id", "query"])
        parts.append(t.slice(0, n - have))
        have += parts[-1].num_rows
        if have >= n:
            break
    pq.write_table(pa.concat_tables(parts), out)
    return have


class Figures:
    """What each step measured, one JSON line each in <root>/figures.jsonl, so that a resumed
    rehearsal reports the steps an earlier attempt finished with the figures measured then."""

    def __init__(self, base: Path, resume: bool):
        self.path = base / "figures.jsonl"
        if not resume:
            self.path.unlink(missing_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.known = {(f["size"], f["stage"]): f for f in map(json.loads, lines)}

    def get(self, size: str, stage: str) -> dict | None:
        return self.known.get((size, stage))

    def add(self, line: dict) -> dict:
        self.known[(line["size"], line["stage"])] = line
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        return line


# The id each stage's rows are known by, to count rows a resumed stage generated again.
ROW_ID = {"questions": "query_id", "language": "query_id", "dedup": "query_id", "responses": "response_id",
          "reward": "response_id", "selection": "response_id"}


def stage_files(stage_dir: Path) -> dict:
    return {f"{sub}/{f.name}": f for sub in ("data", "exclusions") for f in (stage_dir / sub).glob("*.parquet")}


def read_ids(paths, column: str) -> list:
    import pyarrow.parquet as pq

    return [i for f in paths for i in pq.read_table(f, columns=[column])[column].to_pylist()]


def generated_twice(before: set, after: dict, column: str) -> int:
    """Rows that files written by this attempt hold and files an earlier attempt left hold too.
    Files of writes whose commit never happened are deleted by the rerun (their rows were never
    committed, so making them again is the resume working), so the files compared are the ones
    still there afterwards."""
    kept = set(read_ids((after[k] for k in before & set(after)), column))
    return sum(1 for i in read_ids((after[k] for k in set(after) - before), column) if i in kept)


def run_chain(label: str, base: Path, models: dict, questions: int, candidates: int, rss: PeakRSS,
              replicas: int, figures: Figures, resume: bool) -> dict:
    """questions -> language -> dedup at `questions` rows, then responses -> reward -> selection on
    candidates / 5 of the dedup'd questions. Returns the driver's peak RSS over the chain."""
    root = base / label
    if not resume:
        shutil.rmtree(root, ignore_errors=True)
    per_file = rows_per_file(candidates)
    cfg = RunConfig.model_validate(config(root / "run", models, questions, None, ["questions", "language", "dedup"],
                                          per_file, replicas))
    results = per_stage(label, cfg, rss, figures)
    inputs = root / "inputs" / "questions.parquet"
    # (the same rows again on a resume: the responses stage's config names this file)
    got = first_rows(root / "run" / "dedup" / "data", candidates // N_CANDIDATES, inputs)
    cfg = RunConfig.model_validate(config(root / "run", models, questions, str(inputs),
                                          ["responses", "reward", "selection"], per_file, replicas))
    results += per_stage(label, cfg, rss, figures)
    print(f"{label}: {got} questions x {N_CANDIDATES} candidates", flush=True)
    measured = [r for r in results if r["driver_peak_mib"] is not None]
    return {"peak": max((r["driver_peak_mib"] for r in measured), default=0.0),
            "own": max((r["driver_own_mib"] for r in measured), default=0.0),
            "drivers": len({r["driver_pid"] for r in measured}), "root": root, "inputs": inputs, "results": results}


def per_stage(label: str, cfg: RunConfig, rss: PeakRSS, figures: Figures) -> list:
    """The config's stages one at a time, so that each gets its own driver peak."""
    rss.take()
    out = []
    for stage in cfg.pipeline:
        before = stage_files(Path(cfg.root) / stage)
        for r in pipeline.run(cfg, stages=[stage], echo=lambda _: None):
            out.append(report(label, r, rss, figures, before, Path(cfg.root) / stage))
    return out


def report(label: str, r, rss: PeakRSS, figures: Figures, before: dict, stage_dir: Path) -> dict:
    m = r.manifest
    rows = m["rows"] + m["excluded_rows"]
    peak = rss.take()
    if r.skipped:
        line = figures.get(label, r.stage) or figures.add({
            # finished by an attempt that kept no figures: the manifest's, without the driver's
            "size": label, "stage": r.stage, "rows": rows, "seconds": m["seconds"],
            "rows_per_s": round(rows / max(m["seconds"], 1e-9), 1), "driver_peak_mib": None, "driver_own_mib": None,
            "driver_pid": None, "spilled_mib": None, "files": len(m["files"]) + len(m["exclusion_files"])})
        when = "an earlier attempt"
    else:
        made = m.get("rows_written", rows) if m.get("resumed_rows") else rows
        line = figures.add({
            "size": label, "stage": r.stage, "rows": rows, "seconds": m["seconds"],
            "rows_per_s": round(made / max(m["seconds"], 1e-9), 1), "driver_peak_mib": round(peak / 2**20, 1),
            "driver_own_mib": round(rss.own / 2**20, 1), "driver_pid": os.getpid(),
            "spilled_mib": round(spilled_bytes() / 2**20, 1), "files": len(m["files"]) + len(m["exclusion_files"]),
            "resumed_rows": m.get("resumed_rows", 0),
            "generated_twice": generated_twice(set(before), stage_files(stage_dir), ROW_ID[r.stage])
            if m.get("resumed_rows") else 0})
        when = ""
    peak_s = "n/a" if line["driver_peak_mib"] is None else f"{line['driver_peak_mib']:7.1f} MiB (own {line['driver_own_mib']:7.1f})"
    text = (f"{label:>5} {r.stage:<11} rows {rows:>9}  {line['seconds']:8.1f} s  {line['rows_per_s']:>8} rows/s  "
            f"driver peak {peak_s}  spilled {line['spilled_mib'] if line['spilled_mib'] is not None else 'n/a':>8} MiB  "
            f"files {line['files']}")
    if line.get("resumed_rows"):
        text += (f"  (resumed: {line['resumed_rows']} rows taken over, rows/s of the {rows - line['resumed_rows']} "
                 f"made now, {line['generated_twice']} generated twice)")
    if when:
        text += f"  [{when}]"
    print(text, flush=True)
    return line


def bare_processor(tiny: Path, inputs: Path, out: Path, run_seed: int, replicas: int) -> float:
    """A bare ray.data.llm processor over the same requests our responses stage sends (the same
    prompts, sampling and per-row seeds, engine settings from the same config): rows/s."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from scalequest_ray.config import ModelConfig
    from scalequest_ray.engine import chat_sampling, cpu_engine_env, engine_kwargs
    from scalequest_ray.text import derive_seed, solver_user_text
    from scalequest_ray.prompts import SOLVER_INSTRUCTION
    from scalequest_ray.config import SamplingConfig

    model = ModelConfig(path=str(tiny), engine=ENGINE, scale=scale(replicas))
    turn, _, sampling = chat_sampling(model, SamplingConfig(**RESPONSE_SAMPLING))

    def expand(batch):
        rows = {"prompt": [], "sampling_params": []}
        for qid, q in zip(batch["query_id"], batch["query"]):
            for k in range(N_CANDIDATES):
                rows["prompt"].append(turn.prefix + solver_user_text(q, SOLVER_INSTRUCTION) + turn.suffix)
                rows["sampling_params"].append({**sampling, "seed": derive_seed(run_seed, "responses", qid, k)})
        return rows

    config = vLLMEngineProcessorConfig(
        model_source=str(tiny), engine_kwargs=engine_kwargs(model), runtime_env={"env_vars": cpu_engine_env(model)},
        batch_size=512, concurrency=replicas, placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    processor = build_processor(config, preprocess=lambda r: r, postprocess=lambda r: {
        "text": r.get("generated_text"), "n": r.get("num_generated_tokens")})
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    ds = processor(ray.data.read_parquet(str(inputs)).map_batches(expand))
    ds.write_parquet(str(out))
    elapsed = time.time() - t0
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    return rows / elapsed


def kill_and_resume(base: Path, models: dict, inputs: Path, total: int, replicas: int) -> dict:
    """The responses stage with its driver (the CLI, as a user runs it) killed by SIGKILL once half
    of its rows are committed, then the same command again: rows generated twice.

    A row counts as generated twice when the rerun wrote it and a file the killed attempt left
    holds it too. Files of writes whose commit never happened are deleted by the rerun (their rows
    were never committed, so making them again is the resume working), so the files compared are
    the ones still there after the rerun."""
    import pyarrow.parquet as pq

    root = base / "kill"
    shutil.rmtree(root, ignore_errors=True)
    path = base / "kill.yaml"
    per_file = rows_per_file(total)
    cfg = config(root, models, 1, str(inputs), ["responses"], per_file, replicas)
    # The CLI's own local Ray: on 2 cores it would get 4 logical CPUs, and the rerun's two
    # checkpoint filter actors (1 CPU each) would leave room for one replica only (it runs, and
    # says so: tests/test_cluster.py checks that set-up). Two more CPUs keep both replicas, so
    # the rerun's rows/s compares with the first attempt's.
    cfg["ray"] = {"num_cpus": 2 * replicas + 2}
    path.write_text(json.dumps(cfg))
    cmd = [str(Path(sys.executable).parent / "scalequest-ray"), "run", str(path)]
    ckpt = root / "_checkpoints" / "responses"

    def committed_rows() -> int:
        rows = 0
        for f in (ckpt.glob("*.parquet") if ckpt.exists() else []):
            if f.name.endswith(".pending.parquet"):
                continue
            try:
                rows += pq.ParquetFile(f).metadata.num_rows
            except Exception:  # a file being renamed into place
                pass
        return rows

    def files() -> dict:
        return stage_files(root / "responses")

    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while True:  # half of the candidates committed
        if driver.poll() is not None:
            raise RuntimeError("the first attempt finished before it could be killed")
        if committed_rows() >= total // 2:
            break
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    killed_after = time.time() - t0
    committed = committed_rows()
    before = set(files())
    t1 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    rerun_s = time.time() - t1
    m = json.loads((root / "responses" / "_manifest.json").read_text())
    after = files()
    regenerated = generated_twice(before, after, "response_id")
    every = read_ids(after.values(), "response_id")
    once = len(every) == len(set(every)) == m["rows"] + m["excluded_rows"]
    print(f"kill: after {killed_after:.0f} s, {committed} candidates committed; rerun {rerun_s:.0f} s: "
          f"{m['resumed_rows']} taken over, {m['rows_written']} written, {regenerated} generated twice, "
          f"every id once: {once}", flush=True)
    return {"committed": committed, "regenerated": regenerated, "every_id_once": once,
            "manifest_rows": m["rows"] + m["excluded_rows"]}


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}K" if n % 1000 == 0 else str(n)


def main():
    import ray

    from scalequest_ray.engine import configure_data_context

    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=1_000_000)
    ap.add_argument("--candidates", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="the size the driver's memory is compared with")
    ap.add_argument("--replicas", type=int, default=2, help="engine replicas per pool, one thread each")
    ap.add_argument("--kill-at", choices=("small", "big"), default="big",
                    help="the size of the responses stage that is killed and resumed")
    ap.add_argument("--root", default="/tmp/sq-rehearsal")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted rehearsal under --root with the same sizes (see above)")
    args = ap.parse_args()
    base = Path(args.root)
    base.mkdir(parents=True, exist_ok=True)
    figures = Figures(base, args.resume)
    solver = build_tiny_model(cache_dir() / "models" / "tiny-llama-test", tokenizer_from=demo_model_dir())
    models = {"writer": build_tiny_model(cache_dir() / "models" / "tiny-llama-rehearsal", tokenizer_from=demo_model_dir(),
                                         eos_weight=EOS_WEIGHT),
              "solver": solver, "reward": build_scorer_model(cache_dir() / "models" / "tiny-llama-reward-test", solver)}
    configure_data_context()
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=True,
             log_to_driver=False)
    rss = PeakRSS()
    t0 = time.time()
    small_label = size_label(args.small)
    big_label = size_label(args.candidates) if args.questions == args.candidates else \
        f"{size_label(args.questions)}q-{size_label(args.candidates)}c"
    small = run_chain(small_label, base, models, args.small, args.small, rss, args.replicas, figures, args.resume)
    # Same requests, side by side: our responses stage (from the small chain) and a bare processor.
    ours = next(r for r in small["results"] if r["stage"] == "responses")["rows_per_s"]
    bare = (figures.get(small_label, "bare") or figures.add({
        "size": small_label, "stage": "bare",
        "rows_per_s": bare_processor(solver, small["inputs"], base / "bare", run_seed=3, replicas=args.replicas)}))
    print(f"{small_label} candidates: our responses stage {ours:.0f} rows/s, bare ray.data.llm "
          f"{bare['rows_per_s']:.0f} rows/s", flush=True)
    big = run_chain(big_label, base, models, args.questions, args.candidates, rss, args.replicas, figures, args.resume)
    killed = big if args.kill_at == "big" else small
    kill = figures.get(args.kill_at, "kill")
    if kill is None:
        try:
            kill = figures.add({"size": args.kill_at, "stage": "kill", **kill_and_resume(
                base, models, killed["inputs"], args.candidates if args.kill_at == "big" else args.small, args.replicas)})
        except RuntimeError as e:  # still print the figures measured; the result line says what is missing
            print(f"kill: {e}", flush=True)
            kill = {"regenerated": "not_measured"}
    else:
        print(f"kill: {kill['committed']} candidates committed when killed, {kill['regenerated']} generated twice, "
              f"every id once: {kill['every_id_once']}  [an earlier attempt]", flush=True)
    rss.stop()
    ray.shutdown()
    resumed = [r for r in small["results"] + big["results"] if r.get("resumed_rows")]
    for r in resumed:
        print(f"resumed after an interruption: {r['size']} {r['stage']}, {r['resumed_rows']} rows taken over, "
              f"{r['generated_twice']} generated twice")
    drivers = f"; the {big_label} peaks come from {big['drivers']} driver processes" if big["drivers"] > 1 else ""
    if not small["peak"] or not big["peak"]:  # the result line still ends the output
        print(f"driver peaks missing ({small_label} {small['peak']}, {big_label} {big['peak']}): their stages "
              f"finished in an attempt that kept no figures ({figures.path})")
        growth = "not_measured"
    else:
        growth = f"{100 * (big['peak'] - small['peak']) / small['peak']:.1f}"
        print(f"driver peak: {small['peak']:.0f} MiB at {small_label}, {big['peak']:.0f} MiB at {big_label} "
              f"(this attempt {time.time() - t0:.0f} s{drivers}); its own part (RssAnon) {small['own']:.0f} MiB -> "
              f"{big['own']:.0f} MiB ({100 * (big['own'] - small['own']) / small['own']:+.1f}%)")
    print(f"driver_peak_growth_pct={growth} overhead_ratio={ours / bare['rows_per_s']:.2f} "
          f"regenerated_after_resume={kill['regenerated']}")


if __name__ == "__main__":
    main()
