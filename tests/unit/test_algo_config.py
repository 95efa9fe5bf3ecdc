"""AlgoConfig validation names the field."""

from __future__ import annotations

import pytest

from spark_mcore.algo.config import AlgoConfig
from spark_mcore.config.loader import ConfigError


def test_defaults_match_the_public_recipe() -> None:
    cfg = AlgoConfig()
    assert (cfg.adv_eps, cfg.clip_eps, cfg.kl_coef, cfg.kl_estimator, cfg.loss_agg) == (
        1e-9, 0.2, 1e-3, "k3", "token_mean"
    )
    assert cfg.logprob_chunk_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_eps": 0.0}, "algo.clip_eps"),
        ({"kl_coef": -1.0}, "algo.kl_coef"),
        ({"clip_eps_high": 0.0}, "algo.clip_eps_high"),
        ({"adv_eps": -1e-9}, "algo.adv_eps"),
        ({"logprob_chunk_tokens": 0}, "algo.logprob_chunk_tokens"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AlgoConfig(**kwargs)
