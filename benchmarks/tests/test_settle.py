"""benchmarks/settle.py: where the rule stops on a trajectory, and the bounds it writes when the settled
transcript is not the one the run adapted to."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "settle.py"
spec = importlib.util.spec_from_file_location("settle_bench", SCRIPT)
settle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(settle)

TEXT = {(1, 2): "a b", (1, 3): "a c", (4,): "d"}


def _row(greedy, adapted, steps_done=None, returned="a c"):
    # reference "a c"; the unadapted transcript "a b" (1 error)
    return {"method": "m", "domain": "d", "utt_id": "u", "language": "en", "ref": "a c", "ref_words": 2,
            "text_before": "a b", "errors_before": 1, "hyp_adapted": TEXT[tuple(adapted)], "tokens_adapted": adapted,
            "errors_adapted": 0 if adapted == [1, 3] else 1, "hyp": returned, "errors": 0 if returned == "a c" else 1,
            "greedy_steps": greedy, "steps_done": len(greedy) if steps_done is None else steps_done,
            "adapt": {"steps": 4}}


def decode(ids):
    return TEXT[tuple(ids)]


def test_stop_step_needs_n_unchanged_updates():
    a, b = (1, 2), (1, 3)
    assert settle.stop_step([a, a, b, b], 1) == 1
    assert settle.stop_step([a, a, b, b], 2) is None
    assert settle.stop_step([a, b, b, b], 2) == 3
    assert settle.stop_step([a], 1) is None


def test_the_run_stopped_by_its_own_rule_saw_its_last_transcript_once_more():
    r = _row([[1, 2], [1, 3], [1, 3]], [1, 3], steps_done=3)
    assert settle.trajectory(r) == [(1, 2), (1, 3), (1, 3), (1, 3)]


def test_same_transcript_keeps_the_runs_result_and_another_one_is_bounded():
    same = settle.simulate(_row([[1, 2], [1, 3], [1, 3], [1, 3]], [1, 3]), 1, decode)
    assert same["pess"]["hyp"] == "a c" and same["pess"]["steps_done"] == 2
    assert same["pess"]["settle_case"] == "stopped, same transcript"
    # settles on "d" (2 errors) but the run went on to "a c": unknown, bounded by the unadapted "a b" and "d"
    other = settle.simulate(_row([[4], [4], [1, 3], [1, 3]], [1, 3]), 1, decode)
    assert other["pess"]["steps_done"] == 1 and other["pess"]["settle_case"] == "stopped, other transcript"
    assert (other["pess"]["hyp"], other["pess"]["errors"]) == ("d", 2)
    assert (other["opt"]["hyp"], other["opt"]["errors"]) == ("a b", 1)
    assert (other["adapted"]["hyp"], other["adapted"]["errors"]) == ("d", 2)
    never = settle.simulate(_row([[1, 2], [1, 3], [4], [1, 2]], [1, 2], returned="a b"), 1, decode)
    assert never["pess"]["settle_case"] == "ran to the end" and never["pess"]["steps_done"] == 4
    assert never["adapted"]["errors"] == 1
