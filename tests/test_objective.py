"""Exactness of the objective on a tiny autoregressive model where every sequence can be enumerated.

The model: vocabulary {0 = EOS, 1, 2, 3}, sequences stop at EOS or after ``MAX_LEN`` tokens, and the
next-token logits are a free float64 table indexed by the prefix.  ``H(Y|x)`` and its gradient are
computed by enumerating all sequences; the *expected* gradient of ``em_loss`` is computed by
enumerating all samples (all pairs for ``K = 2``) weighted by their probabilities.  Nothing is
sampled, so agreement to 1e-8 means the estimator is exact in expectation.
"""
import itertools

import pytest
import torch

from fastem.objective import cost_to_go, em_loss
from fastem.ops import token_stats

V, EOS, MAX_LEN = 4, 0, 3


def all_prefixes():
    out = [()]
    for n in range(1, MAX_LEN):
        out += [p for p in itertools.product(range(1, V), repeat=n)]
    return out


PREFIXES = all_prefixes()
INDEX = {p: i for i, p in enumerate(PREFIXES)}


def all_sequences():
    seqs = []

    def grow(prefix):
        for tok in range(V):
            seq = prefix + (tok,)
            if tok == EOS or len(seq) == MAX_LEN:
                seqs.append(seq)
            else:
                grow(seq)

    grow(())
    return seqs


SEQS = all_sequences()


def seq_logprob_and_entropies(theta, seq):
    """log p(seq) and the per-step entropies [H_1..H_L] (both differentiable)."""
    rows = torch.stack([theta[INDEX[seq[:t]]] for t in range(len(seq))])
    targets = torch.tensor(seq)
    entropy, logp = token_stats(rows, targets)
    return logp.sum(), entropy


def exact_entropy(theta):
    total = theta.new_zeros(())
    for seq in SEQS:
        lp, ent = seq_logprob_and_entropies(theta, seq)
        total = total + lp.exp() * ent.sum()
    return total


def batch_stats(theta, seqs):
    """entropy, logp, mask [K, MAX_LEN] for a batch of sequences, as the adaptation loop builds them."""
    k = len(seqs)
    entropy = theta.new_zeros(k, MAX_LEN)
    logp = theta.new_zeros(k, MAX_LEN)
    mask = torch.zeros(k, MAX_LEN, dtype=torch.bool)
    rows, targets, where = [], [], []
    for i, seq in enumerate(seqs):
        for t in range(len(seq)):
            rows.append(theta[INDEX[seq[:t]]])
            targets.append(seq[t])
            where.append((i, t))
            mask[i, t] = True
    ent, lp = token_stats(torch.stack(rows), torch.tensor(targets))
    idx = torch.tensor(where)
    entropy = entropy.index_put((idx[:, 0], idx[:, 1]), ent)
    logp = logp.index_put((idx[:, 0], idx[:, 1]), lp)
    return entropy, logp, mask


def expected_surrogate_grad(theta, k, **loss_kwargs):
    """sum over all K-tuples of samples of p(y^1)...p(y^K) * grad em_loss(y^1..y^K)."""
    with torch.no_grad():
        probs = {s: seq_logprob_and_entropies(theta, s)[0].exp().item() for s in SEQS}
    grad = torch.zeros_like(theta)
    for combo in itertools.product(SEQS, repeat=k):
        weight = 1.0
        for s in combo:
            weight *= probs[s]
        th = theta.detach().requires_grad_(True)
        loss = em_loss(*batch_stats(th, list(combo)), **loss_kwargs)
        (g,) = torch.autograd.grad(loss, th)
        grad += weight * g
    return grad


@pytest.fixture
def theta():
    # Fresh random logits each run, scaled so that the entropies are far from uniform.
    return (torch.randn(len(PREFIXES), V, dtype=torch.float64) * 1.5).requires_grad_(True)


def exact_grad(theta):
    (g,) = torch.autograd.grad(exact_entropy(theta), theta)
    return g


