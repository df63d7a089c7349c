"""Guards: each fires on the fault it names, only when adaptation introduced it; and in the loop."""
import importlib

import pytest
import torch

import fastem
from fastem import guards
from tiny_whisper import teacher_forced_mean_logp, tiny_whisper

adapt_module = importlib.import_module("fastem.adapt")


def evidence(before="the cat sat on the mat", after="the cat sat on the mat", tb=None, ta=None, **kw):
    tb = tb if tb is not None else list(range(len(before.split())))
    ta = ta if ta is not None else list(range(len(after.split())))
    return guards.Evidence(text_before=before, text_after=after, tokens_before=tb, tokens_after=ta, seconds=2.0, **kw)


def test_identical_transcripts_pass_every_guard():
    assert guards.check(evidence(source_logp_before=-0.3, source_logp_after=-0.3)) is None


def test_repetition_loop_fires_only_when_adaptation_made_it():
    loop = "the cat the cat the cat the cat the cat the cat"
    ev = evidence(after=loop, ta=[1, 2] * 6)
    assert guards.check(ev)[0] == "repetition"
    assert guards.longest_repeat([1, 2] * 6) == 6 and guards.longest_repeat([1, 2, 3]) == 1
    assert guards.compression_ratio("la " * 40) > 2.4
    # Already looping before adaptation: not the adaptation's doing.
    assert guards.repetition(evidence(before=loop, tb=[1, 2] * 6, after=loop, ta=[1, 2] * 6)) is None


def test_empty_output_fires():
    assert guards.check(evidence(after="", ta=[]))[0] == "empty"
    assert guards.empty(evidence(before="", tb=[], after="", ta=[])) is None


@pytest.mark.parametrize("text", ["[Music]", "(upbeat music)", "♪ ♪", "[BLANK_AUDIO]"])
def test_non_speech_annotations_fire(text):
    assert guards.check(evidence(after=text, ta=[5, 6]))[0] == "non_speech"


def test_appended_text_fires_on_length():
    after = "the cat sat on the mat and then it went for a long walk in the park"
    name, reason = guards.check(evidence(after=after))
    assert name == "length" and "17 tokens vs 6" in reason
    assert guards.length(evidence(after="the cat sat on a mat too")) is None  # small difference


def test_confidence_drop_fires_past_the_threshold():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.4,
                  source_logp_after=-1.2, max_logp_drop=0.5)
    name, reason = guards.check(ev)
    assert name == "confidence" and "drop 0.80" in reason
    ev.max_logp_drop = 1.0
    assert guards.check(ev) is None


def test_verifier_fires_past_its_threshold_and_abstains_without_scores():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], verifier_logp_before=-0.50,
                  verifier_logp_after=-0.75)
    name, reason = guards.check(ev, ("verifier",))
    assert name == "verifier" and "drop 0.25 > 0.1" in reason
    ev.max_verifier_drop = 0.3
    assert guards.verifier(ev) is None
    assert guards.verifier(evidence(after="the cap", ta=[0, 9])) is None  # no verifier (or it abstained)
    assert guards.verifier(evidence(verifier_logp_before=-0.1, verifier_logp_after=-5.0)) is None  # nothing changed
    assert "verifier" not in guards.DEFAULT_GUARDS  # it needs a second checkpoint: opt in with AdaptConfig.verifier
    assert fastem.AdaptConfig(verifier="base").guard_names[-1] == "verifier"


def test_confidence_at_zero_accepts_only_what_the_source_model_also_prefers():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.40,
                  source_logp_after=-0.41, max_logp_drop=0.0)
    assert guards.confidence(ev) is not None  # any drop at all
    ev.source_logp_after = -0.39  # the source model prefers the adapted transcript: a search correction
    assert guards.confidence(ev) is None
    fastem.AdaptConfig(max_logp_drop=0.0)  # a valid setting


def test_likelihood_compares_whole_transcripts_not_per_token_means():
    """Dropping two low-probability tokens raises the mean per token and lowers the total: the per-token
    confidence guard passes it, the likelihood guard (sequence log-prob, end of text counted) does not."""
    ev = evidence(before="a b c d e", after="a b c", tb=[1, 2, 3, 4, 5], ta=[1, 2, 3], source_logp_before=-0.5,
                  source_logp_after=-0.6, max_logp_drop=0.0, max_seq_logp_drop=0.0)
    assert guards.sequence_logp(-0.5, [1, 2, 3, 4, 5]) == pytest.approx(-3.0)   # 6 terms: 5 tokens + end of text
    ev.source_logp_after = -0.45  # mean up: -1.8 in total against -3.0
    assert guards.confidence(ev) is None and guards.likelihood(ev) is None
    ev.source_logp_after = -0.80  # total -3.2 < -3.0, while the mean drop (0.3) would pass max_logp_drop=0.5
    name, reason = guards.check(ev, ("confidence", "likelihood")) or (None, None)
    assert name == "confidence"  # the per-token guard at 0 sees it too
    ev.max_logp_drop = 0.5
    name, reason = guards.check(ev, ("confidence", "likelihood"))
    assert name == "likelihood" and "drop 0.20 > 0" in reason
    ev.max_seq_logp_drop = 0.25
    assert guards.likelihood(ev) is None
    ev.max_seq_logp_drop = None  # off
    assert guards.likelihood(ev) is None
    same = evidence(source_logp_before=-0.1, source_logp_after=-5.0, max_seq_logp_drop=0.0)  # nothing changed
    assert guards.likelihood(same) is None


