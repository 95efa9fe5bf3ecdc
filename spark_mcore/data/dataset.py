"""Prompt sources (builtin tasks or dataset files) and a resumable, shuffling batch loader."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from spark_mcore.data import countdown
from spark_mcore.data.arith import arith_problems
from spark_mcore.data.arith import worked_solution as arith_solution
from spark_mcore.data.jsonl import DatasetError, load_prompt_file
from spark_mcore.types import KIND_KEY, Prompt

if TYPE_CHECKING:  # a runtime import would close the cycle data.config -> config -> config.run -> data.config
    from spark_mcore.data.config import DataConfig

BUILTIN_PREFIX = "builtin:"
# A builtin task makes the prompts of one split from the data config.
BuiltinTask = Callable[["DataConfig", str], list[Prompt]]
_BUILTINS: dict[str, BuiltinTask] = {}


def register_builtin(name: str) -> Callable[[BuiltinTask], BuiltinTask]:
    def deco(fn: BuiltinTask) -> BuiltinTask:
        if name in _BUILTINS:
            raise ValueError(f"builtin task '{name}' is registered twice")
        _BUILTINS[name] = fn
        return fn

    return deco


@register_builtin("arith")
def _arith(cfg: DataConfig, split: str) -> list[Prompt]:
    size = cfg.train_size if split == "train" else cfg.test_size
    try:
        return arith_problems(list(cfg.levels), split, size, cfg.seed)  # type: ignore[arg-type]
    except ValueError as e:
        raise DatasetError(str(e)) from e


@register_builtin("countdown")
def _countdown(cfg: DataConfig, split: str) -> list[Prompt]:
    size = cfg.train_size if split == "train" else cfg.test_size
    try:
        return countdown.countdown_problems(list(cfg.levels), split, size, cfg.seed)  # type: ignore[arg-type]
    except ValueError as e:
        raise DatasetError(str(e)) from e
@register_builtin("shapes")
def _shapes(cfg: DataConfig, split: str) -> list[Prompt]:
    from spark_mcore.data.shapes import shapes_problems

    return shapes_problems(split, cfg.train_size if split == "train" else cfg.test_size, cfg.seed)


def _builtin(source: str, cfg: DataConfig, split: str, key: str) -> list[Prompt]:
    name = source[len(BUILTIN_PREFIX) :]
    if name not in _BUILTINS:
        raise DatasetError(
            f"{key}: no builtin task '{name}'. Fix: use one of {', '.join(BUILTIN_PREFIX + n for n in sorted(_BUILTINS))} or a file path"
        )
    return _BUILTINS[name](cfg, split)


def load_prompts(
    cfg: DataConfig,
    split: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    known_tasks: Collection[str] | None = None,
) -> list[Prompt]:
    """Prompts of `split` ("train" or "test").

    train: `cfg.source`. test: `cfg.eval_source` if set, else the test split of a builtin
    source (a file source then needs eval_source). Builtin sizes come from train_size /
    test_size; file rows are checked against `cfg.max_prompt_tokens` when a tokenizer is given.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    source, key = cfg.source, "data.source"
    if split == "test" and cfg.eval_source is not None:
        source, key = cfg.eval_source, "data.eval_source"
    if source.startswith(BUILTIN_PREFIX):
        return _builtin(source, cfg, split, key)
    if split == "test" and key == "data.source":
        raise DatasetError(
            "data.eval_source is not set and data.source is a file, so there is no held-out split. Fix: set data.eval_source to a held-out file"
        )
    return load_prompt_file(
        Path(source),
        on_bad_row=cfg.on_bad_row,
        tokenizer=tokenizer,
        max_prompt_tokens=cfg.max_prompt_tokens,
        known_tasks=known_tasks,
        image_check=_image_check(cfg),
    )


def worked_solution(prompt: Prompt) -> str:
    """The worked solution of a builtin prompt (arith or countdown, by meta["source"])."""
    if prompt.meta.get("source") == countdown.SOURCE:
        return countdown.worked_solution(prompt)
    return arith_solution(prompt)


