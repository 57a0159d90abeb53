"""Entry point of the real-time API.

``python main.py`` serves on API_HOST:API_PORT (default 0.0.0.0:8000, no auto-reload);
``uvicorn main:app`` works as well (the lifespan then loads the settings).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from api import app_from_environment, create_app
from classifier import ConversationClassifier
from config import field_help, load_settings
from error_handler import EXIT_OK, ConfigError
from logger import configure_logging

# For `uvicorn main:app`; building the app reads and connects nothing.
app = app_from_environment()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python main.py",
        description="Serve the conversation classification API (POST /classify, GET /health, GET /ready). "
        "Other settings come from the environment or .env (see README).",
    )
    parser.add_argument("--host", dest="api_host", default=None, help=field_help("api_host"))
    parser.add_argument("--port", dest="api_port", type=int, default=None, help=field_help("api_port"))
    parser.add_argument(
        "--log-level", dest="log_level", default=None, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help=field_help("log_level"),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load and check the configuration, then serve until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(vars(args))
        configure_logging(settings.log_level)
        classifier = ConversationClassifier.from_settings(settings)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)  # message and hint on one line
        return e.exit_code
    uvicorn.run(
        create_app(settings, classifier=classifier),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # keep the project's log format (logger.py)
        access_log=False,  # one INFO line per request comes from api.py instead
    )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
