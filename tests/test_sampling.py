"""fastem.sampling: Whisper's prompt, K samples per utterance for B utterances, and their teacher-forced scores.

The references are independent of the code under test:

* ``hf_reference`` -- fastem's earlier decoding on transformers' own decoder and KV cache (commit
  300ef44): the same seed must give the same tokens and log-probs (1e-5).
* ``model.generate`` for greedy decoding and language detection.
* a float64 recomputation (HF's decoder in float64, suppression built from the token lists) for
  score's log-probs and entropies, with tolerances well below the effect of the suppression itself.
* lengths and live-row counts computed from the tokens, not taken from ``Hypotheses``.
"""
import copy

import pytest
import torch

import hf_reference as ref
from fastem import sampling, whisper
from tiny_whisper import EOS, LANGS, NO_TS, SOT, SUPPRESS, TRANSCRIBE, random_features, tiny_whisper

BEGIN_SUPPRESS = [220, EOS]
LOGP_TOL = 2e-5  # float32 vs float64 on this model: ~1e-6 measured


def features(n):
    """``n`` clearly different utterances ``[n, 80, 3000]``."""
    scales = [1.0, 3.0, 0.3, 2.0]
    return torch.cat([scales[i] * random_features(i) for i in range(n)])


def setup(model, feats, languages=None):
    cross = whisper.cross_kv(model, whisper.encode(model, feats))
    prompts = sampling.build_prompts(model, cross, languages or ["en"] * feats.shape[0])
    return cross, prompts


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def true_lengths(tokens, caps):
    """A row's length from its tokens alone: up to and including its first EOS, at most its cap."""
    out = []
    for row, cap in zip(tokens.tolist(), caps):
        n = row.index(EOS) + 1 if EOS in row else len(row)
        out.append(min(n, cap))
    return torch.tensor(out)


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_prompt_follows_whisper():
    model = tiny_whisper()
    feats = features(3)
    cross = whisper.cross_kv(model, whisper.encode(model, feats))
    given = sampling.build_prompts(model, cross, ["english", "<|de|>", "nl"])
    assert [p.ids for p in given] == [[SOT, LANGS[f"<|{c}|>"], TRANSCRIBE, NO_TS] for c in ("en", "de", "nl")]
    assert [p.language for p in given] == ["en", "de", "nl"]
    assert all(p.eos_id == EOS and p.suppress == SUPPRESS and p.begin_suppress == BEGIN_SUPPRESS for p in given)
    assert all(p.language_probability is None for p in given)
    # Detection per utterance is what generate() does: argmax over the language tokens at the first step.
    detected = sampling.build_prompts(model, cross, [None, "de", None])
    expected = model.detect_language(input_features=feats).view(-1).tolist()
    assert [detected[0].ids[1], detected[2].ids[1]] == [expected[0], expected[2]]
    assert detected[1].ids[1] == LANGS["<|de|>"] and detected[1].language_probability is None
    assert all(0 < detected[b].language_probability <= 1 for b in (0, 2))
    with pytest.raises(ValueError, match="language"):
        sampling.build_prompts(model, cross, ["klingon", "en", "en"])


# ------------------------------------------------------------------------------------------------
# decode == the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_seed, eos_strength", [(0, 3.0), (1, 3.0), (3, 3.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@torch.no_grad()
def test_sampling_equals_the_reference(model_seed, eos_strength, temperature):
    """Same seed, same tokens, with rows ending at different steps (the new path drops finished rows
    from the batch but must keep the generator stream as if they were there)."""
    model = tiny_whisper(seed=model_seed, eos_strength=eos_strength)
    feats = random_features(model_seed)
    cross, prompts = setup(model, feats)
    enc = ref.encode(model, feats)
    rprompt = ref.build_prompt(model, enc, "en")
    assert prompts[0].ids == rprompt.ids
    staggered = 0
    for seed in (0, 1, 2):
        ours = sampling.decode(model, cross, prompts, num_samples=4, temperature=temperature, max_new_tokens=16,
                               generators=gens([seed]))
        theirs = ref.decode(model, enc, rprompt, num_samples=4, temperature=temperature, max_new_tokens=16,
                            generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours.tokens, theirs.tokens), f"seed {seed}"
        assert torch.equal(ours.lengths, theirs.lengths)
        torch.testing.assert_close(ours.logp, theirs.logp, atol=1e-5, rtol=0)
        staggered += len(set(ours.lengths.tolist())) > 1 and int(ours.lengths.min()) < int(ours.lengths.max())
    assert staggered >= 1, "no case had rows ending at different steps: the test would not exercise row dropping"


