"""Contract of the rollout-engine registry (spark_mcore.rollout.builders): the one place where
`rollout.engine` names become an engine plus its weight pusher."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from spark_mcore.config.run import load_run_config
from spark_mcore.rollout import base
from spark_mcore.rollout.base import RolloutEngine
from spark_mcore.rollout.builders import (
    EngineContext,
    WeightPusher,
    build_rollout,
    register_engine_builder,
    registered_engine_builders,
)


class _StubActor:
    """The two MegatronActor methods the "hf" builder uses, on a tiny Qwen2."""

    def __init__(self) -> None:
        self.config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=False)
        torch.manual_seed(3)
        self.state = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_config(self.config).named_parameters()}

    def hf_config(self, tokenizer: Any) -> Qwen2Config:
        return self.config

    def export_hf(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.state.items())


def test_registry_names_and_unknown_engine() -> None:
    assert registered_engine_builders() == ["hf", "sglang"]
    assert not hasattr(base, "build_engine") and not hasattr(base, "register_engine")  # one registry only
    cfg = load_run_config(None, ["rollout.engine=nope"])
    with pytest.raises(KeyError, match="rollout.engine 'nope' has no engine builder"):
        build_rollout(EngineContext(cfg, Path("."), None, None, None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered twice"):
        register_engine_builder("hf")(lambda ctx: (None, None))  # type: ignore[arg-type,return-value]


def test_every_builder_takes_only_the_engine_context() -> None:
    from spark_mcore.rollout import builders

    for name in registered_engine_builders():
        params = list(inspect.signature(builders._BUILDERS[name]).parameters)
        assert params == ["ctx"], (name, params)


def test_hf_builder_returns_engine_and_pusher_at_version_0(monkeypatch: pytest.MonkeyPatch) -> None:
    import spark_mcore.weights.gather as gather

    # the stub has no megatron chunks: its "gathered" weights are its HF state
    monkeypatch.setattr(gather, "actor_hf_weights", lambda actor: iter(actor.export_hf()))
    cfg = load_run_config(None, ["rollout.engine=hf"])
    actor = _StubActor()
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "", pad_token_id=0)
    root = SimpleNamespace(tp_rank=0, pp_rank=0)  # the replica's first rank holds the engine
    engine, pusher = build_rollout(EngineContext(cfg, Path("."), root, tok, actor))  # type: ignore[arg-type]
    try:
        assert isinstance(engine, RolloutEngine) and isinstance(pusher, WeightPusher)
        assert engine.policy_version == 0
        params = dict(engine.model.named_parameters())  # type: ignore[attr-defined]
        assert all(torch.equal(params[n], t) for n, t in actor.state.items())
        actor.state = {n: t + 1 for n, t in actor.state.items()}
        pusher.push(5)
        assert engine.policy_version == 5
        assert all(torch.equal(params[n], t) for n, t in actor.state.items())
    finally:
        pusher.close()
        engine.shutdown()
