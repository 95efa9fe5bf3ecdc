"""GRPO / PPO losses as pure tensor functions.

Shapes: B sequences, T token positions. `mask` is [B, T] (bool or 0/1 float); a position takes
part in a loss only where mask != 0. Masked-out positions never influence values *or* gradients:
inputs are replaced by neutral values with `torch.where` before any nonlinearity, so padding may
hold arbitrary (even huge) numbers without producing inf/NaN.

Extension points are registries: `KL_ESTIMATORS` (name -> `KLEstimator`) and `AGGREGATORS`
(name -> `Aggregator`); `register_kl_estimator` / `register_aggregator` add new entries and the
contract tests in tests/unit/test_algo_losses.py run over every registered entry.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from spark_mcore.algo.config import AlgoConfig

__all__ = [
    "AGGREGATORS",
    "KL_ESTIMATORS",
    "Aggregator",
    "KLEstimator",
    "aggregate",
    "grpo_loss",
    "kl_penalty",
    "policy_loss",
    "register_aggregator",
    "register_kl_estimator",
    "sft_loss",
]


class KLEstimator(Protocol):
    """Per-token estimate of KL(policy || reference) from log_ratio = logp - ref_logp.

    Contract: same shape as the input, 0 where log_ratio == 0, finite for finite input.
    """

    def __call__(self, log_ratio: Tensor) -> Tensor: ...


class Aggregator(Protocol):
    """Reduces per-token values [B, T] under a bool mask [B, T] to a scalar.

    Contract: 0 (not NaN) for an all-false mask; masked-out values do not matter (the caller
    already zeroed them). `normalizer`, when given, replaces the local count in the
    denominator (global token / sequence count across micro-batches).
    """

    def __call__(self, values: Tensor, mask: Tensor, normalizer: float | None) -> Tensor: ...


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio * log_ratio


def _k3(log_ratio: Tensor) -> Tensor:
    # exp(ref - logp) - (ref - logp) - 1 with ref - logp = -log_ratio; >= 0 everywhere.
    return torch.exp(-log_ratio) + log_ratio - 1.0


def _token_mean(values: Tensor, mask: Tensor, normalizer: float | None) -> Tensor:
    denom = mask.sum().clamp(min=1) if normalizer is None else normalizer
    return values.sum() / denom


def _seq_mean(values: Tensor, mask: Tensor, normalizer: float | None) -> Tensor:
    counts = mask.sum(dim=-1)
    per_seq = values.sum(dim=-1) / counts.clamp(min=1)
    # Sequences without any masked-in token are not counted as sequences.
    denom = (counts > 0).sum().clamp(min=1) if normalizer is None else normalizer
    return per_seq.sum() / denom


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": _k1, "k2": _k2, "k3": _k3}
AGGREGATORS: dict[str, Aggregator] = {"token_mean": _token_mean, "seq_mean": _seq_mean}


def register_kl_estimator(name: str, fn: KLEstimator) -> None:
    """Adds a KL estimator; refuses to overwrite an existing name."""
    if name in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {name!r} already registered; pick another name")
    KL_ESTIMATORS[name] = fn


def register_aggregator(name: str, fn: Aggregator) -> None:
    """Adds a loss aggregation mode; refuses to overwrite an existing name."""
    if name in AGGREGATORS:
        raise ValueError(f"aggregation {name!r} already registered; pick another name")
    AGGREGATORS[name] = fn


def _lookup(registry: dict, name: str, field: str) -> object:
    if name not in registry:
        raise ValueError(f"{field}: unknown value {name!r}; choose one of {sorted(registry)}")
    return registry[name]


def _check_bt(name: str, t: Tensor, like: Tensor) -> None:
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} like logp [B, T], got {tuple(t.shape)}"
        )


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    _check_bt("mask", mask, like)
    return mask if mask.dtype == torch.bool else mask != 0


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(policy || reference) estimate.

    k1 = logp - ref; k2 = 0.5 (logp - ref)^2; k3 = exp(ref - logp) - (ref - logp) - 1.

    Args:
        logp, ref_logp: [B, T] log-probs of the sampled tokens.
        estimator: a key of `KL_ESTIMATORS`.
    Returns:
        [B, T] (no masking; pass masked-out positions with equal values or use `grpo_loss`).
    """
    _check_bt("ref_logp", ref_logp, logp)
    fn = _lookup(KL_ESTIMATORS, estimator, "algo.kl_estimator")
    return fn(logp - ref_logp)  # type: ignore[operator]


