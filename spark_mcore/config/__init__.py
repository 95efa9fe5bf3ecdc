"""Run configuration: one typed dataclass per component, composed into `RunConfig`."""

from spark_mcore.config.loader import ConfigError, apply_overrides, build, from_dict, load_yaml, to_dict
from spark_mcore.config.run import LoggingConfig, RunConfig, load_run_config

__all__ = [
    "ConfigError", "LoggingConfig", "RunConfig", "apply_overrides", "build", "from_dict",
    "load_run_config", "load_yaml", "to_dict",
]
