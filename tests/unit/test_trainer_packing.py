"""Padding-free micro-batches: the packing plan, masks, position ids and the unpack round trip,
then the actor at world size 1: log-probs and one GRPO step with packing equal the padded path."""

from collections.abc import Iterator

import pytest
import torch

import spark_mcore.config  # noqa: F401  (import order: loader before component configs)
from spark_mcore.algo.config import AlgoConfig
from spark_mcore.config.loader import ConfigError
from spark_mcore.distributed.config import ParallelConfig
from spark_mcore.distributed.parallel import destroy_distributed, init_distributed
from spark_mcore.models.config import ModelConfig
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.trainer.config import TrainerConfig
from spark_mcore.trainer.packing import (
    packed_micro_batches,
    packing_stats,
    padded_micro_batches,
    plan_rows,
    sequence_lengths,
)
from spark_mcore.types import TrainBatch

VOCAB = 64
# (prompt end, response end) per sequence: lengths 10, 8, 5, 10, 9, 7, 3
SPANS = [(3, 10), (4, 8), (2, 5), (5, 10), (3, 9), (6, 7), (1, 3)]


def _batch(width: int = 12) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    n = len(SPANS)
    tokens = torch.randint(1, VOCAB, (n, width), generator=g)
    mask = torch.zeros(n, width)
    for i, (start, end) in enumerate(SPANS):
        mask[i, start:end] = 1
        tokens[i, end:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25])
    offset = 0.3 * torch.sign(torch.sin(torch.arange(tokens.numel()).view_as(tokens).float()))
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv, old_logprobs=offset)


# ---- plan, layout, unpack (no model) ----------------------------------------------------------

def test_sequence_lengths_end_at_the_last_scored_token() -> None:
    assert sequence_lengths(_batch()).tolist() == [end for _, end in SPANS]
    empty = TrainBatch(tokens=torch.ones(1, 4, dtype=torch.long), loss_mask=torch.zeros(1, 4),
                       advantages=torch.zeros(1))
    assert sequence_lengths(empty).tolist() == [1]


def test_first_fit_decreasing_plan() -> None:
    lengths = [10, 8, 5, 10, 9, 7, 3]
    rows = plan_rows(lengths, 16)
    # longest first: 10(0) 10(3) 9(4) 8(1) 7(5) 5(2) 3(6); each into the first row with room
    assert rows == [[0, 2], [3, 6], [4, 5], [1]]
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
    assert plan_rows(lengths, 10) == [[0], [3], [4], [1], [5, 6], [2]]
    with pytest.raises(ValueError, match="row length 9"):
        plan_rows(lengths, 9)


def test_layout_positions_segments_and_mask() -> None:
    batch = _batch()
    mbs = packed_micro_batches(batch, row_length=16, rows_per_micro_batch=2)
    assert [mb.tokens.shape for mb in mbs] == [(2, 16), (2, 16)]
    first = mbs[0]
    assert first.index.tolist() == [0, 2, 3, 6]           # row 0: seqs 0 and 2, row 1: 3 and 6
    assert first.slots.tolist() == [[0, 0, 10], [0, 10, 5], [1, 0, 10], [1, 10, 3]]
    pos, seg = first.packed.position_ids, first.packed.segment_ids
    assert pos[0].tolist() == list(range(10)) + list(range(5)) + [0]
    assert seg[0].tolist() == [0] * 10 + [1] * 5 + [2]
    assert pos[1].tolist() == list(range(10)) + list(range(3)) * 2  # the tail is its own segment
    assert seg[1].tolist() == [0] * 10 + [1] * 3 + [2] * 3
    assert first.packed.seqlens.tolist() == [10, 5, 1, 10, 3, 3]
    assert int(first.packed.seqlens.sum()) == first.tokens.numel()
    mask = first.packed.attention_mask()
    assert mask.shape == (2, 1, 16, 16) and mask.dtype == torch.bool
    seen = ~mask[0, 0]
    assert seen[11, 10] and seen[11, 11] and not seen[11, 12]  # causal inside sequence 2
    assert not seen[11, 9] and not seen[10, 0]                  # nothing across sequences
    assert seen[:10, :10].equal(torch.ones(10, 10, dtype=torch.bool).tril())
    assert torch.equal(first.tokens[0, 10:15], batch.tokens[2, :5])


