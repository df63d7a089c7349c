"""The judge: each guard fires on the fault it names, only when adaptation introduced it; the gate; Whisper's
decoding rules as the gate sees them; and the judge in the pipeline."""
import dataclasses
import importlib
from types import SimpleNamespace

import pytest
import torch

import fastem
from fastem import decoding, judge
from fastem.text import normalize
from tiny_whisper import teacher_forced_mean_logp, tiny_whisper

adapt_module = importlib.import_module("fastem.adapt")
PLAIN = dict(compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None)


def evidence(before="the cat sat on the mat", after="the cat sat on the mat", tb=None, ta=None, **kw):
    tb = tb if tb is not None else list(range(len(before.split())))
    ta = ta if ta is not None else list(range(len(after.split())))
    return judge.Evidence(text_before=before, text_after=after, tokens_before=tb, tokens_after=ta, seconds=2.0, **kw)


def test_identical_transcripts_pass_every_guard():
    assert judge.check(evidence(source_logp_before=-0.3, source_logp_after=-0.3)) is None


def test_repetition_loop_fires_only_when_adaptation_made_it():
    loop = "the cat the cat the cat the cat the cat the cat"
    ev = evidence(after=loop, ta=[1, 2] * 6)
    assert judge.check(ev)[0] == "repetition"
    assert judge.longest_repeat([1, 2] * 6) == 6 and judge.longest_repeat([1, 2, 3]) == 1
    assert judge.compression_ratio("la " * 40) > 2.4
    # Already looping before adaptation: not the adaptation's doing.
    assert judge.repetition(evidence(before=loop, tb=[1, 2] * 6, after=loop, ta=[1, 2] * 6)) is None


def test_empty_output_fires():
    assert judge.check(evidence(after="", ta=[]))[0] == "empty"
    assert judge.empty(evidence(before="", tb=[], after="", ta=[])) is None


@pytest.mark.parametrize("text", ["[Music]", "(upbeat music)", "♪ ♪", "[BLANK_AUDIO]"])
def test_non_speech_annotations_fire(text):
    assert judge.check(evidence(after=text, ta=[5, 6]))[0] == "non_speech"


def test_appended_text_fires_on_length():
    after = "the cat sat on the mat and then it went for a long walk in the park"
    name, reason = judge.check(evidence(after=after))
    assert name == "length" and "17 tokens vs 6" in reason
    assert judge.length(evidence(after="the cat sat on a mat too")) is None  # small difference


def test_confidence_drop_fires_past_the_threshold():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.4,
                  source_logp_after=-1.2, max_logp_drop=0.5)
    name, reason = judge.check(ev)
    assert name == "confidence" and "drop 0.80" in reason
    ev.max_logp_drop = 1.0
    assert judge.check(ev) is None


def test_verifier_fires_past_its_threshold_and_abstains_without_scores():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], verifier_logp_before=-0.50,
                  verifier_logp_after=-0.75)
    name, reason = judge.check(ev, ("verifier",))
    assert name == "verifier" and "drop 0.25 > 0.1" in reason
    ev.max_verifier_drop = 0.3
    assert judge.verifier(ev) is None
    assert judge.verifier(evidence(after="the cap", ta=[0, 9])) is None  # no verifier (or it abstained)
    assert judge.verifier(evidence(verifier_logp_before=-0.1, verifier_logp_after=-5.0)) is None  # nothing changed
    assert "verifier" in judge.DEFAULT_GUARDS  # the second checkpoint is AdaptConfig.verifier ("auto" by default)
    assert fastem.AdaptConfig(verifier="base", draws=1).active_guards[-1] == "verifier"


def test_confidence_at_zero_accepts_only_what_the_source_model_also_prefers():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.40,
                  source_logp_after=-0.41, max_logp_drop=0.0)
    assert judge.confidence(ev) is not None  # any drop at all
    ev.source_logp_after = -0.39  # the source model prefers the adapted transcript: a search correction
    assert judge.confidence(ev) is None
    fastem.AdaptConfig(max_logp_drop=0.0)  # a valid setting