def test_likelihood_and_verifier_come_with_their_settings():
    """On by default through their settings (``max_seq_logp_drop=2``, ``verifier="auto"``), off when unset;
    an empty guard list turns every guard off."""
    assert "likelihood" not in guards.DEFAULT_GUARDS
    assert fastem.AdaptConfig().guard_names == guards.DEFAULT_GUARDS + ("likelihood", "verifier")
    assert fastem.AdaptConfig(max_seq_logp_drop=None, verifier=None).guard_names == guards.DEFAULT_GUARDS
    assert fastem.AdaptConfig(guards=()).guard_names == ()
    assert fastem.AdaptConfig(max_seq_logp_drop=1.0, guards=("likelihood",)).guard_names == ("likelihood", "verifier")
    assert fastem.AdaptConfig(guards=("likelihood",), verifier=None).guard_names == ("likelihood",)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="max_seq_logp_drop"):
            fastem.AdaptConfig(max_seq_logp_drop=bad)


def test_likelihood_decides_on_the_loops_own_scores(processor):
    """In the loop the guard sees the source model's scores of both transcripts: its verdict is what the
    totals computed from ``result.scores`` say, and a rejection returns the unadapted transcript."""
    model = tiny_whisper(seed=1)  # here the source model finds the adapted transcript ~0.015 nats less likely
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=5e-2, max_new_tokens=6, min_entropy=0.0)
    kw.update(guards=("likelihood",), verifier=None)
    free = fastem.adapt(model, audio, max_seq_logp_drop=1e9, **kw)  # scored, never fires
    assert free.tokens_adapted != free.tokens_before  # the setting changes the transcript: the test can fail
    before = guards.sequence_logp(free.scores["source_before"], free.tokens_before)
    after = guards.sequence_logp(free.scores["source_after"], free.tokens_adapted)
    verdicts = []
    for limit in (0.0, max(before - after, 0.0) + 0.01, abs(before - after) + 1.0):
        res = fastem.adapt(model, audio, max_seq_logp_drop=limit, **kw)
        fires = before - after > limit
        assert (res.guard == "likelihood") == fires
        assert res.tokens == (res.tokens_before if fires else free.tokens_adapted)
        verdicts.append(fires)
    assert verdicts == [True, False, False]  # both outcomes seen


def test_length_lets_a_repair_of_a_looping_transcript_through():
    loop = "I have one knee, knee, knee, knee, knee, knee, knee, knee, knee, knee, knee"
    ev = evidence(before=loop, after="I have one knee", tb=[1, 2, 3] + [4, 5] * 10, ta=[1, 2, 3, 4])
    assert guards.looping(ev.text_before, ev.tokens_before)
    assert guards.length(ev) is None
    ev.text_before, ev.tokens_before = "I have one knee and two feet and ten fingers and toes", list(range(22))
    assert guards.length(ev) is not None  # far shorter than a sane transcript: still fires


def test_a_looping_greedy_transcript_falls_back_to_sampling(processor, monkeypatch):
    """Whisper's temperature fallback: the random model with no pull towards end of text loops greedily;
    the transcript returned is the first non-looping sample, reproducibly, and the gate does not skip it."""
    model = tiny_whisper(eos_strength=0.0)
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    kw = dict(processor=processor, language="en", max_new_tokens=12)
    monkeypatch.setattr(adapt_module, "FALLBACK_TEMPERATURES", ())
    greedy = fastem.adapt(model, audio, steps=0, **kw)
    assert guards.looping(greedy.text_before, greedy.tokens_before) and "fallback_before" not in greedy.scores
    monkeypatch.undo()
    first = fastem.adapt(model, audio, steps=0, **kw)
    assert first.scores["fallback_before"] == adapt_module.FALLBACK_TEMPERATURES[0]
    assert not guards.looping(first.text_before, first.tokens_before) and first.text == first.text_before
    assert fastem.adapt(model, audio, steps=0, **kw).tokens_before == first.tokens_before  # seeded
    assert fastem.transcribe(model, audio, **kw) == first.text
    # a loop is not confidence: adapted even where the gate would skip everything else
    gated = fastem.adapt(model, audio, steps=1, num_samples=2, min_entropy=1e6, **kw)
    assert gated.skipped is None and len(gated.history) == 1
    assert not guards.looping(gated.text_adapted, gated.tokens_adapted)
    calm = fastem.adapt(tiny_whisper(), audio, steps=1, num_samples=2, min_entropy=1e6, **kw)
    assert calm.skipped == "confident" and calm.history == []