def test_enumeration_covers_probability_one(theta):
    with torch.no_grad():
        total = sum(seq_logprob_and_entropies(theta, s)[0].exp() for s in SEQS)
    assert abs(total.item() - 1.0) < 1e-12


@pytest.mark.parametrize("baseline", ["none", "loo"])
@pytest.mark.parametrize("k", [1, 2])
def test_em_gradient_is_exact_in_expectation(theta, k, baseline):
    want = exact_grad(theta)
    got = expected_surrogate_grad(theta, k, objective="em", baseline=baseline)
    assert torch.isfinite(got).all()
    assert want.abs().max() > 1e-3  # the test is not vacuous
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)


@pytest.mark.parametrize("objective", ["entropy", "pg"])
def test_partial_objectives_are_not_exact(theta, objective):
    want = exact_grad(theta)
    got = expected_surrogate_grad(theta, 1, objective=objective, baseline="none")
    assert (got - want).abs().max() > 1e-3


def test_partial_objectives_sum_to_the_full_one_without_baseline(theta):
    """entropy + (pg with cost-to-go) = em; pg's whole-sequence cost differs only by the past entropies."""
    seqs = [SEQS[3], SEQS[-1]]
    stats = batch_stats(theta, seqs)
    em = em_loss(*stats, objective="em", baseline="none")
    ent = em_loss(*stats, objective="entropy", baseline="none")
    (g_em,) = torch.autograd.grad(em, theta, retain_graph=True)
    (g_ent,) = torch.autograd.grad(ent, theta, retain_graph=True)
    # The remaining piece is the score-function term with the cost-to-go.
    entropy, logp, mask = stats
    m = mask.double()
    pg_to_go = (cost_to_go((entropy * m).detach()) * logp * m).sum() / len(seqs)
    (g_pg,) = torch.autograd.grad(pg_to_go, theta)
    torch.testing.assert_close(g_em, g_ent + g_pg, atol=1e-12, rtol=0)


def test_mean_baseline_scales_the_policy_gradient(theta):
    """'mean' includes the sample itself: in expectation its score term is (K-1)/K of the exact one."""
    k = 2
    full = expected_surrogate_grad(theta, k, objective="em", baseline="mean")
    ent_only = expected_surrogate_grad(theta, 1, objective="entropy", baseline="none")
    exact = exact_grad(theta)
    torch.testing.assert_close(full - ent_only, (exact - ent_only) * (k - 1) / k, atol=1e-8, rtol=0)


def test_cost_to_go_and_masking():
    h = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.25, 0.0, 0.0]])
    torch.testing.assert_close(cost_to_go(h), torch.tensor([[5.0, 3.0, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0]]))
    # Padding after EOS must not change the loss, whatever values it holds.
    entropy = torch.tensor([[1.0, 2.0, 7.0], [3.0, 9.0, 9.0]], requires_grad=True)
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    base = em_loss(entropy, logp, mask)
    garbage_e = entropy.detach().clone()
    garbage_e[~mask] = 123.0
    garbage_l = logp.detach().clone()
    garbage_l[~mask] = -99.0
    assert em_loss(garbage_e, garbage_l, mask).item() == pytest.approx(base.item())
    base.backward()
    assert (entropy.grad[~mask] == 0).all() and (logp.grad[~mask] == 0).all()


def test_reductions_and_bad_arguments():
    entropy = torch.rand(3, 5)
    logp = -torch.rand(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    s = em_loss(entropy, logp, mask, reduction="sum")
    m = em_loss(entropy, logp, mask, reduction="mean")
    assert s.item() * 3 / mask.sum().item() == pytest.approx(m.item())
    with pytest.raises(ValueError, match="objective"):
        em_loss(entropy, logp, mask, objective="kl")
    with pytest.raises(ValueError, match="baseline"):
        em_loss(entropy, logp, mask, baseline="ema")
    with pytest.raises(ValueError, match="reduction"):
        em_loss(entropy, logp, mask, reduction="max")
    with pytest.raises(ValueError, match="same shape"):
        em_loss(entropy, logp[:, :4], mask)