def test_likelihood_compares_whole_transcripts_not_per_token_means():
    """Dropping two low-probability tokens raises the mean per token and lowers the total: the per-token
    confidence guard passes it, the likelihood guard (sequence log-prob, end of text counted) does not."""
    ev = evidence(before="a b c d e", after="a b c", tb=[1, 2, 3, 4, 5], ta=[1, 2, 3], source_logp_before=-0.5,
                  source_logp_after=-0.6, max_logp_drop=0.0, max_seq_logp_drop=0.0)
    assert judge.sequence_logp(-0.5, [1, 2, 3, 4, 5]) == pytest.approx(-3.0)   # 6 terms: 5 tokens + end of text
    ev.source_logp_after = -0.45  # mean up: -1.8 in total against -3.0
    assert judge.confidence(ev) is None and judge.likelihood(ev) is None
    ev.source_logp_after = -0.80  # total -3.2 < -3.0, while the mean drop (0.3) would pass max_logp_drop=0.5
    name, reason = judge.check(ev, ("confidence", "likelihood")) or (None, None)
    assert name == "confidence"  # the per-token guard at 0 sees it too
    ev.max_logp_drop = 0.5
    name, reason = judge.check(ev, ("confidence", "likelihood"))
    assert name == "likelihood" and "drop 0.20 > 0" in reason
    ev.max_seq_logp_drop = 0.25
    assert judge.likelihood(ev) is None
    ev.max_seq_logp_drop = None  # off
    assert judge.likelihood(ev) is None
    same = evidence(source_logp_before=-0.1, source_logp_after=-5.0, max_seq_logp_drop=0.0)  # nothing changed
    assert judge.likelihood(same) is None


def test_guards_names_every_guard_that_runs(processor):
    """One switch: ``guards`` names every guard that runs, the likelihood guard and the verifier included;
    their settings are thresholds only, and asking for a guard without what it needs is an error."""
    assert fastem.AdaptConfig().guards == "auto" and fastem.AdaptConfig(draws=1).active_guards == judge.DEFAULT_GUARDS
    # two draws (the greedy default): the textual guards on each, the medoid in place of the scored and voted ones
    assert fastem.AdaptConfig().active_guards == judge.TEXTUAL_GUARDS == ("empty", "non_speech", "repetition", "length")
    assert fastem.AdaptConfig(draws=2, guards=("verifier",)).active_guards == ("verifier",)  # named: as named
    # with beams the second checkpoint's own transcript (agreement) replaces its log-prob vote (DEV, RESULTS.md)
    assert fastem.AdaptConfig(num_beams=5, draws=1).active_guards == judge.BEAM_GUARDS  # one draw
    assert fastem.AdaptConfig(num_beams=5).active_guards == judge.TEXTUAL_GUARDS  # two draws: the medoid, as greedy
    assert set(judge.BEAM_GUARDS) == set(judge.DEFAULT_GUARDS) - {"verifier"} | {"agreement"}
    assert fastem.AdaptConfig(num_beams=5, guards=("verifier",)).active_guards == ("verifier",)  # named: as named
    # no verifier: "auto" is the guards that need none (a call that resolves draws to 1 must not fail for it)
    assert fastem.AdaptConfig(num_beams=5, draws=1, verifier=None).active_guards == tuple(
        g for g in judge.BEAM_GUARDS if g != "agreement")
    assert "verifier" in judge.DEFAULT_GUARDS and "likelihood" not in judge.DEFAULT_GUARDS  # DEV: off, RESULTS.md
    assert set(judge.DEFAULT_GUARDS) == set(judge.GUARDS) - {"likelihood", "agreement"}  # both opt in
    assert fastem.AdaptConfig(guards=()).guards == ()
    assert fastem.AdaptConfig(guards=("likelihood",), verifier=None).guards == ("likelihood",)
    assert fastem.AdaptConfig(verifier=None, draws=1).active_guards == tuple(
        g for g in judge.DEFAULT_GUARDS if g != "verifier")
    assert dataclasses.replace(fastem.AdaptConfig(verifier=None), draws=1).active_guards == tuple(
        g for g in judge.DEFAULT_GUARDS if g != "verifier")  # what the pipeline does for an Adapter or an LM
    with pytest.raises(ValueError, match="leave 'verifier' out of guards"):
        fastem.AdaptConfig(verifier=None, draws=1, guards=("empty", "verifier"))  # named: an error
    assert fastem.AdaptConfig(verifier=None).active_guards == judge.TEXTUAL_GUARDS  # two draws need no verifier
    with pytest.raises(ValueError, match="leave 'agreement' out of guards"):
        fastem.AdaptConfig(guards=("agreement",), verifier=None)
    with pytest.raises(ValueError, match="leave 'likelihood' out of guards"):
        fastem.AdaptConfig(max_seq_logp_drop=None)
    # the empty guard, alone, runs alone: nothing else is scored or loaded
    res = fastem.adapt(tiny_whisper(), torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1,
                       processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6, min_entropy=0.0,
                       guards=("empty",))
    assert list(res.verdicts) == ["empty", "medoid"]  # two draws (the default): the medoid's verdict beside it
    assert "source_before" not in res.scores and "verifier" not in res.scores
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="max_seq_logp_drop"):
            fastem.AdaptConfig(max_seq_logp_drop=bad)