def test_unpack_round_trip() -> None:
    batch = _batch()
    for mb in packed_micro_batches(batch, row_length=16, rows_per_micro_batch=1):
        # per-token values that identify their token: unpacking must land them on the same
        # (sequence, position) as the padded layout, with 0 at t = 0 and past the length
        values = mb.tokens.float() * 10 + mb.packed.position_ids.float()
        out = mb.unpack(values.unsqueeze(-1).expand(-1, -1, 3))
        seqs = mb.seqs
        lengths = sequence_lengths(seqs)
        t = torch.arange(seqs.tokens.shape[1])
        expect = (seqs.tokens.float() * 10 + t) * ((t > 0) & (t < lengths[:, None]))
        assert out.shape == (*seqs.tokens.shape, 3)
        assert torch.equal(out[..., 1], expect)


def test_unpack_is_differentiable() -> None:
    mb = packed_micro_batches(_batch(), row_length=16, rows_per_micro_batch=4)[0]
    values = torch.randn(mb.tokens.shape, requires_grad=True)
    mb.unpack(values).sum().backward()
    # every token of every sequence except its first position receives gradient once
    assert int(values.grad.sum()) == int(sequence_lengths(mb.seqs).sum()) - mb.num_sequences


def test_micro_batch_counts_pad_to_a_multiple() -> None:
    batch = _batch()
    packed = packed_micro_batches(batch, row_length=16, rows_per_micro_batch=1, multiple=3)
    assert len(packed) == 6 and [mb.num_sequences for mb in packed[4:]] == [0, 0]
    padded = padded_micro_batches(batch, size=2, multiple=3)
    assert len(padded) == 6 and padded[3].index.tolist() == [6, -1]
    assert padded[5].index.tolist() == [-1, -1] and float(padded[5].seqs.loss_mask.sum()) == 0
    stats = packing_stats(batch, packed_micro_batches(batch, 16, 4))
    assert stats == {"tokens_processed": 64.0, "tokens_real": 52.0}


def test_micro_batches_move_to_the_model_device() -> None:
    """The actor feeds each micro-batch on `pstate.device` (CUDA on GPU); "meta" stands in here."""
    batch = _batch()
    batch.old_logprobs = torch.zeros(batch.tokens.shape)
    for mb in [*packed_micro_batches(batch, 16, 2), *padded_micro_batches(batch, 3)]:
        assert mb.to("cpu") is mb
        moved = mb.to("meta")
        tensors = [moved.tokens, moved.index, moved.seqs.tokens, moved.seqs.loss_mask, moved.seqs.advantages,
                   moved.seqs.old_logprobs]
        if mb.packed is not None:
            tensors += [moved.slots, moved.packed.position_ids, moved.packed.segment_ids, moved.packed.seqlens]
        assert all(t.device.type == "meta" for t in tensors)
        assert moved.seqs.ref_logprobs is None and moved.tokens.shape == mb.tokens.shape


# ---- the actor: packed == padded ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pstate() -> Iterator[object]:
    state = init_distributed(ParallelConfig(), seed=11)
    yield state
    destroy_distributed()


def _actor(pstate: object, pack: bool, budget: int = 0, mbs: int = 3) -> MegatronActor:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64, max_position_embeddings=64)
    trainer = TrainerConfig(micro_batch_size=mbs, lr=1e-2, warmup_ratio=0.0, pack_sequences=pack,
                            max_tokens_per_micro_batch=budget)
    return MegatronActor(model, trainer, AlgoConfig(kl_coef=0.1, clip_eps=0.2), pstate, VOCAB)


def _step(actor: MegatronActor, init: dict[str, torch.Tensor]) -> dict[str, object]:
    actor.unwrapped.load_state_dict(init, strict=False)
    actor.setup_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
    actor.snapshot_reference()
    batch = _batch()
    batch.old_logprobs = actor.compute_logprobs(batch) + batch.loss_mask * batch.old_logprobs
    batch.ref_logprobs = actor.compute_logprobs(batch, reference=True)
    metrics = actor.train_step(batch)
    # weights after the step are not compared: Adam maps a gradient of 4e-9 to an update of
    # ~0.3 lr (eps 1e-8), so fp32 summation-order noise in such tiny gradients moves weights by
    # ~1e-4; the gradients themselves agree to ~2e-8
    grads = {k: v.main_grad.detach().clone() for k, v in actor.unwrapped.named_parameters()}
    return {"old": batch.old_logprobs, "metrics": metrics, "grads": grads}


