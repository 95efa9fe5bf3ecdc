"""Prefix-RFT rollouts (arXiv 2507.01679): some members of a group continue a demonstration.

For a policy prompt with a demonstration (`data.dataset.demonstration`: the row's "solution"
field or the builtin task's worked solution), members 0 .. k-1 of its group (k =
rollout.prefix.members) get prompt + the first floor(p * L) tokens of the demonstration's L
tokens as input, p drawn per member uniformly from [low, high] (`algo.prefix`; the bounds
follow their cosine schedule over the policy steps); the other members, and every prompt
without a demonstration, are sampled on-policy as usual. A prefixed member's response is the
prefix tokens followed by the engine's continuation (`Completion.prefix_len` marks the
prefix), cut to rollout.max_new_tokens tokens in all, and it is verified as a whole.

Any engine serves it: each member is one engine input (n = 1) with its own sampling seed, the
member's response seed (`groups.response_seeds`), so a prefixed group samples what world size 1
would, whatever the division over ranks; the SGLang engine sends prompt + prefix as input_ids.
The prefix fraction of a member is drawn from a generator seeded by that same seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import torch

from spark_mcore.algo.prefix import draw_prefix_fractions, prefix_fraction_bounds, prefix_lengths
from spark_mcore.data.dataset import demonstration
from spark_mcore.rollout.base import RolloutEngine
from spark_mcore.rollout.config import PrefixConfig
from spark_mcore.rollout.groups import engine_generate, response_seeds
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup, SamplingParams

_FRACTION_SALT = 0x5EED_F00D  # the fraction draw's generator differs from the sampling seed's stream


class PrefixRollouts:
    """Generates a step's groups with demonstration prefixes (see the module docstring).

    tokenize: demonstration text -> token ids (no special tokens); decode: ids -> text.
    total_steps: policy steps of the run (the schedule length when cfg.schedule_steps is 0).
    """

    def __init__(self, cfg: PrefixConfig, total_steps: int, tokenize: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str]) -> None:
        self.cfg, self.tokenize, self.decode = cfg, tokenize, decode
        self.total_steps = cfg.schedule_steps or total_steps
        self._demos: dict[str, list[int] | None] = {}

    def bounds(self, policy_step: int) -> tuple[float, float]:
        """(low, high) of the prefix fraction at `policy_step` (cosine schedules)."""
        return prefix_fraction_bounds(policy_step, self.total_steps, (self.cfg.low_start, self.cfg.low_end),
                                      (self.cfg.high_start, self.cfg.high_end))

    def demonstration_ids(self, prompt: Prompt) -> list[int] | None:
        if prompt.id not in self._demos:
            text = demonstration(prompt)
            self._demos[prompt.id] = None if text is None else list(self.tokenize(text)) or None
        return self._demos[prompt.id]

    def member_prefixes(self, prompts: list[Prompt], seeds: list[list[int]], bounds: tuple[float, float],
                        max_new_tokens: int) -> list[list[list[int]]]:
        """[prompt][member] prefix token ids ([] = on-policy). At most max_new_tokens - 1 tokens,
        so a continuation always has room for one token."""
        out = []
        for prompt, row_seeds in zip(prompts, seeds, strict=True):
            demo = self.demonstration_ids(prompt)
            row = [[] for _ in row_seeds]
            for j in range(min(self.cfg.members, len(row_seeds)) if demo else 0):
                gen = torch.Generator().manual_seed(int(row_seeds[j]) ^ _FRACTION_SALT)
                frac = draw_prefix_fractions(1, *bounds, generator=gen)
                n = int(prefix_lengths(frac, torch.tensor([len(demo)]))[0])
                row[j] = demo[:min(n, max_new_tokens - 1)]
            out.append(row)
        return out

    def generate(self, engine: RolloutEngine, prompts: list[Prompt], encode: Callable[[Prompt], list[int]],
                 params: SamplingParams, bounds: tuple[float, float]) -> list[RolloutGroup]:
        """Like `groups.generate_groups`, with members 0..k-1 of each prompt with a demonstration
        continuing a prefix of it."""
        seeds = params.seeds_for(len(prompts)) if params.sample_seeds is not None else response_seeds(
            prompts, params.n, params.seed if params.seed is not None else random.getrandbits(31))
        prefixes = self.member_prefixes(prompts, seeds, bounds, params.max_new_tokens)
        prompt_ids = [encode(p) for p in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        inputs = [prompt_ids[i] + prefixes[i][j] for i, j in rows]
        single = replace(params, n=1, seed=None, sample_seeds=[[seeds[i][j]] for i, j in rows])
        outputs = engine_generate(engine, [prompts[i] for i, _ in rows], inputs, encode, single)
        if len(outputs) != len(rows) or any(len(o) != 1 for o in outputs):
            raise RuntimeError(f"engine returned {[len(o) for o in outputs]} completions for {len(rows)} single inputs")
        version = engine.policy_version
        groups = []
        for i, prompt in enumerate(prompts):
            comps = [self._response(prefixes[i][j], outputs[i * params.n + j][0], params.max_new_tokens)
                     for j in range(params.n)]
            groups.append(RolloutGroup(prompt, [Rollout(prompt, prompt_ids[i], c, policy_version=version)
                                                for c in comps]))
        return groups

    def _response(self, prefix: list[int], cont: Completion, max_new_tokens: int) -> Completion:
        """prefix + continuation as one response of at most max_new_tokens tokens."""
        if not prefix:
            return cont
        room = max_new_tokens - len(prefix)
        tokens, text, finish = cont.token_ids, cont.text, cont.finish_reason
        logprobs = cont.logprobs
        if len(tokens) > room:  # the continuation had the whole budget: cut it to the response's
            tokens, finish = tokens[:room], "length"
            text = self.decode(tokens)
            logprobs = None if logprobs is None else logprobs[:room]
        return Completion(token_ids=list(prefix) + list(tokens), text=self.decode(list(prefix)) + text,
                          logprobs=None if logprobs is None else [0.0] * len(prefix) + list(logprobs),
                          finish_reason=finish, prefix_len=len(prefix))


def prefix_metrics(groups: list[RolloutGroup], bounds: tuple[float, float]) -> dict[str, float]:
    """Step metrics (prefix `rollout/`): the fraction bounds, prefixed responses, their mean
    prefix length, and the accuracy of prefixed and of on-policy policy responses."""
    from spark_mcore.types import KIND_KEY

    policy = [r for g in groups for r in g.rollouts if KIND_KEY not in r.prompt.meta]
    pre = [r for r in policy if r.completion.prefix_len > 0]
    onp = [r for r in policy if r.completion.prefix_len == 0]
    return {"rollout/prefix_frac_low": bounds[0], "rollout/prefix_frac_high": bounds[1],
            "rollout/prefix_responses": float(len(pre)),
            "rollout/prefix_tokens": sum(r.completion.prefix_len for r in pre) / len(pre) if pre else 0.0,
            "rollout/prefix_accuracy": sum(r.correct for r in pre) / len(pre) if pre else 0.0,
            "rollout/onpolicy_accuracy": sum(r.correct for r in onp) / len(onp) if onp else 0.0}


__all__ = ["PrefixRollouts", "prefix_metrics"]
