"""Configuration: the settings loader and the default taxonomy and few-shot files."""

from config.settings import CONFIG_DIR, EMBEDDED_DATABASE, Settings, env_name, env_names, field_help, load_settings

__all__ = ["CONFIG_DIR", "EMBEDDED_DATABASE", "Settings", "env_name", "env_names", "field_help", "load_settings"]
