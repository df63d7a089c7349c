"""The adaptation steps: where the adapted parameters enter the forward pass, and one optimizer step.

Per step, for ``B`` utterances at once: the encoder layers that hold adapted parameters (none: the
encoder ran once, before the loop), the decoder's cross-attention keys/values (once per utterance when
they cannot change), ``K`` hypotheses per utterance with the KV cache, their teacher-forced scores,
each utterance's loss (the objective the config selects), one optimizer step.  Each utterance has its
own copy of the adapted parameters and its own optimizer state (Adam is element-wise), so a batch
gives each utterance what it would get alone.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .objective import em_loss, entropy_rows, suta_loss
from .params import Binding, ModelSnapshot
from .precision import full_precision, step_autocast
from .sampling import Head, Hypotheses, decode, score, teacher_forced_hidden
from .whisper import CrossKV, PaddingContext, cross_kv, encoder_embed, encoder_layers, padding_from

__all__ = ["Encoder", "Settling", "State", "make_optimizer", "step", "update"]


@dataclass
class State:
    """What persists across calls of a continual :class:`fastem.Adapter` (None for episodic calls)."""

    binding: Binding
    optimizer: Any
    steps_taken: int = 0
    source: ModelSnapshot | None = None  # direct parameter sets: the source values (the model holds adapted ones)


def make_optimizer(cfg, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Encoder:
    """The encoder split for adaptation: what runs once per utterance and what runs each step.

    ``start``: the first encoder layer holding an adapted parameter (None: none adapts); ``embed``:
    the convolutions adapt (the embedding runs each step, from the features); ``cross_fixed``: the
    cross-attention keys/values cannot change.  ``prefix``: the input of the part that runs each step
    (features, the embedding, or the hidden states below layer ``start``); ``source``: the source
    model's encoder output and ``cross``: its cross-attention keys/values.  ``short``: the same input
    on the clips' own length (``AdaptConfig.encoder_context="clip"``), which the steps use when the
    encoder adapts; every transcript is decoded from the full 30-s input.  ``speech``: with
    ``encoder_context="speech"``, per utterance its own first positions of the full input (its clip's length) and
    the source model's keys/values and output on the positions after them (:class:`fastem.whisper.PaddingContext`):
    the steps run each utterance's positions over the whole 30-s context, utterances of one length together, so an
    utterance's steps are the same in a batch as alone.
    """

    start: int | None
    embed: bool
    cross_fixed: bool
    prefix: torch.Tensor
    source: torch.Tensor
    cross: CrossKV
    short: torch.Tensor | None = None
    speech: list[tuple[torch.Tensor, PaddingContext]] | None = None

    @classmethod
    def build(cls, model, feats: torch.Tensor, start: int | None, embed: bool, cross_fixed: bool,
              short_frames: int | None = None, speech_frames: list[int] | None = None) -> "Encoder":
        """Run the source model's encoder once (no grad), keeping the split point's input (``short_frames``: and
        the clips' own length; ``speech_frames``: each utterance's, with the source model's padding context; see
        the class)."""
        with torch.no_grad():
            embedded = encoder_embed(model, feats)
            below = encoder_layers(model, embedded, 0, start, final_norm=False) if start else embedded
            padded = speech_frames is not None and start is not None and not embed
            inputs: list[torch.Tensor] | None = [] if padded else None  # the padding context, from the same pass
            last = encoder_layers(model, below, start or 0, final_norm=False, attn_inputs=inputs)
            source = model.get_encoder().layer_norm(last)
            short, speech = None, None
            if padded:
                speech = [(below[b:b + 1, :f // 2],
                           padding_from(model, start, [x[b:b + 1] for x in inputs], last[b:b + 1], f // 2))
                          for b, f in enumerate(speech_frames)]
            elif short_frames is not None and short_frames < feats.shape[-1] and (embed or start is not None):
                clipped = feats[..., :short_frames]
                if embed:
                    short = clipped
                else:
                    e = encoder_embed(model, clipped, shorter=True)
                    short = encoder_layers(model, e, 0, start, final_norm=False) if start else e
        prefix = feats if embed else below
        return cls(start, embed, cross_fixed, prefix, source, cross_kv(model, source), short, speech)

    def select(self, index: list[int]) -> "Encoder":
        return Encoder(self.start, self.embed, self.cross_fixed, self.prefix[index], self.source[index],
                       self.cross.select(index), None if self.short is None else self.short[index],
                       None if self.speech is None else [self.speech[i] for i in index])

    def _speech_layers(self, model, over, rows: torch.Tensor | None) -> torch.Tensor:
        """The adapted encoder's output with each utterance's own positions run over its padding context,
        utterances of one length together."""
        n = len(self.speech)
        rows = rows if rows is not None else torch.arange(n, device=self.prefix.device)
        groups: dict[int, list[int]] = {}
        for j, (positions, _) in enumerate(self.speech):
            groups.setdefault(positions.shape[1], []).append(j)
        parts, order = [], []
        for idx in groups.values():
            padding = PaddingContext.cat([self.speech[j][1] for j in idx])
            parts.append(encoder_layers(model, torch.cat([self.speech[j][0] for j in idx]), self.start, over=over,
                                        rows=rows[idx], padding=padding))
            order += idx
        hidden = torch.cat(parts)
        if order != list(range(n)):
            hidden = hidden[torch.tensor(order, device=hidden.device).argsort()]
        return hidden

    def adapted_cross(self, model, over, *, short: bool = False, autocast=None,
                      rows: torch.Tensor | None = None) -> CrossKV:
        """Cross-attention keys/values under the current adapted parameters (``short``: on the clips' own
        length, where the config asks for it).  ``autocast``: the context the encoder layers run in
        (:func:`fastem.precision.step_autocast`); the keys/values are projected from their output in the
        model's own dtype, so sampling and scoring run as they do without it.  ``rows``: the row of
        ``over``'s tables each utterance of this encoder uses (a :meth:`select`-ed part of the batch)."""
        prefix = self.short if short and self.short is not None else self.prefix
        if self.embed or self.start is not None:
            with autocast if autocast is not None else contextlib.nullcontext():
                if self.embed:
                    hidden = encoder_layers(model, encoder_embed(model, prefix, shorter=True), 0, over=over, rows=rows)
                elif short and self.speech is not None:
                    hidden = self._speech_layers(model, over, rows)
                else:
                    hidden = encoder_layers(model, prefix, self.start, over=over, rows=rows)
            return cross_kv(model, hidden.to(self.source.dtype))
        if not self.cross_fixed:
            return cross_kv(model, self.source)
        return self.cross


def importance_weights(logp: torch.Tensor, hyps: Hypotheses) -> list[torch.Tensor]:
    """Each utterance's self-normalized importance weights (mean 1 over its ``K`` rows) of hypotheses drawn
    earlier: ``p(y) / q(y)`` with ``logp`` their per-token log-probs under the model now and ``hyps.logp`` under
    the distribution they were drawn from (both at the sampling temperature), computed in log space."""
    mask = hyps.mask
    log_ratio = ((logp.detach().double() - hyps.logp.double()) * mask).sum(-1)
    out = []
    for b in range(len(hyps.groups)):
        s = hyps.rows_of(b)
        out.append(torch.softmax(log_ratio[s], 0) * (s.stop - s.start))
    return out


def _losses(model, cfg, cross: CrossKV, prompts, hyps: Hypotheses, binding: Binding,
            head: Head, generators, over_rows=None, reused: bool = False):
    """Each utterance's loss, the hypotheses' per-token entropy and mask (for the history), and (``reused``:
    hypotheses drawn at an earlier step, importance-weighted) each utterance's weights, else None."""
    if cfg.objective == "suta":
        hidden = teacher_forced_hidden(model, cross, prompts, hyps, over=binding.over, over_rows=over_rows)
        first_bias, bias = prompts[0].biases(head.vocab_size, hidden.device)
        mask = hyps.mask
        losses, ents = [], torch.zeros(mask.shape, device=hidden.device)
        for b in range(len(prompts)):
            r = hyps.rows_of(b).start
            n = int(hyps.lengths[r])
            logits = head.logits(hidden[r, :n]) + torch.stack([first_bias] + [bias] * (n - 1))
            z = logits / cfg.sample_temperature
            with full_precision(z):
                losses.append(suta_loss(z, em_coef=cfg.em_coef))
            with torch.no_grad():
                ents[r, :n] = entropy_rows(z)
        return losses, ents, mask, None
    entropy, logp, mask = score(model, cross, prompts, hyps, temperature=cfg.sample_temperature, backend=cfg.backend,
                                over=binding.over, head=head, over_rows=over_rows)
    weights = importance_weights(logp, hyps) if reused else None
    losses = []
    for b in range(len(prompts)):
        s = hyps.rows_of(b)
        losses.append(em_loss(entropy[s], logp[s], mask[s], objective=cfg.objective, baseline=cfg.baseline,
                              reduction=cfg.reduction, generator=generators[b] if generators else None,
                              weights=None if weights is None else weights[b]))
    return losses, entropy.detach(), mask, weights


def update(optimizer, binding: Binding, finite: torch.Tensor) -> None:
    """The optimizer step for the utterances ``finite`` (``[B]`` bool) alone: the others' gradient rows are zeroed
    before it (the optimizer never sees an inf or NaN) and their values and optimizer state are put back after it,
    as if they had not stepped (Adam's step count, one per tensor, counts the step all the same)."""
    if not bool(finite.any()):
        return
    saved = None
    if not bool(finite.all()):
        binding.drop_grads(~finite)
        saved = binding.rows(), binding.optimizer_rows(optimizer)
    optimizer.step()
    binding.after_step()
    if saved is not None:
        binding.undo(saved[0], ~finite, optimizer, saved[1])


def step(model, cfg, binding: Binding, optimizer, encoder: Encoder, prompts, budgets, generators,
         head: Head, frozen: list[bool] | None = None,
         watch: Callable[[list[tuple[int, ...] | None]], list[bool]] | None = None,
         reuse: Hypotheses | None = None) -> tuple[Hypotheses | None, list[dict]]:
    """One optimizer step for the batch; an utterance whose loss or gradient is not finite is not updated,
    nor one that is ``frozen`` (its steps are over while others' go on; where each utterance has its own
    rows of the adapted parameters, the step runs on the others alone).  ``watch``: called with each
    utterance's greedy transcript under the parameters the step starts from (one more row of the step's
    sampling, which draws the same samples as without it; None for a frozen utterance not run), it returns
    the updated ``frozen`` flags; when every utterance is frozen the step ends there, before scoring
    (returns ``None, []``).  Returns the step's hypotheses and one history entry per utterance run (with
    ``greedy``: that transcript, when watched; an empty entry for one not run).  ``reuse``: hypotheses an
    earlier step drew for the same utterances (``AdaptConfig.sample_every``): scored again, importance-weighted,
    instead of drawing new ones (a watched step then decodes the greedy rows alone)."""
    n = len(prompts)
    t0 = time.perf_counter()
    live = [b for b in range(n) if not (frozen and frozen[b])]
    sub = live if binding.over is not None and len(live) < n else None  # run the live utterances alone
    if sub is not None:
        encoder, prompts = encoder.select(sub), [prompts[b] for b in sub]
        budgets, generators = [budgets[b] for b in sub], [generators[b] for b in sub]
    ran = sub if sub is not None else list(range(n))
    binding.before_backward()
    greedy = None
    with torch.enable_grad():
        autocast = step_autocast(cfg.step_precision, model)
        rows = None if sub is None else torch.tensor(sub, device=head.weight.device)
        cross = encoder.adapted_cross(model, binding.over, short=True, autocast=autocast, rows=rows)  # after before_backward
        if reuse is not None:
            hyps = reuse
            if watch is not None:  # the greedy rows alone
                g = decode(model, cross.detach(), prompts, greedy=True, max_new_tokens=budgets, over=binding.over,
                           head=head, over_rows=sub)
                greedy = [tuple(g.row(j, eos_id=prompts[j].eos_id)) for j in range(len(ran))]
        else:
            hyps = decode(model, cross.detach(), prompts, num_samples=cfg.num_samples,
                          greedy=cfg.uses_greedy_hypotheses, temperature=cfg.sample_temperature, max_new_tokens=budgets,
                          generators=generators, over=binding.over, head=head, with_greedy=watch is not None,
                          over_rows=sub)
            if watch is not None and cfg.uses_greedy_hypotheses:  # the hypotheses are the greedy transcripts
                greedy = [tuple(hyps.row(j, eos_id=prompts[j].eos_id)) for j in range(len(ran))]
            elif watch is not None:
                greedy, hyps = hyps.split_greedy(prompts[0].eos_id)
        if watch is not None:
            seen: list[tuple[int, ...] | None] = [None] * n
            for j, b in enumerate(ran):
                seen[b] = greedy[j]
            frozen = watch(seen)
            if all(frozen):
                binding.zero_grad()
                return None, []
        losses, entropy, mask, weights = _losses(model, cfg, cross, prompts, hyps, binding, head, generators,
                                                 over_rows=sub, reused=reuse is not None)
        finite = torch.zeros(n, dtype=torch.bool)
        for j, b in enumerate(ran):
            finite[b] = bool(torch.isfinite(losses[j])) and not (frozen and frozen[b])
        if bool(finite.any()):
            sum(loss for loss, b in zip(losses, ran) if finite[b]).backward()
    binding.after_backward()
    finite &= binding.grad_finite(n)
    update(optimizer, binding, finite)
    binding.zero_grad()
    elapsed = time.perf_counter() - t0
    entries: list[dict] = [{} for _ in range(n)]
    for j, b in enumerate(ran):
        s = hyps.rows_of(j)
        m = mask[s]
        entries[b] = {"loss": float(losses[j].detach()), "entropy": float((entropy[s] * m).sum() / m.sum().clamp_min(1)),
                      "length": float(hyps.lengths[s].float().mean()), "tokens": int(hyps.lengths[s].sum()),
                      "seconds": elapsed, "skipped": not bool(finite[b]), "reused": reuse is not None}
        if weights is not None:  # the effective number of samples, (sum w)^2 / sum w^2
            entries[b]["ess"] = float(weights[j].sum() ** 2 / (weights[j] ** 2).sum())
        if greedy is not None:
            entries[b]["greedy"] = list(greedy[j])
    return hyps, entries


class Settling:
    """The stopping rule of ``AdaptConfig.stop_when_settled``: an utterance's steps end once its greedy
    transcript has come out the same at the start of ``updates + 1`` steps in a row (``updates`` updates in a
    row left it unchanged).  Call it with each step's greedy transcripts; it returns the ``frozen`` flags."""

    def __init__(self, n: int, updates: int):
        self.updates = updates
        self.frozen = [False] * n
        self.seen: list[list[tuple[int, ...]]] = [[] for _ in range(n)]

    def __call__(self, greedy: list[tuple[int, ...] | None]) -> list[bool]:
        for j, g in enumerate(greedy):
            if not self.frozen[j] and g is not None:
                self.seen[j].append(g)
                self.frozen[j] = self.settled(j)
        return self.frozen

    def settled(self, j: int) -> bool:
        """Whether utterance ``j``'s last ``updates + 1`` greedy transcripts are one and the same."""
        seen = self.seen[j]
        return self.updates > 0 and len(seen) > self.updates and len(set(seen[-(self.updates + 1):])) == 1
