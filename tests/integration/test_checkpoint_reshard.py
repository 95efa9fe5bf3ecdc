"""A trainer checkpoint written under one TP/PP layout resumes under another: the model, the KL
reference, Adam's state (exp_avg, exp_avg_sq, step) and the LR schedule load exactly, and the
next GRPO step equals the uninterrupted run's (fp32, within 1e-5).

Runs: world size 1 in this process (trains 2 steps from a fixed init, saves, takes a 3rd step:
the uninterrupted reference), then 4 gloo processes (TP2xDP2 trains from the same init, saves
and continues; TP2xPP2 resumes the world-size-1 checkpoint; PP2xDP2 resumes the TP2 one), then
world size 1 again resuming the TP2 checkpoint. Resumed actors are built from another seed, so
nothing they end with can come from their own initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from grpo_batch import grpo_step, stateful_actor

import spark_mcore.config  # noqa: F401  (loader before component configs)
from spark_mcore.checkpoint.io import load_actor_state, write_checkpoint
from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor

pytestmark = pytest.mark.slow

WORLD, STEPS_BEFORE_SAVE = 4, 2
INIT_SEED, OTHER_SEED = 1, 7
EMBEDDING = "embedding.word_embeddings.weight"
METRICS = ["pg_loss", "kl", "entropy", "grad_norm", "clip_frac", "lr"]
# (name, tp, pp, checkpoint it resumes; None = trains from the init and saves "tp2"), on 4
# processes: "tp2" is TP2xDP2 and "pp2_from_tp2" PP2xDP2 (each DP rank takes half the rows)
SPAWNED = [("tp2", 2, 1, None), ("tp2pp2_from_w1", 2, 2, "w1"), ("pp2_from_tp2", 1, 2, "tp2")]
RESUMES = ["tp2pp2_from_w1", "pp2_from_tp2", "w1_from_tp2"]
SAVED_BY = {"tp2pp2_from_w1": "w1", "pp2_from_tp2": "tp2", "w1_from_tp2": "tp2"}


def _model_cfg(**overrides: Any) -> ModelConfig:
    sizes = dict(hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=64, tie_word_embeddings=True)
    return ModelConfig(**{**sizes, **overrides})


def _actor(pstate: ParallelState, init: dict[str, torch.Tensor] | None = None,
           **model_overrides: Any) -> MegatronActor:
    return stateful_actor(_model_cfg(**model_overrides), pstate, init=init)


def _merged(actor: MegatronActor, module: torch.nn.Module,
            value: Any) -> dict[str, torch.Tensor]:
    """value(param) merged over TP, by global layer name (this PP stage's parameters)."""
    offset = mcore_tp.layer_offset(module)
    out = {}
    for name, param in module.named_parameters():
        local = value(param).detach().clone()
        shards = [torch.empty_like(local) for _ in range(actor.pstate.tp_size)]
        dist.all_gather(shards, local, group=actor.pstate.tp_group)
        gname = mcore_tp.shift_layer_index(name, offset)
        out[gname] = mcore_tp.merge_tp_shards(gname, shards)
    return out


def _adam_state(actor: MegatronActor) -> dict[Any, dict[str, Any]]:
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    return {p: s for opt in optimizers for p, s in opt.optimizer.state.items()}


def _snapshot(actor: MegatronActor) -> dict[str, Any]:
    """Full (TP-merged) weights, reference, Adam moments and steps, and the schedule (a
    parameter without Adam state, as after a failed optimizer load, reads as zeros)."""
    state = _adam_state(actor)
    steps = {float(s["step"]) for s in state.values()}

    def moment(key: str) -> Any:
        return lambda p: state.get(p, {}).get(key, torch.zeros_like(p))

    return {"weights": _merged(actor, actor.unwrapped, lambda p: p.data),
            "ref": _merged(actor, actor.ref, lambda p: p.data),
            "exp_avg": _merged(actor, actor.unwrapped, moment("exp_avg")),
            "exp_avg_sq": _merged(actor, actor.unwrapped, moment("exp_avg_sq")),
            "adam_steps": sorted(steps), "lr": actor.optimizer.param_groups[0]["lr"],
            "scheduler": actor.scheduler.state_dict()}


def _train_save_continue(actor: MegatronActor, root: Path) -> dict[str, Any]:
    """The run that writes a checkpoint: 2 steps, save, snapshot, 1 more step."""
    for _ in range(STEPS_BEFORE_SAVE):
        grpo_step(actor)
    write_checkpoint(actor, root, STEPS_BEFORE_SAVE, {"note": "reshard test"})
    saved = _snapshot(actor)
    metrics = grpo_step(actor)
    return {"saved": saved, "metrics": metrics, "after": _snapshot(actor)}


def _resume_continue(actor: MegatronActor, ckpt: Path) -> dict[str, Any]:
    """The resumed run: load, snapshot, 1 more step."""
    state = load_actor_state(actor, ckpt)
    assert state["note"] == "reshard test"
    loaded = _snapshot(actor)
    metrics = grpo_step(actor)
    return {"loaded": loaded, "metrics": metrics, "after": _snapshot(actor)}


def _ckpt(tmp: Path, name: str) -> Path:
    return tmp / name / f"step_{STEPS_BEFORE_SAVE}"


def _worker(rank: int, tmp_dir: str) -> None:
    tmp = Path(tmp_dir)
    init = torch.load(tmp / "init.pt")
    for name, tp, pp, source in SPAWNED:
        if source is None:
            pstate = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=INIT_SEED)
            result = _train_save_continue(_actor(pstate, init), tmp / name)
        else:
            pstate = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=OTHER_SEED)
            result = _resume_continue(_actor(pstate), _ckpt(tmp, source))
        torch.save(result, tmp / f"{name}_rank{rank}.pt")
        dist.barrier()  # the next init_distributed re-creates only megatron's groups


