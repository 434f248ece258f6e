"""Graders: pure functions `(response, gold_answer) -> reward`, and the registry that names them.

A grader sees one response and one gold answer and returns a float (1.0 / 0.0 for verifiable
math). Graders may be slow or hang on adversarial input; they are therefore only ever called inside
a `RewardPool` worker process, whose parent enforces a hard timeout. Two math graders:

- `math_verify`: the last `\\boxed{}` of the response only (the toy recipes' default: strict,
  and cheap, since only the box is parsed).
- `math_verify_response`: math-verify's `math_metric` on the whole response, configured as the
  papers' verl forks do (SPEED-RL and JSPO-Official `verl/utils/reward_score/math_verify.py`), so
  an unboxed final answer ("the answer is 12") can score. The paper recipes use it.

Deliberately left out: format rewards and partial credit, which would be separate graders in the
same registry.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from math_verify.metric import math_metric
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

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


@functools.cache
def _response_metric() -> Callable[[list[str], list[str]], tuple[float, Any]]:
    """`math_metric` exactly as the papers' verl forks build it, once per process.

    Its logger warns, with the whole response, for every response it extracts nothing from (a
    truncated or answerless response: routine in RL, and simply a 0); that warning is silenced.
    """
    logging.getLogger("math_verify.metric").setLevel(logging.ERROR)
    return math_metric(gold_extraction_target=(LatexExtractionConfig(),),
                       pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()))


def math_verify_response_grader(response: str, answer: str) -> float:
    """1.0 if math-verify's `math_metric` matches the whole response to the gold answer, else 0.0.

    The papers' grader (verl's `math_verify.compute_score` in SPEED-RL and JSPO-Official): the gold
    is wrapped as `\\boxed{answer}` as given and extracted as LaTeX; the prediction is extracted
    from the whole response as plain expression or LaTeX, in math-verify's priority order (a
    "final answer is ..." phrase, then boxes, then other expressions), so an unboxed final answer
    scores, and a later box is not simply preferred: math-verify may read two boxes as one set
    (`first \\boxed{7}, on reflection \\boxed{12}` matches neither 7 nor 12; `math_verify`, which
    reads only the last box, gives it 12).

    Failures score 0.0, as upstream (which catches every exception, timeouts included, and returns
    `timeout_score = 0`): math-verify's own timeouts (SIGALRM: 5 s per parse and per comparison,
    so this must run in a process's main thread, as `RewardPool` workers do) score 0.0 here;
    other exceptions (e.g. a gold answer math-verify cannot extract) propagate, so the pool scores
    them 0.0 and counts them under `reward/errors` instead of hiding them.
    """
    try:
        score, _ = _response_metric()([f"\\boxed{{{answer}}}"], [response])
    except TimeoutException:  # a BaseException: left alone it would end the worker's loop
        return 0.0
    return float(score)


GRADERS: dict[str, Grader] = {
    "math_verify": math_verify_grader,
    "math_verify_response": math_verify_response_grader,
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
