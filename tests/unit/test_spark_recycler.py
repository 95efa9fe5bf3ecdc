"""SparkConfig, templates and the recycler on hand-built groups."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

import spark_mcore.rewards as rewards
from spark_mcore.config.loader import ConfigError, from_dict
from spark_mcore.spark.config import SparkConfig
from spark_mcore.spark.recycler import Recycler
from spark_mcore.spark.templates import TEMPLATES, get_template, pick_template, render_pairwise
from spark_mcore.spark.text import show_response, strip_special_tokens
from spark_mcore.types import Completion, Prompt, Rollout, RolloutGroup

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _standin_extract_boxed(text: str) -> str | None:
    found = _BOXED.findall(text)
    return found[-1] if found else None


@pytest.fixture(autouse=True)
def _extract_boxed(monkeypatch: pytest.MonkeyPatch) -> None:
    # spark_mcore.rewards is written concurrently; use the real extract_boxed once it exists.
    if not hasattr(rewards, "extract_boxed"):
        monkeypatch.setattr(rewards, "extract_boxed", _standin_extract_boxed, raising=False)


def resp(ans: str) -> str:
    return f"We add the numbers step by step. The result is \\boxed{{{ans}}}"


def group(
    pid: str, texts: list[str], correct: list[bool], answer: str = "98765", images: list[str] | None = None
) -> RolloutGroup:
    prompt = Prompt(
        id=pid,
        messages=[{"role": "user", "content": f"Question {pid}: compute it."}],
        answer=answer,
        images=images or [],
    )
    rollouts = [
        Rollout(
            prompt=prompt,
            prompt_ids=[1],
            completion=Completion(token_ids=[2], text=t),
            reward=float(c),
            policy_version=3,
        )
        for t, c in zip(texts, correct, strict=True)
    ]
    return RolloutGroup(prompt=prompt, rollouts=rollouts)


def cfg(**kw: object) -> SparkConfig:
    return SparkConfig(enabled=True, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- config


def test_config_defaults_and_caps() -> None:
    c = SparkConfig()
    assert (c.enabled, c.schedule, c.mixed_ratio, c.pointwise_prob_mixed, c.content_mode) == (
        False,
        "alternate",
        0.5,
        0.3,
        "both",
    )
    assert c.caps(64) == (32, 32)  # the recipe: 32 judge + 32 reflection per 64 prompts
    assert c.caps(3) == (2, 2)
    assert c.caps(0) == (0, 0)
    assert SparkConfig(judge_per_prompt=1.0, reflection_per_prompt=0.0).caps(5) == (5, 0)
    assert c.resolve_reward_batch_size(16) == 16
    assert SparkConfig(reward_batch_size=8).resolve_reward_batch_size(16) == 8


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"schedule": "sometimes"}, "spark.schedule"),
        ({"content_mode": "all"}, "spark.content_mode"),
        ({"mixed_ratio": 0.0}, "spark.mixed_ratio"),
        ({"pointwise_prob_mixed": 1.5}, "spark.pointwise_prob_mixed"),
        ({"judge_per_prompt": -0.1}, "spark.judge_per_prompt"),
        ({"reflection_per_prompt": 2.0}, "spark.reflection_per_prompt"),
        ({"reward_batch_size": -1}, "spark.reward_batch_size"),
        ({"cache_max": 0}, "spark.cache_max"),
        ({"max_shown_chars": -5}, "spark.max_shown_chars"),
    ],
)
def test_config_rejects_bad_values(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        SparkConfig(**kw)


def test_config_cache_smaller_than_reward_batch() -> None:
    with pytest.raises(ConfigError, match="spark.cache_max"):
        SparkConfig(cache_max=8).resolve_reward_batch_size(16)


def test_config_from_yaml_mapping() -> None:
    c = from_dict(SparkConfig, {"enabled": True, "schedule": "mixed", "mixed_ratio": 0.25}, "spark")
    assert (c.enabled, c.schedule, c.mixed_ratio) == (True, "mixed", 0.25)
    with pytest.raises(ConfigError, match="spark.judge_per_promt.*judge_per_prompt"):
        from_dict(SparkConfig, {"judge_per_promt": 0.5}, "spark")


# ---------------------------------------------------------------- templates


def test_template_inventory() -> None:
    for kind in ("pointwise", "pairwise", "reflection"):
        assert len(TEMPLATES[kind]) >= 8
        assert len({t.text for t in TEMPLATES[kind]}) == len(TEMPLATES[kind])
    assert sum(t.states_wrong for t in TEMPLATES["reflection"]) == 3
    assert not any(t.states_wrong for k in ("pointwise", "pairwise") for t in TEMPLATES[k])
    for t in (t for ts in TEMPLATES.values() for t in ts):
        text = t.text.format(
            noun="answer", Noun="Answer", question="Q", candidate="C", a="RA", b="RB", attempt="T"
        )
        assert "\\box{" not in text
        assert len(text.split()) < 60, t.id  # leaves room for the question in a 512-token demo
        assert get_template(t.id) is t
        if t.kind == "pointwise":
            assert "\\boxed{Yes}" in text and "\\boxed{No}" in text
        elif t.kind == "pairwise":
            assert "\\boxed{A}" in text and "\\boxed{B}" in text
            assert text.index("RA") < text.index("RB")  # A is always shown first
        else:
            assert "\\boxed{}" in text


def test_pick_template_is_seeded() -> None:
    ids = [pick_template("pairwise", random.Random(7)).id for _ in range(3)]
    assert ids[0] == ids[1] == ids[2]
    assert {pick_template("reflection", random.Random(s), states_wrong=True).id for s in range(50)} == {
        "reflection-07",
        "reflection-08",
        "reflection-09",
    }
    with pytest.raises(KeyError, match="pointwise"):
        pick_template("judge", random.Random(0))


def test_show_response_views() -> None:
    assert strip_special_tokens("ok \\boxed{4}<|im_end|>\n<|endoftext|>") == "ok \\boxed{4}"
    assert show_response("x \\boxed{4}</s>", "answer") == ("4", "answer")
    assert show_response("x \\boxed{4}</s>", "cot") == ("x \\boxed{4}", "cot")
    assert show_response("no final answer here", "answer") == ("no final answer here", "cot")
    assert show_response("  <|im_end|>", "cot") is None
    assert show_response("abcdefghij", "cot", max_chars=4) == ("... ghij", "cot")


# ---------------------------------------------------------------- recycler


def test_all_correct_group_gives_one_pointwise_yes() -> None:
    g = group("p0", [resp("5")] * 8, [True] * 8)
    out = Recycler(cfg()).recycle([g], step=0)
    assert [s.kind for s in out] == ["pointwise"]
    s = out[0]
    assert (s.label, s.prompt.answer, s.prompt.task, s.source_prompt_id) == ("Yes", "Yes", "judge", "p0")
    assert s.prompt.meta["spark_kind"] == "pointwise" and s.prompt.meta["policy_version"] == 3
    assert s.prompt.meta["template_id"].startswith("pointwise-")
    assert "Question p0: compute it." in s.prompt.messages[0]["content"]


def test_all_wrong_group_gives_pointwise_no_and_reflection() -> None:
    g = group("p1", [resp(str(i)) for i in range(8)], [False] * 8, answer="98765")
    out = Recycler(cfg()).recycle([g], step=2)
    assert [(s.kind, s.label, s.prompt.task) for s in out] == [
        ("pointwise", "No", "judge"),
        ("reflection", "98765", "math"),
    ]
    refl = out[1]
    idx = refl.prompt.meta["source_rollouts"][0]
    shown = resp(str(idx)) if refl.prompt.meta["view"] == "cot" else str(idx)
    assert shown in refl.prompt.messages[0]["content"]
    assert refl.prompt.id == "p1@s2:reflection"


@pytest.mark.parametrize("size", [2, 16])
def test_mixed_group_pairwise_label_is_position_of_correct(size: int) -> None:
    texts = [resp(str(100 + i)) for i in range(size)]
    correct = [i % 2 == 0 for i in range(size)]
    labels = Counter()
    for seed in range(40):
        out = Recycler(cfg(pointwise_prob_mixed=0.0, content_mode="cot", seed=seed)).recycle(
            [group("m", texts, correct)], 0
        )
        assert [s.kind for s in out] == ["pairwise", "reflection"]
        pair = out[0]
        ia, ib = pair.prompt.meta["source_rollouts"]
        assert correct[ia] != correct[ib]
        assert pair.label == ("A" if correct[ia] else "B")
        content = pair.prompt.messages[0]["content"]
        assert content.index(texts[ia]) < content.index(texts[ib])
        labels[pair.label] += 1
        assert not correct[out[1].prompt.meta["source_rollouts"][0]]  # reflection on a wrong one
    assert labels["A"] > 5 and labels["B"] > 5


def test_mixed_group_pointwise_probability_and_balance() -> None:
    g = group("m", [resp("1"), resp("2"), resp("3")], [True, False, False])
    kinds, labels = Counter(), Counter()
    for seed in range(400):
        s = Recycler(cfg(seed=seed)).recycle([g], 0)[0]
        kinds[s.kind] += 1
        if s.kind == "pointwise":
            labels[s.label] += 1
    assert 0.24 < kinds["pointwise"] / 400 < 0.36
    assert 0.35 < labels["Yes"] / kinds["pointwise"] < 0.65  # right/wrong 50/50, not 1/3
    only_point = Recycler(cfg(pointwise_prob_mixed=1.0)).recycle([g], 0)
    assert [s.kind for s in only_point] == ["pointwise", "reflection"]


def test_groups_of_different_sizes_in_one_call() -> None:
    groups = [
        group("a", [resp("1"), resp("2")], [True, False]),
        group("b", [resp("7")], [True]),
        group("c", [resp(str(i)) for i in range(16)], [False] * 16),
        group("d", [resp(str(i)) for i in range(5)], [True, True, False, True, True]),
    ]
    out = Recycler(cfg(judge_per_prompt=1.0, reflection_per_prompt=1.0)).recycle(groups, 1)
    by_src = Counter((s.source_prompt_id, s.kind == "reflection") for s in out)
    assert by_src == Counter(
        {
            ("a", False): 1,
            ("a", True): 1,
            ("b", False): 1,
            ("c", False): 1,
            ("c", True): 1,
            ("d", False): 1,
            ("d", True): 1,
        }
    )
    assert [s.source_prompt_id for s in out] == ["a", "a", "b", "c", "c", "d", "d"]  # ordered by group


def test_empty_responses_are_never_shown() -> None:
    empties = ["", "   ", "<|im_end|>"]
    # the right responses are all empty: the group counts as all-wrong
    g = group("e", empties + [resp("4"), resp("6")], [True, True, True, False, False])
    out = Recycler(cfg(judge_per_prompt=1.0)).recycle([g], 0)
    assert [(s.kind, s.label) for s in out] == [("pointwise", "No"), ("reflection", "98765")]
    assert all(i >= 3 for s in out for i in s.prompt.meta["source_rollouts"])
    assert Recycler(cfg()).recycle([group("z", empties, [True, False, False])], 0) == []


def test_answer_mode_without_boxed_answer_shows_full_text() -> None:
    texts = ["I could not finish the computation", "Reasoning that ends with \\boxed{12}"]
    for seed in range(10):
        for s in Recycler(cfg(content_mode="answer", pointwise_prob_mixed=0.0, seed=seed)).recycle(
            [group("n", texts, [False, False])], 0
        ):
            content = s.prompt.messages[0]["content"]
            if s.prompt.meta["source_rollouts"] == [0]:
                assert s.prompt.meta["view"] == "cot" and texts[0] in content
            else:
                assert s.prompt.meta["view"] == "answer" and "12" in content and "Reasoning" not in content


def test_answer_mode_pair_with_one_unboxed_response_uses_full_text_for_both() -> None:
    texts = ["no box here at all", resp("8")]
    out = Recycler(cfg(content_mode="answer", pointwise_prob_mixed=0.0)).recycle(
        [group("u", texts, [False, True])], 0
    )
    pair = out[0]
    assert pair.kind == "pairwise" and pair.prompt.meta["view"] == "cot"
    assert texts[0] in pair.prompt.messages[0]["content"] and texts[1] in pair.prompt.messages[0]["content"]


def test_content_mode_both_is_about_half_answer_only() -> None:
    views = Counter()
    for seed in range(200):
        for s in Recycler(cfg(seed=seed)).recycle([group("v", [resp("1"), resp("2")], [False, False])], 0):
            views[s.prompt.meta["view"]] += 1
    assert 0.4 < views["answer"] / sum(views.values()) < 0.6


def test_special_tokens_stripped_and_long_responses_truncated() -> None:
    text = "x" * 50 + " \\boxed{3}<|im_end|>"
    out = Recycler(cfg(content_mode="cot", max_shown_chars=20)).recycle([group("t", [text], [False])], 0)
    for s in out:
        content = s.prompt.messages[0]["content"]
        assert "<|im_end|>" not in content
        assert "... " + ("x" * 50 + " \\boxed{3}")[-20:] in content


def test_pointwise_text_is_identical_for_labels_yes_and_no() -> None:
    texts = [resp("41")] * 4
    for seed in range(20):
        r = Recycler(cfg(seed=seed))
        yes = r.recycle([group("same", texts, [True] * 4)], 5)[0]
        no = r.recycle([group("same", texts, [False] * 4)], 5)[0]
        assert (yes.label, no.label) == ("Yes", "No")
        assert yes.prompt.messages == no.prompt.messages


def test_pairwise_text_does_not_depend_on_the_label() -> None:
    x, y = resp("10"), resp("20")
    seen: dict[tuple, tuple[str, set[str]]] = {}
    for seed in range(300):
        for correct in ([True, False], [False, True]):
            s = Recycler(cfg(seed=seed, pointwise_prob_mixed=0.0, content_mode="cot")).recycle(
                [group("q", [x, y], correct)], 0
            )[0]
            ia, ib = s.prompt.meta["source_rollouts"]
            key = (s.prompt.meta["template_id"], ia, ib)
            text, labels = seen.setdefault(key, (s.prompt.messages[0]["content"], set()))
            assert text == s.prompt.messages[0]["content"]
            labels.add(s.label)
            assert text == render_pairwise(
                get_template(key[0]), "Question q: compute it.", [x, y][ia], [x, y][ib], "cot"
            )
    assert sum(len(labels) == 2 for _, labels in seen.values()) >= 5


def test_reflection_never_shows_the_ground_truth() -> None:
    for seed in range(50):
        out = Recycler(cfg(seed=seed)).recycle(
            [group("g", [resp("3"), resp("4")], [False, False], answer="98765")], 0
        )
        for s in out:
            assert "98765" not in s.prompt.messages[0]["content"]
            assert "98765" not in json.dumps(s.prompt.messages)


def test_same_seed_same_tasks_and_groups_are_independent() -> None:
    rng = random.Random(0)
    groups = [
        group(
            f"p{i}", [resp(str(rng.randint(0, 9))) for _ in range(8)], [rng.random() < 0.5 for _ in range(8)]
        )
        for i in range(12)
    ]
    full = cfg(judge_per_prompt=1.0, reflection_per_prompt=1.0)
    a = [s.prompt.to_dict() for s in Recycler(full).recycle(groups, 4)]
    b = [s.prompt.to_dict() for s in Recycler(full).recycle(groups, 4)]
    assert a == b
    assert a != [s.prompt.to_dict() for s in Recycler(full).recycle(groups, 5)]
    first = [s.prompt.to_dict() for s in Recycler(full).recycle(groups[:6], 4)]
    assert first == [d for d in a if int(d["meta"]["source_prompt_id"][1:]) < 6]


def test_caps_per_step() -> None:
    groups = [group(f"p{i}", [resp("1"), resp("2")] * 4, [True, False] * 4) for i in range(64)]
    out = Recycler(cfg()).recycle(groups, 0)
    kinds = Counter("judge" if s.kind != "reflection" else "reflection" for s in out)
    assert kinds == Counter({"judge": 32, "reflection": 32})
    r = Recycler(cfg(judge_per_prompt=0.25, reflection_per_prompt=0.0))
    out = r.recycle(groups[:10], 0)
    assert len(out) == 3 and all(s.kind != "reflection" for s in out)
    assert r.last_stats["spark/capped_judge"] == 7 and r.last_stats["spark/capped_reflection"] == 10


def test_disabled_recycled_and_vl_prompts() -> None:
    g = group("img", [resp("1"), resp("2")], [True, False], images=["a.png", "b.png"])
    assert Recycler(SparkConfig(enabled=False)).recycle([g], 0) == []
    out = Recycler(cfg()).recycle([g], 0)
    assert out and all(s.prompt.images == ["a.png", "b.png"] for s in out)
    out[0].prompt.images.append("c.png")
    assert g.prompt.images == ["a.png", "b.png"]  # copied, not shared
    again = group("img2", [resp("1")], [False])
    again.prompt.meta["spark_kind"] = "pointwise"  # a recycled task is not recycled again
    assert Recycler(cfg()).recycle([again], 0) == []


def test_question_is_the_last_user_turn() -> None:
    from spark_mcore.spark.text import question_text

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Example: 1+1?"},
        {"role": "assistant", "content": "\\boxed{2}"},
        {"role": "user", "content": " What is 5+5? "},
    ]
    assert question_text(Prompt(id="x", messages=msgs, answer="10")) == "What is 5+5?"
    with pytest.raises(ValueError, match="prompt 'y' has no user message"):
        question_text(Prompt(id="y", messages=[{"role": "system", "content": "hi"}], answer="1"))


def test_corpus_texts_cover_every_template_in_both_views() -> None:
    from spark_mcore.spark.templates import corpus_texts

    texts = corpus_texts()
    assert len(texts) == 2 * sum(len(ts) for ts in TEMPLATES.values()) == 60
    assert sum("solution" in t for t in texts) >= 25 and not any("{question}" in t for t in texts)
