"""fastem.verifier: a second checkpoint's teacher-forced scores, recomputed by hand; its guard in the loop."""
import copy
import importlib

import pytest
import torch

import fastem
from fastem import verifier as verifier_module
from fastem.decoding import Transcript
from tiny_whisper import NO_TS, SOT, TRANSLATE, teacher_forced_mean_logp, tiny_whisper

adapt_module = importlib.import_module("fastem.adapt")


def _feats(processor, audio):
    return processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features


def _english_only(model):
    """The same network as an English-only checkpoint: no language or task tokens in its prompt."""
    model = copy.deepcopy(model)
    gc = model.generation_config
    gc.lang_to_id, gc.task_to_id, gc.is_multilingual = None, None, False
    return model


def test_scores_are_the_verifiers_teacher_forced_log_probs(processor):
    model = tiny_whisper(seed=3)
    g = torch.Generator().manual_seed(2)
    waves = [torch.randn(24000, generator=g) * 0.1, torch.randn(40000, generator=g) * 0.1]
    texts = [["the cat sat", "the cap sat on it"], ["hello", ""]]
    tok = processor.tokenizer
    for task, task_id in (("transcribe", 50359), ("translate", TRANSLATE)):  # the call's task reaches the prompt
        out = verifier_module.verifier_scores(model, processor, waves, texts, ["en", "cs"], task=task)
        for b, lang in ((0, 50259), (1, 50283)):
            feats = _feats(processor, waves[b])
            for key, text in zip(("verifier_before", "verifier_after"), texts[b]):
                ids = tok.encode(" " + text, add_special_tokens=False) if text else []
                prompt = (SOT, lang, task_id, NO_TS)
                assert out[b][key] == pytest.approx(teacher_forced_mean_logp(model, feats, ids, prompt=prompt), abs=1e-4)
    # An English-only verifier scores English after its short prompt, and abstains on Czech and on a translation.
    en_only = _english_only(model)
    out = verifier_module.verifier_scores(en_only, processor, waves, texts, ["en", "cs"])
    assert "English-only" in out[1]["verifier_abstained"]
    ids = tok.encode(" the cat sat", add_special_tokens=False)
    assert out[0]["verifier_before"] == pytest.approx(
        teacher_forced_mean_logp(en_only, _feats(processor, waves[0]), ids, prompt=(SOT, NO_TS)), abs=1e-4)
    assert "task" in verifier_module.verifier_scores(en_only, processor, waves[:1], texts[:1], ["en"],
                                                     task="translate")[0]["verifier_abstained"]
    unknown = verifier_module.verifier_scores(model, processor, waves, texts, [None, "yue"])
    assert unknown[0] == {"verifier_abstained": "language unknown"}
    assert "does not know language 'yue'" in unknown[1]["verifier_abstained"]  # abstains instead of raising


def test_the_verifier_votes_in_the_loop(processor, monkeypatch):
    """A changed transcript is scored by the verifier (scores recomputed by hand) and rejected exactly when the
    verifier finds it more than max_verifier_drop nats per token less likely; the verifier is loaded by name."""
    model, judge = tiny_whisper(), tiny_whisper(seed=5)
    loaded = []
    monkeypatch.setattr(verifier_module, "load_verifier", lambda name, device: loaded.append(name) or (judge, processor))
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    _force_change(monkeypatch)
    kw = dict(processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6, min_entropy=0.0,
              guards=("verifier",), verifier="judge-checkpoint", draws=1)
    loose = fastem.adapt(model, audio, max_verifier_drop=100.0, **kw)
    assert loaded == ["judge-checkpoint"] and loose.guard is None and loose.text == "hello world"
    assert loose.scores["verifier"] == "judge-checkpoint" and loose.verdicts == {"verifier": None}
    feats = _feats(processor, audio)
    tok = processor.tokenizer
    for key, text in (("verifier_before", loose.text_before), ("verifier_after", loose.text_adapted)):
        ids = tok.encode(" " + text, add_special_tokens=False) if text else []
        assert loose.scores[key] == pytest.approx(teacher_forced_mean_logp(judge, feats, ids), abs=1e-4)
    drop = loose.scores["verifier_before"] - loose.scores["verifier_after"]
    strict = fastem.adapt(model, audio, max_verifier_drop=0.0, **kw)
    assert (strict.guard == "verifier") == (drop > 0)
    assert strict.text == (loose.text_before if drop > 0 else "hello world")
    plain = fastem.adapt(model, audio, **{**kw, "verifier": None, "guards": ()})
    assert "verifier_before" not in plain.scores and plain.guard is None


