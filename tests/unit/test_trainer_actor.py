"""The Megatron actor at world size 1 on CPU: log-probs, micro-batch invariance, SFT learning."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import spark_mcore.config  # noqa: F401  (import order: loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.types import TrainBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from padded_batch import padded_batch  # noqa: E402

VOCAB = 64


@pytest.fixture(scope="module")
def pstate() -> Iterator[object]:
    state = init_distributed(ParallelConfig(), seed=7)
    yield state
    destroy_distributed()


def _actor(pstate: object, mbs: int, kl: float = 0.0) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, max_position_embeddings=64)
    trainer = TrainerConfig(micro_batch_size=mbs, lr=1e-2, warmup_ratio=0.0)
    return MegatronActor(model, trainer, AlgoConfig(kl_coef=kl), pstate, VOCAB)


def _batch() -> TrainBatch:
    return padded_batch(VOCAB, torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_log_softmax(pstate: object, temperature: float) -> None:
    actor = _actor(pstate, mbs=4)
    actor.temperature = temperature  # log-probs of the distribution the engine sampled from
    batch = _batch()
    got = actor.compute_logprobs(batch)
    with torch.no_grad():
        logits = actor.adapter.forward(actor.unwrapped.eval(), batch.tokens)
    ref = torch.log_softmax(logits.float() / temperature, -1)[:, :-1].gather(-1, batch.tokens[:, 1:, None])[..., 0]
    expected = torch.nn.functional.pad(ref, (1, 0)) * batch.loss_mask
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.all(got[batch.loss_mask == 0] == 0)


def test_micro_batching_does_not_change_the_update(pstate: object) -> None:
    actor = _actor(pstate, mbs=6)
    initial = {k: v.clone() for k, v in actor.unwrapped.state_dict().items() if torch.is_tensor(v)}
    batch = _batch()
    batch.old_logprobs = actor.compute_logprobs(batch)
    results = []
    for mbs in (6, 2, 4):
        actor.unwrapped.load_state_dict(initial, strict=False)
        actor.cfg.micro_batch_size = mbs
        actor.setup_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
        metrics = actor.train_step(batch)
        # Megatron's DDP keeps the reduced gradient in `main_grad` until the next zero_grad_buffer
        grads = {k: v.main_grad.detach().clone() for k, v in actor.unwrapped.named_parameters()}
        results.append((metrics, grads))
    (m0, p0) = results[0]
    for m, p in results[1:]:
        assert m["pg_loss"] == pytest.approx(m0["pg_loss"], abs=1e-6)
        assert m["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
        for name in p0:
            assert torch.allclose(p[name], p0[name], atol=1e-6), name
    assert max(float(g.abs().max()) for g in p0.values()) > 1e-3  # a real, non-zero gradient
    moved = actor.unwrapped.state_dict()
    assert any(not torch.equal(moved[n], initial[n]) for n in p0 if n in initial)


def test_sft_steps_reduce_loss_and_reference_is_frozen(pstate: object) -> None:
    actor = _actor(pstate, mbs=6, kl=0.1)
    actor.snapshot_reference()
    actor.setup_optimizer(lr=1e-2, total_steps=30, warmup_steps=0)
    batch = _batch()
    ref_before = actor.compute_logprobs(batch, reference=True)
    losses = [actor.sft_step(batch)["sft_loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(actor.compute_logprobs(batch, reference=True), ref_before)


def test_token_budget_sets_micro_batch_rows(pstate: object) -> None:
    actor = _actor(pstate, mbs=6)
    actor.cfg.max_tokens_per_micro_batch = 25  # T = 10 -> 2 rows per micro-batch
    seen: list[int] = []
    original = actor._forward_step

    def spy(loss_fn, norm, data_iterator, model):  # type: ignore[no-untyped-def]
        out = original(loss_fn, norm, _Recorder(data_iterator, seen), model)
        return out

    actor._forward_step = spy  # type: ignore[method-assign]
    actor.compute_logprobs(_batch())
    assert seen == [2, 2, 2]


class _Recorder:
    def __init__(self, it, seen: list[int]) -> None:  # type: ignore[no-untyped-def]
        self.it, self.seen = it, seen

    def __next__(self) -> TrainBatch:
        mb = next(self.it)
        self.seen.append(mb.num_sequences)
        return mb


def test_logprob_chunk_tokens_reaches_the_log_prob_kernel(pstate: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """algo.logprob_chunk_tokens sets the chunk of the fp32 log-prob computation; results agree."""
    import spark_mcore.trainer.logits as logits_mod

    seen: list[int | None] = []
    kernel = logits_mod.token_logprobs

    def spy(*args: object, chunk_size: int | None = None, **kw: object) -> torch.Tensor:
        seen.append(chunk_size)
        return kernel(*args, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(logits_mod, "token_logprobs", spy)
    actor = _actor(pstate, mbs=6)
    auto = actor.compute_logprobs(_batch())
    actor.algo = AlgoConfig(logprob_chunk_tokens=3)
    chunked = actor.compute_logprobs(_batch())
    assert seen == [None, 3]
    assert torch.allclose(auto, chunked, atol=1e-6)


def test_lr_scale_scales_one_step_and_leaves_the_schedule(pstate: object) -> None:
    actor = _actor(pstate, mbs=6)
    initial = {k: v.clone() for k, v in actor.unwrapped.state_dict().items() if torch.is_tensor(v)}
    batch = _batch()
    batch.old_logprobs = actor.compute_logprobs(batch)
    deltas, lrs = [], []
    for scale in (1.0, 0.25):
        actor.unwrapped.load_state_dict(initial, strict=False)
        actor.setup_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
        actor.train_step(batch, lr_scale=scale)
        now = actor.unwrapped.state_dict()
        deltas.append({k: now[k] - initial[k] for k in initial if k in now and now[k].is_floating_point()})
        lrs.append([g["lr"] for g in actor.optimizer.param_groups])
    moved = [k for k in deltas[0] if float(deltas[0][k].abs().max()) > 1e-6]
    assert moved  # Adam's first step is lr * g/|g| per coordinate: a quarter of the lr, a quarter of the move
    for k in moved:
        assert torch.allclose(deltas[1][k], 0.25 * deltas[0][k], rtol=1e-3, atol=1e-7), k
    assert lrs[0] == lrs[1]  # the scheduled lr is back after the scaled step
