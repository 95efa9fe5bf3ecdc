"""Prompt sources from the data config, SFT pairs, and the resumable batch loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spark_mcore.config  # noqa: F401  (must precede data.config: the config package imports it back)
from spark_mcore.data.config import DataConfig
from spark_mcore.data.dataset import PromptLoader, load_prompts, sft_examples
from spark_mcore.data.jsonl import DatasetError
from spark_mcore.types import Prompt


def _prompts(n: int) -> list[Prompt]:
    return [
        Prompt(id=f"p{i}", messages=[{"role": "user", "content": str(i)}], answer=str(i)) for i in range(n)
    ]


def _ids(batch: list[Prompt]) -> list[str]:
    return [p.id for p in batch]


def test_builtin_splits_from_config() -> None:
    cfg = DataConfig(levels=[1, 3], train_size=50, test_size=20, seed=5)
    train, test = load_prompts(cfg, "train"), load_prompts(cfg, "test")
    assert len(train) == 50 and len(test) == 20
    assert train[0].id == "arith-train-000000" and test[-1].id == "arith-test-000019"
    assert {p.meta["level"] for p in train} == {1, 3}
    assert not {p.messages[0]["content"] for p in train} & {p.messages[0]["content"] for p in test}
    assert [p.to_dict() for p in load_prompts(cfg, "train")] == [p.to_dict() for p in train]


def test_file_sources(tmp_path: Path) -> None:
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    tr.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n{bad\n")
    ev.write_text(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n")
    with pytest.raises(DatasetError, match="train.jsonl:2: field '<row>'"):
        load_prompts(DataConfig(source=str(tr)), "train")
    cfg = DataConfig(source=str(tr), eval_source=str(ev), on_bad_row="skip")
    assert [(p.id, p.answer) for p in load_prompts(cfg, "train")] == [("train-1", "2")]
    assert [(p.id, p.answer) for p in load_prompts(cfg, "test")] == [("eval-1", "4")]
    with pytest.raises(DatasetError, match="data.eval_source is not set"):
        load_prompts(DataConfig(source=str(tr)), "test")
    # a builtin eval source next to a file train source
    mixed = DataConfig(source=str(tr), eval_source="builtin:arith", test_size=3, on_bad_row="skip")
    assert [p.id for p in load_prompts(mixed, "test")] == [
        "arith-test-000000",
        "arith-test-000001",
        "arith-test-000002",
    ]


def test_bad_sources() -> None:
    with pytest.raises(
        DatasetError, match="data.source: no builtin task 'algebra'. Fix: use one of builtin:arith"
    ):
        load_prompts(DataConfig(source="builtin:algebra"), "train")
    with pytest.raises(DatasetError, match="unknown arith level 7"):
        load_prompts(DataConfig(levels=[7]), "train")
    with pytest.raises(DatasetError, match="split"):
        load_prompts(DataConfig(), "valid")


def test_sft_examples() -> None:
    prompts = load_prompts(DataConfig(levels=[2], train_size=5), "train")
    pairs = sft_examples(prompts)
    assert [p for p, _ in pairs] == prompts
    assert all(sol.endswith(f"\\boxed{{{p.answer}}}") for p, sol in pairs)
    with pytest.raises(DatasetError, match="warmstart.steps.*id 'p0'.*warmstart.steps=0"):
        sft_examples(_prompts(1))


def test_loader_epochs_are_permutations() -> None:
    loader = PromptLoader(_prompts(10), batch_size=4, seed=3)
    batches = [_ids(next(loader)) for _ in range(5)]  # 20 prompts = exactly 2 epochs
    flat = [i for b in batches for i in b]
    assert all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == sorted(flat[10:]) == sorted(f"p{i}" for i in range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    assert loader.state_dict() == {"epoch": 1, "position": 10, "seed": 3, "num_prompts": 10, "batch_size": 4}
    again = PromptLoader(_prompts(10), batch_size=4, seed=3)
    assert [_ids(next(again)) for _ in range(5)] == batches
    other = PromptLoader(_prompts(10), batch_size=4, seed=4)
    assert [_ids(next(other)) for _ in range(5)] != batches


def test_loader_resume_gives_identical_next_batches() -> None:
    ref = PromptLoader(_prompts(7), batch_size=3, seed=11)
    for _ in range(4):  # stops mid-epoch (12 of 14 prompts of epochs 0-1)
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["position"]) == (1, 5)
    resumed = PromptLoader(_prompts(7), batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [_ids(next(resumed)) for _ in range(6)] == [_ids(next(ref)) for _ in range(6)]


def test_loader_rejects_mismatched_state() -> None:
    state = PromptLoader(_prompts(5), 2, seed=1).state_dict()
    with pytest.raises(DatasetError, match="same data.seed and data source"):
        PromptLoader(_prompts(6), 2, seed=1).load_state_dict(state)
    with pytest.raises(DatasetError, match="same data.seed"):
        PromptLoader(_prompts(5), 2, seed=2).load_state_dict(state)
    with pytest.raises(DatasetError, match="'position' missing"):
        PromptLoader(_prompts(5), 2, seed=1).load_state_dict({"epoch": 0, "seed": 1, "num_prompts": 5})
    with pytest.raises(DatasetError, match="out of range"):
        PromptLoader(_prompts(5), 2, seed=1).load_state_dict({**state, "position": 9})


def test_loader_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="no prompts"):
        PromptLoader([], 2)
    with pytest.raises(DatasetError, match="prompts_per_step"):
        PromptLoader(_prompts(3), 0)
    small = PromptLoader(_prompts(2), batch_size=5, seed=0)  # a batch may span several epochs
    assert sorted(_ids(next(small))[:2]) == ["p0", "p1"]
