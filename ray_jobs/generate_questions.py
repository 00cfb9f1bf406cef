"""Ray job entrypoint for the question-generation stage only (see run_pipeline.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_pipeline import entry  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:], "questions"))