def _force_change(monkeypatch, text="hello world", ids=(23748, 1002)):
    """Make every adapted transcript differ from the unadapted one (the decodes given the adapted copies, ``over``)."""
    real = adapt_module.transcripts

    def changed(*args, **kwargs):
        out = real(*args, **kwargs)
        return [Transcript(text, list(ids), -0.5)] * len(out) if kwargs.get("over") is not None else out

    monkeypatch.setattr(adapt_module, "transcripts", changed)


def test_the_verifier_is_loaded_only_when_a_transcript_changed(processor, monkeypatch):
    """Loaded lazily: a call whose transcripts stay the same (or that adapts nothing) never loads it; the
    call's task reaches it; clear() releases what was loaded."""
    model = tiny_whisper()
    loaded, tasks = [], []
    monkeypatch.setattr(verifier_module, "load_verifier", lambda name, device: loaded.append(name) or (model, processor))
    real_scores = verifier_module.verifier_scores
    monkeypatch.setattr(verifier_module, "verifier_scores",
                        lambda *a, task="transcribe": tasks.append(task) or real_scores(*a, task=task))
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    kw = dict(processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6, min_entropy=0.0,
              guards=("verifier",), verifier="judge-checkpoint")
    same = fastem.adapt(model, audio, lr=1e-9, **kw)  # a step too small to change the transcript
    assert same.tokens_adapted == same.tokens_before and loaded == [] and "verifier" not in same.scores
    gated = fastem.adapt(model, audio, **{**kw, "min_entropy": 1e9, "logprob_threshold": None})
    assert gated.skipped == "confident" and loaded == []
    _force_change(monkeypatch)
    fastem.adapt(model, audio, task="translate", **kw)
    assert loaded == ["judge-checkpoint"] and tasks == ["translate"]
    verifier_module._LOADED[("x", "cpu")] = (model, processor)
    verifier_module.clear()
    assert verifier_module._LOADED == {}


def test_a_bad_verifier_fails_without_changing_the_model(processor, tmp_path, monkeypatch):
    model = tiny_whisper()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audio = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    _force_change(monkeypatch)
    for params in ("layernorm", "all"):
        with pytest.raises(Exception):
            fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=4,
                         min_entropy=0.0, params=params, verifier=str(tmp_path / "no-such-checkpoint"), draws=1)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", [dict(max_verifier_drop=-0.1), dict(max_verifier_drop=float("nan")),
                                 dict(verifier=""), dict(verifier=3)])
def test_bad_verifier_settings_are_named(bad):
    with pytest.raises(ValueError, match="verifier"):
        fastem.AdaptConfig(**bad)



def _checkpoint(d_model, layers, vocab, origin="some/checkpoint"):
    """Only what the resolution reads: the architecture and where the model came from."""
    from types import SimpleNamespace

    config = SimpleNamespace(d_model=d_model, encoder_layers=layers, decoder_layers=layers, vocab_size=vocab,
                             _name_or_path=origin)
    return SimpleNamespace(config=config)


def test_auto_picks_a_bundled_checkpoint_other_than_the_model(monkeypatch):
    monkeypatch.setattr("fastem.models.is_installed", lambda name: True)
    resolve = verifier_module.resolve_verifier
    assert resolve("auto", _checkpoint(512, 6, 51865)) == "tiny.en"     # base (or a fine-tune of it)
    assert resolve("auto", _checkpoint(384, 4, 51864)) == "base"        # tiny.en
    assert resolve("auto", _checkpoint(768, 12, 51865)) == "base"       # small, from the hub
    loaded = _checkpoint(512, 6, 51865, origin="")
    loaded.fastem_load_info = fastem.models.LoadInfo("base", "cache", "/somewhere", 0.1)
    assert resolve("auto", loaded) == "tiny.en"                         # load_whisper's own record
    assert resolve("auto", _checkpoint(512, 6, 51865, origin="")) is None  # built in memory: nothing to compare
    assert resolve("auto", tiny_whisper()) is None
    assert resolve("tiny.en", tiny_whisper()) == "tiny.en" and resolve(None, _checkpoint(512, 6, 51865)) is None