@pytest.mark.parametrize("model_seed, eos_strength, expected_length", [(0, 0.2, 4), (2, 0.2, 3), (3, 0.2, 12),
                                                                        (1, 3.0, 2)])
@torch.no_grad()
def test_greedy_equals_the_reference_and_generate(model_seed, eos_strength, expected_length):
    model = tiny_whisper(seed=model_seed, eos_strength=eos_strength)
    feats = random_features(model_seed)
    cross, prompts = setup(model, feats)
    ours = sampling.decode(model, cross, prompts, greedy=True, max_new_tokens=12)
    assert int(ours.lengths[0]) == expected_length  # the cases cover EOS at several steps and the cap
    enc = ref.encode(model, feats)
    theirs = ref.decode(model, enc, ref.build_prompt(model, enc, "en"), greedy=True, max_new_tokens=12)
    assert torch.equal(ours.tokens, theirs.tokens)
    torch.testing.assert_close(ours.logp, theirs.logp, atol=1e-5, rtol=0)
    out = model.generate(feats, language="en", task="transcribe", max_new_tokens=12, do_sample=False)[0].tolist()
    # generate may or may not return the prompt: remove it as a prefix only, and the final EOS.
    prefix = prompts[0].ids
    if out[:len(prefix)] == prefix:
        out = out[len(prefix):]
    assert out[:1] != [SOT], f"generate returned part of the prompt: {out}"
    if out and out[-1] == EOS:
        out = out[:-1]
    assert ours.row(0, eos_id=EOS) == out


@torch.no_grad()
def test_samples_end_at_eos_respect_suppression_and_are_reproducible():
    model = tiny_whisper(seed=1, eos_strength=3.0)
    cross, prompts = setup(model, features(2))
    hyps = sampling.decode(model, cross, prompts, num_samples=6, max_new_tokens=12, generators=gens([1, 2]))
    again = sampling.decode(model, cross, prompts, num_samples=6, max_new_tokens=12, generators=gens([1, 2]))
    assert torch.equal(hyps.tokens, again.tokens) and torch.equal(hyps.logp, again.logp)
    assert hyps.groups == [6, 6] and hyps.tokens.shape[0] == 12
    assert len({tuple(hyps.row(i)) for i in range(12)}) > 6, "samples should differ"
    assert torch.equal(hyps.lengths, true_lengths(hyps.tokens, [12] * 12))
    for i in range(12):
        row = hyps.row(i)
        n = len(row)
        assert EOS not in row[:-1]
        assert row[-1] == EOS or n == 12
        assert (hyps.tokens[i, n:] == EOS).all() and (hyps.logp[i, n:] == 0).all()
        assert (hyps.logp[i, :n] < 0).all()
        assert not set(row) & set(SUPPRESS)
        assert row[0] not in BEGIN_SUPPRESS
    ended = [hyps.row(i)[-1] == EOS for i in range(12)]
    assert any(ended) and not all(ended)  # some at EOS, some at the cap
    with pytest.raises(ValueError, match="temperature"):
        sampling.decode(model, cross, prompts, temperature=0.0)


class RowCounter:
    """Rows fed to the decoder per call (a hook on the first self-attention query projection)."""

    def __init__(self, model):
        self.module = model.get_decoder().layers[0].self_attn.q_proj
        self.rows = []

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[0]))
        return self.rows

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def test_finished_rows_are_dropped_from_the_batch():
    model = tiny_whisper(seed=1, eos_strength=3.0)
    cross, prompts = setup(model, features(2))
    with RowCounter(model) as rows:
        hyps = sampling.decode(model, cross, prompts, num_samples=4, max_new_tokens=[16, 5], generators=gens([0, 1]))
    lengths = true_lengths(hyps.tokens, [16] * 4 + [5] * 4)
    # The prompt on every row, then after token t the rows that have not ended (length > t + 1).
    expected = [8] + [int((lengths > t + 1).sum()) for t in range(int(lengths.max()) - 1)]
    assert rows == expected
    assert len(set(expected)) > 2  # rows really ended at different steps


# ------------------------------------------------------------------------------------------------
# batches of utterances
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_samples, caps, eos_strength", [(4, [3, 16, 7], 3.0), (2, [1, 9], 3.0),
                                                             (1, [5, 2, 12], 0.2)])