def _in_process(fn: Any, tmp: Path, seed: int = OTHER_SEED) -> Any:
    """fn(pstate, tmp) at world size 1 in this process; process groups always torn down."""
    try:
        return fn(init_distributed(ParallelConfig(), seed=seed), tmp)
    finally:
        destroy_distributed()


def _world_one_reference(pstate: ParallelState, tmp: Path) -> dict[str, Any]:
    actor = _actor(pstate)
    init = {k: v.detach().clone() for k, v in mcore_tp.local_state(actor.unwrapped).items()}
    torch.save(init, tmp / "init.pt")
    return _train_save_continue(actor, tmp / "w1")


def _world_one_resume(pstate: ParallelState, tmp: Path) -> dict[str, Any]:
    return _resume_continue(_actor(pstate), _ckpt(tmp, "tp2"))


def _world_one_refusal(pstate: ParallelState, tmp: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_actor_state(_actor(pstate, ffn_hidden_size=96), _ckpt(tmp, "w1"))
    return str(err.value)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("reshard")
    out: dict[str, Any] = {"w1": [_in_process(_world_one_reference, tmp, INIT_SEED)]}
    spawn_workers(_worker, WORLD, args=(str(tmp),), timeout_s=300)
    for name, *_ in SPAWNED:
        out[name] = [torch.load(tmp / f"{name}_rank{r}.pt") for r in range(WORLD)]
    out["w1_from_tp2"] = [_in_process(_world_one_resume, tmp)]
    out["refusal"] = _in_process(_world_one_refusal, tmp)
    return out


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float,
                  what: str) -> None:
    """Every tensor of `got` (one rank's stage) equals the full run's; a tied output layer on a
    last pipeline stage is the embedding."""
    assert got, what
    for name, value in got.items():
        want = expected.get(name, expected[EMBEDDING] if name == "output_layer.weight" else None)
        assert want is not None, (what, name)
        diff = (value - want).abs().max().item()
        assert diff <= atol, f"{what} {name}: max |diff| {diff}"


def _assert_names_covered(ranks: list[dict[str, Any]], key: str, expected: dict[str, Any]) -> None:
    names = {n for r in ranks for n in r[key]["weights"]} - {"output_layer.weight"}
    assert names == set(expected), sorted(names ^ set(expected))


@pytest.mark.parametrize("resume", RESUMES)
def test_resharded_load_restores_saved_state(runs: dict[str, Any], resume: str) -> None:
    saved = runs[SAVED_BY[resume]][0]["saved"]
    assert saved["adam_steps"] == [float(STEPS_BEFORE_SAVE)]
    _assert_names_covered(runs[resume], "loaded", saved["weights"])
    for rank, res in enumerate(runs[resume]):
        loaded = res["loaded"]
        for key in ("weights", "ref", "exp_avg", "exp_avg_sq"):
            _assert_close(loaded[key], saved[key], 0.0, f"rank {rank} {key}")
        assert loaded["adam_steps"] == saved["adam_steps"]
        assert loaded["scheduler"] == saved["scheduler"] and loaded["lr"] == saved["lr"]


@pytest.mark.parametrize("resume", RESUMES)
def test_step_after_resharded_resume_matches_uninterrupted(runs: dict[str, Any], resume: str) -> None:
    reference = runs["w1"][0]
    assert reference["metrics"]["clip_frac"] > 0 and abs(reference["metrics"]["pg_loss"]) > 1e-4
    continued = runs[SAVED_BY[resume]][0]  # the saving layout's own next step
    for rank, res in enumerate(runs[resume]):
        for key in METRICS:
            for want in (reference, continued):
                assert res["metrics"][key] == pytest.approx(want["metrics"][key], abs=1e-5), (rank, key)
        for key in ("weights", "exp_avg", "exp_avg_sq"):
            _assert_close(res["after"][key], reference["after"][key], 1e-5, f"rank {rank} {key}")
        assert res["after"]["adam_steps"] == [float(STEPS_BEFORE_SAVE + 1)]


def test_saving_layouts_agree(runs: dict[str, Any]) -> None:
    """The TP2 run saved what the world-size-1 run saved (so the resumes above compare like
    with like), and its own next step matches."""
    reference = runs["w1"][0]
    for rank, res in enumerate(runs["tp2"]):
        for key in ("weights", "ref", "exp_avg", "exp_avg_sq"):
            _assert_close(res["saved"][key], reference["saved"][key], 1e-5, f"rank {rank} {key}")
            _assert_close(res["after"][key], reference["after"][key], 1e-5, f"rank {rank} {key}")


def test_checkpoint_of_another_model_shape_is_refused(runs: dict[str, Any]) -> None:
    message = runs["refusal"]
    assert "model.ffn_hidden_size: checkpoint 64, this run 96" in message
    assert "--set model.ffn_hidden_size=64" in message and "checkpoint.resume=false" in message
