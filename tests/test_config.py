"""Settings: precedence, validation with the variable's name, normalisation, help texts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from config import CONFIG_DIR, EMBEDDED_DATABASE, Settings, env_name, field_help, load_settings
from error_handler import ConfigError


def load(
    overrides: dict[str, object] | None = None,
    environ: dict[str, str] | None = None,
    env_file: Path | None = None,
) -> Settings:
    return load_settings(overrides, environ=environ or {}, env_file=env_file)


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    settings = load()
    assert settings.llm_endpoint == "http://localhost:11434"
    assert settings.llm_model == "llama3"
    assert settings.ollama_timeout == 120
    assert settings.ollama_keep_alive == "5m"
    assert settings.api_max_body_bytes == 1_000_000
    assert settings.api_port == 8000
    assert settings.taxonomy_file == CONFIG_DIR / "taxonomy.json"
    assert settings.few_shots_file == CONFIG_DIR / "few_shots.json"
    assert settings.taxonomy_file.is_file() and settings.few_shots_file.is_file()


def test_precedence_overrides_then_environment_then_env_file_then_defaults(tmp_path: Path) -> None:
    env_file = write_env(
        tmp_path,
        "# comment\nLLM_MODEL=from-file\nOLLAMA_TIMEOUT=7\nOLLAMA_KEEP_ALIVE=1h\nAPI_PORT=9001\n",
    )
    settings = load(
        overrides={"llm_model": "from-override", "api_port": None},  # None: flag not given
        environ={"LLM_MODEL": "from-environ", "OLLAMA_TIMEOUT": "9", "UNRELATED": "x"},
        env_file=env_file,
    )
    assert settings.llm_model == "from-override"  # override > environ > file
    assert settings.ollama_timeout == 9  # environ > file
    assert settings.ollama_keep_alive == "1h"  # file > default
    assert settings.api_port == 9001  # an unset override does not hide the file
    assert settings.ollama_num_predict == 256  # default


def test_env_file_is_read_only_when_asked(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "LLM_MODEL=from-file\n")
    assert load(env_file=env_file).llm_model == "from-file"
    assert load(env_file=None).llm_model == "llama3"
    assert load(env_file=tmp_path / "missing.env").llm_model == "llama3"


def test_empty_value_in_env_file_without_equals_is_ignored(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "LLM_MODEL\nOLLAMA_TIMEOUT=3\n")
    settings = load(env_file=env_file)
    assert settings.llm_model == "llama3"
    assert settings.ollama_timeout == 3


def test_default_environ_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_MODEL", "from-process")
    assert load_settings(env_file=None).llm_model == "from-process"


@pytest.mark.parametrize(
    "variable, value, fragment",
    [
        ("OLLAMA_TIMEOUT", "abc", "OLLAMA_TIMEOUT='abc'"),
        ("OLLAMA_TIMEOUT", "0", "OLLAMA_TIMEOUT='0'"),
        ("OLLAMA_NUM_PREDICT", "8", "OLLAMA_NUM_PREDICT='8'"),
        ("API_PORT", "70000", "API_PORT='70000'"),
        ("API_MAX_BODY_BYTES", "10", "API_MAX_BODY_BYTES='10'"),
        ("CONVERSATION_CHAR_BUDGET", "100", "CONVERSATION_CHAR_BUDGET='100'"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL='verbose'"),
        ("LLM_ENDPOINT", "localhost:11434", "http://"),
        ("LLM_MODEL", "", "LLM_MODEL=''"),
        # A setting given by its former name: the message names the variable the user set.
        ("OLLAMA_ENDPOINT", "localhost:11434", "OLLAMA_ENDPOINT: 'localhost:11434', must start with http://"),
        ("OLLAMA_MODEL", "", "OLLAMA_MODEL=''"),
    ],
)
def test_invalid_environment_value_names_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={variable: value})
    message = str(info.value)
    assert message.startswith("Invalid configuration: ")
    assert variable in message
    assert fragment in message
    assert "\n" not in message


def test_invalid_value_from_the_env_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="OLLAMA_TIMEOUT='soon'"):
        load(env_file=write_env(tmp_path, "OLLAMA_TIMEOUT=soon\n"))


def test_invalid_override_says_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides={"api_port": -1})
    assert "command line=-1" in str(info.value)


def test_several_problems_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={"OLLAMA_TIMEOUT": "x", "API_PORT": "y"})
    assert "OLLAMA_TIMEOUT" in str(info.value) and "API_PORT" in str(info.value)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("http://ollama:11434/", "http://ollama:11434"),
        ("  https://gpu.example.com/ollama//  ", "https://gpu.example.com/ollama"),
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434"),
    ],
)
def test_endpoint_is_normalised(value: str, expected: str) -> None:
    assert load(environ={"LLM_ENDPOINT": value}).llm_endpoint == expected


@pytest.mark.parametrize("value", ["ftp://host", "localhost:11434", "", "ws://host:11434"])
def test_non_http_endpoint_is_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match="LLM_ENDPOINT"):
        load(environ={"LLM_ENDPOINT": value})


# --- LLM_ENDPOINT and LLM_MODEL, and OLLAMA_ENDPOINT and OLLAMA_MODEL, their former names ------------


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_the_former_names_still_work(tmp_path: Path, where: str) -> None:
    values = {"OLLAMA_ENDPOINT": "http://gpu1:11434", "OLLAMA_MODEL": "qwen2.5:7b"}
    if where == "environment":
        settings = load(environ=values)
    else:
        settings = load(env_file=write_env(tmp_path, "".join(f"{k}={v}\n" for k, v in values.items())))
    assert (settings.llm_endpoint, settings.llm_model) == ("http://gpu1:11434", "qwen2.5:7b")


@pytest.mark.parametrize("where", ["environment", ".env"])
def test_both_names_in_one_place_the_new_one_wins_and_a_warning_names_the_other(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    values = {"OLLAMA_ENDPOINT": "http://user:s3cret@old:11434", "LLM_ENDPOINT": "http://ollama:11434",
              "OLLAMA_MODEL": "llama3", "LLM_MODEL": "llama3"}
    if where == "environment":
        settings = load(environ=values)
    else:
        settings = load(env_file=write_env(tmp_path, "".join(f"{k}={v}\n" for k, v in values.items())))
    assert (settings.llm_endpoint, settings.llm_model) == ("http://ollama:11434", "llama3")
    [warning] = [r.getMessage() for r in caplog.records if r.name == "config.settings"]  # equal models: silent
    assert warning.startswith("OLLAMA_ENDPOINT is ignored: LLM_ENDPOINT is set too")
    assert "s3cret" not in warning


def test_across_places_the_usual_precedence_holds_whatever_the_name(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "LLM_MODEL=from-file\nOLLAMA_ENDPOINT=http://from-file:11434\n")
    settings = load(environ={"OLLAMA_MODEL": "from-environ", "LLM_ENDPOINT": "http://from-environ:11434"},
                    env_file=env_file)
    assert (settings.llm_model, settings.llm_endpoint) == ("from-environ", "http://from-environ:11434")


def test_help_says_which_name_wins() -> None:
    from cli import build_parser

    epilog = build_parser().format_help()
    assert "LLM_ENDPOINT" in epilog and "Also read as OLLAMA_ENDPOINT" in epilog and "LLM_ENDPOINT wins" in epilog
    assert "LLM_MODEL" in epilog and "Also read as OLLAMA_MODEL" in epilog and "LLM_MODEL wins" in epilog


def test_log_level_any_case() -> None:
    assert load(environ={"LOG_LEVEL": "debug"}).log_level == "DEBUG"


@pytest.mark.parametrize(
    "uri, embedded",
    [
        ("embedded", True),
        (" Embedded ", True),
        ("EMBEDDED", True),
        ("mongodb://localhost:27017", False),
        ("mongodb://embedded:27017", False),
    ],
)
def test_embedded_database_detection(uri: str, embedded: bool) -> None:
    assert load(environ={"MONGODB_CONNECTION_STRING": uri}).uses_embedded_database is embedded
    assert EMBEDDED_DATABASE == "embedded"


def test_settings_are_frozen_and_reject_unknown_fields() -> None:
    settings = load()
    with pytest.raises(ValidationError, match="frozen"):
        settings.llm_model = "other"  # type: ignore[misc]
    with pytest.raises(ConfigError):
        load(overrides={"no_such_setting": 1})


def test_every_field_has_an_env_name_and_help() -> None:
    for name in Settings.model_fields:
        assert env_name(name) == name.upper()
        text = field_help(name)
        assert f"[env {name.upper()}; default: " in text
        assert Settings.model_fields[name].description
    # Paths inside the project are shown relative to it, not as this machine's absolute path.
    assert "default: config/taxonomy.json]" in field_help("taxonomy_file")
    assert "%" not in field_help("batch_monitoring_mode").replace("%%", "")


def test_api_max_waiting_follows_the_concurrency_unless_given() -> None:
    assert load().api_max_waiting == 2 * load().api_max_concurrency == 16
    assert load(environ={"API_MAX_CONCURRENCY": "3"}).api_max_waiting == 6
    assert load({"api_max_concurrency": 3}, environ={"API_MAX_WAITING": "0"}).api_max_waiting == 0
    with pytest.raises(ConfigError, match="API_MAX_WAITING='-1'"):
        load(environ={"API_MAX_WAITING": "-1"})
    # An unreadable concurrency is reported as itself, not as a problem of the waiting bound.
    with pytest.raises(ConfigError) as raised:
        load(environ={"API_MAX_CONCURRENCY": "many"})
    assert "API_MAX_CONCURRENCY='many'" in str(raised.value) and "API_MAX_WAITING" not in str(raised.value)


# --- what the model is asked for ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "on"), [("on", True), ("off", False), ("ON", True), ("true", True), ("0", False)])
def test_categorization_and_confidence_are_on_or_off(value: str, on: bool) -> None:
    settings = load(environ={"CATEGORIZATION": value, "CONFIDENCE": value})
    assert settings.categorization is on and settings.confidence is on


def test_the_answer_settings_default_to_on_and_to_the_prompt_builders_bound() -> None:
    from prompt_builder import CATEGORIZATION_MAX_CHARS

    settings = load()
    assert settings.categorization is True and settings.confidence is True
    assert settings.categorization_max_chars == CATEGORIZATION_MAX_CHARS
    assert load(environ={"CATEGORIZATION_MAX_CHARS": "0"}).categorization_max_chars == 0


@pytest.mark.parametrize(("variable", "value"), [("CATEGORIZATION", "sometimes"), ("CONFIDENCE", "maybe"),
                                                 ("CATEGORIZATION_MAX_CHARS", "-1"),
                                                 ("CATEGORIZATION_MAX_CHARS", "301")])
def test_invalid_answer_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={variable: value})
    assert f"{variable}={value!r}" in str(info.value)