@torch.no_grad()
def test_batched_decoding_equals_each_utterance_alone(num_samples, caps, eos_strength):
    """Each utterance has its own generator and cap: its tokens do not depend on the batch.  (caps
    [1, 9] with K=2 leaves utterance 1 alone in the batch with as many rows as utterances.)"""
    model = tiny_whisper(seed=0 if num_samples == 1 else 1, eos_strength=eos_strength)
    n = len(caps)
    feats = features(n)
    cross, prompts = setup(model, feats)
    greedy = num_samples == 1
    batch = sampling.decode(model, cross, prompts, num_samples=num_samples, greedy=greedy, max_new_tokens=caps,
                            generators=gens([10 + b for b in range(n)]))
    assert batch.groups == [num_samples] * n
    capped = 0
    for b in range(n):
        rows = batch.rows_of(b)
        one = whisper.cross_kv(model, whisper.encode(model, feats[b:b + 1]))
        alone = sampling.decode(model, one, prompts[b:b + 1], num_samples=num_samples, greedy=greedy,
                                max_new_tokens=caps[b], generators=gens([10 + b]))
        width = alone.tokens.shape[1]
        assert torch.equal(batch.tokens[rows, :width], alone.tokens), f"utterance {b}"
        assert (batch.tokens[rows, width:] == EOS).all()
        assert torch.equal(batch.lengths[rows], alone.lengths)
        torch.testing.assert_close(batch.logp[rows, :width], alone.logp, atol=1e-5, rtol=0)
        assert torch.equal(batch.lengths[rows], true_lengths(batch.tokens[rows], [caps[b]] * num_samples))
        assert int(batch.lengths[rows].max()) <= caps[b]
        last = batch.tokens[rows].gather(1, (batch.lengths[rows] - 1).unsqueeze(1)).squeeze(1)
        capped += int(((batch.lengths[rows] == caps[b]) & (last != EOS)).sum())
    assert capped >= 1, "no row reached its cap: the caps were not exercised"


@torch.no_grad()
@pytest.mark.parametrize("eos_strength, caps", [(3.0, [9, 9, 9]), (0.2, [2, 9, 5])])
def test_with_greedy_adds_the_greedy_row_and_draws_the_same_samples(eos_strength, caps):
    """``with_greedy``: each utterance's greedy row comes after its samples; the samples (tokens, lengths,
    log-probs) are those drawn without it, and the greedy row is what greedy decoding returns, whichever
    row ends first.  In float64: the extra row changes the matrix products' blocking, and in float32 that moved a
    draw across a token's boundary on one thread (the same samples are a property of the generators, not of the
    rounding)."""
    model = tiny_whisper(seed=1, eos_strength=eos_strength).double()
    feats = features(len(caps)).double()
    cross, prompts = setup(model, feats)
    kw = dict(num_samples=3, max_new_tokens=caps, temperature=0.8)
    plain = sampling.decode(model, cross, prompts, generators=gens([4, 5, 6]), **kw)
    both = sampling.decode(model, cross, prompts, generators=gens([4, 5, 6]), with_greedy=True, **kw)
    assert both.groups == [4, 4, 4]
    greedy, samples = both.split_greedy(EOS)
    assert samples.groups == plain.groups and torch.equal(samples.lengths, plain.lengths)
    assert torch.equal(samples.tokens, plain.tokens)
    torch.testing.assert_close(samples.logp, plain.logp, atol=1e-5, rtol=0)
    alone = sampling.decode(model, cross, prompts, greedy=True, max_new_tokens=caps)
    assert greedy == [tuple(alone.row(b, eos_id=EOS)) for b in range(len(caps))]
    assert any(len(g) != int(samples.lengths[samples.rows_of(b)].max()) for b, g in enumerate(greedy)), \
        "the greedy rows all ended with the samples: lifetimes were not exercised"


