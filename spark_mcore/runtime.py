"""Builds the boxes of the data-flow diagram from a RunConfig, each from its own config section."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from spark_mcore.config.loader import ConfigError, to_dict
from spark_mcore.config.run import RunConfig
from spark_mcore.data.chat import encode_prompt, stop_token_ids
from spark_mcore.data.dataset import PromptLoader, builtin_corpus, check_sft_ready, load_prompts
from spark_mcore.data.images import check_prompt_images, processor_config
from spark_mcore.data.steps import StepFinder
from spark_mcore.data.tokenizer import get_tokenizer
from spark_mcore.data.vision_prompts import VisionPromptEncoder, vision_prompt_encoder
from spark_mcore.distributed.parallel import ParallelState, init_distributed
from spark_mcore.doctor import machine_findings
from spark_mcore.engines import EngineContext, WeightPusher, build_rollout, check_weight_mode
from spark_mcore.errors import check_writable_dir
from spark_mcore.metrics import MetricsLogger
from spark_mcore.models.registry import get_adapter
from spark_mcore.rewards import VerifierPool, registered_verifiers
from spark_mcore.rollout.base import RolloutEngine
from spark_mcore.rollout.groups import check_engine_images
from spark_mcore.rollout.prefix import PrefixRollouts
from spark_mcore.rollout.source import InProcessSource, RankZeroSource, RolloutSource, StreamSource
from spark_mcore.spark.templates import corpus_texts
from spark_mcore.trainer.actor import MegatronActor
from spark_mcore.types import Prompt

log = logging.getLogger(__name__)


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    pstate: ParallelState
    tokenizer: object
    encode: Callable[[Prompt], list[int]]
    stop_ids: list[int]
    actor: MegatronActor
    engine: RolloutEngine | None  # None on ranks that never generate (hf engine: all but each replica's first)
    weights: WeightPusher  # how the actor's weights reach `engine` (see spark_mcore.engines)
    pool: VerifierPool
    logger: MetricsLogger
    loader: PromptLoader
    test_prompts: list[Prompt]
    source: RolloutSource  # where each step's verified groups come from (rollout.source)
    policy_version: int = 0  # of the weights the engine serves (the same on every rank)
    step_finder: Callable[[list[int]], list[int]] | None = None  # the SPRM step head's steps (model.step_head)

    def push_weights(self, version: int) -> None:
        """The actor's current weights become the engine's policy `version` (collective)."""
        self.weights.push(version)
        self.source.weights_pushed(version)
        self.policy_version = version

    def close(self) -> None:
        self.source.close()
        self.pool.close()
        self.logger.close()
        try:
            self.weights.close()
        finally:
            if self.engine is not None:
                self.engine.shutdown()  # stops launched rollout servers


def load_hf_weights(actor: MegatronActor, hf_path: str) -> None:
    """Initialises the actor from the safetensors of an HF directory (e.g. the `hf/` export of
    an earlier run), through the family adapter. The actor was built with the checkpoint's
    sizes (`resolve_hf_model`); a config.json that does not describe its tensors fails here."""
    from spark_mcore.checkpoint.hf_io import SafetensorsReader

    with SafetensorsReader(hf_path) as reader:  # validates the directory and its files
        state = {name: reader.get(name) for name in reader.names()}
    try:
        for chunk in actor.chunks:  # one per virtual pipeline stage; each takes its layers
            actor.adapter.load_hf_state(chunk, state)
    except (KeyError, ValueError, RuntimeError) as e:  # missing names, shapes, head reshapes
        raise ConfigError(f"model.hf_path={hf_path}: its weights do not fit the model built from the "
                          f"model.* settings ({e}). Fix: set model.* (and data.tokenizer) to those of "
                          "the checkpoint") from e


# ModelConfig fields that describe the architecture: with model.hf_path they come from its
# config.json; the others (dtype, transformer_impl, attention, freeze_vision, ...) stay the run's.
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
                "tie_word_embeddings", "qkv_bias", "init_std", "vision")


def resolve_hf_model(cfg: RunConfig) -> RunConfig:
    """With model.hf_path: the model's architecture from the checkpoint's config.json (a run
    launched on Qwen2.5-7B must not build the tiny default sizes), a model.family that names
    another family refused, and data.tokenizer defaulting to the checkpoint's tokenizer when the
    directory has one. Without model.hf_path: `cfg` unchanged."""
    hf_path = cfg.model.hf_path
    if not hf_path:
        return cfg
    from spark_mcore.checkpoint.convert import inspect_hf

    family, hf_model, _ = inspect_hf(Path(hf_path), cfg.model.dtype)
    if family != cfg.model.family:
        raise ConfigError(f"model.family={cfg.model.family!r} but model.hf_path={hf_path} is a {family!r} "
                          f"checkpoint; set model.family={family}")
    defaults = type(cfg.model)()
    for f in _ARCH_FIELDS:  # a size the user set (not the default) that the checkpoint overrides
        mine, theirs = getattr(cfg.model, f), getattr(hf_model, f)
        if mine != theirs and mine != getattr(defaults, f) and f != "vocab_size":
            log.warning("model.%s=%s ignored: model.hf_path=%s has %s", f, mine, hf_path, theirs)
    model = dataclasses.replace(cfg.model, **{f: getattr(hf_model, f) for f in _ARCH_FIELDS})
    data = cfg.data
    has_tokenizer = any((Path(hf_path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if not data.tokenizer and has_tokenizer:
        data = dataclasses.replace(data, tokenizer=str(hf_path))
    return dataclasses.replace(cfg, model=model, data=data)


def vision_encoder(cfg: RunConfig, tokenizer: object, run_dir: Path, main: bool) -> VisionPromptEncoder:
    """The `encode` of a vision-language run: the tokenizer gets the vision tokens (saved with
    the run's built-in tokenizer, so a resumed run keeps their ids), which must be the model's."""
    vision = cfg.model.vision
    if vision is None:
        raise ConfigError(f"model.family={cfg.model.family!r} needs model.vision (the vision tower's config)")
    before = len(tokenizer)  # type: ignore[arg-type]
    encoder = vision_prompt_encoder(tokenizer, vision, cfg.data)
    if main and len(tokenizer) != before and not cfg.data.tokenizer:  # type: ignore[arg-type]
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))  # type: ignore[attr-defined]
    return encoder


def build_run(cfg: RunConfig) -> Run:
    import torch

    check_weight_mode(cfg, torch.cuda.is_available())  # before any process group or model
    cfg = resolve_hf_model(cfg)
    run_dir = Path(cfg.checkpoint.dir)
    pstate = init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    main = pstate.rank == 0
    if main:
        check_writable_dir(run_dir, "checkpoint.dir")  # before any work, naming the setting
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        # what megatron would otherwise warn about on every command (TE / apex fallbacks), once
        (run_dir / "backends.txt").write_text("".join(f"{f.name}: {f.detail}\n" for f in machine_findings(None)))
    tokenizer = get_tokenizer(cfg.data, run_dir, extra_corpus=corpus_texts() + builtin_corpus(cfg.data.source))
    multimodal = bool(getattr(get_adapter(cfg.model.family), "multimodal", False))
    vision = vision_encoder(cfg, tokenizer, run_dir, main) if multimodal else None
    vocab = cfg.model.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)}); set 0")
    train_prompts = load_prompts(cfg.data, "train", tokenizer, known_tasks=registered_verifiers())
    if cfg.checkpoint.resume is False or not (run_dir / "checkpoints").is_dir():
        check_sft_ready(train_prompts, "data.source", cfg.warmstart.steps)
    test_prompts = load_prompts(cfg.data, "test", tokenizer, known_tasks=registered_verifiers())
    check_prompt_images(train_prompts + test_prompts, cfg.model.family, multimodal)
    actor = MegatronActor(cfg.model, cfg.trainer, cfg.algo, pstate, vocab, cfg.parallel, step_head=cfg.step_head)
    actor.temperature = cfg.rollout.temperature or 1.0  # log-probs of what the engine samples
    if cfg.model.hf_path:
        load_hf_weights(actor, cfg.model.hf_path)
    engine, weights = build_rollout(EngineContext(cfg, run_dir, pstate, tokenizer, actor,
                                                  processor_config(vision.processing) if vision else None))
    try:
        if vision is not None and engine is not None:  # before any step: the engine must take the images
            check_engine_images(engine, train_prompts + test_prompts)
        pool = VerifierPool(cfg.reward)
        loader = PromptLoader(train_prompts, cfg.data.prompts_per_step, seed=cfg.data.seed)
        encode = vision or partial(encode_prompt, tokenizer)
        return Run(
            cfg=cfg, run_dir=run_dir, pstate=pstate, tokenizer=tokenizer,
            encode=encode, stop_ids=stop_token_ids(tokenizer),
            actor=actor, engine=engine, weights=weights, pool=pool,
            logger=MetricsLogger(cfg.logging, run_dir, enabled=main),
            loader=loader, test_prompts=test_prompts,
            source=build_source(cfg, run_dir, pstate, InProcessSource(engine, encode, pool, loader, pstate,
                                                                      prefix=prefix_rollouts(cfg, tokenizer)), vocab),
            step_finder=StepFinder(tokenizer, cfg.step_head.delimiter, cfg.step_head.score_last)
            if cfg.model.step_head else None,
        )
    except BaseException:  # no Run to close: stop launched rollout servers here
        weights.close()
        if engine is not None:
            engine.shutdown()
        raise


def prefix_rollouts(cfg: RunConfig, tokenizer: Any) -> PrefixRollouts | None:
    """Prefix-RFT's generator of demonstration-prefixed members (None: rollout.prefix off)."""
    if not cfg.rollout.prefix.enabled:
        return None
    return PrefixRollouts(cfg.rollout.prefix, cfg.trainer.steps,
                          tokenize=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
                          decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


def build_source(cfg: RunConfig, run_dir: Path, pstate: ParallelState, inprocess: InProcessSource,
                 vocab: int) -> RolloutSource:
    """`rollout.source`: the in-process source, or the stream endpoint that rollout workers
    connect to (bound on global rank 0; its address goes to <run_dir>/stream_endpoint). The
    endpoint rejects token ids at or above the model's `vocab` (or a lower transport.max_token_id):
    one from a worker whose servers run another model would fail the embedding lookup (on a GPU,
    a device-side assert that ends the job)."""
    if cfg.rollout.source == "inprocess":
        return inprocess
    from spark_mcore.transport.endpoint import StreamEndpoint
    from spark_mcore.transport.malloc import keep_freed_memory

    if pstate.world_size > 1:  # one endpoint per run, on rank 0; every rank gets the step's groups
        inner = build_source(cfg, run_dir, dataclasses.replace(pstate, world_size=1), inprocess, vocab) \
            if pstate.rank == 0 else None
        return RankZeroSource(inner, pstate.rank, pstate.device)

    async_ = cfg.rollout.mode == "async"
    keep_freed_memory(cfg.transport.malloc_keep_mb)  # (process-wide: ZeroMQ's receive buffers stay warm)
    transport = dataclasses.replace(cfg.transport, max_token_id=min(cfg.transport.max_token_id or vocab, vocab))
    endpoint = StreamEndpoint(transport, max_staleness=cfg.rollout.max_staleness if async_ else 0)
    (run_dir / "stream_endpoint").write_text(endpoint.endpoint + "\n")
    print(f"rollout stream: trainer endpoint {endpoint.endpoint} ({cfg.rollout.mode} mode); start workers with "
          f"`spark-mcore rollout-worker --connect {endpoint.endpoint} --config RUN.yaml`", flush=True)
    return StreamSource(endpoint, inprocess.loader, max_staleness=cfg.rollout.max_staleness if async_ else None)
