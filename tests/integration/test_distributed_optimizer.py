"""megatron's DistributedOptimizer (`parallel.use_distributed_optimizer=true`) on CPU / gloo:
DP2 gives the GRPO metrics and weights of world size 1 with the plain optimizer after each of
two steps (fp32, within 1e-5), each DP rank holds about half of Adam's state, and checkpoints
written at DP2 (after a step, and before any) resume at DP2 and at world size 1, where the
next step again equals the uninterrupted reference.

Runs: world size 1 in this process (the plain-optimizer reference from a fixed init), then 2
gloo processes (DP2 trains 2 steps from the same init, saving before and after the first; a
fresh actor from another seed then resumes each checkpoint and redoes the next step), then
world size 1 again resuming the DP2 checkpoint with the distributed optimizer (one DP rank:
resharded).
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
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.launch import spawn_workers
from spark_mcore.distributed.parallel import ParallelState, destroy_distributed, init_distributed
from spark_mcore.models import mcore_tp
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor

pytestmark = pytest.mark.slow

WORLD = 2
INIT_SEED, OTHER_SEED = 1, 7
METRICS = ["pg_loss", "kl", "entropy", "grad_norm", "clip_frac", "lr"]
DISTRIBUTED = ParallelConfig(use_distributed_optimizer=True)


def _actor(pstate: ParallelState, parallel: ParallelConfig, init: dict[str, torch.Tensor] | None = None
           ) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, tie_word_embeddings=True)
    return stateful_actor(model, pstate, parallel, init)


def _step(actor: MegatronActor) -> dict[str, Any]:
    """One GRPO step; its metrics and the (full, all-gathered) weights after it."""
    metrics = grpo_step(actor)
    return {"metrics": metrics, "weights": {n: p.detach().clone() for n, p in actor.unwrapped.named_parameters()}}


def _adam_numel(actor: MegatronActor) -> dict[str, int]:
    """Elements of Adam's first moment held by this rank, and of the model's parameters."""
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    held = sum(s["exp_avg"].numel() for opt in optimizers for s in opt.optimizer.state.values())
    return {"adam": int(held), "model": sum(p.numel() for p in actor.unwrapped.parameters())}


def _worker(rank: int, tmp_dir: str) -> None:
    tmp = Path(tmp_dir)
    pstate = init_distributed(DISTRIBUTED, seed=INIT_SEED)
    actor = _actor(pstate, DISTRIBUTED, torch.load(tmp / "init.pt"))
    write_checkpoint(actor, tmp / "dp2", 0)  # before any step: Adam has no state yet
    first = _step(actor)
    write_checkpoint(actor, tmp / "dp2", 1)
    result = {"steps": [first, _step(actor)], "numel": _adam_numel(actor)}
    dist.barrier()
    pstate = init_distributed(DISTRIBUTED, seed=OTHER_SEED)
    resumed = _actor(pstate, DISTRIBUTED)
    load_actor_state(resumed, tmp / "dp2" / "step_1")
    result["resumed"] = _step(resumed)
    resumed.setup_optimizer(lr=1e-3, total_steps=10, warmup_steps=2)  # what a fresh run has
    load_actor_state(resumed, tmp / "dp2" / "step_0")
    result["resumed_from_0"] = _step(resumed)
    torch.save(result, tmp / f"rank{rank}.pt")


def _in_process(fn: Any, parallel: ParallelConfig, tmp: Path, seed: int) -> Any:
    """fn(pstate, tmp) at world size 1 in this process; process groups always torn down."""
    try:
        return fn(init_distributed(parallel, seed=seed), tmp)
    finally:
        destroy_distributed()


def _world_one_reference(pstate: ParallelState, tmp: Path) -> list[dict[str, Any]]:
    actor = _actor(pstate, ParallelConfig())
    init = {k: v.detach().clone() for k, v in mcore_tp.local_state(actor.unwrapped).items()}
    torch.save(init, tmp / "init.pt")
    return [_step(actor), _step(actor)]


def _world_one_resume(pstate: ParallelState, tmp: Path) -> dict[str, Any]:
    actor = _actor(pstate, DISTRIBUTED)
    load_actor_state(actor, tmp / "dp2" / "step_1")
    return _step(actor)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("distopt")
    out: dict[str, Any] = {"reference": _in_process(_world_one_reference, ParallelConfig(), tmp, INIT_SEED)}
    spawn_workers(_worker, WORLD, args=(str(tmp),), timeout_s=300)
    out["dp2"] = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
    out["w1_resumed"] = _in_process(_world_one_resume, DISTRIBUTED, tmp, OTHER_SEED)
    return out


def _assert_same_step(got: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    for key in METRICS:
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-5), (where, key)
    assert got["metrics"]["update_skipped"] == 0.0, where
    assert got["weights"].keys() == expected["weights"].keys()
    for name, value in got["weights"].items():
        assert (value - expected["weights"][name]).abs().max().item() <= 1e-5, (where, name)


def test_dp2_steps_match_world_size_one(runs: dict[str, Any]) -> None:
    ref = runs["reference"]
    assert ref[0]["metrics"]["clip_frac"] > 0 and abs(ref[0]["metrics"]["pg_loss"]) > 1e-4
    moved = max((ref[1]["weights"][n] - w).abs().max().item() for n, w in ref[0]["weights"].items())
    assert moved > 1e-4  # the second step changes the weights: it checks something
    for rank, res in enumerate(runs["dp2"]):
        for i, step in enumerate(res["steps"]):
            _assert_same_step(step, ref[i], f"rank {rank} step {i + 1}")


def test_adam_state_is_sharded_over_dp(runs: dict[str, Any]) -> None:
    numels = [res["numel"] for res in runs["dp2"]]
    total = numels[0]["model"]
    assert sum(n["adam"] for n in numels) == total  # every element on exactly one rank
    for n in numels:
        assert 0.35 * total <= n["adam"] <= 0.65 * total, numels


def test_checkpoint_resumes_at_dp2_and_world_size_one(runs: dict[str, Any]) -> None:
    first, second = runs["reference"]
    for rank, res in enumerate(runs["dp2"]):
        _assert_same_step(res["resumed"], second, f"dp2 resume rank {rank}")
        _assert_same_step(res["resumed_from_0"], first, f"dp2 resume of step 0, rank {rank}")
    _assert_same_step(runs["w1_resumed"], second, "world size 1 resume")
