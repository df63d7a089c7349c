"""Decoding for adaptation: ``K`` hypotheses per utterance for ``B`` utterances at once, and their scores.

The encoder output of each utterance is projected to cross-attention keys/values once
(:func:`fastem.whisper.cross_kv`); the ``K`` rows of an utterance share them.  Rows are ordered
utterance-major: rows ``[b*K, (b+1)*K)`` belong to utterance ``b``.

* :func:`build_prompts` builds Whisper's prompt per utterance (language given or detected).
* :func:`decode` draws ``K`` samples per utterance (or the greedy hypothesis) with a preallocated
  self-attention cache, one decoder call per token for all live rows; rows that ended are dropped.
  Each utterance samples from its own generator, so an utterance's samples do not depend on which
  other utterances share the batch.
* :func:`score` is the differentiable teacher-forced pass over the hypotheses: per-token entropy and
  log-prob of the drawn token by :func:`fastem.ops.linear_token_stats` (the logits need not be
  materialised).

Logits are processed the same way in both (suppressed tokens ``-inf``, temperature dividing the
logits, float32 head), so ``score`` describes the distribution the hypotheses were drawn from, in
half-precision models too.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import ops
from .precision import full_precision
from .whisper import CrossKV, LayerNormOverrides, decoder_forward

__all__ = ["Prompt", "Hypotheses", "Head", "build_prompts", "decode", "score", "mean_logp", "language_code"]


@dataclass
class Prompt:
    """Whisper's decoder prompt and the logit processing rules of one utterance."""

    ids: list[int]
    eos_id: int
    suppress: list[int] = field(default_factory=list)        # suppressed at every step
    begin_suppress: list[int] = field(default_factory=list)  # also suppressed at the first generated token
    language: str | None = None
    language_probability: float | None = None                # when detected

    def biases(self, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive float32 logit biases (0 or -inf) for the first generated position and for the others."""
        rest = torch.zeros(vocab_size, device=device)
        if self.suppress:
            rest[torch.tensor(self.suppress, device=device)] = float("-inf")
        first = rest.clone()
        if self.begin_suppress:
            first[torch.tensor(self.begin_suppress, device=device)] = float("-inf")
        return first, rest


@dataclass
class Hypotheses:
    """Decoded continuations: ``groups[b]`` consecutive rows per utterance ``b``.

    ``tokens [R, T]`` holds the generated tokens (EOS included where reached; positions after a row's
    end hold EOS as padding), ``lengths [R]`` the number of real tokens per row, ``logp [R, T]`` the
    log-probability each token had under the distribution it was drawn from (0 on padding); for greedy
    decoding ``entropy [R, T]`` holds the entropy of each step's next-token distribution (else None).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logp: torch.Tensor
    groups: list[int]
    seconds: float = 0.0
    entropy: torch.Tensor | None = None
    no_speech: list[float] | None = None  # per utterance, when decode was asked for it

    def mean_entropy(self) -> list[float]:
        """Greedy decoding: each utterance's mean next-token entropy (nats) along its first row."""
        if self.entropy is None:
            raise ValueError("only greedy decoding records the entropy of its steps")
        out = []
        for b in range(len(self.groups)):
            r = self.rows_of(b).start
            n = max(int(self.lengths[r]), 1)
            out.append(float(self.entropy[r, :n].mean()))
        return out

    @property
    def mask(self) -> torch.Tensor:
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    def rows_of(self, b: int) -> slice:
        lo = sum(self.groups[:b])
        return slice(lo, lo + self.groups[b])

    def split_greedy(self, eos_id: int) -> tuple[list[tuple[int, ...]], "Hypotheses"]:
        """For hypotheses decoded ``with_greedy``: each utterance's greedy transcript (without EOS), and the
        samples alone, as :func:`decode` returns them without it."""
        greedy = [tuple(self.row(self.rows_of(b).stop - 1, eos_id=eos_id)) for b in range(len(self.groups))]
        keep = [r for b in range(len(self.groups)) for r in range(self.rows_of(b).start, self.rows_of(b).stop - 1)]
        index = torch.tensor(keep, device=self.tokens.device)
        lengths = self.lengths[index]
        used = int(lengths.max()) if keep else 0
        return greedy, Hypotheses(tokens=self.tokens[index, :used], lengths=lengths, logp=self.logp[index, :used],
                                  groups=[g - 1 for g in self.groups], seconds=self.seconds, no_speech=self.no_speech)

    def row(self, k: int, *, eos_id: int | None = None) -> list[int]:
        """Real tokens of row ``k`` (without the final EOS when ``eos_id`` is given)."""
        ids = self.tokens[k, : int(self.lengths[k])].tolist()
        if eos_id is not None and ids and ids[-1] == eos_id:
            ids = ids[:-1]
        return ids


class Head:
    """The output projection as both decoding and scoring use it: float32 weight, float32 bias if any.  For a half
    precision model the weight is a float32 copy, made again whenever the model's weight has changed (a parameter
    set that adapts the output embedding in place, or a model restored); while that weight is adapting (it requires
    grad, under grad mode) the conversion itself, so its gradient reaches it as in float32."""

    def __init__(self, model):
        module = model.get_output_embeddings()
        self.module = module
        self.bias = None if module.bias is None else module.bias.float()
        self.vocab_size = module.out_features
        self._copy, self._version = None, None

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        if w.dtype == torch.float32:
            return w
        if w.requires_grad and torch.is_grad_enabled():
            return w.float()
        if self._version != w._version:
            self._copy, self._version = w.detach().float(), w._version
        return self._copy

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with full_precision(hidden):
            return F.linear(hidden.float(), self.weight, self.bias)


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


def _start_and_eos(model) -> tuple[int, int]:
    gc = model.generation_config
    start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
    eos = gc.eos_token_id if gc.eos_token_id is not None else model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    return int(start), int(eos)


@torch.no_grad()
def is_multilingual(model) -> bool:
    """Whether the checkpoint's prompt carries language and task tokens (not an English-only ``.en`` model)."""
    gc = model.generation_config
    return bool(getattr(gc, "lang_to_id", None)) and getattr(gc, "is_multilingual", True) is not False


def build_prompts(model, cross: CrossKV, languages: list[str | None], task: str = "transcribe",
                  head: Head | None = None) -> list[Prompt]:
    """Whisper's prompt per utterance: start, language (given or detected), task, no-timestamps.

    English-only checkpoints (no ``lang_to_id``) get ``start, no-timestamps``.  A ``None`` language
    on a multilingual model is detected from the first decoder step, as ``generate`` does (the
    probability of the chosen language is kept in ``Prompt.language_probability``).
    """
    gc = model.generation_config
    start, eos = _start_and_eos(model)
    lang_to_id = getattr(gc, "lang_to_id", None) or {}
    multilingual = is_multilingual(model)
    task_to_id = getattr(gc, "task_to_id", None) or {}
    if multilingual and task_to_id and task not in task_to_id:
        raise ValueError(f"task must be one of {sorted(task_to_id)}, got {task!r}")
    if not multilingual and task != "transcribe":
        raise ValueError(f"this model is English-only: it transcribes, task={task!r} cannot be honoured")
    codes: list[str | None] = []
    for language in languages:
        if language is None:
            codes.append(None)
            continue
        code = language_code(language)
        if multilingual and f"<|{code}|>" not in lang_to_id:
            raise ValueError(f"language {language!r} is not supported by this model")
        if not multilingual and code != "en":
            raise ValueError(f"this model is English-only; language={language!r} cannot be honoured")
        codes.append(code)
    probs: list[float | None] = [None] * len(codes)
    if multilingual and any(c is None for c in codes):
        head = head or Head(model)
        ids = torch.full((len(codes), 1), start, device=cross.keys[0].device)
        hidden = decoder_forward(model, ids, cross, [1] * len(codes))[:, -1]
        logits = head.logits(hidden)
        allowed = torch.tensor(sorted(lang_to_id.values()), device=logits.device)
        p = torch.softmax(logits[:, allowed], dim=-1)
        best = p.argmax(-1)
        id_to_code = {i: t[2:-2] for t, i in lang_to_id.items()}
        for b, c in enumerate(codes):
            if c is None:
                codes[b] = id_to_code[int(allowed[best[b]])]
                probs[b] = float(p[b, best[b]])
    no_ts = getattr(gc, "no_timestamps_token_id", None)
    prompts = []
    for code, prob, given in zip(codes, probs, languages):
        ids = [start]
        if multilingual:
            ids.append(int(lang_to_id[f"<|{code}|>"]))
            if task in task_to_id:
                ids.append(int(task_to_id[task]))
        elif code is None and getattr(gc, "is_multilingual", None) is False:
            code = "en"
        if no_ts is not None:
            ids.append(int(no_ts))
        prompts.append(Prompt(ids=ids, eos_id=eos, suppress=list(gc.suppress_tokens or []),
                              begin_suppress=list(gc.begin_suppress_tokens or []), language=code,
                              language_probability=prob))
    return prompts


def max_positions(model) -> int:
    """The longest sequence (prompt + continuation) the decoder takes."""
    config = model.config
    for name in ("max_target_positions", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 4096


def _row_owner(groups: list[int], device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(groups), device=device), torch.tensor(groups, device=device))


def _ln_rows(owner: torch.Tensor, over_rows: list[int] | None) -> torch.Tensor:
    """Each row's row of the per-utterance LayerNorm tables: its utterance's ``over_rows`` entry (default its own)."""
    return owner if over_rows is None else torch.tensor(over_rows, device=owner.device)[owner]


@dataclass
class Started:
    """``k`` rows per utterance with their prompts run into a cache: what the sampler and beam search start from.

    ``limits``: each utterance's token budget (within the decoder's positions); ``owner`` / ``ln_owner``: each
    row's utterance, and its row of the per-utterance LayerNorm tables; ``hidden [R, D]``: the last prompt
    position's hidden state; ``no_speech``: Whisper's no-speech probability per utterance (when asked)."""

    limits: list[int]
    groups: list[int]
    owner: torch.Tensor
    ln_owner: torch.Tensor
    hidden: torch.Tensor
    cache: object
    no_speech: list[float] | None


def start_rows(model, cross, prompts: list[Prompt], k: int, max_new_tokens: int | list[int], *,
               over: LayerNormOverrides | None, over_rows: list[int] | None, head: Head,
               no_speech_id: int | None) -> Started:
    """Check the prompts and budgets, and prefill ``k`` rows per utterance (see :class:`Started`)."""
    n, device = len(prompts), cross.device
    plen = len(prompts[0].ids)
    if any(len(p.ids) != plen for p in prompts):
        raise ValueError("all prompts of a batch must have the same length")
    caps = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    room = max_positions(model) - plen
    limits = [min(c, room) for c in caps]
    if min(limits) < 1:
        raise ValueError(f"no room to decode: prompt of {plen} tokens, max_new_tokens={max_new_tokens}")
    groups = [k] * n
    owner = _row_owner(groups, device)
    ln_owner = _ln_rows(owner, over_rows)
    prompt_ids = torch.tensor([p.ids for p in prompts], device=device).repeat_interleave(k, 0)
    prompt_hidden, cache = cross.prefill(model, prompt_ids, groups, max_len=plen + max(limits), over=over, rows=ln_owner)
    no_speech = None
    if no_speech_id is not None:  # after the start token, on the raw logits (as Whisper computes it)
        first = torch.arange(n, device=device) * k
        no_speech = torch.softmax(head.logits(prompt_hidden[first, 0]), dim=-1)[:, no_speech_id].tolist()
    return Started(limits, groups, owner, ln_owner, prompt_hidden[:, -1], cache, no_speech)


def _sample(probs: torch.Tensor, owner: torch.Tensor, live: torch.Tensor, k: int,
            generators: list[torch.Generator | None], width: int | None = None) -> torch.Tensor:
    """One draw per live row; utterance ``b`` draws for all its ``k`` rows from its own generator (rows
    that ended get a dummy distribution), so its stream does not depend on its rows' lifetimes or
    on the other utterances.  ``width``: rows per utterance (``k`` unless more rows follow its samples)."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    local = live % (width or k)
    for b in owner.unique().tolist():
        sel = (owner == b).nonzero(as_tuple=True)[0]
        full = torch.zeros(k, probs.shape[1], device=probs.device, dtype=probs.dtype)
        full[:, 0] = 1.0
        full[local[sel]] = probs[sel]
        draw = categorical(full, generator=generators[b])
        out[sel] = draw[local[sel]]
    return out


def categorical(probs: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from each row of ``probs [R, V]`` (non-negative, any scale) by inverting its cumulative sum
    in float64 at one uniform number per row: the distribution ``torch.multinomial`` samples, far cheaper on
    a CPU over Whisper's vocabulary (RESULTS.md, "The sampler's draw").  A token of probability 0 is never
    drawn; a row without a positive finite total raises, as ``torch.multinomial`` does."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * total[:, None]
    draw = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)
    bad = probs.gather(1, draw.unsqueeze(1)).squeeze(1) <= 0  # u rounded up to the total: the last live token
    invalid = ~(total > 0) | ~torch.isfinite(total)
    any_bad, any_invalid = torch.stack([bad.any(), invalid.any()]).tolist()  # one sync
    if any_invalid:
        rows = invalid.nonzero(as_tuple=True)[0].tolist()
        raise ValueError(f"cannot sample from rows {rows[:8]}: their probabilities do not sum to a positive finite "
                         "number (NaN, inf or all zero)")
    if any_bad:
        last = probs.shape[1] - 1 - (probs[bad].flip(-1) > 0).float().argmax(-1)
        draw[bad] = last
    return draw


@torch.no_grad()
def decode(model, cross: CrossKV, prompts: list[Prompt], *, num_samples: int = 1, greedy: bool = False,
           temperature: float = 1.0, max_new_tokens: int | list[int] = 128,
           generators: list[torch.Generator | None] | None = None, over: LayerNormOverrides | None = None,
           head: Head | None = None, over_rows: list[int] | None = None, no_speech_id: int | None = None,
           model_logp: bool = False, with_greedy: bool = False) -> Hypotheses:
    """Draw ``num_samples`` continuations of each utterance's prompt (or its greedy one).

    ``cross``: the utterances' cross-attention keys/values (``B`` rows); ``max_new_tokens``: one cap
    for all or one per utterance; ``generators``: one per utterance (``None`` entries use torch's
    global generator).  ``over_rows[b]``: the row of the per-utterance LayerNorm tables ``over`` that
    utterance ``b`` of this call uses (default ``b``: decode a subset of a batch with its own rows).
    ``no_speech_id``: record each utterance's probability of that token right after the start token
    (Whisper's no-speech probability, ``Hypotheses.no_speech``).  ``model_logp``: ``logp`` holds each
    drawn token's log-prob under the model's own distribution (temperature 1), as Whisper's
    average log-prob counts it, instead of the distribution it was drawn from.  ``with_greedy``: one more
    row per utterance, after its samples, decoded greedily in the same passes (the samples drawn are those
    drawn without it; :meth:`Hypotheses.split_greedy` separates it).
    """
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 for sampling (use greedy=True for argmax decoding)")
    t0 = time.perf_counter()
    n = len(prompts)
    k = 1 if greedy else num_samples
    width = k + 1 if with_greedy and not greedy else k  # rows per utterance
    head = head or Head(model)
    device = cross.device
    start = start_rows(model, cross, prompts, width, max_new_tokens, over=over, over_rows=over_rows, head=head,
                       no_speech_id=no_speech_id)
    limits, groups, owner, ln_owner, hidden, cache = (start.limits, start.groups, start.owner, start.ln_owner,
                                                      start.hidden, start.cache)
    generators = list(generators) if generators is not None else [None] * n
    rows = n * width
    limit_row = torch.tensor(limits, device=device).repeat_interleave(width)
    steps = max(limits)
    eos = prompts[0].eos_id
    first_bias, bias = prompts[0].biases(head.vocab_size, device)
    tokens = torch.full((rows, steps), eos, dtype=torch.long, device=device)
    logps = torch.zeros((rows, steps), device=device)
    entropy = torch.zeros((rows, steps), device=device) if greedy else None
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    live = torch.arange(rows, device=device)
    for t in range(steps):
        logits = head.logits(hidden) + (first_bias if t == 0 else bias)
        if greedy:
            log_probs = torch.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1)
            entropy[live, t] = torch.special.entr(log_probs.exp()).sum(-1)
        else:
            log_probs = torch.log_softmax(logits / temperature, dim=-1)
            if width > k:
                drawn = (live % width) < k
                nxt = logits.argmax(-1)
                nxt[drawn] = _sample(log_probs[drawn].exp(), owner[live][drawn], live[drawn], k, generators,
                                     width=width)
            else:
                nxt = _sample(log_probs.exp(), owner[live], live, k, generators)
            if model_logp and temperature != 1.0:
                log_probs = torch.log_softmax(logits, dim=-1)
        tokens[live, t] = nxt
        logps[live, t] = log_probs.gather(1, nxt.unsqueeze(1)).squeeze(1)
        ended = (nxt == eos) | (limit_row[live] <= t + 1)
        lengths[live[ended]] = t + 1
        if bool(ended.all()):
            break
        if bool(ended.any()):
            keep = (~ended).nonzero(as_tuple=True)[0]
            cache.keep(keep)
            live, nxt = live[keep], nxt[keep]
        live_groups = torch.bincount(owner[live], minlength=n).tolist()
        hidden = cross.step(model, nxt.unsqueeze(1), cache, live_groups, over=over, rows=ln_owner[live])[:, -1]
    used = int(lengths.max())
    return Hypotheses(tokens=tokens[:, :used].clone(), lengths=lengths, logp=logps[:, :used].clone(), groups=groups,
                      seconds=time.perf_counter() - t0, entropy=entropy[:, :used].clone() if greedy else None,
                      no_speech=start.no_speech)


def teacher_forced_hidden(model, cross: CrossKV, prompts: list[Prompt], hyps: Hypotheses, *,
                          over: LayerNormOverrides | None = None, over_rows: list[int] | None = None) -> torch.Tensor:
    """Decoder hidden states ``[R, T, D]``; ``hidden[:, t]`` predicts ``hyps.tokens[:, t]``.  ``over_rows[b]``:
    the row of ``over``'s tables utterance ``b`` uses (as for :func:`decode`)."""
    device = hyps.tokens.device
    plen = len(prompts[0].ids)
    prompt_ids = torch.tensor([p.ids for p in prompts], device=device).repeat_interleave(
        torch.tensor(hyps.groups, device=device), dim=0)
    ids = torch.cat([prompt_ids, hyps.tokens[:, :-1]], dim=1)
    rows = _ln_rows(_row_owner(hyps.groups, device), over_rows) if over is not None else None
    return cross.forward(model, ids, hyps.groups, over=over, rows=rows, start=plen - 1)


def score(model, cross: CrossKV, prompts: list[Prompt], hyps: Hypotheses, *, temperature: float = 1.0,
          backend: str = "auto", over: LayerNormOverrides | None = None, head: Head | None = None,
          over_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``(entropy, logp, mask)``, each ``[R, T]``, differentiable w.r.t. the adapted
    parameters (through ``cross`` when it requires grad, and through ``over``)."""
    head = head or Head(model)
    tokens, mask = hyps.tokens, hyps.mask
    rows, steps = tokens.shape
    device = tokens.device
    hidden = teacher_forced_hidden(model, cross, prompts, hyps, over=over, over_rows=over_rows)
    first_bias, bias = prompts[0].biases(head.vocab_size, device)
    if head.bias is not None:
        first_bias, bias = first_bias + head.bias / temperature, bias + head.bias / temperature
    sel = mask.nonzero(as_tuple=True)
    h = hidden[sel].float() / temperature
    weight = head.weight
    if ops.resolve_backend(backend, h) == "triton" and head.module.weight.dtype != torch.float32:
        h, weight = h.to(head.module.weight.dtype), head.module.weight  # the half-precision kernel, fp32 accumulation
    targets = tokens[sel]
    first = sel[1] == 0
    entropy = torch.zeros(rows, steps, device=device)
    logp = torch.zeros(rows, steps, device=device)
    for part, b in ((first, first_bias), (~first, bias)):
        if bool(part.any()):
            with full_precision(h):
                ent, lp = ops.linear_token_stats(h[part], weight, targets[part], b, backend=backend)
            idx = (sel[0][part], sel[1][part])
            entropy = entropy.index_put(idx, ent.float())
            logp = logp.index_put(idx, lp.float())
    return entropy, logp, mask


def mean_logp(model, cross: CrossKV, prompts: list[Prompt], tokens: list[list[list[int]]], head: Head | None = None,
              over: LayerNormOverrides | None = None) -> list[list[float]]:
    """Mean per-token log-prob (EOS included) of transcripts, teacher forced: ``tokens[b]`` lists the
    transcripts of utterance ``b`` (the same number for each utterance)."""
    eos = prompts[0].eos_id
    per = len(tokens[0])
    rows = [t + [eos] for group in tokens for t in group]
    width = max(len(r) for r in rows)
    device = cross.device
    ids = torch.full((len(rows), width), eos, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=device)
    hyps = Hypotheses(tokens=ids, lengths=torch.tensor([len(r) for r in rows], device=device),
                      logp=torch.zeros(ids.shape, device=device), groups=[per] * len(tokens))
    _, logp, mask = score(model, cross, prompts, hyps, backend="torch", over=over, head=head)
    mean = (logp.sum(1) / mask.sum(1)).tolist()
    return [mean[b * per:(b + 1) * per] for b in range(len(tokens))]