def test_auto_without_the_bundled_weights_warns_and_verifies_nothing(monkeypatch):
    monkeypatch.setattr("fastem.models.is_installed", lambda name: False)
    monkeypatch.setattr(verifier_module, "_WARNED", set())
    with pytest.warns(UserWarning, match="not installed"):
        assert verifier_module.resolve_verifier("auto", _checkpoint(384, 4, 51864)) is None


def test_the_default_loads_the_auto_verifier_in_the_loop(processor, monkeypatch):
    """With the default settings a model loaded from a checkpoint is verified by the checkpoint "auto" names."""
    model, judge = tiny_whisper(), tiny_whisper(seed=5)
    model.config._name_or_path = "someone/whisper-finetune"  # d_model 32: not base's shape, so "base" verifies
    monkeypatch.setattr("fastem.models.is_installed", lambda name: True)
    loaded = []
    monkeypatch.setattr(verifier_module, "load_verifier", lambda name, device: loaded.append(name) or (judge, processor))
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1
    _force_change(monkeypatch)
    fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6,
                 min_entropy=0.0, num_beams=1)
    assert loaded == []  # two draws (the default): their medoid, no verifier
    fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6,
                 min_entropy=0.0, draws=1)
    assert loaded == ["base"]
    fastem.adapt(model, audio, processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6,
                 min_entropy=0.0, guards=())
    assert loaded == ["base"]  # no guards: no verifier loaded


def test_the_verifier_transcribes_for_agreement(processor, monkeypatch):
    """With rules, the verifier also transcribes the audio (``verifier_text``), exactly as ``fastem.transcribe``
    with that checkpoint does; in the loop the ``agreement`` guard gets it and decides by it, and a call that only
    runs ``verifier`` does not transcribe."""
    model, judge_model = tiny_whisper(), tiny_whisper(seed=5)
    g = torch.Generator().manual_seed(4)
    waves = [torch.randn(24000, generator=g) * 0.1, torch.randn(40000, generator=g) * 0.1]
    cfg = fastem.AdaptConfig()
    budgets = adapt_module.WHISPER.budgets(cfg, adapt_module.WHISPER.seconds(waves))  # what transcribe gives each
    out = verifier_module.verifier_scores(judge_model, processor, waves, [["a", "b"], ["c", "d"]], ["en", "en"],
                                          rules=cfg.decode_rules, budgets=budgets)
    for b in range(2):
        assert out[b]["verifier_text"] == fastem.transcribe(judge_model, waves[b], processor=processor, language="en")
    assert "verifier_text" not in verifier_module.verifier_scores(judge_model, processor, waves[:1], [["a", "b"]], ["en"])[0]
    with pytest.raises(ValueError, match="token budget"):
        verifier_module.verifier_scores(judge_model, processor, waves, [["a", "b"], ["c", "d"]], ["en", "en"],
                                        rules=cfg.decode_rules)
    # in the loop the verifier transcribes within the call's own budget (max_new_tokens below)
    heard = fastem.transcribe(judge_model, waves[0], processor=processor, language="en", max_new_tokens=6)
    monkeypatch.setattr(verifier_module, "load_verifier", lambda name, device: (judge_model, processor))
    _force_change(monkeypatch)
    kw = dict(processor=processor, language="en", steps=1, num_samples=2, max_new_tokens=6, min_entropy=0.0,
              verifier="judge-checkpoint", num_beams=1)
    res = fastem.adapt(model, waves[0], guards=("agreement",), **kw)
    assert res.scores["verifier_text"] == heard
    from fastem.text import normalize, word_errors

    far = word_errors(heard, "hello world")[0] > word_errors(heard, res.text_before)[0] and normalize(heard).split()
    assert far and res.guard == "agreement" and res.text == res.text_before  # it hears the unadapted one better
    assert "verifier_text" not in fastem.adapt(model, waves[0], guards=("verifier",), **kw).scores
