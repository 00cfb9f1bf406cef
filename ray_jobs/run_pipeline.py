"""Ray job entrypoint: run the configured stages on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/run_pipeline.py --config configs/paper_gpu.yaml [--stages questions] [--set k=v]

The job's driver joins the cluster through RAY_ADDRESS, which `ray job submit` sets.
Exit status: 0 done, 2 bad config or input (nothing started), 1 anything else.
"""

import sys
from pathlib import Path

# --working-dir ships the repository; the package may not be installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalequest_ray.cli import main  # noqa: E402


def entry(argv, command="run"):
    args = list(argv)
    if "--config" in args:
        i = args.index("--config")
        config = args[i + 1]
        del args[i : i + 2]
    else:
        print("error: --config is required", file=sys.stderr)
        return 2
    return main([command, config, *args])


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