def test_likelihood_decides_on_the_loops_own_scores(processor):
    """In the loop the guard sees the source model's scores of both transcripts: its verdict is what the
    totals computed from ``result.scores`` say, and a rejection returns the unadapted transcript."""
    model = tiny_whisper(seed=5)  # here the source model finds the adapted transcript ~0.04 nats less likely
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=5e-2, max_new_tokens=6, min_entropy=0.0)
    kw.update(guards=("likelihood",), verifier=None, num_beams=1)
    free = fastem.adapt(model, audio, max_seq_logp_drop=1e9, **kw)  # scored, never fires
    assert free.tokens_adapted != free.tokens_before  # the setting changes the transcript: the test can fail
    before = judge.sequence_logp(free.scores["source_before"], free.tokens_before)
    after = judge.sequence_logp(free.scores["source_after"], free.tokens_adapted)
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
    assert judge.looping(ev.text_before, ev.tokens_before)
    assert judge.length(ev) is None
    ev.text_before, ev.tokens_before = "I have one knee and two feet and ten fingers and toes", list(range(22))
    assert judge.length(ev) is not None  # far shorter than a sane transcript: still fires


def test_a_looping_greedy_transcript_falls_back_to_sampling(processor):
    """Whisper's temperature fallback: the random model with no pull towards end of text loops greedily
    (its text compresses more than 2.4); the transcript returned is a sample that does not loop,
    reproducibly, and the gate does not skip it."""
    model = tiny_whisper(eos_strength=0.0)
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    kw = dict(processor=processor, language="en", max_new_tokens=60, logprob_threshold=None)
    greedy = fastem.adapt(model, audio, steps=0, **{**kw, "compression_ratio_threshold": None})
    assert judge.compression_ratio(greedy.text_before) > 2.4 and "fallback_before" not in greedy.scores
    first = fastem.adapt(model, audio, steps=0, **kw)
    assert first.scores["fallback_before"] in decoding.TEMPERATURES
    assert judge.compression_ratio(first.text_before) <= 2.4 and first.text == first.text_before
    assert fastem.adapt(model, audio, steps=0, **kw).tokens_before == first.tokens_before  # seeded
    assert fastem.transcribe(model, audio, **kw) == first.text
    # a loop is not confidence: adapted even where the gate would skip everything else
    gated = fastem.adapt(model, audio, steps=1, num_samples=2, min_entropy=1e6, num_beams=1, **kw)
    assert gated.skipped is None and len(gated.history) == 1
    calm = fastem.adapt(tiny_whisper(), audio, steps=1, num_samples=2, min_entropy=1e6, processor=processor,
                        language="en", max_new_tokens=12, **PLAIN)
    assert calm.skipped == "confident" and calm.history == []


def test_whisper_rules_leave_a_confident_repetition_alone():
    """A legitimate repetition said with confidence needs no fallback (the old n-gram test fired on it); a
    long loop, an unlikely transcript and an unlikely no-speech window do; each rule switches off."""
    rules = decoding.DecodeRules()
    yes = decoding.Transcript("Yes, yes, yes, yes.", [100, 11, 100, 11, 100, 11, 100, 13], avg_logprob=-0.3)
    assert judge.looping(yes.text, [100] * 4) and not rules.needs_fallback(yes)
    count = decoding.Transcript("one two three four five six seven eight nine ten", list(range(10)), avg_logprob=-0.2)
    assert not rules.needs_fallback(count)
    loop = decoding.Transcript("la " * 40, [100] * 40, avg_logprob=-0.1)
    assert rules.needs_fallback(loop) and not decoding.DecodeRules(compression_ratio=None).needs_fallback(loop)
    unsure = decoding.Transcript("the cap sat", [1, 2, 3], avg_logprob=-1.4, no_speech_prob=0.2)
    assert rules.needs_fallback(unsure) and not rules.is_silence(unsure)
    quiet = decoding.Transcript("thank you", [1, 2], avg_logprob=-1.4, no_speech_prob=0.9)
    assert rules.is_silence(quiet) and not decoding.DecodeRules(no_speech=None).is_silence(quiet)
    sure = decoding.Transcript("thank you", [1, 2], avg_logprob=-0.4, no_speech_prob=0.9)
    assert not rules.is_silence(sure)  # confident words are not silence, whatever the no-speech probability
    # as openai-whisper decides: with the log-prob test off the no-speech probability alone; at the threshold, silence
    assert decoding.DecodeRules(logprob=None).is_silence(sure)
    assert rules.is_silence(decoding.Transcript("thank you", [1, 2], avg_logprob=-1.0, no_speech_prob=0.9))


