"""fastem.Adapter: continual adaptation over a stream, rollback on a rejected call, safety reset."""
import importlib

import pytest
import torch

import fastem
from test_adapt import assert_same_state, full_state, speechlike
from tiny_whisper import tiny_whisper

adapt_module = importlib.import_module("fastem.loop")  # where the steps decode


@pytest.fixture
def model():
    return tiny_whisper()


KW = dict(language="en")
CFG = dict(steps=2, num_samples=2, lr=1e-2, max_new_tokens=6, guards=(), draws=1)  # an Adapter keeps one copy


@pytest.mark.parametrize("params", ["layernorm", "decoder"])
def test_state_carries_over_and_close_restores_the_model(model, processor, params):
    before = full_state(model)
    with fastem.Adapter(model, processor, params=params, **CFG) as adapter:
        first = adapter.adapt(speechlike(seed=0), **KW)
        second = adapter.adapt(speechlike(seed=0), **KW)
        # The second call starts from what the first learnt (its first step's loss is not the first
        # call's first loss), and is judged against the source model: its unadapted transcript is the
        # source model's, as in the first call (same audio).
        assert second.history[0]["loss"] != pytest.approx(first.history[0]["loss"], rel=1e-6)
        assert second.tokens_before == first.tokens_before
        assert adapter.calls == 2 and adapter.resets == 0
    assert_same_state(model, before)


def test_episodic_adapt_equals_an_adapter_after_reset(model, processor):
    """The same settings give the same call."""
    episodic = fastem.adapt(model, speechlike(seed=3), processor=processor, **KW, **CFG)
    with fastem.Adapter(model, processor, **CFG) as adapter:
        adapter.adapt(speechlike(seed=1), **KW)
        adapter.reset()
        again = adapter.adapt(speechlike(seed=3), **KW)
    assert again.tokens == episodic.tokens and again.tokens_before == episodic.tokens_before
    assert adapter.resets == 1


def test_auto_settings_resolve_as_in_an_episodic_call_unless_given(model, processor):
    """An Adapter's "auto" settings are the episodic call's (on two draws of both DEV streams a temperature and gate
    of its own did not leave fewer transcripts worse: RESULTS.md, "The continual Adapter, two draws per side"); a
    value given in the config or as a keyword is used as given, and the caller's config is not changed."""
    auto = fastem.AdaptConfig()
    with fastem.Adapter(model, processor) as adapter:
        got = adapter.config
        assert (got.sample_temperature, got.gate_entropy, got.step_count) == (auto.sample_temperature,
                                                                              auto.gate_entropy, auto.step_count)
    given = fastem.AdaptConfig(temperature=0.5)
    with fastem.Adapter(model, processor, given, min_entropy=2.0) as adapter:
        assert (adapter.config.sample_temperature, adapter.config.gate_entropy) == (0.5, 2.0)
    assert given.temperature == 0.5 and given.min_entropy == "auto"


def test_forced_collapse_fires_the_reset_and_the_output_recovers(model, processor):
    """A learning rate far too high wrecks the transcript; the guards reject it, the calls are rolled back
    and after two rejections in a row the adapter resets to the source model."""
    audio = speechlike(seed=2)
    source = fastem.transcribe(model, audio, processor=processor, language="en", max_new_tokens=6)
    with fastem.Adapter(model, processor, steps=3, num_samples=2, lr=50.0, max_new_tokens=6,
                        guards=("empty", "non_speech", "repetition", "length", "confidence"),
                        max_logp_drop=0.05, reset_after=2, temperature=1.0) as adapter:  # the scenario drawn at T = 1
        results = [adapter.adapt(audio, **KW) for _ in range(4)]
        assert any(r.guard is not None for r in results)
        assert adapter.rollbacks >= 1
        fired = [r for r in results if r.scores.get("reset")]
        assert adapter.resets >= 1 and fired
        # Every returned transcript is the source model's (rolled back before it could drift).
        assert all(r.text == source for r in results if r.guard is not None)
        assert all(torch.isfinite(t).all() for t in adapter._state.binding.tensors)


def test_a_failed_call_leaves_the_adapter_as_it_was(model, processor, monkeypatch):
    with fastem.Adapter(model, processor, **CFG) as adapter:
        adapter.adapt(speechlike(seed=0), **KW)
        values = [t.detach().clone() for t in adapter._state.binding.tensors]
        calls = {"n": 0}
        real = adapt_module.decode

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the second step, after the first has moved the values
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(adapt_module, "decode", flaky)
        with pytest.raises(KeyboardInterrupt):
            adapter.adapt(speechlike(seed=1), **KW)
        assert all(torch.equal(a, b) for a, b in zip(values, adapter._state.binding.tensors))


def test_closed_adapter_refuses_work(model, processor):
    adapter = fastem.Adapter(model, processor, **CFG)
    adapter.close()
    with pytest.raises(RuntimeError, match="closed"):
        adapter.adapt(speechlike(), **KW)


def test_silence_in_a_stream_is_skipped(model, processor):
    with fastem.Adapter(model, processor, **CFG) as adapter:
        r = adapter.adapt(torch.zeros(16000), **KW)
    assert r.skipped == "silence" and r.text == "" and adapter.calls == 0