def aggregate(
    values: Tensor, mask: Tensor, mode: str = "token_mean", normalizer: float | None = None
) -> Tensor:
    """Masked reduction of per-token values to a scalar.

    token_mean: sum over masked tokens / number of masked tokens.
    seq_mean: per-sequence masked mean, then the mean over sequences that have >= 1 token.
    An all-false mask gives 0. Values under mask == 0 are ignored even if inf/NaN.

    Args:
        values: [B, T].
        mask: [B, T] bool or 0/1.
        mode: a key of `AGGREGATORS` (algo.loss_agg).
        normalizer: optional denominator replacing the local token count (token_mean) or
            sequence count (seq_mean), e.g. the global count when summing micro-batch losses.
    Returns:
        0-dim tensor.
    """
    bmask = _bool_mask(mask, values)
    fn = _lookup(AGGREGATORS, mode, "algo.loss_agg")
    if normalizer is not None and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}; pass None for the local count")
    zeroed = torch.where(bmask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return fn(zeroed, bmask, normalizer)  # type: ignore[operator]


def _token_mean_metric(values: Tensor, bmask: Tensor) -> Tensor:
    with torch.no_grad():
        return aggregate(values.detach().float(), bmask, "token_mean")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    agg: str = "token_mean",
    normalizer: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A), each token
    times `is_weights` when given (truncated importance sampling, see `tis_weights`).

    ratio = exp(logp - old_logp); `old_logp` and `advantages` are treated as constants.

    Args:
        logp: [B, T] current policy log-probs (requires grad).
        old_logp: [B, T] log-probs of the policy that sampled the tokens.
        advantages: [B] one advantage per sequence, broadcast over its tokens, or [B, T] one
            per token (SPRO); values under mask == 0 are ignored.
        mask: [B, T] response-token mask.
        clip_eps, clip_eps_high: clip range [1 - clip_eps, 1 + clip_eps_high];
            clip_eps_high None means clip_eps (symmetric).
        agg, normalizer: see `aggregate`.
        is_weights: [B, T] constant per-token weights, or None.
    Returns:
        (loss 0-dim, metrics). Metrics are detached token means over the mask, whatever `agg`:
        clip_frac (share of tokens whose clipped term is the active one, i.e. zero gradient),
        ratio_mean, approx_kl (k3 of old vs new: exp(old - new) - (old - new) - 1).
    """
    _check_bt("old_logp", old_logp, logp)
    if logp.dim() != 2 or advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be [B] = {tuple(logp.shape[:1])} or [B, T] = {tuple(logp.shape)} for logp "
            f"[B, T], got {tuple(advantages.shape)}; pass one value per sequence or per token"
        )
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if clip_eps <= 0 or high <= 0:
        raise ValueError(f"clip_eps ({clip_eps}) and clip_eps_high ({high}) must be > 0")
    bmask = _bool_mask(mask, logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Masked positions get log-ratio 0 (ratio 1) so padding values cannot overflow exp().
    log_ratio = torch.where(bmask, logp - old_logp.detach(), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(logp.dtype)
    # per-sequence values broadcast over the tokens; per-token ones are zeroed under the mask so
    # that padding (even inf) cannot reach the surrogate's gradient
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else torch.where(bmask, adv, zero)
    surr = ratio * adv
    surr_clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(surr, surr_clipped)
    if is_weights is not None:
        _check_bt("is_weights", is_weights, logp)
        per_token = per_token * is_weights.detach().to(logp.dtype)
    loss = aggregate(per_token, bmask, agg, normalizer)
    metrics = {
        "clip_frac": _token_mean_metric((surr_clipped < surr).float(), bmask),
        "ratio_mean": _token_mean_metric(ratio, bmask),
        "approx_kl": _token_mean_metric(_k3(log_ratio), bmask),
    }
    return loss, metrics


def tis_weights(old_logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights min(exp(old - engine), cap) per token, 1 off the mask.

    Args:
        old_logp: [B, T] the trainer's log-probs of the sampled tokens before the update.
        engine_logp: [B, T] the rollout engine's log-probs of the same tokens (it sampled them).
        mask: [B, T]; cap: > 0.
    Returns:
        [B, T] detached weights in (0, cap].
    """
    _check_bt("engine_logp", engine_logp, old_logp)
    bmask = _bool_mask(mask, old_logp)
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_w = torch.where(bmask, old_logp.detach() - engine_logp.detach().to(old_logp.dtype), zero)
    return torch.exp(log_w.clamp(max=math.log(cap)))