def test_unknown_guard_is_named():
    with pytest.raises(ValueError, match="unknown guard"):
        judge.check(evidence(), names=("nonsense",))
    with pytest.raises(ValueError, match="unknown guards"):
        fastem.AdaptConfig(guards=("nonsense",))


def test_a_guard_that_fires_in_the_loop_returns_the_unadapted_transcript(processor, monkeypatch):
    """Force the adapted transcript into a repetition loop: the result keeps the unadapted one."""
    model = tiny_whisper()
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    real = adapt_module.transcripts

    def looping(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("over") is not None:  # the transcripts after adaptation (given the adapted copies)
            return [decoding.Transcript("la la la la la la la la la la", [100] * 10, -0.1) for _ in out]
        return out

    monkeypatch.setattr(adapt_module, "transcripts", looping)
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
                          max_new_tokens=6, draws=1)
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    for key, toks in (("source_before", result.tokens_before), ("source_after", result.tokens_adapted)):
        assert result.scores[key] == pytest.approx(teacher_forced_mean_logp(model, feats, toks), abs=1e-4)


def test_consensus_fires_when_both_models_together_prefer_the_unadapted_transcript():
    ev = evidence(after="the cap sat on the map", ta=[0, 9, 2, 3, 4, 8], source_logp_before=-0.4,
                  source_logp_after=-0.7, adapted_logp_before=-0.5, adapted_logp_after=-0.3)
    # the adapted model prefers its own by 0.2 nats per token, the source model its own by 0.3: rejected
    name, reason = judge.check(ev, ("consensus",))
    assert name == "consensus" and "by 0.20" in reason and "by 0.30" in reason
    ev.adapted_logp_before = -0.65  # now the adapted model's preference (0.35) outweighs the source's
    assert judge.check(ev, ("consensus",)) is None
    ev.consensus_margin = 0.1  # a stricter rule (guard_sweep's margins): 0.35 < 0.3 + 0.1, rejected again
    assert judge.check(ev, ("consensus",))[0] == "consensus"
    assert "consensus" in judge.DEFAULT_GUARDS
    # without the scores, or when nothing changed, it cannot fire
    assert judge.consensus(evidence(after="the cap", ta=[0, 9], source_logp_before=-0.1, source_logp_after=-9.0)) is None
    same = evidence(source_logp_before=-0.1, source_logp_after=-0.1, adapted_logp_before=-0.1, adapted_logp_after=-0.1)
    assert judge.consensus(same) is None


@pytest.mark.parametrize("params", ["layernorm", "layernorm:decoder"])
def test_adapted_scores_are_the_adapted_models_log_probs(processor, params):
    """scores['adapted_before' / 'adapted_after'] are the mean log-probs of the unadapted / adapted transcripts
    under the adapted model: written into the model by a continual adapter, recomputed from the plain HF model's logits."""
    model = tiny_whisper()
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    with fastem.Adapter(model, processor, steps=2, num_samples=2, lr=1e-2, max_new_tokens=6, params=params,
                        guards=("consensus",), min_entropy=0.0, rollback=False) as adapter:  # kept whatever the verdict
        result = adapter.adapt(audio, language="en")
        adapter._state.binding.commit(0)  # the adapted LayerNorms into the model, until the adapter closes
        feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
        for key, toks in (("adapted_before", result.tokens_before), ("adapted_after", result.tokens_adapted)):
            assert result.scores[key] == pytest.approx(teacher_forced_mean_logp(model, feats, toks), abs=1e-4)
    assert result.scores["source_before"] != pytest.approx(result.scores["adapted_before"], abs=1e-6)  # it moved


