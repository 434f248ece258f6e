"""Graders: pure functions `(response, gold_answer) -> reward`, and the registry that names them.

A grader sees one response and one gold answer and returns a float (1.0 / 0.0 for verifiable
math). Graders may be slow or hang on adversarial input; they are therefore only ever called inside
a `RewardPool` worker process, whose parent enforces a hard timeout. Deliberately left out: format
rewards and partial credit, which would be separate graders in the same registry.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from math_verify import parse, verify

Grader = Callable[[str, str], float]

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, with balanced braces; None if there is none.

    Escaped braces (`\\{`, `\\}`) do not count towards the balance, so `\\boxed{\\{1,2\\}}` yields
    `\\{1,2\\}`. A last box that is never closed (a response cut off mid-answer) counts as no box:
    an earlier box is deliberately not used in its place.
    """
    opens = list(_BOXED_OPEN.finditer(text))
    if not opens:
        return None
    start = opens[-1].end()
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _gold_latex(answer: str) -> str:
    """The gold answer in a form math-verify extracts: as given if already boxed or in `$...$`."""
    answer = answer.strip()
    if "\\boxed" in answer or answer.startswith("$"):
        return answer
    return f"\\boxed{{{answer}}}"


def math_verify_grader(response: str, answer: str) -> float:
    """1.0 if the response's last boxed expression equals the gold answer under math-verify, else 0.0.

    Equivalence is math-verify's: `2412.0` matches `2412`, `\\frac{1}{2}` matches `0.5`, `1+x`
    matches `x+1`. Uses math-verify's signal-based timeouts, so it must run in a process's main
    thread (a `RewardPool` worker), never in a helper thread of the trainer.
    """
    boxed = last_boxed(response)
    if boxed is None or not boxed.strip():
        return 0.0
    gold = parse(_gold_latex(answer))
    if not gold:
        return 0.0
    predicted = parse(f"\\boxed{{{boxed}}}")
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted) else 0.0


GRADERS: dict[str, Grader] = {
    "math_verify": math_verify_grader,
}


def resolve_grader(name: str) -> Grader:
    """The grader named `name`: a key of `GRADERS` or an importable `"module:function"` path.

    Raises ValueError naming the grader and the registered names when it cannot be found.
    """
    if name in GRADERS:
        return GRADERS[name]
    registered = ", ".join(sorted(GRADERS))
    if ":" not in name:
        raise ValueError(f"unknown grader {name!r}: registered graders are [{registered}]; "
                         "or pass an importable 'module:function' path")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"grader {name!r}: cannot import module {module_name!r} ({exc}); "
                         f"registered graders are [{registered}]") from exc
    grader = getattr(module, attr, None)
    if not callable(grader):
        raise ValueError(
            f"grader {name!r}: module {module_name!r} has no callable {attr!r}; "
            f"registered graders are [{registered}]")
    return grader
