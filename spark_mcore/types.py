"""Records that pass between the boxes of the data-flow diagram.

They are plain dataclasses so that they can be validated at boundaries and serialised to
msgpack-friendly dicts (`to_dict` / `from_dict`) without pickle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # records carry tensors, but importing them needs no torch (config loading)
    import torch

RewardKind = Literal["pointwise", "pairwise", "reflection"]
REWARD_KINDS: tuple[RewardKind, ...] = get_args(RewardKind)
KIND_KEY = "spark_kind"  # Prompt.meta key: the RewardKind of a recycled reward task (absent on policy prompts)
JUDGE_TASK = "judge"  # Prompt.task of pointwise / pairwise reward tasks (the "judge" verifier)


@dataclass
class SamplingParams:
    """n samples per prompt; temperature 0 means greedy. Generation stops at any of
    `stop_token_ids` (the stop token is kept in the returned ids) or after max_new_tokens.

    Seeds: `sample_seeds[i][j]` is the seed of sample j of prompt i (see
    `spark_mcore.rollout.groups.response_seeds`: a function of the step seed, the prompt id and
    the sample index, so a response does not depend on which rank or batch generates it).
    Without it, `seed` gives sample (i, j) the seed `seed + i * n + j`; with neither, sampling
    is unseeded."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    sample_seeds: list[list[int]] | None = None

    def seeds_for(self, num_prompts: int) -> list[list[int]] | None:
        """Per-sample seeds [num_prompts][n] (None: unseeded); validates `sample_seeds`."""
        if self.sample_seeds is not None:
            if len(self.sample_seeds) != num_prompts or any(len(s) != self.n for s in self.sample_seeds):
                raise ValueError(f"params.sample_seeds: expected {num_prompts} lists of n={self.n} seeds, got "
                                 f"{[len(s) for s in self.sample_seeds]}")
            return [list(s) for s in self.sample_seeds]
        if self.seed is None:
            return None
        return [[self.seed + i * self.n + j for j in range(self.n)] for i in range(num_prompts)]


@dataclass
class Prompt:
    """One problem to solve.

    `task` names the verifier that scores responses (see `spark_mcore.rewards`): "math",
    "exact", "choice" or "judge". `answer` is the reference the verifier compares against.
    `images` are file paths or URLs for vision-language prompts.
    """

    id: str
    messages: list[dict[str, str]]
    answer: str
    task: str = "math"
    images: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompt:
        return cls(**d)


@dataclass
class Completion:
    """One generated response. `logprobs` are the engine's (informational only: the trainer
    recomputes old/ref log-probs itself). `finish_reason` is "stop" or "length".
    `prefix_len`: Prefix-RFT: the first prefix_len token ids are a demonstration's prefix the
    engine continued from (not sampled; their logprobs are 0.0); 0 for an on-policy response."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str = "stop"
    prefix_len: int = 0


@dataclass
class Rollout:
    """A completion of a prompt with its verified reward and the policy version that made it."""

    prompt: Prompt
    prompt_ids: list[int]
    completion: Completion
    reward: float = 0.0
    policy_version: int = 0

    @property
    def correct(self) -> bool:
        return self.reward > 0.5


@dataclass
class RolloutGroup:
    """The n rollouts of one prompt (the GRPO group)."""

    prompt: Prompt
    rollouts: list[Rollout]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]


@dataclass
class RewardSample:
    """A reward-model task recycled from a verified policy group (SPARK).

    `prompt.task` selects the verifier ("judge" for pointwise/pairwise, "math" for reflection)
    and `prompt.answer` holds `label`, which never appears in the prompt text.
    """

    kind: RewardKind
    prompt: Prompt
    source_prompt_id: str
    label: str


@dataclass
class TrainBatch:
    """Packed, right-padded tensors for one optimizer step.

    Shapes: B sequences, T = longest prompt+response length.
      tokens         [B, T] long   prompt + response token ids (pad = 0)
      loss_mask      [B, T] float  1 on response tokens that are *predicted*, aligned with tokens
      advantages     [B]    float  per-sequence advantage (broadcast over its tokens), or
                     [B, T] float  per-token advantage (SPRO), 0 where loss_mask == 0
      old_logprobs   [B, T] float  log p_old(tokens[t] | tokens[<t]); 0 where loss_mask == 0
      ref_logprobs   [B, T] float  same under the frozen reference; None when KL is off
      group_ids      [B]    long   prompt group of each sequence (token-level advantages need
                                   it); None when unknown, -1 on padding rows
      engine_logprobs [B, T] float the rollout engine's log-probs of the sampled tokens (0 off
                                   the mask); set for truncated importance sampling, else None
      prefix_mask    [B, T] bool   Prefix-RFT: True on response tokens copied from a
                                   demonstration's prefix (inside loss_mask); None when
                                   rollout.prefix is off
      step_positions [B, S] long   positions (in the row) of the tokens before each reasoning-step
                                   delimiter, -1 pads; rows without steps (reward tasks) all -1;
                                   set only with model.step_head, else None
      outcomes       [B]    float  1 for a verified-correct response, 0 otherwise (the step head's
                                   label for every step of the row); None without the step head
    Position t of the log-prob tensors scores token t (the first position is never in the mask).
    images: per row, (pixel_values [P_i, D], image_grid_thw [N_i, 3]) of its images or None
      (vision-language models); an empty list when no row has images.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    kinds: list[str] = field(default_factory=list)
    group_ids: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None
    images: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    step_positions: torch.Tensor | None = None
    outcomes: torch.Tensor | None = None

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on `device` (itself when already there)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        import torch  # a batch holds tensors, so torch is loaded by now

        if self.tokens.device == torch.device(device):
            return self
        return replace(self, tokens=move(self.tokens), loss_mask=move(self.loss_mask),
                       advantages=move(self.advantages), old_logprobs=move(self.old_logprobs),
                       ref_logprobs=move(self.ref_logprobs), group_ids=move(self.group_ids),
                       engine_logprobs=move(self.engine_logprobs), prefix_mask=move(self.prefix_mask),
                       step_positions=move(self.step_positions), outcomes=move(self.outcomes))


def prompt_kind(prompt: Prompt) -> str:
    """"policy" for a dataset prompt, else the RewardKind of a recycled reward task."""
    return str(prompt.meta.get(KIND_KEY, "policy"))
