"""The one settings object of the project.

Every setting has an environment variable named after the field in upper case
(``ollama_endpoint`` -> ``OLLAMA_ENDPOINT``). Values come from, highest first:
explicit overrides (the command line), the process environment, a ``.env``
file, and the defaults below. This is the only module that reads the
environment; everything else receives a :class:`Settings` as an argument.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from error_handler import ConfigError
from logger import redact_url

CONFIG_DIR = Path(__file__).resolve().parent

#: The value of MONGODB_CONNECTION_STRING that starts a local SecantusDB child process.
EMBEDDED_DATABASE = "embedded"

#: BATCH_MAX_CONCURRENT=auto: the most conversations at once the controller may reach.
AUTO_CONCURRENCY_CEILING = 64


class Settings(BaseModel):
    """All configuration, validated. Field descriptions double as CLI and README help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- Ollama -------------------------------------------------------------------------
    ollama_endpoint: str = Field(
        "http://localhost:11434",
        description="Base URL of the Ollama server, or several separated by commas (each call goes to the "
        "least busy one).",
    )
    ollama_model: str = Field("llama3", min_length=1, description="Ollama model used for classification.")
    ollama_timeout: float = Field(120.0, gt=0, description="Seconds to wait for one Ollama answer.")
    ollama_keep_alive: str = Field("5m", description="How long Ollama keeps the model loaded after a request.")
    ollama_num_predict: int = Field(256, ge=32, le=4096, description="Maximum tokens the model may generate.")
    ollama_max_retries: int = Field(3, ge=0, le=10, description="Batch: retries of a transient LLM failure.")
    ollama_retry_base_seconds: float = Field(
        2.0, ge=0, description="Batch: first LLM retry delay; doubles each retry (2, 4, 8 s)."
    )

    # --- LLM provider and confidence ----------------------------------------------------
    llm_provider: Literal["ollama", "openai"] = Field(
        "ollama",
        description="ollama: Ollama's /api/chat; openai: any OpenAI-compatible server "
        "(OLLAMA_ENDPOINT is then its base URL, e.g. http://localhost:8000/v1).",
    )
    # SecretStr: repr(), str() and logs show '**********', never the key.
    llm_api_key: SecretStr | None = Field(
        None, description="Sent as 'Authorization: Bearer <key>' (OpenAI-compatible servers that need one)."
    )
    confidence: bool = Field(
        True,
        description="on: ask the server for token log-probabilities and answer label confidences; off: ask for "
        "none (confidence is null, CONFIDENCE_THRESHOLD has no effect).",
    )
    llm_top_logprobs: int = Field(
        10, ge=0, le=20, description="Alternatives per token asked for to compute label confidences; 0: none."
    )
    confidence_threshold: float = Field(
        0.0, ge=0, le=1, description="Results whose label confidence is below this get needs_review (0: off)."
    )

    # --- Prompt -------------------------------------------------------------------------
    taxonomy_file: Path = Field(CONFIG_DIR / "taxonomy.json", description="Label fields and labels.")
    few_shots_file: Path = Field(CONFIG_DIR / "few_shots.json", description="Few-shot examples.")
    categorization: bool = Field(
        True, description="on: the model also writes a few words saying what the customer wants; off: labels only "
        "(fewer tokens; categorization is null)."
    )
    categorization_max_chars: int = Field(
        40,
        ge=0,
        le=300,
        description="Longest categorization (characters; the answer schema's maxLength, which the server enforces "
        "while generating); 0: no maxLength in the schema, for a server that refuses it.",
    )
    answer_format: Literal["array", "object"] = Field(
        "array",
        description="array: the model answers [categorization, label, ...] (the fewest tokens); object: "
        '{"c": ..., "i": ...} with one-letter keys, for a server whose strict mode refuses prefixItems '
        "(OpenAI's hosted API).",
    )
    conversation_char_budget: int = Field(
        12000,
        ge=500,
        description="Longest transcript sent to the model; longer ones keep the opening and latest turns.",
    )

    # --- Logging ------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    # --- API ----------------------------------------------------------------------------
    api_host: str = Field("0.0.0.0", description="Address the API listens on.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port the API listens on.")
    api_max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body (bytes).")
    api_max_concurrency: int = Field(
        8, ge=1, le=256, description="LLM calls in flight at once per API process; further requests wait their turn."
    )
    api_queue_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for its turn before it gets 503 llm_busy."
    )

    # --- MongoDB ------------------------------------------------------------------------
    mongodb_connection_string: str = Field(
        "mongodb://localhost:27017",
        description="MongoDB URI, or 'embedded' for a local SecantusDB in ./data/db (development only).",
    )
    mongodb_database_name: str = Field("customer_support", min_length=1, description="Database name.")
    mongodb_source_collection: str = Field("conversation_set", min_length=1, description="Conversations to classify.")
    mongodb_results_collection: str = Field(
        "sentimental_analysis", min_length=1, description="Where classifications are written."
    )
    mongodb_jobs_collection: str = Field(
        "jobs", min_length=1, description="Where batch jobs record their progress (read by the dashboard)."
    )
    mongodb_batch_size: int = Field(100, ge=1, le=10000, description="Conversations per batch file.")
    mongodb_max_retries: int = Field(3, ge=0, le=10, description="Retries of a transient MongoDB failure.")
    mongodb_timeout_ms: int = Field(30000, ge=100, description="MongoDB server selection and socket timeout (ms).")
    mongodb_retry_base_seconds: float = Field(
        1.0, ge=0, description="First MongoDB retry delay; doubles each retry (1, 2, 4 s)."
    )
    embedded_db_path: Path = Field(Path("data/db"), description="Data folder of the embedded database.")

    # --- Batch processor ----------------------------------------------------------------
    batch_processor_mode: Literal["batch", "continuous"] = Field(
        "batch",
        description="batch: classify every pending conversation, then exit; continuous: keep polling for new ones.",
    )
    batch_max_concurrent: int = Field(
        5,
        ge=1,
        le=256,
        description="Conversations classified at once, in total across the LLM servers; 'auto' finds the level "
        f"(AIMD) up to {AUTO_CONCURRENCY_CEILING}.",
    )
    batch_auto_concurrency: bool = Field(
        False,
        description="Find the concurrency automatically (start low, raise while throughput rises and no server "
        "is busy, halve on busy) up to BATCH_MAX_CONCURRENT; BATCH_MAX_CONCURRENT=auto sets this.",
    )
    batch_files_dir: Path = Field(Path("batch_files"), description="Folder for batch, queue and progress files.")
    batch_poll_interval: float = Field(30.0, gt=0, description="Continuous mode: seconds between polls.")
    batch_change_streams: bool = Field(
        True,
        description="Continuous mode: wake on MongoDB change streams when the server has them "
        "(the poll interval stays as a safety net); false: poll only.",
    )
    batch_monitoring_mode: Literal["development", "production", "interactive"] = Field(
        "interactive",
        description="development: progress bar; production: logs + progress files; interactive: bar + logs.",
    )
    batch_retry_queue_attempts: int = Field(
        3, ge=1, le=100, description="Retry-queue passes before a conversation is marked failed."
    )
    batch_shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="On SIGINT/SIGTERM, how long in-flight conversations may finish."
    )
    batch_lease_seconds: float = Field(
        300.0, gt=0, description="Lease of a claimed conversation; renewed while worked on, taken over once expired."
    )
    batch_worker_id: str = Field(
        "", description="This processor's id in claims (unique per running processor); empty: host name + pid."
    )
    batch_failure_window: int = Field(
        100, ge=1, description="Stop check: the last N finished conversations whose model failure rate is watched."
    )
    batch_max_failure_rate: float = Field(
        0.10, ge=0, le=1,
        description="Stop the job when more than this share of the window failed because of the model; 0 turns it off.",
    )
    circuit_breaker_failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures of an LLM server that pause calls to it (a circuit per server)."
    )
    circuit_breaker_recovery_seconds: float = Field(
        300.0, ge=0, description="Pause before trying Ollama again after the circuit opened."
    )

    @field_validator("ollama_endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str) -> str:
        urls = [url.strip().rstrip("/") for url in value.split(",")]
        if not any(urls):
            raise ValueError("must name at least one server, e.g. http://localhost:11434")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"{redact_url(url)!r} must start with http:// or https://, e.g. http://localhost:11434 "
                    "(several servers: separated by commas)"
                )
        if len(set(urls)) != len(urls):
            raise ValueError("lists a server twice")
        return ",".join(urls)

    @model_validator(mode="before")
    @classmethod
    def _auto_concurrency(cls, data: Any) -> Any:
        # BATCH_MAX_CONCURRENT=auto keeps the field an int (the ceiling) for everything that
        # sizes pools by it, and turns the adaptive controller on.
        if isinstance(data, dict) and str(data.get("batch_max_concurrent", "")).strip().lower() == "auto":
            data = {**data, "batch_max_concurrent": AUTO_CONCURRENCY_CEILING, "batch_auto_concurrency": True}
        return data

    @field_validator("llm_provider", mode="before")
    @classmethod
    def _lower_provider(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("llm_api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def llm_endpoints(self) -> list[str]:
        """The LLM servers' base URLs (OLLAMA_ENDPOINT split at commas), in the order given."""
        return self.ollama_endpoint.split(",")

    @property
    def uses_embedded_database(self) -> bool:
        """True when MongoDB is the local development SecantusDB started on demand."""
        return self.mongodb_connection_string.strip().lower() == EMBEDDED_DATABASE


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return field_name.upper()


def field_help(field_name: str) -> str:
    """Description, environment variable and default of a setting, for ``--help``.

    The flags themselves default to None so that an unset flag lets the environment win.
    """
    info = Settings.model_fields[field_name]
    default = info.default
    if isinstance(default, Path) and default.is_absolute():
        default = default.relative_to(CONFIG_DIR.parent) if default.is_relative_to(CONFIG_DIR.parent) else default
    # argparse %-formats help strings: a literal % must be doubled.
    text = f"{info.description} [env {env_name(field_name)}; default: {default}]"
    return text.replace("%", "%%")


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> Settings:
    """Build the settings: ``overrides`` > ``environ`` (default ``os.environ``) > ``env_file`` > defaults.

    ``overrides`` entries whose value is None are ignored, so an argparse namespace
    with unset flags can be passed as is. Raises :class:`ConfigError` naming the
    variable when a value is invalid.
    """
    environ = os.environ if environ is None else environ
    file_values: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        file_values = dotenv_values(env_file)

    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        key = env_name(name)
        if key in environ:
            values[name] = environ[key]
        elif file_values.get(key) is not None:
            values[name] = file_values[key]
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value

    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            source = "command line" if overrides and overrides.get(name) is not None else env_name(name)
            value = values.get(name)
            shown = redact_url(value) if isinstance(value, str) else value  # a URL's password never shows
            problems.append(f"{source}={shown!r}: {err['msg']}")
        raise ConfigError("Invalid configuration: " + "; ".join(problems)) from e
