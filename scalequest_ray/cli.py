"""`scalequest-ray`: run the configured pipeline or one stage; fetch the demo model."""

from __future__ import annotations

import argparse
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
    try:
        args.fn(args)
    except (ConfigError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
