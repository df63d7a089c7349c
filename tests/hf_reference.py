"""The reference decoding path: fastem's earlier implementation on ``transformers``' own Whisper decoder.

This is ``fastem/sampling.py`` as of commit 300ef44 (before the lean forward of :mod:`fastem.whisper`),
trimmed to ``encode`` / ``build_prompt`` / ``decode`` / ``score``.  It runs HF's encoder and decoder
modules with a ``DynamicCache`` / ``EncoderDecoderCache``, one utterance at a time, all ``K`` rows
drawn from one generator, one uniform number per row per step, by inverting the float64 cumulative sum
(rows that ended still draw; their draw is replaced by EOS; until 2026-12-06 the draw was one
``torch.multinomial`` call, the same distribution).  The new path must reproduce its tokens and
log-probs for the same seed.

Kept as it was, on purpose, including its precision: the logits of ``decode`` come from the head in
the model's dtype (``head(hidden).float()``), while ``score`` multiplies in float32 -- in half
precision models the two differ (see ``test_sampling.test_bf16_score_matches_decode``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from fastem import ops
from fastem.sampling import Prompt, language_code

__all__ = ["RefPrompt", "RefHypotheses", "encode", "build_prompt", "decode", "score"]


# The prompt and its logit-processing rules are the same data in both paths.
RefPrompt = Prompt


@dataclass
class RefHypotheses:
    tokens: torch.Tensor
    lengths: torch.Tensor
    logp: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)


def encode(model, input_features: torch.Tensor) -> torch.Tensor:
    return model.get_encoder()(input_features).last_hidden_state


def _prefill(model, enc: torch.Tensor, prompt_ids: list[int]):
    ids = torch.tensor([prompt_ids], device=enc.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = model.get_decoder()(input_ids=ids, encoder_hidden_states=enc[:1], past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, -1], out.past_key_values


def _expand_cache(cache: EncoderDecoderCache, k: int) -> None:
    for sub in (cache.self_attention_cache, cache.cross_attention_cache):
        for layer in sub.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.expand(k, *layer.keys.shape[1:])
                layer.values = layer.values.expand(k, *layer.values.shape[1:])


@torch.no_grad()
def build_prompt(model, enc: torch.Tensor, language: str | None = None, task: str = "transcribe") -> RefPrompt:
    gc = model.generation_config
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
    ids = [int(start)]
    lang_to_id = getattr(gc, "lang_to_id", None) or {}
    multilingual = bool(lang_to_id) and getattr(gc, "is_multilingual", True) is not False
    code = None
    if multilingual:
        if language is not None:
            code = language_code(language)
            ids.append(int(lang_to_id[f"<|{code}|>"]))
        else:
            hidden, _ = _prefill(model, enc, ids)
            logits = model.get_output_embeddings()(hidden)[0].float()
            allowed = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
            lang_id = int(allowed[logits[allowed].argmax()])
            code = next(t[2:-2] for t, i in lang_to_id.items() if i == lang_id)
            ids.append(lang_id)
        task_to_id = getattr(gc, "task_to_id", None) or {}
        if task in task_to_id:
            ids.append(int(task_to_id[task]))
    no_ts = getattr(gc, "no_timestamps_token_id", None)
    if no_ts is not None:
        ids.append(int(no_ts))
    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return RefPrompt(ids=ids, eos_id=int(eos), suppress=list(gc.suppress_tokens or []),
                     begin_suppress=list(gc.begin_suppress_tokens or []), language=code)


@torch.no_grad()
def decode(model, enc: torch.Tensor, prompt: RefPrompt, *, num_samples: int = 1, greedy: bool = False,
           temperature: float = 1.0, max_new_tokens: int = 128, generator: torch.Generator | None = None,
           ) -> RefHypotheses:
    """``K`` continuations of ``prompt`` for one utterance ``enc [1, S, D]``."""
    assert enc.shape[0] == 1
    k = 1 if greedy else num_samples
    head = model.get_output_embeddings()
    limit = min(max_new_tokens, model.config.max_target_positions - len(prompt.ids))
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
            probs = log_probs.exp().double()  # inverse CDF at one uniform number per row, as fastem draws
            cdf = probs.cumsum(-1)
            u = torch.rand(k, 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, prompt.eos_id), nxt)
        tokens[:, t] = nxt
        logps[:, t] = torch.where(done, 0.0, log_probs.gather(1, nxt.unsqueeze(1)).squeeze(1))
        ended = (nxt == prompt.eos_id) & ~done
        lengths[ended] = t + 1
        done |= ended
        if bool(done.all()) or t + 1 == limit:
            break
        out = model.get_decoder()(input_ids=nxt.unsqueeze(1), encoder_hidden_states=enc_k, past_key_values=cache,
                                  use_cache=True)
        hidden, cache = out.last_hidden_state[:, -1], out.past_key_values
    steps = int(lengths.max())
    return RefHypotheses(tokens=tokens[:, :steps].clone(), lengths=lengths, logp=logps[:, :steps].clone())


def score(model, enc: torch.Tensor, prompt: RefPrompt, hyps, *, temperature: float = 1.0,
          backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``(entropy, logp, mask)`` of one utterance's ``K`` hypotheses."""
    tokens, mask = hyps.tokens, hyps.mask
    k, steps = tokens.shape
    head = model.get_output_embeddings()
    h0, cache = _prefill(model, enc, prompt.ids)
    hidden = [h0.expand(k, -1).unsqueeze(1)]
    if steps > 1:
        _expand_cache(cache, k)
        out = model.get_decoder()(input_ids=tokens[:, :-1], encoder_hidden_states=enc[:1].expand(k, *enc.shape[1:]),
                                  past_key_values=cache, use_cache=True)
        hidden.append(out.last_hidden_state)
    hidden = torch.cat(hidden, dim=1)
    first_bias, bias = prompt.biases(head.out_features, enc.device)
    if head.bias is not None:
        first_bias = first_bias + head.bias.float() / temperature
        bias = bias + head.bias.float() / temperature
    sel = mask.nonzero(as_tuple=True)
    rows = hidden[sel].float() / temperature
    targets = tokens[sel]
    first = sel[1] == 0
    weight = head.weight.float()
    entropy = torch.zeros(k, steps, device=enc.device)
    logp = torch.zeros(k, steps, device=enc.device)
    for part, b in ((first, first_bias), (~first, bias)):
        if bool(part.any()):
            ent, lp = ops.linear_token_stats(rows[part], weight, targets[part], b, backend=backend)
            idx = (sel[0][part], sel[1][part])
            entropy = entropy.index_put(idx, ent)
            logp = logp.index_put(idx, lp)
    return entropy, logp, mask