# ------------------------------------------------------------------------------------------------
# score
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def float64_stats(model, feats, prompt_ids, hyps, temperature):
    """Per token, from HF's encoder/decoder in float64 and suppression built from the token lists:
    ``(logp, entropy, logp without suppression, entropy without suppression, |mean logit|)`` (the
    mean under the distribution, which float32's softmax normalisation error multiplies)."""
    m64 = copy.deepcopy(model).double()
    enc = m64.get_encoder()(feats.double()).last_hidden_state
    enc = enc.repeat_interleave(torch.tensor(hyps.groups), dim=0)
    prompt = torch.tensor([prompt_ids]).repeat(hyps.tokens.shape[0], 1)
    ids = torch.cat([prompt, hyps.tokens[:, :-1]], dim=1)
    hidden = m64.get_decoder()(input_ids=ids, encoder_hidden_states=enc).last_hidden_state[:, prompt.shape[1] - 1:]
    z = (hidden @ m64.get_output_embeddings().weight.T) / temperature  # [R, T, V]
    bias = torch.zeros(z.shape[1:], dtype=torch.float64)
    bias[:, SUPPRESS] = float("-inf")
    bias[0, BEGIN_SUPPRESS] = float("-inf")
    zs = z + bias

    def stats(x):
        lp = torch.log_softmax(x, -1)
        p = lp.exp()
        ent = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
        return lp.gather(2, hyps.tokens.unsqueeze(2)).squeeze(2), ent

    lp, ent = stats(zs)
    lp_free, ent_free = stats(z)
    mean_z = (torch.softmax(zs, -1) * torch.where(torch.isfinite(zs), zs, 0.0)).sum(-1).abs()
    return lp, ent, lp_free, ent_free, mean_z


@pytest.mark.parametrize("mode, model_seed, eos_strength, temperature", [
    ("sample", 1, 3.0, 1.0), ("sample", 0, 3.0, 0.7), ("greedy", 0, 0.2, 1.0), ("greedy", 3, 0.2, 1.0)])
def test_score_matches_a_float64_recomputation(mode, model_seed, eos_strength, temperature):
    model = tiny_whisper(seed=model_seed, eos_strength=eos_strength)
    feats = features(2)
    cross, prompts = setup(model, feats)
    caps = [12, 7]
    hyps = sampling.decode(model, cross, prompts, num_samples=4, greedy=mode == "greedy", temperature=temperature,
                           max_new_tokens=caps, generators=gens([3, 4]))
    entropy, logp, mask = sampling.score(model, cross, prompts, hyps, temperature=temperature, backend="torch")
    # The mask: from lengths computed from the tokens.
    k = hyps.groups[0]
    lengths = true_lengths(hyps.tokens, [caps[0]] * k + [caps[1]] * k)
    expected_mask = torch.arange(hyps.tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    assert torch.equal(mask, expected_mask) and int(mask.sum()) > 2 * k
    assert (entropy[~mask] == 0).all() and (logp[~mask] == 0).all()

    lp64, ent64, lp_free, ent_free, mean_z = float64_stats(model, feats, prompts[0].ids, hyps, temperature)
    # The tolerance is far below what the suppression changes (dropping the suppressed tokens would show).
    effect = (lp64 - lp_free)[mask]
    assert LOGP_TOL < effect.median() / 10, f"suppression moves logp by {effect.median():.2e} only"
    first_effect = (lp64 - lp_free)[:, 0]
    assert LOGP_TOL < first_effect.min() / 10  # EOS and blank suppressed at the first token
    for name, value in (("score", logp), ("decode", hyps.logp)):
        err = (value.double() - lp64)[mask].abs().max()
        assert err < LOGP_TOL, f"{name} logp off by {err:.2e}"
    # Entropy = logsumexp - E_p[z]: float32's softmax is normalised to ~6e-6 (relative) here, an error
    # E_p[z] multiplies (peaked rows, where E_p[z] is the largest logit, show it).
    tol = 3e-6 + 1.5e-5 * mean_z
    err = (entropy.double() - ent64).abs()
    assert (err[mask] <= tol[mask]).all(), f"entropy off by {err[mask].max():.2e}"
    ent_effect = (ent64 - ent_free).abs()[mask]
    assert tol[mask].median() < ent_effect.median() / 10


@torch.no_grad()
def test_score_equals_the_reference():
    model = tiny_whisper(seed=2, eos_strength=2.0)
    feats = random_features(2)
    cross, prompts = setup(model, feats)
    enc = ref.encode(model, feats)
    rprompt = ref.build_prompt(model, enc, "en")
    for temperature in (1.0, 0.7):
        hyps = sampling.decode(model, cross, prompts, num_samples=4, temperature=temperature, max_new_tokens=10,
                               generators=gens([5]))
        ours = sampling.score(model, cross, prompts, hyps, temperature=temperature, backend="torch")
        theirs = ref.score(model, enc, rprompt, ref.RefHypotheses(hyps.tokens, hyps.lengths, hyps.logp),
                           temperature=temperature)
        assert torch.equal(ours[2], theirs[2])
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)