@pytest.mark.parametrize("params", ["layernorm", "decoder"])
def test_state_dict_resumes_a_stream_in_a_new_adapter(model, processor, params, tmp_path):
    """A stream saved after two calls and loaded into a fresh adapter goes on exactly as one adapter would."""
    clips = [speechlike(seed=s) for s in (4, 5, 6)]
    before = full_state(model)
    with fastem.Adapter(model, processor, params=params, **CFG) as whole:
        straight = [whole.adapt(c, **KW) for c in clips]
    with fastem.Adapter(model, processor, params=params, **CFG) as first:
        for c in clips[:2]:
            first.adapt(c, **KW)
        torch.save(first.state_dict(), tmp_path / "state.pt")
    assert_same_state(model, before)
    with fastem.Adapter(model, processor, params=params, **CFG) as second:
        second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
        assert second.calls == 2
        resumed = second.adapt(clips[2], **KW)
    assert resumed.tokens_before == straight[2].tokens_before
    assert resumed.tokens == straight[2].tokens
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight[2].history], rel=1e-5)
    assert_same_state(model, before)


def test_load_state_dict_refuses_another_parameter_set_and_non_finite_values(model, processor):
    with fastem.Adapter(model, processor, params="layernorm:decoder", **CFG) as small:
        state = small.state_dict()
    with fastem.Adapter(model, processor, params="layernorm", **CFG) as adapter:
        with pytest.raises(ValueError, match="other adapted parameters"):
            adapter.load_state_dict(state)
        bad = adapter.state_dict()
        bad["values"][0][0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            adapter.load_state_dict(bad)


@pytest.mark.parametrize("params", ["layernorm", "decoder"])
def test_a_drifted_adapter_is_judged_against_the_source_model(model, processor, params):
    """After the adapter has learnt (here: far too much), each call's unadapted transcript and the
    guards' reference are the source model's, not the drifted model's; a transcript the drift broke is
    rejected and the source transcript returned."""
    clip = speechlike(seed=7)
    source = fastem.transcribe(model, clip, processor=processor, language="en", max_new_tokens=6)
    with fastem.Adapter(model, processor, params=params, steps=3, num_samples=2, lr=5.0, max_new_tokens=6,
                        guards=(), reset_after=99) as adapter:
        adapter.adapt(speechlike(seed=8), **KW)  # no guards: the wild update is kept
        drifted = adapter.adapt(clip, **KW).tokens_adapted
        assert adapter.resets == 0
        again = adapter.adapt(clip, **KW)
        assert processor.tokenizer.decode(again.tokens_before, skip_special_tokens=True).strip() == source
        assert again.text_before == source
    assert drifted != again.tokens_before, "the test needs an adapter whose own transcript differs from the source's"


def test_without_rollback_a_rejected_call_keeps_what_it_learnt_but_not_its_transcript(model, processor):
    """``rollback=False``: the guard still refuses the adapted transcript (the source's is returned),
    the adapted values stay; two rejections in a row still reset."""
    audio = speechlike(seed=2)
    source = fastem.transcribe(model, audio, processor=processor, language="en", max_new_tokens=6)
    cfg = dict(steps=3, num_samples=2, lr=50.0, max_new_tokens=6, max_logp_drop=0.05, min_entropy=0.0,
               guards=("empty", "non_speech", "repetition", "length", "confidence"),
               temperature=1.0)  # the collapse this random model is driven to at T = 1 is one the source finds unlikely
    with fastem.Adapter(model, processor, rollback=False, reset_after=2, **cfg) as adapter:
        start = adapter.state_dict()["values"]
        first = adapter.adapt(audio, **KW)
        assert first.guard is not None and first.text == source
        assert adapter.rollbacks == 0 and adapter.resets == 0
        kept = adapter.state_dict()["values"]
        assert any(not torch.equal(a, b) for a, b in zip(start, kept)), "the rejected call's update was not kept"
        second = adapter.adapt(audio, **KW)
        assert second.guard is not None and second.scores.get("reset") and adapter.resets == 1
        assert all(torch.equal(a, b) for a, b in zip(start, adapter.state_dict()["values"]))


@pytest.mark.parametrize("params", ["layernorm", "decoder"])
def test_anchor_pulls_what_was_learnt_back_toward_the_source(model, processor, params):
    """``anchor=a``: after a kept update every adapted value is the fraction ``a`` of the way back to the
    source model's value (the same call without the anchor says where the update went)."""
    audio = speechlike(seed=4)
    with fastem.Adapter(model, processor, params=params, **CFG) as free:
        source = free.state_dict()["values"]
        assert free.adapt(audio, **KW).history
        learnt = free.state_dict()["values"]
    with fastem.Adapter(model, processor, params=params, anchor=0.25, **CFG) as anchored:
        result = anchored.adapt(audio, **KW)
        pulled = anchored.state_dict()["values"]
    assert result.guard is None and result.history
    assert any(not torch.equal(a, b) for a, b in zip(source, learnt)), "the call learnt nothing: the test says nothing"
    for s, a, p in zip(source, learnt, pulled):
        torch.testing.assert_close(p, s + 0.75 * (a - s), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="anchor"):
        fastem.Adapter(model, processor, anchor=1.0)


def test_an_adapter_never_touches_a_model_another_call_holds(model, processor):
    """Making, resetting, saving, loading and closing an adapter wait for no one: while another call holds the
    model (its lock, as a thread inside ``fastem.adapt`` does) each is refused with the reason, and the model is
    left as that call has it."""
    from fastem.adapt import _Exclusive

    adapter = fastem.Adapter(model, processor, params="decoder", **CFG)
    adapter.adapt(speechlike(seed=0), **KW)  # the model now holds adapted values (an in-place set)
    state = adapter.state_dict()
    held = full_state(model)
    with _Exclusive(model):
        for call in (lambda: fastem.Adapter(model, processor, **CFG), adapter.reset, adapter.state_dict,
                     lambda: adapter.load_state_dict(state), adapter.close):
            with pytest.raises(RuntimeError, match="another thread"):
                call()
        assert_same_state(model, held)
    adapter.close()
    with pytest.raises(RuntimeError, match="closed"):
        adapter.reset()
