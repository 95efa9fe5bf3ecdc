import torch

from spark_mcore.trainer.batching import groups_to_batch, micro_batches, pack_sequences, split_for_updates
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup


def _group(pid: str, rewards: list[float], prompt_ids: list[int]) -> RolloutGroup:
    p = Prompt(id=pid, messages=[{"role": "user", "content": "q"}], answer="1")
    rollouts = [Rollout(p, prompt_ids, Completion(token_ids=[7] * (i + 1), text="x"), reward=r)
                for i, r in enumerate(rewards)]
    return RolloutGroup(p, rollouts)


def test_pack_sequences_masks_exactly_the_response() -> None:
    tokens, mask = pack_sequences([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0, pad_to_multiple=4)
    assert tokens.tolist() == [[1, 2, 4, 5, 6, 0, 0, 0], [3, 7, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]


def test_groups_to_batch_advantages_and_filter() -> None:
    groups = [_group("a", [1.0, 0.0], [1, 2]), _group("b", [1.0, 1.0], [3])]
    batch, stats = groups_to_batch(groups, eps=1e-9, normalize_std=True, filter_zero_variance=False)
    # group a: mean 0.5, sample std 0.7071 -> +-0.7071; group b: all equal -> 0
    assert torch.allclose(batch.advantages, torch.tensor([0.70710677, -0.70710677, 0.0, 0.0]), atol=1e-6)
    assert stats["zero_variance_groups"] == 1.0
    filtered, _ = groups_to_batch(groups, eps=1e-9, normalize_std=True, filter_zero_variance=True)
    assert filtered.num_sequences == 2
    none, _ = groups_to_batch(groups[1:], eps=1e-9, normalize_std=True, filter_zero_variance=True)
    assert none is None


def test_micro_batches_and_updates_cover_every_row_once() -> None:
    groups = [_group(str(i), [1.0, 0.0, 1.0], [1]) for i in range(3)]
    batch, _ = groups_to_batch(groups, 1e-9, True, False)
    rows = torch.cat([mb.advantages for mb in micro_batches(batch, 4)])
    assert torch.equal(rows, batch.advantages)
    parts = split_for_updates(batch, 2)
    assert [p.num_sequences for p in parts] == [4, 5] or [p.num_sequences for p in parts] == [5, 4]
    assert sum(p.num_sequences for p in parts) == 9


def test_seeded_update_split_shuffles_rows_deterministically() -> None:
    groups = [_group(str(i), [float(i), 0.0, 1.0], [1]) for i in range(4)]
    batch, _ = groups_to_batch(groups, 1e-9, False, False)
    batch.old_logprobs = torch.arange(batch.tokens.numel(), dtype=torch.float32).view_as(batch.tokens)
    parts = split_for_updates(batch, 3, seed=7)
    again = split_for_updates(batch, 3, seed=7)
    assert [p.num_sequences for p in parts] == [4, 4, 4]
    for a, b in zip(parts, again, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.old_logprobs, b.old_logprobs)
    # every row exactly once, rows keep their own tensors together, and the order is not contiguous
    firsts = sorted(int(p.old_logprobs[i, 0]) for p in parts for i in range(p.num_sequences))
    assert firsts == [int(batch.old_logprobs[i, 0]) for i in range(12)]
    for p in parts:
        for i in range(p.num_sequences):
            row = int(p.old_logprobs[i, 0]) // batch.tokens.shape[1]
            assert torch.equal(p.tokens[i], batch.tokens[row]) and p.advantages[i] == batch.advantages[row]
    assert torch.cat([p.advantages for p in parts]).tolist() != batch.advantages.tolist()
