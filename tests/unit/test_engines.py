"""Contract of spark_mcore.engines: the one place where `rollout.engine` names become an engine
plus its weight pusher, and where `weights.mode` is checked before a run builds anything."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from spark_mcore.config.loader import ConfigError
from spark_mcore.config.run import load_run_config
from spark_mcore.engines import (
    EngineContext,
    WeightPusher,
    build_rollout,
    check_weight_mode,
    register_engine_builder,
    registered_engine_builders,
)
from spark_mcore.rollout.base import RolloutEngine


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


def test_unknown_engine_and_double_registration_fail_with_names() -> None:
    assert {"hf", "sglang"} <= set(registered_engine_builders())
    cfg = load_run_config(None, ["rollout.engine=nope"])
    with pytest.raises(KeyError, match="rollout.engine 'nope' has no engine builder; registered: .*'hf'"):
        build_rollout(EngineContext(cfg, Path("."), None, None, None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered twice"):
        register_engine_builder("hf")(lambda ctx: (None, None))  # type: ignore[arg-type,return-value]


def test_a_registered_builder_is_what_rollout_engine_builds() -> None:
    made: list[EngineContext] = []

    class _Engine:
        policy_version = 0

        def generate(self, prompt_ids: Any, params: Any) -> Any:
            return [[] for _ in prompt_ids]

        def shutdown(self) -> None:
            pass

    class _Pusher:
        def push(self, version: int) -> None:
            pass

        def close(self) -> None:
            pass

    @register_engine_builder("test-engines-stub")
    def build(ctx: EngineContext) -> Any:
        made.append(ctx)
        return _Engine(), _Pusher()

    cfg = load_run_config(None, ["rollout.engine=test-engines-stub"])
    ctx = EngineContext(cfg, Path("."), None, None, None)  # type: ignore[arg-type]
    engine, pusher = build_rollout(ctx)
    assert made == [ctx] and isinstance(engine, RolloutEngine) and isinstance(pusher, WeightPusher)


@pytest.mark.parametrize("overrides,cuda,match", [
    (["weights.mode=colocated"], False, "weights.mode=colocated .*no CUDA"),
    (["weights.mode=colocated", "rollout.engine=sglang"], True, "weights.mode=colocated .*sglang.urls is empty"),
    (["weights.mode=colocated", "rollout.engine=sglang", 'sglang.urls=["http://127.0.0.1:1"]'], True, None),
    (["weights.mode=colocated"], True, None),
    (["rollout.engine=sglang"], False, None),
])
def test_weight_mode_is_checked_before_anything_is_built(overrides: list[str], cuda: bool, match: str | None) -> None:
    cfg = load_run_config(None, overrides)
    if match is None:
        check_weight_mode(cfg, cuda_available=cuda)
    else:
        with pytest.raises(ConfigError, match=match):
            check_weight_mode(cfg, cuda_available=cuda)


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