def builtin_corpus(source: str) -> list[str]:
    """Extra tokenizer corpus for a builtin task whose text the default corpus lacks."""
    return countdown.corpus_texts() if source == BUILTIN_PREFIX + countdown.SOURCE else []
def _image_check(cfg: DataConfig) -> Callable[[str], None]:
    from spark_mcore.data.images import check_image, get_decoder

    decoder = get_decoder(cfg.image_decoder)
    return lambda ref: check_image(ref, decoder)


def sft_examples(prompts: list[Prompt]) -> list[tuple[Prompt, str]]:
    """Pairs each prompt with its worked solution (SFT warm-up data): the row's "solution"
    field (a dataset file), or the builtin task's generated solution (arith or countdown)."""
    check_sft_ready(prompts, "data.source")
    return [(p, _solution(p) or worked_solution(p)) for p in prompts]


def demonstration(prompt: Prompt) -> str | None:
    """A prompt's demonstration (Prefix-RFT): the row's "solution" field, else the builtin
    task's worked solution (arith, countdown); None when it has neither (e.g. a dataset row
    without "solution", or a recycled SPARK reward task)."""
    if KIND_KEY in prompt.meta:
        return None
    sol = _solution(prompt)
    if sol is not None:
        return sol
    try:
        return worked_solution(prompt)
    except ValueError:  # not a builtin prompt: no worked solution
        return None


def _solution(prompt: Prompt) -> str | None:
    sol = prompt.meta.get("solution")
    return sol if isinstance(sol, str) and sol.strip() else None


def check_sft_ready(prompts: list[Prompt], key: str = "data.source", steps: int | None = None) -> None:
    """A warm start needs a worked solution per prompt; fails before any work, naming the rows
    without one and the two fixes (a "solution" field per row, or warmstart.steps=0)."""
    if steps == 0:
        return
    missing = []
    for p in prompts:
        if _solution(p) is not None:
            continue
        try:
            worked_solution(p)
        except ValueError:
            missing.append(p)
    if missing:
        raise DatasetError(
            f"warmstart.steps={steps if steps else '>0'} trains on worked solutions, but {len(missing)} of {len(prompts)} prompts of "
            f"{key} have none (first: id {missing[0].id!r}). Fix: add a \"solution\" field (the full answer "
            'text the model should learn, e.g. "2+2=4. \\\\boxed{4}") to every row, or set warmstart.steps=0')


class PromptLoader:
    """Endless batches of `batch_size` prompts, reshuffled every epoch.

    Epoch e visits the prompts in a permutation fixed by (seed, e); a batch that crosses the
    end of an epoch continues with the next epoch's order, so every batch is full and each
    epoch sees every prompt exactly once. `state_dict()` (epoch, position) resumes with
    exactly the batch that would have come next.
    """

    def __init__(self, prompts: list[Prompt], batch_size: int, seed: int = 0) -> None:
        if not prompts:
            raise DatasetError("PromptLoader got no prompts. Fix: check data.source")
        if batch_size < 1:
            raise DatasetError(f"data.prompts_per_step must be >= 1, got {batch_size}")
        self.prompts = prompts
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"prompt-loader:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def __next__(self) -> list[Prompt]:
        batch: list[Prompt] = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(self.prompts[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the position; the seed and dataset size must match the saved run's."""
        for key in ("epoch", "position", "seed", "num_prompts"):
            if not isinstance(state.get(key), int):
                raise DatasetError(
                    f"loader state: '{key}' missing or not an integer; the checkpoint's data state is damaged"
                )
        if state["seed"] != self.seed or state["num_prompts"] != len(self.prompts):
            raise DatasetError(
                f"loader state was saved with seed={state['seed']}, {state['num_prompts']} prompts; this run has seed={self.seed}, "
                f"{len(self.prompts)} prompts. Fix: resume with the same data.seed and data source"
            )
        if not 0 <= state["position"] <= len(self.prompts) or state["epoch"] < 0:
            raise DatasetError(
                f"loader state: epoch {state['epoch']} / position {state['position']} out of range"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


__all__ = ["BUILTIN_PREFIX", "PromptLoader", "builtin_corpus", "check_sft_ready", "demonstration", "load_prompts", "register_builtin",
           "sft_examples", "worked_solution"]