def logprob_mismatch(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's on the sampled tokens.

    Returns logprob_mismatch (token mean of |old - engine|) and logprob_kl_k3 (k3 estimate of
    KL(engine || trainer) from the engine's samples: exp(old - engine) - 1 - (old - engine)).
    """
    _check_bt("engine_logp", engine_logp, old_logp)
    bmask = _bool_mask(mask, old_logp)
    d = torch.where(bmask, old_logp.detach() - engine_logp.detach().to(old_logp.dtype),
                    torch.zeros((), dtype=old_logp.dtype))
    return {"logprob_mismatch": float(_token_mean_metric(d.abs(), bmask)),
            "logprob_kl_k3": float(_token_mean_metric(torch.exp(d) - 1.0 - d, bmask))}


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    cfg: AlgoConfig,
    entropy: Tensor | None = None,
    normalizer: float | None = None,
    engine_logp: Tensor | None = None,
    prefix: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective: policy_loss + kl_coef * KL(policy || ref) - entropy_coef * entropy.
    With `engine_logp` (off-policy rollouts) and cfg.tis_cap > 0 the policy term is weighted by
    `tis_weights(old_logp, engine_logp, mask, cfg.tis_cap)` (metric tis_weight_mean).
    With `prefix` ([B, T] bool, Prefix-RFT) the policy term is `prefix_rft_loss` (prefix tokens:
    advantage-weighted log-likelihood; the advantages already carry the entropy keep-mask) and
    the KL term skips the prefix tokens (they are not samples of the policy, so the estimator
    does not apply to them); they still count in its token mean. Metrics add prefix_token_frac.

    KL and entropy are aggregated like the policy term (`cfg.loss_agg`). `ref_logp` may be None
    only when cfg.kl_coef == 0, `entropy` only when cfg.entropy_coef == 0.

    Args:
        logp, old_logp: [B, T]; ref_logp: [B, T] or None; advantages: [B] or [B, T]; mask: [B, T].
        cfg: AlgoConfig (clip_eps, clip_eps_high, kl_coef, kl_estimator, loss_agg, entropy_coef).
        entropy: [B, T] per-token policy entropy (with grad if entropy_coef != 0) or None.
        normalizer: see `aggregate`.
    Returns:
        (loss 0-dim, metrics): loss, pg_loss, kl, entropy, clip_frac, ratio_mean, approx_kl;
        all detached. kl / entropy are reported as 0 when their input is None.
    """
    weights = None
    if engine_logp is not None and cfg.tis_cap > 0:
        weights = tis_weights(old_logp, engine_logp, mask, cfg.tis_cap)
    if prefix is None:
        pg_loss, metrics = policy_loss(
            logp, old_logp, advantages, mask, cfg.clip_eps, cfg.clip_eps_high, cfg.loss_agg, normalizer, weights
        )
    else:  # import here: algo.prefix builds on this module
        from spark_mcore.algo.prefix import prefix_rft_loss

        pg_loss, metrics = prefix_rft_loss(logp, old_logp, advantages, mask, prefix, None, cfg.clip_eps,
                                           cfg.clip_eps_high, cfg.loss_agg, normalizer, weights)
        metrics.pop("prefix_kept_frac")  # meaningless here: the keep-mask is in the advantages
    if weights is not None:
        metrics["tis_weight_mean"] = _token_mean_metric(weights, _bool_mask(mask, logp))
    bmask = _bool_mask(mask, logp)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    loss = pg_loss
    kl = zero
    if ref_logp is None and cfg.kl_coef > 0:
        raise ValueError("ref_logp is None but algo.kl_coef > 0; compute reference log-probs "
                         "or set algo.kl_coef=0")
    if ref_logp is not None:
        _check_bt("ref_logp", ref_logp, logp)
        fn = _lookup(KL_ESTIMATORS, cfg.kl_estimator, "algo.kl_estimator")
        sampled = bmask if prefix is None else bmask & ~prefix.bool()
        log_ratio = torch.where(sampled, logp - ref_logp.detach(), zero)
        kl = aggregate(torch.where(sampled, fn(log_ratio), zero), bmask, cfg.loss_agg, normalizer)  # type: ignore[operator]
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    ent = zero
    if entropy is None and cfg.entropy_coef != 0:
        raise ValueError("entropy is None but algo.entropy_coef != 0; pass token_entropy(...) "
                         "or set algo.entropy_coef=0")
    if entropy is not None:
        _check_bt("entropy", entropy, logp)
        ent = aggregate(entropy, bmask, cfg.loss_agg, normalizer)
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * ent
    metrics.update(
        loss=loss.detach(), pg_loss=pg_loss.detach(), kl=kl.detach(), entropy=ent.detach()
    )
    return loss, metrics


def sft_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood averaged over masked tokens.

    Args:
        logp: [B, T] log-probs of the target tokens; mask: [B, T].
    Returns:
        0-dim tensor; 0 for an empty mask.
    """
    return -aggregate(logp, mask, "token_mean")