def test_likelihood_guard_abstains_with_beam_search_unless_asked():
    """``max_seq_logp_drop="auto"``: 2 nats with greedy decoding; with beam search the unadapted transcript is
    the source model's own search for its most likely transcript, so the guard abstains unless a threshold
    is given.  The same evidence fires the guard in the other two cases: the test can fail."""
    before = SimpleNamespace(text="a b", ids=[1, 2])
    after = SimpleNamespace(text="a c", ids=[1, 3])
    scores = dict(source_before=-0.1, source_after=-5.0)  # 14.7 nats less likely as a whole
    greedy = judge.evidence(fastem.AdaptConfig(num_beams=1), before, after, 1.0, scores)
    assert greedy.max_seq_logp_drop == 2.0 and judge.likelihood(greedy) is not None
    beams = judge.evidence(fastem.AdaptConfig(num_beams=5), before, after, 1.0, scores)
    assert beams.max_seq_logp_drop is None and judge.likelihood(beams) is None
    asked = judge.evidence(fastem.AdaptConfig(num_beams=5, max_seq_logp_drop=2.0), before, after, 1.0, scores)
    assert judge.likelihood(asked) is not None
    assert fastem.AdaptConfig(max_seq_logp_drop="auto", num_beams=1).seq_logp_limit == 2.0
    assert fastem.AdaptConfig().seq_logp_limit is None  # the default decodes with beams
    for bad in ("bogus", True, None):
        with pytest.raises(ValueError, match="max_seq_logp_drop"):
            fastem.AdaptConfig(max_seq_logp_drop=bad)


def test_agreement_sides_with_the_transcript_the_verifier_hears():
    """The adapted transcript is rejected exactly when the verifier's own transcript is further from it than from
    the unadapted one, in normalized words (case and punctuation do not count); ties pass; no verifier transcript,
    or one without words, abstains; identical transcripts pass."""
    def heard(before, after, verifier_text, **kw):  # token ids that differ exactly when the texts do
        ids = {w: i for i, w in enumerate(sorted(set(before.split()) | set(after.split())))}
        return evidence(before, after, tb=[ids[w] for w in before.split()], ta=[ids[w] for w in after.split()],
                        verifier_text=verifier_text, **kw)

    before, after = "the cat sat on the mat", "the cap sat on a mat"
    assert judge.agreement(heard(before, after, "The cat sat on the mat.")) is not None
    assert "2 words from the adapted transcript, 0 from the unadapted" in judge.agreement(
        heard(before, after, "THE CAT, sat on the mat"))
    assert judge.agreement(heard(before, after, "the cap sat on a mat")) is None  # it hears the adapted
    assert judge.agreement(heard(before, after, "the cap sat on the mat")) is None  # a tie passes
    for silent in (None, "", " ... "):
        assert judge.agreement(heard(before, after, silent)) is None
    assert judge.agreement(heard(before, before, "something else entirely")) is None
    # Words are normalized in the call's language (Czech: the basic normalizer, accents kept).
    assert judge.agreement(heard("řekl že ano", "řekl že ne", "Řekl, že ano!", language="cs")) is not None
    assert "agreement" in judge.GUARDS and "agreement" not in judge.DEFAULT_GUARDS


def test_medoid_is_the_transcript_nearest_the_others_ties_to_the_first():
    assert judge.medoid(["the cat sat", "the cat sat down", "the cat sat down"]) == 1
    assert judge.medoid(["the cat sat", "the dog sat", "the cat ran"]) == 0  # each change made by one draw alone
    assert judge.medoid(["The cat, sat.", "the cat sat", "a cat sat"]) == 0  # Whisper's normalizer: the first two agree
    assert judge.medoid(["a", "b"]) == 0  # a tie goes to the earliest
    assert judge.medoid(["x y z", "x y", "x y", "x"]) == 1
    assert judge.medoid(["dobrý den", "dobrý den", "dobry den"], "cs") == 0


def _transcript(text):
    return SimpleNamespace(text=text, ids=[sum(map(ord, w)) for w in text.split()])


