"""The one settings object of the project.

Every setting has an environment variable named after the field in upper case
(``llm_endpoint`` -> ``LLM_ENDPOINT``); a few are also read under a former name
(:data:`FORMER_NAMES`). Values come from, highest first: explicit overrides (the
command line), the process environment, a ``.env`` file, and the defaults below.
This is the only module that reads the environment; everything else receives a
:class:`Settings` as an argument.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from error_handler import ConfigError
from logger import redact_url

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent

#: The value of MONGODB_CONNECTION_STRING that starts a local SecantusDB child process.
EMBEDDED_DATABASE = "embedded"
#: The value of LLM_ENDPOINT (or OLLAMA_ENDPOINT) that starts llama.cpp's llama-server with the packaged small model
#: as a child process (utils/embedded_llm.py).
EMBEDDED_LLM = "embedded"

#: BATCH_MAX_CONCURRENT=auto: the most conversations at once the controller may reach.
AUTO_CONCURRENCY_CEILING = 64

#: API_MAX_WAITING when not set: this many waiting requests per LLM slot (API_MAX_CONCURRENCY).
WAITING_PER_SLOT = 2


class Settings(BaseModel):
    """All configuration, validated. Field descriptions double as CLI and README help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- The LLM server -----------------------------------------------------------------
    llm_endpoint: str = Field(
        "http://localhost:11434",
        description="Base URL of the LLM server (LLM_PROVIDER=openai: its OpenAI-compatible base URL, e.g. "
        "http://localhost:8000/v1), or several separated by commas (each call goes to the least busy one); "
        f"'{EMBEDDED_LLM}': a small model on llama.cpp started for the run (rough labels, for trying). "
        "Also read as OLLAMA_ENDPOINT, its former name (when both are set, LLM_ENDPOINT wins).",
    )
    llm_model: str = Field(
        "llama3",
        min_length=1,
        description="Model used for classification. Also read as OLLAMA_MODEL, its former name (when both are set, "
        "LLM_MODEL wins).",
    )
    ollama_timeout: float = Field(
        120.0, gt=0, description="Seconds to wait for one Ollama answer (unset with LLM_ENDPOINT=embedded: 600)."
    )
    ollama_keep_alive: str = Field("5m", description="How long Ollama keeps the model loaded after a request.")
    ollama_num_predict: int = Field(256, ge=32, le=4096, description="Maximum tokens the model may generate.")
    ollama_max_retries: int = Field(3, ge=0, le=10, description="Batch: retries of a transient LLM failure.")
    ollama_retry_base_seconds: float = Field(
        2.0, ge=0, description="Batch: first LLM retry delay; doubles each retry (2, 4, 8 s)."
    )
    llama_server_bin: str = Field(
        "",
        description="LLM_ENDPOINT=embedded: llama.cpp's llama-server to run; empty: the one `make run` builds "
        "(~/.cache/support-classifier), else llama-server on PATH.",
    )

    # --- LLM provider and confidence ----------------------------------------------------
    llm_provider: str = Field(
        "ollama",
        description="The LLM server's API, a name of llm_wrapper.PROVIDERS: ollama (Ollama's /api/chat) or "
        "openai (any OpenAI-compatible server).",
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
        '{"c": ..., "i": ...} with one-letter keys, for a server whose strict mode wants an object at the '
        "root of the schema (OpenAI's hosted API).",
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
    api_max_waiting: int = Field(
        WAITING_PER_SLOT * 8,
        ge=0,
        le=100_000,
        description=f"Requests that may wait for their turn at once per API process (each holds its body); "
        f"beyond them, 503 llm_busy at once. Default: {WAITING_PER_SLOT} x API_MAX_CONCURRENCY.",
    )

    # --- Access to conversations (access.py) ---------------------------------------------
    # SecretStr: repr(), str() and logs show '**********', never a token.
    api_tokens: SecretStr | None = Field(
        None,
        description="Who may read transcripts and review labels: 'name:token' pairs separated by commas "
        "(clients send 'Authorization: Bearer <token>', browsers log in on /login); empty: only an API bound to "
        "a loopback API_HOST serves them.",
    )
    api_session_hours: float = Field(
        8.0, gt=0, le=24 * 30, description="How long a browser's login (/login) lasts before it must log in again."
    )

    # --- Few-shot examples from reviewed conversations (retrieval.py) -------------------
    few_shot_source: Literal["static", "reviewed", "both"] = Field(
        "static",
        description="static: the examples of FEW_SHOTS_FILE; reviewed: for each conversation the FEW_SHOT_K most "
        "similar reviewed ones; both: the static ones, then the reviewed ones.",
    )
    few_shot_k: int = Field(3, ge=1, le=20, description="Reviewed examples added to each prompt.")
    embedding_model: str = Field(
        "",
        description="Model of the LLM server's embeddings endpoint that finds similar reviewed conversations; "
        "empty: a lexical index (BM25).",
    )
    few_shot_refresh_seconds: float = Field(
        60.0, gt=0, description="How often the reviewed examples are read again from MongoDB."
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
    mongodb_embeddings_collection: str = Field(
        "conversation_embeddings", min_length=1,
        description="Where the embeddings of reviewed conversations are kept (computed once per model).",
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

    @field_validator("llm_endpoint")
    @classmethod
    def _endpoint_is_http(cls, value: str) -> str:
        if value.strip().lower() == EMBEDDED_LLM:
            return EMBEDDED_LLM
        # The messages name the one bad server, redacted; the whole value (every server's
        # password) is never repeated (load_settings leaves it out: _MESSAGE_NAMES_THE_VALUE).
        urls = [url.strip().rstrip("/") for url in value.split(",")]
        if not any(urls):
            raise ValueError("must name at least one server, e.g. http://localhost:11434")
        for number, url in enumerate(urls, 1):
            which = f"server {number} of {len(urls)}, " if len(urls) > 1 else ""
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"{which}{redact_url(url)!r}, must start with http:// or https://, e.g. http://localhost:11434 "
                    f"(several servers: separated by commas), or be '{EMBEDDED_LLM}'"
                )
            try:
                urlsplit(url)  # what every URL of the project is split with (llm_pool names servers by it)
            except ValueError:  # its message is not shown: it may quote the credentials
                raise ValueError(
                    f"{which}{redact_url(url)!r}, is not a URL: check the brackets of an IPv6 address, and "
                    "percent-encode special characters of a user name or password (/ as %2F, @ as %40)"
                ) from None
            if url in urls[:number - 1]:
                raise ValueError(f"{which}{redact_url(url)!r}, is listed twice")
        return ",".join(urls)

    @model_validator(mode="before")
    @classmethod
    def _auto_concurrency(cls, data: Any) -> Any:
        # BATCH_MAX_CONCURRENT=auto keeps the field an int (the ceiling) for everything that
        # sizes pools by it, and turns the adaptive controller on.
        if isinstance(data, dict) and str(data.get("batch_max_concurrent", "")).strip().lower() == "auto":
            data = {**data, "batch_max_concurrent": AUTO_CONCURRENCY_CEILING, "batch_auto_concurrency": True}
        return data

    @model_validator(mode="before")
    @classmethod
    def _waiting_follows_concurrency(cls, data: Any) -> Any:
        # API_MAX_WAITING not given: a multiple of the concurrency given. An unreadable concurrency
        # is left to its own validation (and its own message); the field's default stands meanwhile.
        if isinstance(data, dict) and data.get("api_max_waiting") is None:
            try:
                concurrency = int(str(data.get("api_max_concurrency", 8)).strip())
            except ValueError:
                return data
            data = {**data, "api_max_waiting": WAITING_PER_SLOT * max(concurrency, 1)}
        return data

    @field_validator("llm_provider", mode="before")
    @classmethod
    def _lower_provider(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("llm_provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        # The provider table is the one list of names: a provider is one entry there, nothing here.
        # Imported when a value is checked, not with this module (llm_wrapper imports the settings).
        from llm_wrapper import PROVIDERS

        if value not in PROVIDERS:
            raise ValueError(f"must be one of {', '.join(PROVIDERS)}")
        return value

    @field_validator("llm_api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _empty_tokens_are_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_tokens")
    @classmethod
    def _tokens_parse(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_api_tokens(value.get_secret_value())  # raises ValueError naming the entry, never a token
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def llm_endpoints(self) -> list[str]:
        """The LLM servers' base URLs (LLM_ENDPOINT split at commas), in the order given."""
        return self.llm_endpoint.split(",")

    @property
    def api_token_names(self) -> dict[str, str]:
        """API_TOKENS as {token: name} (empty when unset). Never log it."""
        return {} if self.api_tokens is None else parse_api_tokens(self.api_tokens.get_secret_value())

    @property
    def uses_embedded_llm(self) -> bool:
        """True when the LLM is the packaged small model, started on demand (utils/embedded_llm.py)."""
        return self.llm_endpoint == EMBEDDED_LLM

    @property
    def uses_embedded_database(self) -> bool:
        """True when MongoDB is the local development SecantusDB started on demand."""
        return self.mongodb_connection_string.strip().lower() == EMBEDDED_DATABASE


#: Settings also read under an older environment variable: the design's OLLAMA_* names, from before
#: the provider table (the endpoint and the model serve every provider). Both names set in one source
#: (the environment, or the .env file): the new name wins, and a warning names the ignored one. Not
#: an error, because deployments mix them while they move: docker-compose.yml sets LLM_ENDPOINT for
#: its network over a .env that may still say OLLAMA_ENDPOINT=http://localhost:11434. Across sources
#: the usual precedence holds, whichever name each uses (OLLAMA_MODEL in the environment beats
#: LLM_MODEL in .env).
FORMER_NAMES: dict[str, str] = {"llm_endpoint": "OLLAMA_ENDPOINT", "llm_model": "OLLAMA_MODEL"}


#: Settings whose validation message names the culprit itself (one server of a list): the whole
#: value is not repeated beside it.
_MESSAGE_NAMES_THE_VALUE = frozenset({"llm_endpoint"})


_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
#: Shorter tokens are guessable: refuse them at start-up rather than serve transcripts behind them.
MIN_TOKEN_CHARS = 8


def parse_api_tokens(value: str) -> dict[str, str]:
    """``"alice:tok-a,bob:tok-b"`` as ``{token: name}``; a ValueError names the bad entry by its
    place and its name, never by its token."""
    tokens: dict[str, str] = {}
    names: set[str] = set()
    for place, entry in enumerate((e.strip() for e in value.split(",")), 1):
        name, sep, token = entry.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not _TOKEN_NAME.fullmatch(name):
            raise ValueError(f"entry {place} must be 'name:token' with a name of letters, digits and _.@- "
                             "(e.g. alice:<token>,bob:<token>)")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if name in names:
            raise ValueError(f"{name!r} is named twice")
        if token in tokens:
            raise ValueError(f"{name!r} has the same token as {tokens[token]!r}")
        names.add(name)
        tokens[token] = name
    return tokens


def _is_secret(field_name: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[field_name].annotation)


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return field_name.upper()


def env_names(field_name: str) -> tuple[str, ...]:
    """Every environment variable that sets ``field_name``: its own, then its former name if it has one.
    (A child process's environment that sets a setting drops them all from the parent's: no stale one.)"""
    former = FORMER_NAMES.get(field_name)
    return (env_name(field_name),) if former is None else (env_name(field_name), former)


def _read(source: Mapping[str, str | None], field_name: str, where: str) -> tuple[str, str] | None:
    """``(variable, value)`` setting ``field_name`` in one source, under its name or its former one."""
    found = [(name, value) for name in env_names(field_name) if (value := source.get(name)) is not None]
    if len({value for _, value in found}) > 1:
        (new, _), (old, _) = found  # no values: an endpoint may carry a password
        logger.warning("%s is ignored: %s is set too (in %s), to another value, and wins. %s is the former name "
                       "of %s: remove it.", old, new, where, old, new)
    return found[0] if found else None


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
        from dotenv import dotenv_values  # only with a .env file: not every start-up (issue 19)

        file_values = dotenv_values(env_file)

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # the variable each value came from, for the error messages
    for name in Settings.model_fields:
        found = _read(environ, name, "the environment") or _read(file_values, name, str(env_file))
        if found is not None:
            origin[name], values[name] = found
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value

    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            given = overrides is not None and overrides.get(name) is not None
            source = "command line" if given else origin.get(name, env_name(name))
            message = str(err["msg"]).removeprefix("Value error, ")
            if name in _MESSAGE_NAMES_THE_VALUE:
                problems.append(f"{source}: {message}")
                continue
            value = values.get(name)
            shown = redact_url(value) if isinstance(value, str) else value  # a URL's password never shows
            if name in Settings.model_fields and _is_secret(name):
                shown = "**********"  # a token or key never shows, not even a malformed one
            problems.append(f"{source}={shown!r}: {message}")
        raise ConfigError("Invalid configuration: " + "; ".join(problems)) from e
