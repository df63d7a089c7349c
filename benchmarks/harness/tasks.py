"""Problems with answers that can be checked, for the language-model task benchmark (``lm_tasks.py``).

:func:`problems` generates them procedurally from a seed: eight families of small arithmetic and word
problems (25 each by default), every answer an integer computed here, not by a model.  A problem is put
to the model as chat messages (:func:`messages`): three fixed worked examples whose answers are bare
numbers, then the question, so that a small instruction model answers tersely and the answer can be read
(:func:`extract_answer`).  :func:`majority` is self-consistency's vote; :func:`paired_accuracy` the
paired bootstrap of one method's accuracy against another's on the same problems.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

__all__ = ["FAMILIES", "SHOTS", "problems", "messages", "extract_answer", "majority", "paired_accuracy"]

NAMES = ["Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lily", "Ben", "Ella"]
ITEMS = ["apples", "pens", "stickers", "books", "marbles", "cookies", "cards", "shells"]


def _name(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    return name, "She" if name in ("Mia", "Ava", "Zoe", "Lily", "Ella") else "He"


def _add_small(rng):
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b


def _add(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", a + b


def _sub(rng):
    a, b = rng.randint(10, 40), rng.randint(1, 9)
    return f"What is {a} - {b}?", a - b


def _mul(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} x {b}?", a * b


def _word_add(rng):
    (name, he), item = _name(rng), rng.choice(ITEMS)
    a, b = rng.randint(2, 15), rng.randint(2, 9)
    return f"{name} has {a} {item}. {he} gets {b} more. How many {item} does {name} have now?", a + b


def _word_sub(rng):
    (name, he), item = _name(rng), rng.choice(ITEMS)
    a = rng.randint(6, 20)
    b = rng.randint(1, a - 1)
    return f"{name} has {a} {item}. {he} gives away {b}. How many {item} does {name} have left?", a - b


def _larger(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", max(a, b)


def _next(rng):
    a, d = rng.randint(1, 20), rng.randint(2, 9)
    return f"What number comes next: {a}, {a + d}, {a + 2 * d}, {a + 3 * d}, ?", a + 4 * d


#: family name -> generator of (question, answer)
FAMILIES: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add_small": _add_small, "add": _add, "sub": _sub, "mul": _mul, "word_add": _word_add,
    "word_sub": _word_sub, "larger": _larger, "next": _next}

#: the worked examples before every question (not drawn from the generators: fixed, and none is a problem)
SHOTS = [("What is 3 + 5?", "8"),
         ("Tom has 4 pens. He gets 2 more. How many pens does Tom have now?", "6"),
         ("What is 12 - 7?", "5")]


def problems(per_family: int = 25, seed: int = 0) -> list[dict]:
    """``per_family`` problems of each family, as ``{"id", "family", "question", "answer"}``, the families
    interleaved (a run cut short has them in equal shares); the same list for the same arguments (each
    family draws from its own seeded generator; no question repeats)."""
    columns = []
    for f, (family, make) in enumerate(FAMILIES.items()):
        rng = random.Random(seed * 1000 + f)
        seen: set[str] = {q for q, _ in SHOTS}
        column: list[dict] = []
        while len(column) < per_family:
            question, answer = make(rng)
            if question in seen:
                continue
            seen.add(question)
            column.append({"id": f"{family}-{len(column):03d}", "family": family, "question": question,
                           "answer": int(answer)})
        columns.append(column)
    return [column[i] for i in range(per_family) for column in columns]


def messages(question: str) -> list[dict]:
    """The chat the model answers: the worked examples as earlier turns, then the question."""
    chat = []
    for q, a in SHOTS:
        chat += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return chat + [{"role": "user", "content": question}]


_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The integer a reply gives as its answer: the first number after the last ``=`` when the reply
    writes an equation (``"12 - 9 = 3"``), else the first number in it (``"The answer is 56."``); None
    when it has none.  Thousands separators are ignored."""
    text = (text or "").replace(",", "")
    if "=" in text:
        found = _INT.search(text.rsplit("=", 1)[1])
        if found:
            return int(found.group())
    found = _INT.search(text)
    return int(found.group()) if found else None


def majority(answers: Sequence[int | None]) -> int | None:
    """Self-consistency's vote: the most frequent answer (None, no answer, never wins); a tie goes to the
    answer drawn first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def paired_accuracy(correct: Sequence[bool], baseline: Sequence[bool], *, n_boot: int = 2000, seed: int = 0,
                    ci: float = 0.95) -> dict:
    """A method's accuracy against a baseline's on the same problems: both accuracies, the difference in
    points, its paired bootstrap percentile interval (problems drawn with replacement, the same draw for
    both), and how many problems the method fixed (baseline wrong, method right) and broke."""
    a = np.asarray(correct, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equal, non-empty lists of outcomes, got {a.size} and {b.size}")
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    diff = a[idx].mean(1) - b[idx].mean(1)
    lo, hi = np.quantile(diff, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return {"n": int(a.size), "accuracy": float(a.mean()), "baseline": float(b.mean()),
            "diff": float(a.mean() - b.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "fixed": int(((a == 1) & (b == 0)).sum()), "broken": int(((a == 0) & (b == 1)).sum())}