@pytest.mark.parametrize("budget", [0, 16, 20])
def test_packed_step_equals_padded(pstate: object, budget: int) -> None:
    padded = _actor(pstate, pack=False)
    init = {k: v.clone() for k, v in padded.unwrapped.state_dict().items() if torch.is_tensor(v)}
    ref = _step(padded, init)
    packed = _actor(pstate, pack=True, budget=budget)
    assert packed.unwrapped.config.masked_softmax_fusion is False
    got = _step(packed, init)
    assert ref["metrics"]["clip_frac"] > 0 and abs(ref["metrics"]["pg_loss"]) > 1e-4
    assert (got["old"] - ref["old"]).abs().max() <= 1e-5
    for key in ("pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "loss"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), key
    for name, g in ref["grads"].items():
        assert (got["grads"][name] - g).abs().max() <= 1e-5, name


def test_packing_uses_fewer_token_positions(pstate: object) -> None:
    actor = _actor(pstate, pack=True, budget=16)
    batch = _batch(width=24)  # padding to a long T costs the padded path, not the packed one
    packed = packing_stats(batch, actor._micro_batches(batch))
    actor.cfg.pack_sequences = False
    padded = packing_stats(batch, actor._micro_batches(batch))
    assert packed["tokens_real"] == padded["tokens_real"] == 52
    assert packed["tokens_processed"] == 64 < padded["tokens_processed"] == 7 * 24


def test_packing_with_context_parallel_is_refused(pstate: object) -> None:
    model = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=64)
    with pytest.raises(ConfigError, match="trainer.pack_sequences"):
        MegatronActor(model, TrainerConfig(pack_sequences=True), AlgoConfig(), pstate, VOCAB,
                      ParallelConfig(cp=2))


def test_rope_follows_per_sequence_positions(pstate: object) -> None:
    """megatron's GPTModel rotates by row offset; inside `rope_positions` it uses position_ids."""
    from spark_mcore.models.packed import rope_positions

    model = _actor(pstate, pack=True).unwrapped
    rotary = model.rotary_pos_emb
    table = rotary(16)                                            # [16, 1, 1, D] by row offset
    mb = packed_micro_batches(_batch(), row_length=16, rows_per_micro_batch=2)[0]
    with rope_positions(model, mb.packed.position_ids):
        emb = rotary(16)
    assert emb.shape == (16, 2, 1, table.shape[-1])
    pos = mb.packed.position_ids
    assert torch.equal(emb[12, 0, 0], table[pos[0, 12], 0, 0]) and int(pos[0, 12]) == 2
    assert torch.equal(rotary(16), table)                         # restored afterwards


def test_prefix_step_packed_equals_padded(pstate: object) -> None:
    """Prefix-RFT: the prefix mask and [B, T] keep-masked advantages travel through packing;
    log-probs, entropies, loss metrics and gradients match the padded layout."""
    from spark_mcore.trainer.advantages import keep_prefix_advantages

    def prefix_step(actor: MegatronActor, init: dict[str, torch.Tensor]) -> dict[str, object]:
        actor.unwrapped.load_state_dict(init, strict=False)
        actor.setup_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
        actor.snapshot_reference()
        batch = _batch()
        batch.prefix_mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)
        for i in range(batch.num_sequences):  # the first 2 response tokens of rows 0, 2, 4, ...
            if i % 2 == 0:
                start = int(batch.loss_mask[i].nonzero()[0])
                batch.prefix_mask[i, start:start + 2] = True
        logp, ent = actor.compute_logprobs_entropy(batch)
        assert torch.equal(logp, actor.compute_logprobs(batch))
        batch.old_logprobs = logp + batch.loss_mask * batch.old_logprobs
        batch.ref_logprobs = actor.compute_logprobs(batch, reference=True)
        kept = keep_prefix_advantages(batch, ent, 0.5)
        metrics = actor.train_step(batch)
        grads = {k: v.main_grad.detach().clone() for k, v in actor.unwrapped.named_parameters()}
        return {"ent": ent, "adv": batch.advantages, "kept": kept, "metrics": metrics, "grads": grads}

    padded = _actor(pstate, pack=False)
    init = {k: v.clone() for k, v in padded.unwrapped.state_dict().items() if torch.is_tensor(v)}
    ref = prefix_step(padded, init)
    got = prefix_step(_actor(pstate, pack=True, budget=16), init)
    assert ref["adv"].dim() == 2 and ref["kept"]["prefix_kept_frac"] == pytest.approx(0.5)
    assert bool((ref["ent"] > 0).any()) and (got["ent"] - ref["ent"]).abs().max() <= 1e-5
    assert torch.equal(got["adv"], ref["adv"])
    assert ref["metrics"]["prefix_token_frac"] > 0 and abs(ref["metrics"]["pg_loss"]) > 1e-4
    for key in ("pg_loss", "kl", "entropy", "clip_frac", "prefix_token_frac", "grad_norm", "loss"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], abs=1e-5), key
    for name, g in ref["grads"].items():
        assert (got["grads"][name] - g).abs().max() <= 1e-5, name
