"""Layout-independent sampling: a response is a function of its own seed (and the weights),
not of the batch, the order of prompts or the rank that generates it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config

from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import response_seeds
from spark_mcore.rollout.hf_engine import HFEngine, SeededSampler, _nucleus
from spark_mcore.sglang.payloads import build_generate_payload, expand_requests
from spark_mcore.types import Prompt


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return HFEngine(cfg, decode=lambda ids: " ".join(map(str, ids)))


PROMPTS = [[3, 4, 5], [7, 8], [9, 10, 11, 12, 13]]


def test_a_response_depends_on_its_seed_not_on_its_batch(engine: HFEngine) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, sample_seeds=[[10 * i + j for j in range(3)]
                                                                                   for i in range(3)])
    together = engine.generate(PROMPTS, params)
    # prompt 2 alone, in another order and in batches of 2 rows
    alone = engine.generate([PROMPTS[2]], SamplingParams(n=3, temperature=1.0, max_new_tokens=6,
                                                         sample_seeds=[params.sample_seeds[2]]))
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[2]]
    engine.batch_size = 2
    reordered = engine.generate(PROMPTS[::-1], SamplingParams(n=3, temperature=1.0, max_new_tokens=6,
                                                              sample_seeds=params.sample_seeds[::-1]))
    engine.batch_size = 64
    assert [[c.token_ids for c in g] for g in reordered[::-1]] == [[c.token_ids for c in g] for g in together]
    # different seeds give different samples (the seeds are used at all)
    tokens = {tuple(c.token_ids) for g in together for c in g}
    assert len(tokens) > 4


def test_seeded_sampler_draws_from_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    for s in range(4000):
        out = SeededSampler([s], temperature=0.5, top_p=1.0)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
        counts[int(out.argmax())] += 1
    expected = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.02)


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_nucleus(logp, 0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(_nucleus(logp, 0.01))[0].tolist() == [True, False, False, False]


def test_the_sampler_reports_log_probs_of_the_chosen_tokens(engine: HFEngine) -> None:
    [[c]] = engine.generate([[3, 4, 5]], SamplingParams(n=1, temperature=0.7, max_new_tokens=5, seed=1))
    assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)


def _prompt(pid: str) -> Prompt:
    return Prompt(id=pid, messages=[{"role": "user", "content": "q"}], answer="1")


def test_response_seeds_follow_prompt_ids_not_positions() -> None:
    a = response_seeds([_prompt("x"), _prompt("y")], n=2, step_seed=5)
    b = response_seeds([_prompt("y"), _prompt("x")], n=2, step_seed=5)
    assert a == b[::-1] and len({s for row in a for s in row}) == 4
    assert response_seeds([_prompt("x")], 2, 6) != a[:1]  # another iteration: other samples
    # a prompt id that occurs twice in a step gets further samples, not the same ones again
    dup = response_seeds([_prompt("x"), _prompt("x")], n=2, step_seed=5)
    assert dup[0] == a[0] and not set(dup[1]) & set(dup[0])


def test_sglang_payload_carries_the_per_sample_seeds() -> None:
    params = SamplingParams(n=2, sample_seeds=[[11, 12], [21, 22]])
    payload = build_generate_payload(expand_requests([[1, 2], [3]], 2), params)
    assert [sp["sampling_seed"] for sp in payload["sampling_params"]] == [11, 12, 21, 22]
    with pytest.raises(ValueError, match="sample_seeds"):
        SamplingParams(n=3, sample_seeds=[[1, 2]]).seeds_for(1)