def test_score_gradients_stay_with_their_utterance():
    """Through per-utterance LayerNorms (decoder and encoder, via cross): utterance 0's loss moves only
    utterance 0's rows."""
    model = tiny_whisper(seed=1, eos_strength=3.0)
    feats = features(2)
    lns = [model.model.decoder.layers[0].self_attn_layer_norm, model.model.encoder.layer_norm]
    table = {m: (m.weight.detach().unsqueeze(0).repeat(2, 1).requires_grad_(True),
                 m.bias.detach().unsqueeze(0).repeat(2, 1).requires_grad_(True)) for m in lns}
    over = whisper.LayerNormOverrides(table)
    cross = whisper.cross_kv(model, whisper.encode(model, feats, over=over))
    prompts = sampling.build_prompts(model, cross.detach(), ["en", "en"])
    hyps = sampling.decode(model, cross.detach(), prompts, num_samples=3, max_new_tokens=6, generators=gens([0, 1]),
                           over=over)
    entropy, logp, mask = sampling.score(model, cross, prompts, hyps, backend="torch", over=over)
    rows = hyps.rows_of(0)
    (entropy[rows].sum() + logp[rows].sum()).backward()
    for m in lns:
        for t in table[m]:
            assert t.grad[0].abs().sum() > 0 and (t.grad[1] == 0).all()


# ------------------------------------------------------------------------------------------------
# half precision
# ------------------------------------------------------------------------------------------------

def test_the_half_precision_head_follows_its_weight():
    """A half-precision model's float32 head copy is made again when the model's weight changes (an in-place
    parameter set holding the tied output embedding, a restore), and while that weight adapts the gradient
    reaches it through the head, as in float32."""
    model = tiny_whisper(seed=1).to(torch.bfloat16).requires_grad_(False)  # as the pipeline holds it
    head = sampling.Head(model)
    w = model.get_output_embeddings().weight
    first = head.weight
    assert first.dtype == torch.float32 and head.weight is first  # one copy while nothing changes
    with torch.no_grad():
        w.mul_(2)
    assert torch.equal(head.weight, w.float()) and not torch.equal(head.weight, first)
    w.requires_grad_(True)
    try:
        (head.logits(torch.randn(2, w.shape[1])) ** 2).sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        with torch.no_grad():
            assert not head.weight.requires_grad  # decoding: the cached copy
    finally:
        w.requires_grad_(False)
        w.grad = None


@torch.no_grad()
def test_bf16_score_matches_decode():
    """No off-policy in half precision: decode and score apply the same float32 head (``Head``).

    With one generated token, decode's prefill and score's teacher-forced pass run the decoder on the
    same shapes, so their bfloat16 hidden states are identical and any difference comes from the head:
    ours agree to float32 rounding (~1e-6).  The reference (300ef44: bfloat16 logits in decode, float32
    in score) misses by 3.7e-4 to 6e-4 here, and is checked to fail this tolerance.

    On whole sequences the incremental (decode) and teacher-forced (score) passes round bfloat16 hidden
    states differently (CPU bf16 matmul and attention results depend on the shapes), so single tokens
    can differ by up to ~1e-2 while most agree to 1e-6 (measured here: max 2.0e-3, median 1e-6; the
    reference: max 1.5e-2, median 1.6e-4).
    """
    model = tiny_whisper(seed=1, eos_strength=3.0).to(torch.bfloat16)
    feats = features(3).to(torch.bfloat16)
    cross, prompts = setup(model, feats)
    tol = 1e-5
    hyps = sampling.decode(model, cross, prompts, num_samples=4, max_new_tokens=1, generators=gens([0, 1, 2]))
    _, logp, mask = sampling.score(model, cross, prompts, hyps, backend="torch")
    assert mask.all() and len(set(hyps.tokens[:, 0].tolist())) > 6
    gap = (logp - hyps.logp).abs().max()
    assert gap < tol, f"score and decode disagree by {gap:.2e} in bfloat16"
    old = []
    for b in range(3):
        enc = ref.encode(model, feats[b:b + 1])
        rprompt = ref.build_prompt(model, enc, "en")
        r = ref.decode(model, enc, rprompt, num_samples=4, max_new_tokens=1, generator=torch.Generator().manual_seed(b))
        old.append((ref.score(model, enc, rprompt, r)[1] - r.logp).abs().max())
    assert max(old) > 10 * tol  # the check would catch a bfloat16 head in decode

    hyps = sampling.decode(model, cross, prompts, num_samples=4, max_new_tokens=16, generators=gens([0, 1, 2]))
    _, logp, mask = sampling.score(model, cross, prompts, hyps, backend="torch")
    gap = (logp - hyps.logp)[mask].abs()
    assert int(mask.sum()) > 50
    assert gap.median() < 2e-5 and gap.max() < 1e-2, (gap.median(), gap.max())


