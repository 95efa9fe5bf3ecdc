"""Rollout work divided over data-parallel replicas: per step, the world generates and verifies
what one process would, and every rank ends with all of the step's verified groups.

    prompts (identical on every rank) -> seeds from prompt ids (`response_seeds`)
    -> DP replica d takes prompts d, d + D, d + 2D, ...   (strided: recycled reward tasks,
       which are longer, sit at the end of a step's list and spread over the replicas)
    -> the first rank of the replica (tp_rank 0, pp_rank 0, cp_rank 0) generates and verifies
       its share; its TP/PP/CP peers do not generate
    -> its rows go to the replica's other ranks (broadcast over the context-parallel group,
       then over the model-parallel group)
    -> all replicas' rows reach every rank (all-gather over the data-parallel group)
    -> groups in the step's prompt order, the same on every rank

Every rank gets every group because every rank builds the same GRPO batch (advantages,
zero-variance filter, the update split) and the same SPARK cache and plan from them; each
then trains on its DP slice of that batch. Rows travel as msgpack bytes in uint8 tensors
(never pickled). Because a response's seed is a function of its prompt id and sample index,
any division samples the same responses as world size 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack
import torch.distributed as dist

from spark_mcore.distributed.collectives import all_gather_bytes, broadcast_bytes
from spark_mcore.distributed.parallel import ParallelState
from spark_mcore.rollout.base import SamplingParams
from spark_mcore.rollout.groups import response_seeds
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

# (prompts, params) -> verified groups, one per prompt in order (generate + score on this rank)
Producer = Callable[[list[Prompt], SamplingParams], list[RolloutGroup]]


def dp_share(num_items: int, dp_rank: int, dp_size: int) -> list[int]:
    """Indices of the items DP replica `dp_rank` handles: dp_rank, dp_rank + dp_size, ..."""
    return list(range(dp_rank, num_items, dp_size))


def is_generator(pstate: ParallelState) -> bool:
    """The rank of a DP replica that generates for it (its other ranks receive the rows)."""
    return pstate.tp_rank == 0 and pstate.pp_rank == 0 and pstate.cp_rank == 0


def _encode(groups: list[RolloutGroup]) -> bytes:
    rows = [[[r.prompt_ids, r.completion.token_ids, r.completion.logprobs, r.completion.text,
              r.completion.finish_reason, float(r.reward), int(r.policy_version), int(r.completion.prefix_len)]
             for r in g.rollouts]
            for g in groups]
    return msgpack.packb(rows)


def _decode(payload: bytes, prompts: list[Prompt], where: str) -> list[RolloutGroup]:
    rows: Any = msgpack.unpackb(payload) if payload else []
    if not isinstance(rows, list) or len(rows) != len(prompts):
        raise RuntimeError(f"{where}: {len(rows) if isinstance(rows, list) else rows!r:.40} groups received for "
                           f"{len(prompts)} prompts (ranks disagree about the step's prompts)")
    groups = []
    for prompt, group in zip(prompts, rows, strict=True):
        rollouts = []
        for prompt_ids, tokens, logprobs, text, finish, reward, version, prefix_len in group:
            completion = Completion(token_ids=list(tokens), text=text, logprobs=logprobs, finish_reason=finish,
                                    prefix_len=prefix_len)
            rollouts.append(Rollout(prompt, list(prompt_ids), completion, reward=reward, policy_version=version))
        groups.append(RolloutGroup(prompt=prompt, rollouts=rollouts))
    return groups


class DividedRollout:
    """A `Producer` over the whole world: call it on EVERY rank with the same prompts (a
    collective); it runs `local` on this replica's share on the generating rank only.
    `last_responses` counts the responses this rank generated and verified in the last call;
    `stats` is a dict the local producer may fill (e.g. its seconds), for the caller to log."""

    def __init__(self, local: Producer, pstate: ParallelState, stats: dict[str, float] | None = None) -> None:
        self.local, self.pstate = local, pstate
        self.stats = stats if stats is not None else {}
        self.last_responses = 0
        self.total_responses = 0
        mp_ranks = dist.get_process_group_ranks(pstate.mp_group) if pstate.world_size > 1 else [pstate.rank]
        self._source = min(mp_ranks)  # tp_rank 0, pp_rank 0 of this replica (megatron's rank order)
        # CP peers share a dp_rank and a model-parallel position: CP rank 0 generates for them
        self._cp_source = min(dist.get_process_group_ranks(pstate.cp_group)) if pstate.cp_size > 1 else pstate.rank

    def __call__(self, prompts: list[Prompt], params: SamplingParams) -> list[RolloutGroup]:
        ps = self.pstate
        if params.seed is not None and params.sample_seeds is None and params.temperature > 0:
            params = replace(params, sample_seeds=response_seeds(prompts, params.n, params.seed))
        shares = [dp_share(len(prompts), d, ps.dp_size) for d in range(ps.dp_size)]
        mine = shares[ps.dp_rank]
        payload = None
        self.last_responses = 0
        if is_generator(ps):
            seeds = None if params.sample_seeds is None else [params.sample_seeds[i] for i in mine]
            groups = self.local([prompts[i] for i in mine], replace(params, sample_seeds=seeds)) if mine else []
            self.last_responses = sum(len(g.rollouts) for g in groups)
            payload = _encode(groups)
        self.total_responses += self.last_responses
        if ps.world_size == 1:
            return groups
        if ps.cp_size > 1 and ps.tp_rank == 0 and ps.pp_rank == 0:  # CP rank 0 generated for its CP peers
            payload = broadcast_bytes(payload, self._cp_source, ps.cp_group, ps.device)
        payload = broadcast_bytes(payload, self._source, ps.mp_group, ps.device)
        parts = all_gather_bytes(payload, ps.dp_group, ps.device)
        ordered: list[RolloutGroup | None] = [None] * len(prompts)
        for d, (share, part) in enumerate(zip(shares, parts, strict=True)):
            for i, group in zip(share, _decode(part, [prompts[i] for i in share], f"rollout rows of DP replica {d}"),
                                strict=True):
                ordered[i] = group
        return [g for g in ordered if g is not None]


__all__ = ["Producer", "DividedRollout", "dp_share", "is_generator"]
