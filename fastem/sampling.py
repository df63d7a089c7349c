"""Decoding for adaptation: K hypotheses per utterance from one encoder pass, and their teacher-forced scores.

Everything here works on one utterance.  The encoder runs once and its output ``enc [1, S, D]`` is
shared by the ``K`` rows; the decoder prefills Whisper's prompt on a single row, and its key/value
cache (self-attention over the prompt, cross-attention over ``enc``) is *expanded* to ``K`` rows as
views, so neither the encoder nor the cross-attention projections are ever recomputed per row.

* :func:`decode` draws ``K`` samples (or the greedy hypothesis) incrementally with the KV cache,
  applying the model's suppress-token lists, until EOS or ``max_new_tokens``.
* :func:`score` is the differentiable teacher-forced pass over those hypotheses: per-token entropy
  and log-prob of the drawn token, computed by :func:`fastem.ops.linear_token_stats` from the
  decoder's hidden states and the (tied) output projection, so the logits need not be materialised.

Logits are processed exactly as in sampling (suppressed tokens are ``-inf``, temperature divides
the logits), so ``score`` describes the distribution the hypotheses were drawn from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from . import ops

__all__ = ["Prompt", "Hypotheses", "encode", "build_prompt", "decode", "score", "language_code"]


@dataclass
class Prompt:
    """Whisper's decoder prompt and the logit processing rules of one utterance."""

    ids: list[int]
    eos_id: int
    suppress: list[int] = field(default_factory=list)        # suppressed at every step
    begin_suppress: list[int] = field(default_factory=list)  # also suppressed at the first generated token
    language: str | None = None

    def biases(self, vocab_size: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive logit biases (0 or -inf) for the first generated position and for the others."""
        rest = torch.zeros(vocab_size, device=device, dtype=dtype)
        if self.suppress:
            rest[torch.tensor(self.suppress, device=device)] = float("-inf")
        first = rest.clone()
        if self.begin_suppress:
            first[torch.tensor(self.begin_suppress, device=device)] = float("-inf")
        return first, rest


@dataclass
class Hypotheses:
    """``K`` decoded continuations of one prompt.

    ``tokens [K, T]`` holds the generated tokens (EOS included where reached; positions after a row's
    end hold EOS as padding), ``lengths [K]`` the number of real tokens per row, ``logp [K, T]`` the
    log-probability each token had under the distribution it was drawn from (0 on padding).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logp: torch.Tensor
    seconds: float = 0.0

    @property
    def mask(self) -> torch.Tensor:
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    def row(self, k: int, *, eos_id: int | None = None) -> list[int]:
        """Real tokens of row ``k`` (without the final EOS when ``eos_id`` is given)."""
        ids = self.tokens[k, : int(self.lengths[k])].tolist()
        if eos_id is not None and ids and ids[-1] == eos_id:
            ids = ids[:-1]
        return ids


def encode(model, input_features: torch.Tensor) -> torch.Tensor:
    """Encoder output ``[B, S, D]`` for log-mel features ``[B, n_mels, frames]``."""
    return model.get_encoder()(input_features).last_hidden_state


def _decoder(model):
    return model.get_decoder()


def _prefill(model, enc: torch.Tensor, prompt_ids: list[int]):
    """Run the prompt through the decoder on one row; return its last hidden state and the cache."""
    ids = torch.tensor([prompt_ids], device=enc.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = _decoder(model)(input_ids=ids, encoder_hidden_states=enc[:1], past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, -1], out.past_key_values


def _expand_cache(cache: EncoderDecoderCache, k: int) -> None:
    """Make a one-row cache serve ``k`` rows without copying (expanded views)."""
    for sub in (cache.self_attention_cache, cache.cross_attention_cache):
        for layer in sub.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.expand(k, *layer.keys.shape[1:])
                layer.values = layer.values.expand(k, *layer.values.shape[1:])


def _head(model):
    return model.get_output_embeddings()



def language_code(language: str) -> str:
    """``"en"``, ``"english"`` or ``"<|en|>"`` -> ``"en"``."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.strip().lower()
    if lang.startswith("<|") and lang.endswith("|>"):
        lang = lang[2:-2]
    if lang in LANGUAGES:
        return lang
    if lang in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[lang]
    raise ValueError(f"unknown language {language!r}: use a Whisper language code such as 'en' or a name such as "
                     "'english'")


@torch.no_grad()
def build_prompt(model, enc: torch.Tensor, language: str | None = None, task: str = "transcribe") -> Prompt:
    """Whisper's prompt: start, language (given or detected), task, no-timestamps; and suppress lists.

    English-only checkpoints (no ``lang_to_id``) get ``start, no-timestamps``.  With ``language=None``
    a multilingual model detects the language from the first decoder step, as ``generate`` does.
    """
    gc = model.generation_config
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
    ids = [int(start)]
    lang_to_id = getattr(gc, "lang_to_id", None) or {}
    multilingual = bool(lang_to_id) and getattr(gc, "is_multilingual", True) is not False
    code = None
    if multilingual:
        if language is not None:
            code = language_code(language)
            token = f"<|{code}|>"
            if token not in lang_to_id:
                raise ValueError(f"language {language!r} is not supported by this model")
            ids.append(int(lang_to_id[token]))
        else:
            hidden, _ = _prefill(model, enc, ids)
            logits = _head(model)(hidden)[0].float()
            allowed = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
            lang_id = int(allowed[logits[allowed].argmax()])
            code = next(t[2:-2] for t, i in lang_to_id.items() if i == lang_id)
            ids.append(lang_id)
        task_to_id = getattr(gc, "task_to_id", None) or {}
        if task in task_to_id:
            ids.append(int(task_to_id[task]))
        elif task_to_id:
            raise ValueError(f"task must be one of {sorted(task_to_id)}, got {task!r}")
    elif language is not None and language_code(language) != "en":
        raise ValueError(f"this model is English-only; language={language!r} cannot be honoured")
    else:
        code = "en" if language is not None or getattr(gc, "is_multilingual", None) is False else None
    no_ts = getattr(gc, "no_timestamps_token_id", None)
    if no_ts is not None:
        ids.append(int(no_ts))
    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return Prompt(ids=ids, eos_id=int(eos), suppress=list(gc.suppress_tokens or []),
                  begin_suppress=list(gc.begin_suppress_tokens or []), language=code)


@torch.no_grad()
def decode(model, enc: torch.Tensor, prompt: Prompt, *, num_samples: int = 1, greedy: bool = False,
           temperature: float = 1.0, max_new_tokens: int = 128, generator: torch.Generator | None = None,
           ) -> Hypotheses:
    """Draw ``num_samples`` continuations of ``prompt`` (or the greedy one) with a KV cache.

    ``enc`` is the encoder output of the utterance ``[1, S, D]``: it is used once, by the prefill on a
    single row; the ``K`` rows then share its cross-attention keys and values.
    """
    if enc.shape[0] != 1:
        raise ValueError(f"decode works on one utterance: enc must be [1, S, D], got {tuple(enc.shape)}")
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 for sampling (use greedy=True for argmax decoding)")
    t0 = time.perf_counter()
    k = 1 if greedy else num_samples
    head = _head(model)
    limit = min(max_new_tokens, model.config.max_target_positions - len(prompt.ids))
    if limit < 1:
        raise ValueError(f"no room to decode: prompt of {len(prompt.ids)} tokens, max_new_tokens={max_new_tokens}")
    hidden, cache = _prefill(model, enc, prompt.ids)
    first_bias, bias = prompt.biases(head.out_features, enc.device)
    _expand_cache(cache, k)
    enc_k = enc.expand(k, *enc.shape[1:])
    tokens = torch.full((k, limit), prompt.eos_id, dtype=torch.long, device=enc.device)
    logps = torch.zeros((k, limit), device=enc.device)
    lengths = torch.full((k,), limit, dtype=torch.long, device=enc.device)
    done = torch.zeros(k, dtype=torch.bool, device=enc.device)
    hidden = hidden.expand(k, -1)
    for t in range(limit):
        logits = head(hidden).float() + (first_bias if t == 0 else bias)
        log_probs = torch.log_softmax(logits / (1.0 if greedy else temperature), dim=-1)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, prompt.eos_id), nxt)
        tokens[:, t] = nxt
        logps[:, t] = torch.where(done, 0.0, log_probs.gather(1, nxt.unsqueeze(1)).squeeze(1))
        ended = (nxt == prompt.eos_id) & ~done
        lengths[ended] = t + 1
        done |= ended
        if bool(done.all()) or t + 1 == limit:
            break
        out = _decoder(model)(input_ids=nxt.unsqueeze(1), encoder_hidden_states=enc_k, past_key_values=cache,
                              use_cache=True)
        hidden, cache = out.last_hidden_state[:, -1], out.past_key_values
    steps = int(lengths.max())
    return Hypotheses(tokens=tokens[:, :steps].clone(), lengths=lengths, logp=logps[:, :steps].clone(),
                      seconds=time.perf_counter() - t0)


def score(model, enc: torch.Tensor, prompt: Prompt, hyps: Hypotheses, *, temperature: float = 1.0,
          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``(entropy, logp, mask)``, each ``[K, T]``, differentiable w.r.t. the model.

    One decoder pass over the prompt on one row (whose cache the ``K`` rows share) and one over the
    ``K`` hypotheses; gradients reach the encoder through ``enc`` if it requires grad.
    """
    tokens, mask = hyps.tokens, hyps.mask
    k, steps = tokens.shape
    head = _head(model)
    h0, cache = _prefill(model, enc, prompt.ids)
    hidden = [h0.expand(k, -1).unsqueeze(1)]
    if steps > 1:
        _expand_cache(cache, k)
        out = _decoder(model)(input_ids=tokens[:, :-1], encoder_hidden_states=enc[:1].expand(k, *enc.shape[1:]),
                              past_key_values=cache, use_cache=True)
        hidden.append(out.last_hidden_state)
    hidden = torch.cat(hidden, dim=1)  # [K, T, D]: hidden[:, t] predicts tokens[:, t]
    first_bias, bias = prompt.biases(head.out_features, enc.device)
    if head.bias is not None:
        first_bias = first_bias + head.bias.float() / temperature
        bias = bias + head.bias.float() / temperature
    sel = mask.nonzero(as_tuple=True)
    rows = hidden[sel].float() / temperature
    targets = tokens[sel]
    first = sel[1] == 0
    weight = head.weight.float()  # no copy for float32 weights
    entropy = torch.zeros(k, steps, device=enc.device)
    logp = torch.zeros(k, steps, device=enc.device)
    for part, b in ((first, first_bias), (~first, bias)):
        if bool(part.any()):
            ent, lp = ops.linear_token_stats(rows[part], weight, targets[part], b, backend=backend)
            idx = (sel[0][part], sel[1][part])
            entropy = entropy.index_put(idx, ent)
            logp = logp.index_put(idx, lp)
    return entropy, logp, mask
