"""Beam search for ``B`` utterances at once, on the same decoder, cache and logit rules as the sampler.

The algorithm is the one ``transformers``' ``generate(num_beams=k)`` runs by default, so that a
transcript decoded here equals the one a user gets from ``generate`` with the same beams: each step
keeps the ``2k`` best continuations of the ``k`` running beams (log-probs of the whole vocabulary,
suppressed tokens removed afterwards, as ``generate``'s logits processors do), finishes those among the
best ``k`` that end (end of text, or the token budget), scores a finished hypothesis by its total
log-prob over its length (length penalty 1), and stops an utterance when it has ``k`` finished
hypotheses and no running beam could still beat the worst of them.  The self-attention cache is
reordered in place each step; the encoder output is shared by an utterance's beams.

Besides the tokens, each hypothesis carries the log-prob of each of its tokens and the entropy of each
step's next-token distribution along its path, both under the distribution with the suppressed tokens
removed (as a greedy transcript records them: Whisper's average log-prob and the gate's evidence).
"""
from __future__ import annotations

import time

import torch

from .sampling import Head, Hypotheses, Prompt, start_rows
from .whisper import CrossKV, LayerNormOverrides

__all__ = ["beam_search"]


@torch.no_grad()
def beam_search(model, cross: CrossKV, prompts: list[Prompt], *, num_beams: int, max_new_tokens: int | list[int],
                over: LayerNormOverrides | None = None, head: Head | None = None, over_rows: list[int] | None = None,
                no_speech_id: int | None = None, length_penalty: float = 1.0) -> Hypotheses:
    """The best hypothesis of each utterance (one row each: ``groups`` all 1), with per-token ``logp`` and
    ``entropy`` along its path; arguments as :func:`fastem.sampling.decode`."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams!r}")
    t0 = time.perf_counter()
    n, k = len(prompts), num_beams
    head = head or Head(model)
    device = cross.device
    start = start_rows(model, cross, prompts, k, max_new_tokens, over=over, over_rows=over_rows, head=head,
                       no_speech_id=no_speech_id)
    limits, groups, ln_owner, hidden, cache = start.limits, start.groups, start.ln_owner, start.hidden, start.cache
    steps, eos, rows = max(limits), prompts[0].eos_id, n * k
    first_bias, bias = prompts[0].biases(head.vocab_size, device)
    running = torch.full((n, k), float("-inf"), device=device)
    running[:, 0] = 0.0  # one live beam to start from
    seq = torch.full((rows, steps), eos, dtype=torch.long, device=device)
    seq_lp = torch.zeros((rows, steps), device=device)
    seq_ent = torch.zeros((rows, steps), device=device)
    finished: list[list[tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
    done = [False] * n
    base = torch.arange(n, device=device).unsqueeze(1) * k
    for t in range(steps):
        logits = head.logits(hidden)
        b_ias = first_bias if t == 0 else bias
        log_probs = torch.log_softmax(logits, dim=-1) + b_ias  # generate's order: normalise, then suppress
        processed = torch.log_softmax(logits + b_ias, dim=-1)
        entropy = torch.special.entr(processed.exp()).sum(-1)
        vocab = log_probs.shape[-1]
        cand = (running.reshape(rows, 1) + log_probs).view(n, k * vocab)
        top, idx = cand.topk(2 * k, dim=-1)
        src = idx // vocab + base  # the row each candidate continues
        tok = idx % vocab
        next_src = torch.empty((n, k), dtype=torch.long, device=device)
        next_tok = torch.full((n, k), eos, dtype=torch.long, device=device)
        next_score = torch.full((n, k), float("-inf"), device=device)
        top_l, src_l, tok_l = top.tolist(), src.tolist(), tok.tolist()
        for b in range(n):
            if done[b]:
                next_src[b] = base[b, 0] + torch.arange(k, device=device)
                continue
            kept = 0
            for j in range(2 * k):
                score, row, token = top_l[b][j], src_l[b][j], tok_l[b][j]
                if score == float("-inf"):
                    break
                if token == eos or t + 1 >= limits[b]:  # this continuation stops here
                    if j < k:  # only the best k may finish (generate's rule)
                        length = t + 1
                        tokens = torch.cat([seq[row, :t], torch.tensor([token], device=device)])
                        lps = torch.cat([seq_lp[row, :t], processed[row, token:token + 1]])
                        ents = torch.cat([seq_ent[row, :t], entropy[row:row + 1]])
                        finished[b].append((score / (length ** length_penalty), length, tokens, lps, ents))
                        finished[b].sort(key=lambda f: -f[0])
                        del finished[b][k:]
                    continue
                if kept < k:
                    next_src[b, kept], next_tok[b, kept], next_score[b, kept] = row, token, score
                    kept += 1
            for j in range(kept, k):  # fewer than k live continuations: pad with dead beams
                next_src[b, j] = base[b, 0]
            worst = finished[b][-1][0] if len(finished[b]) == k else float("-inf")
            best_running = float(next_score[b, 0]) / ((t + 1) ** length_penalty) if kept else float("-inf")
            if kept == 0 or (len(finished[b]) == k and best_running <= worst):
                done[b] = True
        if all(done) or t + 1 >= steps:
            break
        flat_src = next_src.reshape(-1)
        seq, seq_lp, seq_ent = seq[flat_src], seq_lp[flat_src], seq_ent[flat_src]
        step_lp = processed[flat_src, next_tok.reshape(-1)]
        step_ent = entropy[flat_src]
        seq[:, t] = next_tok.reshape(-1)
        seq_lp[:, t] = step_lp
        seq_ent[:, t] = step_ent
        running = next_score
        cache.keep(flat_src)
        hidden = cross.step(model, next_tok.reshape(-1, 1), cache, groups, over=over, rows=ln_owner)[:, -1]
    width = max(f[0][1] if f else 1 for f in finished)
    tokens = torch.full((n, width), eos, dtype=torch.long, device=device)
    logp = torch.zeros((n, width), device=device)
    ent = torch.zeros((n, width), device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    for b, f in enumerate(finished):
        _, length, toks, lps, ents = f[0]
        tokens[b, :length], logp[b, :length], ent[b, :length], lengths[b] = toks, lps, ents, length
    return Hypotheses(tokens=tokens, lengths=lengths, logp=logp, groups=[1] * n, seconds=time.perf_counter() - t0,
                      entropy=ent, no_speech=start.no_speech)
