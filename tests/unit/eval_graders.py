"""A grader for the evaluation tests, importable by reward workers as "tests.unit.eval_graders:length_parity".

Kept in its own module so a worker does not import the test module (and torch with it).
"""

from __future__ import annotations


def length_parity(response: str, answer: str) -> float:
    """1.0 for a response of odd length: a verdict that differs between samples of one prompt."""
    return float(len(response) % 2 == 1)
