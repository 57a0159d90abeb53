"""Command line of the batch processor: ``python batch_processor.py [options]``.

Precedence: command-line flags, then the environment (and ``.env``), then defaults.
Exit codes are named below; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
from collections.abc import Iterable
from typing import Any, NoReturn

from async_llm_wrapper import create_async_llm_client
from batch_processor import BatchProcessor, RunOptions, RunSummary, new_job_id
from classifier import ConversationClassifier
from config import Settings, field_help, load_settings
from error_handler import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_FAILURE_RATE,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    run_command,
)
from llm_pool import AsyncLLMPool
from logger import configure_logging
from mongo_client import MongoStore, data_identity
from retrieval import mongo_source
from utils.batch_file_manager import BatchFileManager
from utils.command_line import command_parser, positive_float, positive_int, settings_epilog
from utils.embedded_llm import embedded_llm
from utils.job_recorder import JobRecorder
from utils.progress import ProgressTracker, build_progress, monitoring_components

#: Settings with a flag of their own (the flag's dest is the setting's name).
FLAG_SETTINGS = ("batch_processor_mode", "mongodb_batch_size", "batch_max_concurrent", "batch_poll_interval",
                 "batch_files_dir", "batch_monitoring_mode", "batch_worker_id")

EPILOG = f"""\
{settings_epilog(exclude=(*FLAG_SETTINGS, "log_level"), exclude_prefixes=("api_",))}

exit codes:
  {EXIT_OK} all conversations classified   {EXIT_INCOMPLETE} finished, some failed or queued for retry
  {EXIT_FAILURE} the run broke off, or another processor holds the batch files folder
  {EXIT_CONFIG} invalid configuration, or a batch files folder that cannot be created or written
  {EXIT_UNAVAILABLE} MongoDB or Ollama unavailable at start-up   {EXIT_USAGE} bad command line
  {EXIT_FAILURE_RATE} stopped: too many conversations failed because of the model (BATCH_MAX_FAILURE_RATE)
  {EXIT_INTERRUPTED} interrupted
"""


def _concurrency(text: str) -> int | str:
    """``--max-concurrent``: a positive number, or ``auto`` (AIMD, see llm_pool)."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "python batch_processor.py",
        "Classify the conversations of a MongoDB collection with a local Ollama model: "
        "the label fields of the taxonomy (intent, topic, sentiment by default) and a one-line categorization, "
        "written to a results collection. "
        "Crash-safe: rerun after any interruption and it continues where it stopped.",
        EPILOG,
    )
    parser.add_argument("--mode", dest="batch_processor_mode", choices=["batch", "continuous"],
                        help=field_help("batch_processor_mode"))
    parser.add_argument("--batch-size", dest="mongodb_batch_size", type=positive_int, metavar="N",
                        help=field_help("mongodb_batch_size"))
    parser.add_argument("--max-concurrent", dest="batch_max_concurrent", type=_concurrency, metavar="N|auto",
                        help=field_help("batch_max_concurrent"))
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="Classify at most N new conversations, then stop (work recovered from an "
                        "earlier run is always finished first). [default: no limit]")
    parser.add_argument("--poll-interval", dest="batch_poll_interval", type=positive_float, metavar="S",
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
                        help="Also classify conversations marked failed by earlier runs (each once per run; "
                        "claims left by a dead processor are taken over without it).")
    parser.add_argument("--worker-id", dest="batch_worker_id", metavar="ID", help=field_help("batch_worker_id"))
    parser.add_argument("--verbose", action="store_true", help="Log at DEBUG level (LOG_LEVEL=DEBUG).")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in FLAG_SETTINGS}
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
        f"  skipped           {p.skipped}" + ("   (no customer turn: status 'skipped', nothing to classify)"
                                               if p.skipped else ""),
        f"  lost claim        {p.lost_claims}" + ("   (taken over or reset while this processor worked: the newer "
                                                  "result stands)" if p.lost_claims else ""),
        f"  rate              {p.successful / p.elapsed_seconds if p.elapsed_seconds else 0:.2f} conversations/s",
        f"  results           {settings.mongodb_database_name}.{settings.mongodb_results_collection}",
        f"  left              {summary.left.describe()}",
    ]
    print("\n".join(lines), flush=True)