def test_unknown_guard_is_named():
    with pytest.raises(ValueError, match="unknown guard"):
        guards.check(evidence(), names=("nonsense",))
    with pytest.raises(ValueError, match="unknown guards"):
        fastem.AdaptConfig(guards=("nonsense",))


def test_a_guard_that_fires_in_the_loop_returns_the_unadapted_transcript(processor, monkeypatch):
    """Force the adapted transcript into a repetition loop: the result keeps the unadapted one."""
    model = tiny_whisper()
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    real = adapt_module._texts
    calls = {"n": 0}

    def looping(processor_, prompts, hyps):
        calls["n"] += 1
        out = real(processor_, prompts, hyps)
        if calls["n"] == 2:  # the transcript after adaptation
            return [("la la la la la la la la la la", [100] * 10) for _ in out]
        return out

    monkeypatch.setattr(adapt_module, "_texts", looping)
    monkeypatch.setattr(adapt_module, "FALLBACK_TEMPERATURES", ())  # the guard is what is left when sampling fails
    result = fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6)
    assert result.guard == "repetition" and "repeats" in result.guard_reason
    assert result.text == result.text_before and result.tokens == result.tokens_before
    assert result.text_adapted.startswith("la la")
    off = fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6,
                       guards=())
    assert off.guard is None


def test_confidence_scores_are_the_source_models_log_probs(processor):
    """scores['source_before'] is the mean log-prob of the unadapted greedy transcript (EOS included) under
    the source model: recompute it by hand from teacher-forced logits of the plain HF model."""
    model = tiny_whisper()
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    result = fastem.adapt(model, audio, processor=processor, language="en", steps=2, num_samples=2, lr=1e-2,
                          max_new_tokens=6)
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    for key, toks in (("source_before", result.tokens_before), ("source_after", result.tokens_adapted)):
        assert result.scores[key] == pytest.approx(teacher_forced_mean_logp(model, feats, toks), abs=1e-4)


def test_consensus_fires_when_both_models_together_prefer_the_unadapted_transcript():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.4,
                  source_logp_after=-0.7, adapted_logp_before=-0.5, adapted_logp_after=-0.3)
    # the adapted model prefers its own by 0.2 nats per token, the source model its own by 0.3: rejected
    name, reason = guards.check(ev, ("consensus",))
    assert name == "consensus" and "by 0.20" in reason and "by 0.30" in reason
    ev.adapted_logp_before = -0.65  # now the adapted model's preference (0.35) outweighs the source's
    assert guards.check(ev, ("consensus",)) is None
    ev.consensus_margin = 0.1  # a stricter rule (guard_sweep's margins): 0.35 < 0.3 + 0.1, rejected again
    assert guards.check(ev, ("consensus",))[0] == "consensus"
    assert "consensus" in guards.DEFAULT_GUARDS
    # without the scores, or when nothing changed, it cannot fire
    assert guards.consensus(evidence(after="the cap", ta=[0, 9], source_logp_before=-0.1, source_logp_after=-9.0)) is None
    same = evidence(source_logp_before=-0.1, source_logp_after=-0.1, adapted_logp_before=-0.1, adapted_logp_after=-0.1)
    assert guards.consensus(same) is None


@pytest.mark.parametrize("params", ["layernorm", "layernorm:decoder"])
def test_adapted_scores_are_the_adapted_models_log_probs(processor, params):
    """scores['adapted_before' / 'adapted_after'] are the mean log-probs of the unadapted / adapted transcripts
    under the adapted model: kept in place (episodic=False), recomputed from the plain HF model's logits."""
    model = tiny_whisper()
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    result = fastem.adapt(model, audio, processor=processor, language="en", steps=2, num_samples=2, lr=1e-2,
                          max_new_tokens=6, episodic=False, params=params, guards=("consensus",))
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    for key, toks in (("adapted_before", result.tokens_before), ("adapted_after", result.tokens_adapted)):
        assert result.scores[key] == pytest.approx(teacher_forced_mean_logp(model, feats, toks), abs=1e-4)
    assert result.scores["source_before"] != pytest.approx(result.scores["adapted_before"], abs=1e-6)  # it moved