def test_choose_returns_a_change_only_when_the_draws_agree_on_it():
    before, change, other = _transcript("the cat sat on the mat"), _transcript("the cat sat on a mat"), \
        _transcript("the bat sat on the mat")
    ok, fired = ({"empty": None}, None), ({"length": "too long"}, ("length", "too long"))
    assert judge.choose(before, [change], [ok]) == (1, ok)  # one draw: its transcript unless a guard fired
    assert judge.choose(before, [change], [fired]) == (0, fired)
    pick, (found, why) = judge.choose(before, [change, change], [ok, ok])
    assert pick == 1 and why is None and found == {"empty": None, "medoid": None}
    pick, (found, why) = judge.choose(before, [change, other], [ok, ok])  # each draw changes another word
    assert pick == 0 and why[0] == "medoid" and "2 of 2 draws" in why[1] and found["medoid"] == why[1]
    pick, (_, why) = judge.choose(before, [change, change], [fired, ok])  # a rejected draw stands as the unadapted
    assert pick == 0 and why[0] == "medoid" and "1 of 2 draws" in why[1]
    assert judge.choose(before, [change, other], [fired, fired])[1][1] == ("length", "too long")
    assert judge.choose(before, [before, before], [ok, ok]) == (0, ({"empty": None, "medoid": None}, None))
    # three draws: two agreeing against the third tie with the unadapted transcript (3 words each), which a tie keeps
    assert judge.choose(before, [change, other, change], [ok, ok, ok])[0] == 0
    assert judge.choose(before, [other, change, change], [ok, ok, ok])[0] == 0
    assert judge.choose(before, [other, change, change, change], [ok, ok, ok, ok])[0] == 2


def test_a_vote_joins_the_medoid_before_the_unadapted_transcript():
    """With beam search the source model's greedy transcript is a candidate too (``votes``, first): it can carry a
    draw's change that the unadapted transcript alone would outvote; a vote saying what a draw says returns that
    draw; a vote saying what no other says, chosen, is returned as pick -1 with the medoid as what fired."""
    before, change, other = _transcript("the cat sat on the mat"), _transcript("the cat sat on a mat"), \
        _transcript("the bat sat on the rug")
    ok = ({"empty": None}, None)
    assert judge.choose(before, [change, other], [ok, ok])[0] == 0  # without the vote: the unadapted transcript
    pick, (found, why) = judge.choose(before, [change, other], [ok, ok], votes=[_transcript("the cat sat on a mat")])
    assert pick == 1 and why is None and found["medoid"] is None  # greedy decoding agrees with draw 1: it is kept
    b, d1, d2, g = (_transcript(t) for t in ("a b c d", "a x c d", "a b y d", "a x y d"))  # every one ties at 4
    pick, (found, why) = judge.choose(b, [d1, d2], [ok, ok], votes=[g])
    assert pick == -1 and why == ("medoid", "the medoid is the source model's greedy transcript") == ("medoid", found["medoid"])
    assert judge.choose(b, [d1, d2], [ok, ok], votes=[_transcript("a b c d")])[0] == 0  # a vote for no change


def _returned(before, drafts, judged, votes):
    """The text a call returns given :func:`fastem.judge.choose`'s pick (as ``fastem.adapt`` keeps it)."""
    pick, (_, fired) = judge.choose(before, drafts, judged, votes=votes)
    return votes[pick].text if pick < 0 else before.text if fired or pick == 0 else drafts[pick - 1].text


def test_foregone_is_what_choose_returns_whatever_the_draws():
    """When the greedy vote and the unadapted beam transcript say the same words, no two draws (any words, any guard
    verdicts) change what ``choose`` returns: the vote's text.  Random word strings over a small vocabulary, so the
    draws often agree with each other, with the unadapted transcripts, or sit between them; and the bound is
    tight: three agreeing draws outvote two unadapted transcripts."""
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "bat"]
    ok, fired = ({}, None), ({"length": "x"}, ("length", "x"))

    def text(n=None):
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, 5) if n is None else n))

    decided = 0
    for _ in range(600):
        g = text()
        beam = rng.choice([g, g.upper() + ".", g + ",", text()])  # the same words (other casing, punctuation) or not
        vote, before = _transcript(g), _transcript(beam)
        pick = judge.foregone(before, [vote], draws=2)
        drafts = [_transcript(rng.choice([text(), g, beam, text(len(g.split()))])) for _ in range(2)]
        verdicts = [rng.choice([ok, ok, fired]) for _ in drafts]
        same_words = normalize(g).split() == normalize(beam).split()
        assert (pick is not None) == same_words
        if pick is not None:
            decided += 1
            assert pick == (0 if beam == g else -1)
            assert _returned(before, drafts, verdicts, [vote]) == g
    assert 100 < decided < 600
    assert judge.foregone(_transcript("a b"), [], draws=2) is None  # no vote: two agreeing draws outvote before
    assert judge.foregone(_transcript("a b"), [_transcript("a b")], draws=3) is None
    three = [_transcript("x y")] * 3
    assert _returned(_transcript("a b"), three, [ok] * 3, [_transcript("a b")]) == "x y"  # why three draws are not
