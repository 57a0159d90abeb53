"""The demo behind ``make demo``: import the sample conversations, classify them, print the report.

    python scripts/demo.py [--chart FILE.png]

1. checks that Ollama answers and has the model (stops at once with the fix otherwise);
2. runs the three commands a user would run, printing each one, with the database of
   MONGODB_CONNECTION_STRING (``embedded`` by default with ``make demo``: each step starts
   the development database, data in ./data/db, and stops it) and the demo's own batch
   files folder, data/demo_batch_files:
   ``scripts/import_data.py data/sample_conversations.json``, ``batch_processor.py``,
   ``scripts/report.py``.

Running it again adds nothing and classifies nothing new: it prints the report again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

# The project (installed by `make install`) imports from anywhere; ROOT finds its data files.
ROOT = Path(__file__).resolve().parents[1]

from config import load_settings  # noqa: E402
from error_handler import EXIT_FAILURE, EXIT_OK, ConfigError, LLMError, fail  # noqa: E402
from llm_wrapper import OllamaClient  # noqa: E402
from logger import configure_logging, redact_url  # noqa: E402

# Exit codes (error_handler): 0 ok, 1 a step failed (it printed why), 3 invalid configuration,
# 4 Ollama unreachable or the model not pulled.

SAMPLE = ROOT / "data" / "sample_conversations.json"
# The demo's database is its own, so are its batch files (never mixed with a real database's).
DEMO_BATCH_FILES = ROOT / "data" / "demo_batch_files"


def run_step(title: str, command: list[str], batch_files: Path, *, ok_codes: tuple[int, ...] = (0,)) -> int:
    """Run one step as the user would; returns its exit code."""
    shown = " ".join(shlex.quote(part) for part in [Path(command[0]).name, *command[1:]])
    print(f"\n== {title}\n$ {shown}", flush=True)
    # The step reads its settings like any run would; only the batch files folder is the demo's.
    env = {**os.environ, "BATCH_FILES_DIR": str(batch_files)}
    code = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    if code not in ok_codes:
        print(f"error: step '{title}' failed with exit code {code}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/demo.py",
        description="Import the sample conversations, classify them with the configured Ollama model, "
        "print the report. Uses MONGODB_CONNECTION_STRING (make demo sets it to 'embedded').",
    )
    parser.add_argument("--chart", metavar="FILE.png", default="reports/demo_chart.png",
                        help="where the report's chart goes [default: %(default)s]")
    parser.add_argument("--batch-files-dir", metavar="DIR", default=str(DEMO_BATCH_FILES.relative_to(ROOT)),
                        help="the demo's own batch files folder [default: %(default)s]")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as e:
        return fail(e)
    configure_logging("WARNING")

    print(f"Checking Ollama at {redact_url(settings.ollama_endpoint)} (model {settings.ollama_model}) ...", flush=True)
    try:
        with OllamaClient(settings) as ollama:
            ollama.check_ready()
    except LLMError as e:
        return fail(e, extra_hint=f"The demo classifies with a real model: start Ollama, run "
                    f"`ollama pull {settings.ollama_model}`, then `make demo` again.")

    chart = Path(args.chart).resolve()
    batch_files = Path(args.batch_files_dir).resolve()
    chart.parent.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    steps = [
        ("Import the sample conversations", [python, "-m", "scripts.import_data", str(SAMPLE.relative_to(ROOT))], (0,)),
        # 5: finished, but some conversations failed or wait for a retry: still worth a report.
        ("Classify them", [python, "batch_processor.py", "--monitoring-mode", "development"], (0, 5)),
        ("Report", [python, "-m", "scripts.report", "--chart", str(chart)], (0,)),
    ]
    for title, command, ok in steps:
        if run_step(title, command, batch_files, ok_codes=ok) not in ok:
            return EXIT_FAILURE
    print(f"\nChart: {args.chart}\nRun `make demo` again any time: nothing is imported or classified twice.")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
