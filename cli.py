"""Command line of the batch processor: ``python batch_processor.py [options]``.

Precedence: command-line flags, then the environment (and ``.env``), then defaults.
Exit codes are named below; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from async_llm_wrapper import create_async_llm_client
from batch_processor import BatchProcessor, RunOptions, RunSummary, new_job_id
from classifier import ConversationClassifier
from config import Settings, field_help, load_settings
from error_handler import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ClassifierError,
    ConfigError,
    fail,
)
from logger import configure_logging
from mongo_client import MongoStore, data_identity
from utils.batch_file_manager import BatchFileManager
from utils.progress import ProgressTracker, build_progress, monitoring_components

# Shared codes (error_handler): 0 ok, 1 the run broke off (MongoDB lost mid-run, a batch file
# unwritable), 2 bad command line, 3 invalid configuration, 4 MongoDB or Ollama unavailable at
# start-up, 130 interrupted. The processor's own outcome:
EXIT_INCOMPLETE = 5  # finished, but some conversations failed or wait in a retry queue

EPILOG = f"""\
other settings (environment or .env):
  MONGODB_CONNECTION_STRING  MongoDB URI, or 'embedded' for a local SecantusDB in ./data/db (default mongodb://localhost:27017)
  MONGODB_DATABASE_NAME      database (default customer_support)
  MONGODB_SOURCE_COLLECTION  conversations to classify (default conversation_set)
  MONGODB_RESULTS_COLLECTION where results go (default sentimental_analysis)
  MONGODB_MAX_RETRIES        retries of a transient MongoDB error, 1/2/4 s apart (default 3)
  MONGODB_TIMEOUT_MS         server selection and socket timeout (default 30000)
  OLLAMA_ENDPOINT, OLLAMA_MODEL, OLLAMA_TIMEOUT, OLLAMA_KEEP_ALIVE, OLLAMA_MAX_RETRIES (LLM retries, 2/4/8 s apart)
  BATCH_RETRY_QUEUE_ATTEMPTS retry-queue passes before a conversation is marked failed (default 3)
  CIRCUIT_BREAKER_FAILURE_THRESHOLD / CIRCUIT_BREAKER_RECOVERY_SECONDS  pause after N Ollama failures (5 / 300 s)

exit codes:
  {EXIT_OK} all conversations classified   {EXIT_INCOMPLETE} finished, some failed or queued for retry
  {EXIT_FAILURE} the run broke off           {EXIT_CONFIG} invalid configuration
  {EXIT_UNAVAILABLE} MongoDB or Ollama unavailable at start-up   {EXIT_USAGE} bad command line
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python batch_processor.py",
        description="Classify the conversations of a MongoDB collection with a local Ollama model: "
        "intent, topic, sentiment and a one-line categorization, written to a results collection. "
        "Crash-safe: rerun after any interruption and it continues where it stopped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", dest="batch_processor_mode", choices=["batch", "continuous"],
                        help=field_help("batch_processor_mode"))
    parser.add_argument("--batch-size", dest="mongodb_batch_size", type=_positive_int, metavar="N",
                        help=field_help("mongodb_batch_size"))
    parser.add_argument("--max-concurrent", dest="batch_max_concurrent", type=_positive_int, metavar="N",
                        help=field_help("batch_max_concurrent"))
    parser.add_argument("--limit", type=_positive_int, metavar="N",
                        help="Classify at most N new conversations, then stop (work recovered from an "
                        "earlier run is always finished first). [default: no limit]")
    parser.add_argument("--poll-interval", dest="batch_poll_interval", type=_positive_float, metavar="S",
                        help=field_help("batch_poll_interval"))
    parser.add_argument("--batch-files-dir", dest="batch_files_dir", metavar="DIR",
                        help=field_help("batch_files_dir"))
    parser.add_argument("--monitoring-mode", dest="batch_monitoring_mode",
                        choices=["development", "production", "interactive"],
                        help=field_help("batch_monitoring_mode"))
    parser.add_argument("--console", action="store_true", help="Add the console progress bar to the monitoring mode.")
    parser.add_argument("--logs", action="store_true", help="Add structured log lines to the monitoring mode.")
    parser.add_argument("--progress-files", action="store_true",
                        help="Add progress_<job>.json and .csv in the batch files folder to the monitoring mode.")
    parser.add_argument("--retry-failed", action="store_true",
                        help="Also classify conversations marked failed by earlier runs (and ones left "
                        "'processing' without a batch file).")
    parser.add_argument("--verbose", action="store_true", help="Log at DEBUG level (LOG_LEVEL=DEBUG).")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("batch_processor_mode", "mongodb_batch_size", "batch_max_concurrent", "batch_poll_interval",
                     "batch_files_dir", "batch_monitoring_mode")
    }
    if args.verbose:
        overrides["log_level"] = "DEBUG"
    return load_settings(overrides)


def print_summary(summary: RunSummary, settings: Settings) -> None:
    p = summary.progress
    lines = [
        f"Job {summary.job_id} {summary.status} in {p.elapsed_seconds:.1f} s",
        f"  classified        {p.successful}",
        f"  failed            {p.failed}"
        + ("   (status 'failed' with failure_reason in the source collection; rerun with --retry-failed)"
           if p.failed else ""),
        f"  in retry queue    {p.queued_for_retry}" + ("   (retried on the next run)" if p.queued_for_retry else ""),
        f"  already done      {p.already_classified}",
        f"  rate              {p.successful / p.elapsed_seconds if p.elapsed_seconds else 0:.2f} conversations/s",
        f"  results           {settings.mongodb_database_name}.{settings.mongodb_results_collection}",
    ]
    print("\n".join(lines), flush=True)


async def run(settings: Settings, options: RunOptions, components: set[str]) -> int:
    """Check the services, run the processor until done or stopped, print the summary."""
    classifier = ConversationClassifier.from_settings(settings)
    files = BatchFileManager(settings.batch_files_dir)
    files.lock()
    try:
        files.claim(data_identity(settings))
        async with MongoStore.connect(settings) as store, create_async_llm_client(settings) as llm:
            await store.ping()
            await llm.check_ready()
            await store.ensure_indexes()
            progress = build_progress(ProgressTracker(new_job_id()), components, files.directory)
            processor = BatchProcessor(settings, store, llm, classifier, files, progress, options)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, processor.request_stop)
            try:
                summary = await processor.run()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
    finally:
        files.unlock()
    print_summary(summary, settings)
    return EXIT_OK if summary.all_succeeded else EXIT_INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, and turn the outcome into an exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as e:
        return fail(e)
    components = monitoring_components(
        settings.batch_monitoring_mode, console=args.console, logs=args.logs, files=args.progress_files
    )
    # Without the log component only problems are logged; the console bar shows progress.
    configure_logging(settings.log_level if "logs" in components or args.verbose else "WARNING")
    options = RunOptions(limit=args.limit, retry_failed=args.retry_failed)
    try:
        return asyncio.run(run(settings, options, components))
    except ClassifierError as e:  # each error carries its exit code (error_handler)
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
