"""Run configuration: one typed dataclass per component (in each package's `config.py`),
composed into `spark_mcore.config.run.RunConfig`. This package init stays import-light so that
component configs can import the loader without a cycle."""

from spark_mcore.config.loader import ConfigError, apply_overrides, build, from_dict, load_yaml, to_dict

__all__ = ["ConfigError", "apply_overrides", "build", "from_dict", "load_yaml", "to_dict"]
