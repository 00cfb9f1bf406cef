"""`scalequest-ray`: run the configured pipeline or one stage; fetch the demo model."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def _config(args):
    from .config import load_config

    overrides = list(args.set or [])
    if getattr(args, "input", None):
        overrides.append(f"stages.responses.input={args.input}")
    return load_config(args.config, overrides)


def cmd_run(args, stages=None):
    from . import pipeline

    cfg = _config(args)
    pipeline.run(cfg, stages=stages or (args.stages.split(",") if getattr(args, "stages", None) else None),
                 force=args.force)


def cmd_validate(args):
    cfg = _config(args)
    print(f"{args.config}: ok (run '{cfg.name}', root {cfg.root}, stages {', '.join(cfg.pipeline)})")


def cmd_plan(args):
    from .plan import format_plan, plan

    cfg = _config(args)
    print(format_plan(cfg, plan(cfg, check_storage=not args.offline)))


def _prices(items, flag: str = "--price", example: str = "A100=1.30") -> dict:
    from .config import ConfigError

    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: expected NAME=NUMBER, e.g. {example}") from None
    return out


def cmd_report(args):
    from . import cost, report

    cfg = _config(args) if args.config else None
    with cost.endpoint(args.endpoint):
        print(report.build_report(args.root, out_dir=args.out, prices=_prices(args.price) or None, cfg=cfg))


def cmd_cost(args):
    from . import cost

    cfg = _config(args) if args.config else None
    with cost.endpoint(args.endpoint):
        print(cost.format_cost(cost.cost_table(args.root, _prices(args.price) or None, cfg)))


def cmd_estimate(args):
    from . import cost

    cfg = _config(args)
    with cost.endpoint(args.endpoint):
        throughput: dict = {}
        for key, value in _prices(args.throughput, "--throughput", "generate/A100=3800").items():
            workload, _, acc = key.partition("/")  # generate/H100=7900, or generate=2200 for every GPU
            if acc:
                throughput.setdefault(workload, {})[acc] = value
            else:
                throughput[workload] = value
        print(cost.format_estimate(cost.estimate(cfg, getattr(args, "from"), throughput or None)))


def cmd_publish(args):
    from . import card, cost

    with cost.endpoint(args.endpoint):
        files = card.publish(args.root, args.repo, token_env=args.token_env, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files to hf.co/datasets/{args.repo}: " + ", ".join(files))


def cmd_fetch_demo(args):
    from .models import fetch_demo_model

    print(fetch_demo_model(Path(args.target) if args.target else None, force=args.force))
    if not args.target:
        from .models import DEMO_MODEL_NAME, build_scorer_model, cache_dir

        # The demo's reward model: SmolLM2 + an untrained one-output head (no trained reward
        # model can be fetched offline; see README "Reward scoring").
        print(build_scorer_model(cache_dir() / "models" / f"{DEMO_MODEL_NAME}-reward-init", fetch_demo_model()))


def cmd_build_tiny(args):
    from .models import build_tiny_model

    print(build_tiny_model(Path(args.target)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalequest-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="run configuration (YAML)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set stages.responses.n=3 (repeatable)")
        sp.add_argument("--force", action="store_true", help="rerun stages even if finished with the same config")
        return sp

    run = with_config(sub.add_parser("run", help="run the configured stages in order"))
    run.add_argument("--stages", help="comma-separated subset, e.g. questions,responses")
    run.set_defaults(fn=cmd_run)
    q = with_config(sub.add_parser("questions", help="question generation stage only"))
    q.set_defaults(fn=lambda a: cmd_run(a, ["questions"]))
    r = with_config(sub.add_parser("responses", help="response generation stage only"))
    r.add_argument("--input", help="Parquet/JSONL file or folder with a 'query' column (local or s3://)")
    r.set_defaults(fn=lambda a: cmd_run(a, ["responses"]))
    v = with_config(sub.add_parser("validate", help="check a config and exit"))
    v.set_defaults(fn=cmd_validate)
    pl = with_config(sub.add_parser("plan", help="print the stages, what runs them, resources and paths (starts nothing)"))
    pl.add_argument("--offline", action="store_true", help="do not look at the run root for finished stages")
    pl.set_defaults(fn=cmd_plan)

    def with_root(sp):
        sp.add_argument("root", help="a run root: a local directory or s3://bucket/prefix")
        sp.add_argument("--endpoint", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS)")
        return sp

    rp = with_root(sub.add_parser("report", help="write the run's HTML report (one offline file)"))
    rp.add_argument("--out", help="output folder (default: ROOT/report)")
    rp.add_argument("--price", action="append", metavar="NAME=DOLLARS", help="$/hour, e.g. A100=1.30, cpu=0.05 (repeatable)")
    rp.add_argument("--config", help="the run's config (names the accelerators of its stages)")
    rp.add_argument("--set", action="append", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    rp.set_defaults(fn=cmd_report)
    co = with_root(sub.add_parser("cost", help="per-stage CPU-, GPU- and node-hours and $ of a finished run"))
    co.add_argument("--price", action="append", metavar="NAME=DOLLARS", help="$/hour, e.g. A100=1.30, cpu=0.05 (repeatable)")
    co.add_argument("--config", help="the run's config (names the accelerators of its stages)")
    co.add_argument("--set", action="append", metavar="KEY=VALUE", help=argparse.SUPPRESS)
    co.set_defaults(fn=cmd_cost)
    es = with_config(sub.add_parser("estimate", help="GPU-hours of CONFIG's sizes from a small finished run, beside the paper's table"))
    es.add_argument("--from", required=True, metavar="ROOT", help="the small run's root (its measured tokens per row)")
    es.add_argument("--throughput", action="append", metavar="WORKLOAD[/GPU]=TOK_PER_S",
                    help="override a per-GPU throughput assumption, e.g. generate/H100=7900 or score=6200")
    es.add_argument("--endpoint", help="S3-compatible endpoint of the small run's root")
    es.set_defaults(fn=cmd_estimate)
    pu = with_root(sub.add_parser("publish", help="upload ROOT/selection (dataset card + data) to the Hugging Face hub"))
    pu.add_argument("--repo", required=True, metavar="ORG/NAME", help="dataset repository (created if missing, private)")
    pu.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the write token (default HF_TOKEN)")
    pu.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    pu.set_defaults(fn=cmd_publish)

    models = sub.add_parser("models", help="model utilities").add_subparsers(dest="models_command", required=True)
    fd = models.add_parser("fetch-demo", help="build the SmolLM2-135M-Instruct demo checkpoint (offline)")
    fd.add_argument("--target", help="output directory (default: the cache)")
    fd.add_argument("--force", action="store_true")
    fd.set_defaults(fn=cmd_fetch_demo)
    bt = models.add_parser("build-tiny", help="a tiny random llama for plumbing tests")
    bt.add_argument("target")
    bt.set_defaults(fn=cmd_build_tiny)
    return p


def main(argv=None) -> int:
    from .config import ConfigError
    from .storage import InputError

    args = parser().parse_args(argv)
    from .console import filtered_console

    try:
        with filtered_console() if args.command in ("run", "questions", "responses") else _nothing():
            args.fn(args)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def _nothing():
    yield


if __name__ == "__main__":
    sys.exit(main())
