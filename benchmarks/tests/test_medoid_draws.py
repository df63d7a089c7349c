"""benchmarks/medoid_draws.py: two draws' rows composed into the medoid the library returns (fastem.judge.medoid),
behind the raised gate, a draw the textual guards reject standing as the unadapted transcript."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "medoid_draws.py"
spec = importlib.util.spec_from_file_location("medoid_draws_bench", SCRIPT)
medoid_draws = importlib.util.module_from_spec(spec)
spec.loader.exec_module(medoid_draws)


def _row(method, utt, adapted, entropy=2.0, before="the cat sat on the mat"):
    return {"method": method, "domain": "d", "utt_id": utt, "language": "en", "ref": "the cat sat on a mat",
            "ref_words": 6, "text_before": before, "hyp_adapted": adapted, "hyp": adapted, "errors": None,
            "audio_seconds": 2.0, "steps_done": 5, "tokens_before": list(range(len(before.split()))),
            "tokens_adapted": [100 + i for i in range(len(adapted.split()))], "adapt": {"max_length_ratio": 2.0},
            "scores": {"entropy_before": entropy}}


def _compose(tmp_path, rows, *extra):
    src, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert medoid_draws.main([str(src), "--draws", "a,b", "--as", "med", "--out", str(out), *extra]) == 0
    return {r["utt_id"]: r for r in map(json.loads, open(out)) if r["method"] == "med"}


def test_the_draws_agreeing_return_their_change_each_alone_is_outvoted(tmp_path):
    long = "the cat sat on a mat " * 4  # more than twice as long: the length guard rejects it
    rows = [_row("a", "agree", "the cat sat on a mat"), _row("b", "agree", "the cat sat on a mat"),
            _row("a", "split", "the cat sat on a mat"), _row("b", "split", "the bat sat on the mat"),
            _row("a", "gated", "the cat sat on a mat", entropy=1.2), _row("b", "gated", "the cat sat on a mat", entropy=1.2),
            _row("a", "guarded", long), _row("b", "guarded", "the cat sat on a mat")]
    got = _compose(tmp_path, rows, "--min-entropy", "1.4")
    assert got["agree"]["hyp"] == "the cat sat on a mat" and got["agree"]["medoid_pick"] == 1
    assert got["agree"]["errors"] == 0 and got["agree"]["changed"]
    assert got["split"]["hyp"] == "the cat sat on the mat" and got["split"]["medoid_pick"] == 0
    assert got["split"]["errors"] == 1
    assert got["gated"]["medoid_pick"] == 0 and not got["gated"]["changed"]  # below the raised gate: not adapted
    assert got["guarded"]["medoid_pick"] == 0  # draw a rejected (length): draw b alone is outvoted
    assert _compose(tmp_path, rows)["gated"]["medoid_pick"] == 1  # at the rows' own gate it was adapted


def test_draws_of_different_utterances_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="must cover the same utterances"):
        _compose(tmp_path, [_row("a", "u1", "x"), _row("b", "u2", "x")])


def test_the_greedy_vote_joins_the_medoid_first(tmp_path):
    """``--greedy-vote`` (beam-search draws): the `none` row's greedy transcript is a candidate before the unadapted
    beam transcript; it carries a draw's change the beam transcript alone would outvote (the pick of the draw that
    says it), and a greedy transcript no other candidate says, chosen, is returned as pick -1."""
    none = lambda utt, text: {**_row("none", utt, text), "hyp": text}  # noqa: E731
    rows = [_row("a", "carry", "the cat sat on a mat"), _row("b", "carry", "the bat sat on the rug"),
            none("carry", "the cat sat on a mat"),
            _row("a", "own", "a x c d", before="a b c d"), _row("b", "own", "a b y d", before="a b c d"),
            none("own", "a x y d")]
    plain = _compose(tmp_path, rows, "--min-entropy", "1.4")
    assert plain["carry"]["medoid_pick"] == 0  # without the vote: the unadapted transcript
    got = _compose(tmp_path, rows, "--min-entropy", "1.4", "--greedy-vote")
    assert got["carry"]["medoid_pick"] == 1 and got["carry"]["hyp"] == "the cat sat on a mat"
    assert got["own"]["medoid_pick"] == -1 and got["own"]["hyp"] == "a x y d"
    with pytest.raises(SystemExit, match="needs a `none` row"):
        _compose(tmp_path, rows[:2], "--greedy-vote")


def test_one_draw_with_the_greedy_vote_is_the_medoid_of_three(tmp_path):
    """``--draws a`` (one draw): the medoid of [greedy, unadapted beam, the draw]; the draw is returned only when it
    is nearer the other two than either is, or says what the greedy vote says (the vote is named by the draw that says
    it, as ``fastem.judge.choose`` names it)."""
    none = lambda utt, text: {**_row("none", utt, text), "hyp": text}  # noqa: E731
    rows = [_row("a", "between", "a x c d", before="a b c d"), none("between", "a x y d"),
            _row("a", "with_greedy", "a x y d", before="a b c d"), none("with_greedy", "a x y d"),
            _row("a", "alone", "q r s t", before="a b c d"), none("alone", "a b c d")]
    src, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert medoid_draws.main([str(src), "--draws", "a", "--as", "one", "--out", str(out), "--greedy-vote"]) == 0
    got = {r["utt_id"]: r for r in map(json.loads, open(out)) if r["method"] == "one"}
    assert got["between"]["medoid_pick"] == 1 and got["between"]["hyp"] == "a x c d"
    assert got["with_greedy"]["medoid_pick"] == 1 and got["with_greedy"]["hyp"] == "a x y d"
    assert got["alone"]["medoid_pick"] == 0 and got["alone"]["medoid_of"] == ["a"]
