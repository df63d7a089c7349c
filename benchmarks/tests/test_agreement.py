"""benchmarks/agreement.py: with the verifier's transcripts cached (no model), the agreement guard moves exactly the
accepted rows whose adapted transcript the verifier hears worse, in both variants, and they are re-scored."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "agreement.py"
spec = importlib.util.spec_from_file_location("agreement_bench", SCRIPT)
agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(agreement)

ADAPT = {"guards": "('empty', 'non_speech', 'repetition', 'length', 'confidence', 'consensus', 'verifier')",
         "max_logp_drop": 1.5, "max_length_ratio": 2.0, "max_verifier_drop": 0.1}


def _row(utt, verifier_after):
    # "a b c d" -> "a b c e"; the verifier's per-token log-prob falls from -0.5 to verifier_after
    return {"method": "m", "model": "base", "domain": "d", "utt_id": utt, "language": "en", "ref": "a b c e",
            "ref_words": 4, "text_before": "a b c d", "hyp_adapted": "a b c e", "hyp": None, "errors": None,
            "audio_seconds": 2.0, "tokens_before": [1, 2, 3, 4], "tokens_adapted": [1, 2, 3, 5], "adapt": ADAPT,
            "scores": {"entropy_before": 2.0, "source_before": -0.5, "source_after": -0.6, "adapted_before": -0.9,
                       "adapted_after": -0.1, "verifier_before": -0.5, "verifier_after": verifier_after}}


def test_agreement_moves_only_what_the_verifier_hears_worse(tmp_path):
    rows = [_row("u1", -0.55), _row("u2", -0.55), _row("u3", -1.0)]  # u3: the verifier guard rejects it (drop 0.5)
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "heard.jsonl"
    heard = {"u1": "a b c d", "u2": "a b c e", "u3": "a b c e"}  # u1: the verifier hears the unadapted transcript
    cache.write_text("".join(json.dumps({"key": f"d|{u}|tiny.en|1", "verifier": "tiny.en", "text": t, "abstained": None})
                             + "\n" for u, t in heard.items()))
    out = tmp_path / "out.jsonl"
    got = {}
    for variant in ("add", "replace"):
        assert agreement.main([str(src), "--method", "m", "--as", variant, "--variant", variant, "--cache", str(cache),
                               "--out", str(out)]) == 0
        got[variant] = {r["utt_id"]: r for r in map(json.loads, open(out)) if r["method"] == variant}
    # add: u1 rejected by agreement, u2 kept, u3 rejected by the verifier guard as before
    assert [got["add"][u]["hyp"] for u in ("u1", "u2", "u3")] == ["a b c d", "a b c e", "a b c d"]
    assert [got["add"][u]["errors"] for u in ("u1", "u2", "u3")] == [1, 0, 1]
    assert got["add"]["u1"]["agreement"]["fired"] and not got["add"]["u3"]["agreement"]["fired"]
    # replace: the verifier guard is gone, so u3 (whose transcript the verifier hears) is kept
    assert [got["replace"][u]["hyp"] for u in ("u1", "u2", "u3")] == ["a b c d", "a b c e", "a b c e"]
    assert len(cache.read_text().splitlines()) == 3  # every transcript came from the cache
