"""benchmarks/breakdown.py: the gate, the unfiltered adaptation and each guard's precision and recall."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "breakdown.py"
spec = importlib.util.spec_from_file_location("breakdown_bench", SCRIPT)
breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(breakdown)


def _row(domain, before, adapted, returned, steps=10, **verdicts):
    return {"method": "fastem", "domain": domain, "text_before": "a", "hyp_adapted": "b" if adapted != before else "a",
            "errors_before": before, "errors_adapted": adapted, "errors": returned, "steps_done": steps,
            "verdicts": {"consensus": None, "likelihood": None, **verdicts}}


def test_counts_and_guard_precision_recall():
    rows = [_row("noise_tap_0db", 2, 3, 2, consensus="x"),      # worse, caught by consensus
            _row("noise_tap_0db", 2, 1, 2, likelihood="x"),     # better, thrown away by likelihood
            _row("noise_tap_0db", 2, 3, 3),                     # worse, let through
            _row("czech", 1, 1, 1, steps=0),                    # gated, wrong
            _row("reverb_hall", 0, 0, 0, steps=0),              # gated, right
            {"method": "none", "domain": "czech"}]
    text = breakdown.breakdown(rows, "fastem")
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert lines["all"].replace(" ", "") == "|all|5|2|1|3|3|1|2|0|1|"
    assert lines["noise 0 dB"].replace(" ", "") == "|noise0dB|3|0|0|3|3|1|2|0|1|"
    assert lines["consensus"].replace(" ", "") == "|consensus|1|1(100%)|1of2(50%)|0(0%)|"
    assert lines["likelihood"].replace(" ", "") == "|likelihood|1|0(0%)|0of2(0%)|1(100%)|"
    assert breakdown.condition("confirm_noise_sheep_5db") == "noise 5 dB" and breakdown.condition("telephone") == "channel"


def test_guard_names_are_the_rows_own_unless_written_before_guards_named_every_guard():
    """A row that records verdicts ran exactly its ``guards`` (today's default leaves ``likelihood`` out though its
    threshold is set); a row written before (no ``verdicts``) ran the guards its thresholds switched on."""
    adapt = {"guards": "('empty', 'consensus', 'verifier')", "max_seq_logp_drop": 2.0, "verifier": "auto"}
    assert breakdown.guard_names({"adapt": adapt, "verdicts": {}}) == ("empty", "consensus", "verifier")
    legacy = {"guards": "('empty', 'consensus')", "max_seq_logp_drop": 2.0, "verifier": "auto"}
    assert breakdown.guard_names({"adapt": legacy}) == ("empty", "consensus", "likelihood", "verifier")


def test_edit_table_counts_what_the_adaptation_added():
    """A substitution added on a worse row and an insertion removed on a better one, against the reference."""
    worse = {**_row("czech", 0, 1, 0), "ref": "red blue green", "text_before": "red blue green",
             "hyp_adapted": "red blew green", "language": "en"}
    better = {**_row("czech", 1, 0, 0), "ref": "red blue green", "text_before": "red blue blue green",
              "hyp_adapted": "red blue green", "language": "en"}
    lines = {line.split("|")[1].strip(): line.replace(" ", "") for line in breakdown.breakdown([worse, better], "fastem")
             .splitlines() if line.startswith("| made")}
    assert lines["made worse"] == "|madeworse|1|+1|+0|+0|"
    assert lines["made better"] == "|madebetter|1|+0|+0|-1|"
    assert breakdown.edit_table([_row("czech", 0, 1, 0)]) == []  # rows without a reference: no table
