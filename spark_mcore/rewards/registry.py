"""The verifier registry: one name per way of scoring a response against a reference answer.

`Prompt.task` names the verifier. A verifier is a plain callable, registered at import time:

    @register_verifier("my_task")
    def my_task(response: str, answer: str) -> float: ...

Contract (checked for every registered verifier by tests/unit/test_rewards.py): it returns a
float in [0, 1] for any input, including non-strings, and never raises. Verifiers that may run
for long (sympy) are bounded from outside, by `spark_mcore.rewards.timeout.run_check` and
`VerifierPool`; they should still avoid work that cannot be interrupted (see math_verifier.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class Verifier(Protocol):
    """Scores `response` (model output text) against `answer` (the reference): 0.0 to 1.0."""

    def __call__(self, response: str, answer: str) -> float: ...


_REGISTRY: dict[str, Verifier] = {}
# math; exact/choice/judge; countdown; judge_check (judge tasks scored on their written check too)
_BUILTINS = ("spark_mcore.rewards.math_verifier", "spark_mcore.rewards.verifiers", "spark_mcore.rewards.countdown",
             "spark_mcore.rewards.judge_check")


def _load_builtins() -> None:
    """Registers the built-in verifiers (their modules register themselves when imported)."""
    import importlib

    for module in _BUILTINS:
        importlib.import_module(module)


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator registering `fn` under `name`. Registering a second, different callable under
    an existing name raises ValueError (two modules fighting over one task name is a bug);
    re-registering the same function (same module and qualified name, e.g. after a reload) is
    allowed and replaces it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_verifier: name must be a non-empty string, got {name!r}")

    def decorator(fn: Verifier) -> Verifier:
        if not callable(fn):
            raise TypeError(f"register_verifier({name!r}): expected a callable, got {type(fn).__name__}")
        old = _REGISTRY.get(name)
        if old is not None and _identity(old) != _identity(fn):
            raise ValueError(
                f"verifier {name!r} is already registered by {_identity(old)}; "
                f"pick another name for {_identity(fn)}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_verifier(name: str) -> Verifier:
    """The verifier registered under `name`; KeyError listing the registered names otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(
            f"unknown verifier {name!r}; registered: {', '.join(registered_verifiers())}. "
            "Set Prompt.task to one of these, or register yours with @register_verifier "
            "(and list its module in reward.verifier_modules for the worker pool)"
        ) from None


def registered_verifiers() -> list[str]:
    """Names of all registered verifiers, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def _identity(fn: object) -> str:
    module = getattr(fn, "__module__", "?")
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{module}.{qualname}"
