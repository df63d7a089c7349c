"""benchmarks/guard_sweep.py: offline re-decisions agree with the library's guards when rows carry token ids."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "guard_sweep.py"
spec = importlib.util.spec_from_file_location("guard_sweep_bench", SCRIPT)
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def _row(before, after, tokens_before=None, tokens_adapted=None, **scores):
    row = {"ref": "x", "text_before": before, "hyp_adapted": after, "audio_seconds": 3.0,
           "scores": {"entropy_before": 2.0, "source_before": -0.5, "source_after": -0.6, **scores}}
    if tokens_before is not None:
        row.update(tokens_before=tokens_before, tokens_adapted=tokens_adapted)
    return sweep.normalized(row)


def test_length_guard_counts_tokens_when_the_row_has_them():
    # Two words either way, but the adapted transcript is 12 tokens against 3: the library's length guard
    # (on tokens) rejects it; with words only the sweep cannot see it.
    before, after = "hello world", "hellooooo wooorld"
    with_ids = _row(before, after, tokens_before=[1, 2, 3], tokens_adapted=list(range(10, 22)))
    words_only = _row(before, after)
    assert sweep.decide(with_ids, max_drop=None, max_ratio=2.0) == before
    assert sweep.decide(words_only, max_drop=None, max_ratio=2.0) == after


def test_gate_and_confidence_thresholds():
    row = _row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4], source_after=-1.0)
    assert sweep.decide(row, max_drop=None, max_ratio=None) == "a b d"
    assert sweep.decide(row, max_drop=0.4, max_ratio=None) == "a b c"  # the source model finds it 0.5 nats less likely
    assert sweep.decide(row, max_drop=0.6, max_ratio=None) == "a b d"
    assert sweep.decide(row, max_drop=None, max_ratio=None, min_entropy=2.5) == "a b c"  # gated: not adapted
    fell_back = _row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4], fallback_before=0.2)
    # the library's gate: a transcript that needed Whisper's fallback adapts whatever its entropy
    assert sweep.decide(fell_back, max_drop=None, max_ratio=None, min_entropy=2.5) == "a b d"


def test_consensus_margin_matches_the_library_guard_at_zero():
    from fastem import judge as guards

    row = _row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4], source_before=-0.4,
               source_after=-0.7, adapted_before=-0.5, adapted_after=-0.3)  # gain 0.2 < drop 0.3
    ev = guards.Evidence(text_before="a b c", text_after="a b d", tokens_before=[1, 2, 3], tokens_after=[1, 2, 4],
                         seconds=3.0, source_logp_before=-0.4, source_logp_after=-0.7, adapted_logp_before=-0.5,
                         adapted_logp_after=-0.3)
    assert guards.consensus(ev) is not None
    assert sweep.decide(row, max_drop=None, max_ratio=None, consensus=0.0) == "a b c"
    assert sweep.decide(row, max_drop=None, max_ratio=None, consensus=-0.15) == "a b d"  # a looser margin keeps it
    assert sweep.decide(row, max_drop=None, max_ratio=None) == "a b d"  # off
    old = _row("a b c", "a b d")  # a row from before the adapted model's scores were recorded: no decision
    assert sweep.decide(old, max_drop=None, max_ratio=None, consensus=0.0) == "a b d"


def test_tradeoff_tightens_the_confidence_guard_on_top_of_consensus():
    # Both rows pass consensus (the adapted model gains more than the source loses); the source model finds the
    # first adapted transcript 0.3 nats less likely, the second 0.1 nats more likely.
    rows = [{**_row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4], source_before=-0.4,
                    source_after=-0.7, adapted_before=-0.5, adapted_after=0.0), "ref": "a b c"},
            {**_row("x y", "x z", tokens_before=[5, 6], tokens_adapted=[5, 7], source_before=-0.5,
                    source_after=-0.4, adapted_before=-0.5, adapted_after=-0.2), "ref": "x z"}]
    base = [sweep.score(r["ref"], r["before"], r["language"]) for r in rows]
    loose, strict = sweep.tradeoff(rows, base, [1.5, 0.0])
    assert (loose["worse"], loose["better"]) == (1, 1)  # the first change is harmful, the second helps
    assert (strict["worse"], strict["better"]) == (0, 1)  # a drop of 0 rejects the first and keeps the second
    assert strict["kept"] == 1


def test_verifier_drop_re_decides_through_the_library_guard():
    row = _row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4], verifier_before=-0.5,
               verifier_after=-0.7)
    assert sweep.decide(row, max_drop=None, max_ratio=None) == "a b d"  # off
    assert sweep.decide(row, max_drop=None, max_ratio=None, verifier_drop=0.1) == "a b c"  # a drop of 0.2 > 0.1
    assert sweep.decide(row, max_drop=None, max_ratio=None, verifier_drop=0.3) == "a b d"
    unscored = _row("a b c", "a b d", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4])
    assert sweep.decide(unscored, max_drop=None, max_ratio=None, verifier_drop=0.0) == "a b d"  # no vote: kept


def test_seq_drop_re_decides_on_whole_transcript_log_probs():
    from fastem import judge as guards

    # mean -0.5 over 3 tokens + end of text = -2.0 in total; the adapted one: -0.45 over 5 + 1 = -2.7
    row = _row("a b c", "a b d e f", tokens_before=[1, 2, 3], tokens_adapted=[1, 2, 4, 5, 6], source_before=-0.5,
               source_after=-0.45)
    ev = guards.Evidence(text_before="a b c", text_after="a b d e f", tokens_before=[1, 2, 3],
                         tokens_after=[1, 2, 4, 5, 6], seconds=3.0, source_logp_before=-0.5, source_logp_after=-0.45,
                         max_seq_logp_drop=0.5)
    assert guards.likelihood(ev) is not None
    assert sweep.decide(row, max_drop=None, max_ratio=None, seq_drop=0.5) == "a b c"
    assert sweep.decide(row, max_drop=None, max_ratio=None, seq_drop=0.8) == "a b d e f"
    assert sweep.decide(row, max_drop=0.0, max_ratio=None) == "a b d e f"  # per token it is more likely
    words_only = _row("a b c", "a b d e f", source_before=-0.5, source_after=-0.45)
    assert sweep.decide(words_only, max_drop=None, max_ratio=None, seq_drop=0.0) == "a b d e f"  # no token ids


def test_grid_crosses_the_verifier_and_likelihood_thresholds(tmp_path, capsys):
    import json

    def raw(ref, verifier_after, source_after):
        # "a b c" -> "a b d": 3 tokens + end of text each, source mean -0.5 before
        return {"method": "m", "ref": ref, "text_before": "a b c", "hyp_adapted": "a b d", "audio_seconds": 3.0,
                "domain": "d", "language": "en", "tokens_before": [1, 2, 3], "tokens_adapted": [1, 2, 4],
                "scores": {"entropy_before": 2.0, "source_before": -0.5, "source_after": source_after,
                           "adapted_before": -1.0, "adapted_after": 0.0, "verifier_before": -0.5,
                           "verifier_after": verifier_after}}

    rows = [raw("a b c", -0.7, -0.5),   # harmful; the verifier objects (drop 0.2 per token), the source does not
            raw("a b d", -0.5, -1.25)]  # helpful; the source finds it 3 nats less likely in total
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.main([str(path), "--method", "m", "--drops", "none", "--ratios", "none",
                       "--verifier-drops", "0.1", "--seq-drops", "2", "--grid"]) == 0
    out = capsys.readouterr().out
    grid = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[7].strip()
            for line in out.split("max_verifier_drop | max_seq_logp_drop")[1].splitlines()[2:] if line.startswith("|")}
    assert grid == {("off", "off"): "1 / 1", ("off", "2"): "1 / 0", ("0.1", "off"): "0 / 1", ("0.1", "2"): "0 / 0"}
    # the same rows through --lodo (one domain each): the library's pair (0.1, and "auto" resolved to 2 nats for
    # greedy decoding) must be found in the grid, and the table printed
    rows[1]["domain"] = "e"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.main([str(path), "--method", "m", "--drops", "none", "--ratios", "none",
                       "--verifier-drops", "0.1", "--seq-drops", "2", "--lodo"]) == 0
    assert "verifier 0.1, likelihood 2" in capsys.readouterr().out


def test_leave_one_domain_out_judges_each_domain_on_a_choice_made_without_it():
    """Two settings, 'keep' (the unadapted transcript) and 'take' (the adapted one), on three domains:
    'take' fixes an error in a and in b and adds one in c (which has fewer words, so its WER moves most).
    Chosen on all three, 'keep' wins (in-sample).  Held out, a and b get 'keep' (chosen on the other one
    and c), but c gets 'take' (chosen on a and b alone) and pays for it there: the estimate of the rule is
    worse than the in-sample figure, as it must be when a choice does not carry over."""
    def row(domain, ref, before, after):
        return {"ref": ref, "before": before, "adapted": after, "language": "en", "domain": domain,
                "scores": {}, "seconds": 1.0}

    rows = [row("a", "x y z w", "x y q w", "x y z w"), row("a", "p q", "p q", "p q"),
            row("b", "x y z w", "x y q w", "x y z w"), row("b", "p q", "p q", "p q"),
            row("c", "x y", "x y", "x q")]
    base = [sweep.score(r["ref"], r["before"], "en") for r in rows]
    settings = {"keep": lambda r: r["before"], "take": lambda r: r["adapted"]}
    res = sweep.leave_one_domain_out(rows, base, settings, "keep")
    assert res["best"] == "keep" and res["in_sample"] == res["default"] == (1 / 6 + 1 / 6 + 0) / 3
    assert res["chosen"] == {"a": "keep", "b": "keep", "c": "take"}
    assert res["per_domain"]["c"]["wer_chosen"] == 0.5 and res["per_domain"]["c"]["wer_default"] == 0.0
    assert res["lodo"] == (1 / 6 + 1 / 6 + 0.5) / 3 and res["lodo_worse"] == 0.2
    # a bound on harm of 10%: on all three 'take' leaves 1 of 5 worse (20%) and is ruled out; on a and b
    # alone it leaves none worse, so c still gets it
    bounded = sweep.leave_one_domain_out(rows, base, settings, "keep", max_worse=0.1)
    assert bounded["best"] == "keep" and bounded["chosen"] == res["chosen"]
    # with the bound at 0, nothing that leaves any utterance worse is chosen, unless nothing else is left
    strict = sweep.leave_one_domain_out(rows, base, {"take": settings["take"]}, "take", max_worse=0.0)
    assert strict["best"] == "take"
    text = sweep.lodo_markdown(res, "keep")
    assert "leave one domain out" in text and "| c | take | 50.00% | 0.00% | 0.00% | 0.00% |" in text


def test_gates_through_lodo_pool_the_methods_named_with_plus(tmp_path, capsys):
    """``--method A+B --gates ... --lodo``: both draws' rows judged together, each gate with the library's default
    guards, and the gate chosen without the domain it is judged on."""
    import json

    def raw(method, domain, ref, entropy):
        # the adapted transcript fixes "c" -> "d" where the reference says "d"; every guard passes (the source and
        # the adapted model prefer the adapted transcript, no verifier scores)
        return {"method": method, "ref": ref, "text_before": "a b c", "hyp_adapted": "a b d", "audio_seconds": 3.0,
                "domain": domain, "language": "en", "tokens_before": [1, 2, 3], "tokens_adapted": [1, 2, 4],
                "scores": {"entropy_before": entropy, "source_before": -0.5, "source_after": -0.4,
                           "adapted_before": -1.0, "adapted_after": 0.0}}

    # domain g: an uncertain utterance the adaptation mends; domain h: a surer one it harms (just under the
    # library's gate), in both draws; a third method that --method does not name
    gate = sweep.AdaptConfig().gate_entropy
    low = round(gate - 0.2, 3)
    rows = [raw(m, "g", "a b d", gate + 1) for m in ("m", "m_s1")] + [raw(m, "h", "a b c", gate - 0.1)
                                                                      for m in ("m", "m_s1")]
    rows.append(raw("other", "g", "a b d", gate + 1))
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep.main([str(path), "--method", "m+m_s1", "--drops", "none", "--ratios", "none",
                       "--gates", f"{low:g},{gate:g}", "--lodo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 rows of m+m_s1")
    gates = {line.split("|")[1].strip(): line.split("|")[7].strip() for line in out.splitlines()
             if line.startswith(f"| {low:g} |") or line.startswith(f"| {gate:g} |")}
    assert gates == {f"{low:g}": "2 / 2", f"{gate:g}": "0 / 2"}  # the harm in h (two draws) is gated, the gains stay
    assert f"| the default (gate {gate:g}) |" in out
    # held out, g is judged under the gate chosen on h alone (the library's: no harm there) and h under g's
    # (a tie there: the first)
    assert f"| g | gate {gate:g} |" in out and f"| h | gate {low:g} |" in out
