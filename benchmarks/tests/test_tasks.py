"""harness.tasks: the checkable problems of the language-model task benchmark, its answer reader, vote and
paired bootstrap."""
import re

import pytest

from harness.tasks import FAMILIES, SHOTS, extract_answer, majority, messages, paired_accuracy, problems


def _solve(question: str) -> int:
    """An independent solver for every family (by the wording), to check the generated answers."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if question.startswith("What is"):
        a, b = nums
        return {"+": a + b, "-": a - b, "x": a * b}[re.search(r"\d+ ([+\-x]) \d+", question).group(1)]
    if "gets" in question:
        return nums[0] + nums[1]
    if "gives away" in question:
        return nums[0] - nums[1]
    if "larger" in question:
        return max(nums)
    if "comes next" in question:
        return nums[3] + (nums[1] - nums[0])
    raise AssertionError(question)


def test_problems_are_200_fixed_distinct_and_correct():
    ps = problems()
    assert len(ps) == 200 and len({p["id"] for p in ps}) == 200
    assert problems() == ps and problems(seed=1) != ps  # fixed by the seed
    assert [p["family"] for p in ps[:len(FAMILIES)]] == list(FAMILIES)  # interleaved
    for family in FAMILIES:
        mine = [p for p in ps if p["family"] == family]
        assert len(mine) == 25 and len({p["question"] for p in mine}) == 25
    assert all(_solve(p["question"]) == p["answer"] for p in ps)
    assert not {p["question"] for p in ps} & {q for q, _ in SHOTS}


def test_messages_put_the_worked_examples_first():
    chat = messages("What is 2 + 2?")
    assert [m["role"] for m in chat] == ["user", "assistant"] * len(SHOTS) + ["user"]
    assert chat[-1]["content"] == "What is 2 + 2?" and chat[1]["content"] == SHOTS[0][1]


@pytest.mark.parametrize("text, want", [
    ("56", 56), ("The answer is 56.", 56), ("12 - 9 = 3", 3), ("Sam has 15 apples - 7 = 22 apples.", 22),
    ("74 is larger than 93.", 74), ("-4", -4), ("1,024", 1024), ("no idea", None), ("", None), ("x = ?", None)])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_majority_ignores_no_answer_and_breaks_ties_by_first_drawn():
    assert majority([None, 3, 4, 4, None, None]) == 4
    assert majority([5, 3, 3, 5]) == 5
    assert majority([None, None]) is None and majority([]) is None


def test_paired_accuracy_counts_and_interval():
    method = [True] * 30 + [False] * 70
    base = [True] * 20 + [False] * 10 + [True] * 5 + [False] * 65
    c = paired_accuracy(method, base)
    assert (c["accuracy"], c["baseline"]) == (0.30, 0.25) and c["fixed"] == 10 and c["broken"] == 5
    assert c["diff"] == pytest.approx(0.05) and c["ci_low"] < 0.05 < c["ci_high"]
    same = paired_accuracy(base, base)
    assert same["ci_low"] == same["ci_high"] == 0.0
    with pytest.raises(ValueError, match="equal"):
        paired_accuracy([True], [True, False])


def _lm_tasks():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lm_tasks_bench", Path(__file__).resolve().parents[1] / "lm_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_pairs_methods_on_the_problems_all_have():
    lm_tasks = _lm_tasks()
    conf = {"steps": 3}
    rows = []
    for i, (g, a, raw) in enumerate([(True, True, True), (False, True, True), (False, False, True), (True, True, False)]):
        base = {"id": f"p{i}", "family": "add" if i < 2 else "sub", "answer": 1, "settings": conf}
        rows.append({**base, "method": "greedy", "correct": g, "seconds": 1.0})
        rows.append({**base, "method": "adapt:em", "correct": a, "correct_adapted": raw, "guard": None if a == raw else "x",
                     "entropy": [2.0, 1.0], "seconds": 10.0})
    rows.append({"id": "p9", "family": "add", "answer": 1, "settings": conf, "method": "greedy", "correct": True,
                 "seconds": 1.0})  # no adapted row: left out of every comparison
    text = lm_tasks.report(rows)
    assert text.startswith("4 problems")
    line = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "| 50.0% |" in line["greedy"]
    assert "| 75.0% | +25.0" in line["adapt:em (returned)"] and "| 1 / 0 | 10.0 |" in line["adapt:em (returned)"]
    assert "| 75.0% | +25.0" in line["adapt:em (unfiltered)"] and "| 2 / 1 |" in line["adapt:em (unfiltered)"]
    assert "2.000 -> 1.000 | 2 |" in line["em"]
    assert line["add (2)"].split("|")[2].strip() == "50%"