@pytest.mark.parametrize("model_seed, eos_strength", [(0, 0.2), (3, 0.2), (1, 3.0)])
@torch.no_grad()
def test_greedy_step_entropy_matches_the_float64_recomputation(model_seed, eos_strength):
    """The entropy greedy decoding records at each step (incremental, KV-cached) equals the float64
    teacher-forced entropy of the same tokens; the sampled path records none."""
    model = tiny_whisper(seed=model_seed, eos_strength=eos_strength)
    feats = features(2)
    cross, prompts = setup(model, feats)
    hyps = sampling.decode(model, cross, prompts, greedy=True, max_new_tokens=[12, 7])
    mask = hyps.mask
    _, ent64, _, ent_free, mean_z = float64_stats(model, feats, prompts[0].ids, hyps, 1.0)
    # sum(entr(softmax)) in float32 over 51k-wide rows: ~1e-5; the gate it feeds works at 0.1 nats.
    tol = 2e-5 + 1.5e-5 * mean_z
    err = (hyps.entropy.double() - ent64).abs()
    assert (err[mask] <= tol[mask]).all(), f"greedy entropy off by {err[mask].max():.2e}"
    assert tol[mask].median() < (ent64 - ent_free).abs()[mask].median() / 10  # suppression must show
    expected = [float(ent64[b][mask[b]].mean()) for b in range(2)]
    assert hyps.mean_entropy() == pytest.approx(expected, abs=1e-4)
    sampled = sampling.decode(model, cross, prompts, num_samples=2, max_new_tokens=5, generators=gens([1, 2]))
    assert sampled.entropy is None
    with pytest.raises(ValueError, match="greedy"):
        sampled.mean_entropy()


def test_categorical_draws_the_distribution_and_never_a_zero():
    """fastem's draw inverts the float64 CDF: frequencies match the probabilities (and not a slightly different
    distribution), a token of probability 0 is never drawn (-inf logits, the last token, all but one), rows
    of any scale are normalised, and a seed reproduces the draws."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    draws = sampling.categorical(p.repeat(200_000, 1) * 7.0, generator=g)  # unnormalised rows
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[1] == 0 and freq[5] == 0
    se = (p.double() * (1 - p.double()) / draws.numel()).sqrt()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), freq
    wrong = torch.tensor([0.11, 0.0, 0.19, 0.3, 0.4, 0.0], dtype=torch.float64)  # the check can fail
    assert ((freq - wrong).abs() > 5 * se).any()
    logits = torch.randn(64, 51865, generator=g) * 4
    logits[:, ::3] = float("-inf")  # suppressed tokens, the last included (51864 = 3 * 17288)
    probs = torch.softmax(logits, -1)
    for _ in range(20):
        d = sampling.categorical(probs, generator=g)
        assert bool((probs.gather(1, d[:, None]) > 0).all())
    one = torch.zeros(3, 51865)
    one[:, 17] = 1e-30  # a single live token of tiny mass
    assert sampling.categorical(one, generator=g).tolist() == [17, 17, 17]
    a = sampling.categorical(probs, generator=torch.Generator().manual_seed(5))
    b = sampling.categorical(probs, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_categorical_falls_back_to_the_last_live_token_when_the_uniform_rounds_up(monkeypatch):
    """If u * total rounds up to the total, the search lands past the last live token: it is moved back to it."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(real_rand(*a, **k).shape, dtype=torch.float64))
    assert sampling.categorical(probs).tolist() == [1, 1]


@pytest.mark.parametrize("bad", ["zeros", "nan", "inf"])
def test_categorical_refuses_a_row_that_is_no_distribution(bad):
    """NaN never passes: a row of NaN, inf or all zeros raises and names the row, as torch.multinomial does."""
    probs = torch.softmax(torch.randn(3, 50), -1)
    probs[1] = {"zeros": 0.0, "nan": float("nan"), "inf": float("inf")}[bad]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sampling.categorical(probs, generator=torch.Generator().manual_seed(0))

