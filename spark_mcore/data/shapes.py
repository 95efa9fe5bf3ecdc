"""The builtin visual task `shapes`: procedurally drawn images with verifiable answers.

Three kinds of problem, in turn:
- count:   3-7 shapes (circle, square, triangle) in red / green / blue / yellow on a 3x3 grid
           of a 96x96 image; "how many <colour> shapes?" (0 is a possible answer);
- compare: two shapes of one kind and colour, left and right, sizes differing by >= 8 px;
           "which is larger: 1 (left) or 2 (right)?";
- sum:     "a + b" drawn as text (a, b in 0..49) at a jittered place; "what is the sum?".
Answers are integers checked by the `math` verifier (boxed). Images travel inside the prompt as
PNG `data:` URIs (no files), so a problem is fully described by its Prompt record.

Deterministic by seed: problem k of a split comes from random.Random(f"shapes:{seed}:{split}:
{attempt}"). Disjoint train/test: each candidate has a key (count and compare: the whole
drawing; sum: the pair (a, b), so test sums are pairs never seen in training) and belongs to
test iff sha256(key) % 5 == 0; candidates of the other split are dropped.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from typing import Any

from spark_mcore.data.images import bytes_to_data_uri
from spark_mcore.types import Prompt

SIZE = 96
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
           "yellow": (230, 200, 30)}
KINDS = ("circle", "square", "triangle")
_BOX = "Put the final answer in \\boxed{}."


def _canvas() -> tuple[Any, Any]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _draw(draw: Any, kind: str, cx: int, cy: int, r: int, colour: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)


def _png_uri(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return bytes_to_data_uri(buf.getvalue(), "image/png")


Problem = tuple[tuple[Any, ...], str, str, Any]  # (split key, question, answer, image)


def _count(rng: random.Random) -> Problem:
    img, draw = _canvas()
    cells = rng.sample(range(9), rng.randint(3, 7))
    shapes = []
    for c in sorted(cells):
        kind, colour = rng.choice(KINDS), rng.choice(sorted(COLOURS))
        r = rng.randint(6, 13)
        cx, cy = 16 + 32 * (c % 3) + rng.randint(-2, 2), 16 + 32 * (c // 3) + rng.randint(-2, 2)
        _draw(draw, kind, cx, cy, r, COLOURS[colour])
        shapes.append((kind, colour, cx, cy, r))
    target = rng.choice(sorted(COLOURS))
    answer = sum(s[1] == target for s in shapes)
    question = f"How many {target} shapes are in the image? {_BOX}"
    return ("count", target, tuple(shapes)), question, str(answer), img


def _compare(rng: random.Random) -> Problem:
    img, draw = _canvas()
    kind, colour = rng.choice(KINDS), rng.choice(sorted(COLOURS))
    small = rng.randint(6, 14)
    big = small + rng.randint(8, 12)
    left_big = rng.random() < 0.5
    radii = (big, small) if left_big else (small, big)
    for cx, r in zip((24, 72), radii, strict=True):
        _draw(draw, kind, cx, 48 + rng.randint(-8, 8), r, COLOURS[colour])
    question = (f"There are two {colour} {kind}s. Which one is larger: 1 (the left one) or 2 "
                f"(the right one)? {_BOX}")
    return ("compare", kind, colour, radii), question, "1" if left_big else "2", img


def _sum(rng: random.Random) -> Problem:
    from PIL import ImageFont

    img, draw = _canvas()
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    font = ImageFont.load_default(size=18)
    draw.text((6 + rng.randint(0, 20), 30 + rng.randint(-16, 16)), f"{a} + {b}", fill=(0, 0, 0),
              font=font)
    question = f"The image shows an addition. What is its result? {_BOX}"
    return ("sum", a, b), question, str(a + b), img


MAKERS: dict[str, Callable[[random.Random], Problem]] = {
    "count": _count, "compare": _compare, "sum": _sum}


def _split_of(key: tuple[Any, ...]) -> str:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 5 == 0 else "train"


def shapes_problems(split: str, size: int, seed: int = 0,
                    kinds: tuple[str, ...] = tuple(MAKERS)) -> list[Prompt]:
    """`size` prompts of `split` ("train" | "test"), kinds in turn; one image each."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = set(kinds) - set(MAKERS)
    if unknown or not kinds:
        raise ValueError(f"shapes kinds {sorted(unknown) or kinds} unknown; use {sorted(MAKERS)}")
    out: list[Prompt] = []
    attempt = 0
    while len(out) < size:
        kind = kinds[len(out) % len(kinds)]
        rng = random.Random(f"shapes:{seed}:{split}:{attempt}")
        attempt += 1
        key, question, answer, img = MAKERS[kind](rng)
        if _split_of(key) != split:
            continue
        out.append(Prompt(id=f"shapes-{split}-{len(out)}",
                          messages=[{"role": "user", "content": question}], answer=answer,
                          task="math", images=[_png_uri(img)],
                          meta={"kind": kind, "split_key": repr(key)}))
    return out


__all__ = ["COLOURS", "KINDS", "MAKERS", "shapes_problems"]