async def check_services(settings: Settings, store: MongoStore, llm: AsyncLLMPool, files: BatchFileManager,
                         label_fields: Iterable[str]) -> None:
    """Ping MongoDB, tie the folder to it, create the indexes; check the LLM servers meanwhile.

    The LLM check (a GET per server in a worker thread) overlaps MongoDB's round trips instead of
    following them (issue 19). Its outcome is taken (logged, raised) once MongoDB's steps are done,
    as when the checks ran one after the other: without MongoDB, its error alone is reported. A
    server that fails its check gets no call until its probe.
    """
    checking = asyncio.create_task(llm.check_all())
    try:
        await store.ping()
        # Tied only once MongoDB answered: a run that never reached it must not claim the folder.
        files.tie_to(data_identity(settings))
        await store.ensure_indexes(label_fields)
    except BaseException:
        checking.cancel()
        await asyncio.gather(checking, return_exceptions=True)  # its outcome matters no more
        raise
    llm.settle_check(await checking, pause_failed=True)


async def run(settings: Settings, options: RunOptions, components: set[str]) -> int:
    """Check the services, run the processor until done or stopped, print the summary."""
    classifier = ConversationClassifier.from_settings(settings)
    files = BatchFileManager(settings.batch_files_dir)
    with files.locked():
        # One client per LLM server (LLM_ENDPOINT may list several), routed by the pool.
        async with MongoStore.connect(settings) as store, AsyncLLMPool(settings, create_async_llm_client) as llm:
            await check_services(settings, store, llm, files, classifier.taxonomy.field_names)
            if classifier.retriever is not None:  # FEW_SHOT_SOURCE reviewed/both: examples from this database
                classifier.retriever.source = mongo_source(store.results.database, settings, classifier.taxonomy,
                                                           llm.embed if settings.embedding_model else None)
            tracker = ProgressTracker(new_job_id())
            # The recorder's block encloses the progress's: closing the progress gives it the final state,
            # leaving its own block waits for that to be written.
            async with (JobRecorder(store.uri, settings, tracker.job_id) as recorder,
                        build_progress(tracker, components, files.directory) as progress):
                progress.reporters.append(recorder)  # the dashboard's list of jobs
                processor = BatchProcessor(settings, store, llm, classifier, files, progress, options)
                loop = asyncio.get_running_loop()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, processor.request_stop)
                try:
                    summary = await processor.run()
                    if llm.observer is not None:  # --max-concurrent auto: say where it settled
                        logging.getLogger(__name__).info("%s", llm.observer.summary())
                finally:
                    for signum in (signal.SIGINT, signal.SIGTERM):
                        loop.remove_signal_handler(signum)
    print_summary(summary, settings)
    return EXIT_OK if summary.all_succeeded else EXIT_INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, and turn the outcome into an exit code (error_handler.run_command)."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run_from_args(args))


def _run_from_args(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    components = monitoring_components(
        settings.batch_monitoring_mode, console=args.console, logs=args.logs, files=args.progress_files
    )
    # Without the log component only problems are logged; the console bar shows progress.
    configure_logging(settings.log_level if "logs" in components or args.verbose else "WARNING")
    options = RunOptions(limit=args.limit, retry_failed=args.retry_failed)
    # LLM_ENDPOINT=embedded: the embedded model runs for the run, started from the main thread
    # (a child dies with the thread that started it).
    with embedded_llm(settings) as llm_settings:
        return asyncio.run(run(llm_settings, options, components))


def exit_fast(code: int) -> NoReturn:
    """Exit with ``code``, the interpreter's final garbage collection skipped over what lives until then.

    Everything the run opened is closed by now; what is left (modules, pydantic's schemas, the
    libraries' tables) dies with the process. The interpreter still traverses it all in its final
    collection: about half a second per run on this project's imports (issue 19). Frozen, the
    objects are left out of that traversal; they are still freed as their modules are torn down.
    """
    gc.freeze()
    raise SystemExit(code)


def collect_after_imports() -> None:
    """Turn the cyclic garbage collector on (``python batch_processor.py`` turns it off before the
    imports), the imported modules' objects frozen first: they live until the exit, and leaving them
    out of the collections of the run saves every full collection a traversal of them all (issue 19)."""
    gc.freeze()
    gc.enable()


if __name__ == "__main__":
    collect_after_imports()
    exit_fast(main())
