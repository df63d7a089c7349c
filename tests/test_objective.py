"""Exactness of the objective on a tiny autoregressive model where every sequence can be enumerated.

The model: vocabulary {0 = EOS, 1, 2, 3}, sequences stop at EOS or after ``MAX_LEN`` tokens, and the
next-token logits are a free float64 table indexed by the prefix.  ``H(Y|x)`` and its gradient are
computed by enumerating all sequences; the *expected* gradient of ``em_loss`` is computed by
enumerating all samples (all pairs for ``K = 2``) weighted by their probabilities.  Nothing is
sampled, so agreement to 1e-8 means the estimator is exact in expectation.

The two terms of ``grad H(Y|x)`` (fastem.objective's docstring) are also enumerated separately, each
by its own explicit loops (the cost-to-go without :func:`fastem.objective.cost_to_go`), and so is
the ``pg`` ablation's expectation (sequence cost times score): each objective's expected gradient
is checked against the quantity it claims to estimate, not only against "not exact".  The random
logit table is seeded (``THETA_SEED``).
"""
import itertools
import math

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


def expected_surrogate_grad(theta, k, drawn_from=None, weighted=True, **loss_kwargs):
    """sum over all K-tuples of samples of p(y^1)...p(y^K) * grad em_loss(y^1..y^K).

    The gradient of a weighted sum is the weighted sum of the gradients (the weights are constants):
    one backward pass.  Each sequence's rows come from one :func:`batch_stats` call over all
    sequences (a sequence's statistics do not depend on the batch it is drawn in).  ``drawn_from``: the
    samples are drawn from another table q instead (probabilities q(y^1)...q(y^K)) and enter em_loss with the
    importance weights p(y^k) / q(y^k) (``weighted=False``: without them)."""
    with torch.no_grad():
        probs = {s: seq_logprob_and_entropies(theta, s)[0].exp().item() for s in SEQS}
        draw = probs if drawn_from is None else {s: seq_logprob_and_entropies(drawn_from, s)[0].exp().item() for s in SEQS}
    th = theta.detach().requires_grad_(True)
    entropy, logp, mask = batch_stats(th, SEQS)
    total = th.new_zeros(())
    for combo in itertools.product(range(len(SEQS)), repeat=k):
        weight = 1.0
        for i in combo:
            weight *= draw[SEQS[i]]
        rows = list(combo)
        if drawn_from is not None:
            ratio = [probs[SEQS[i]] / draw[SEQS[i]] if weighted else 1.0 for i in combo]
            loss_kwargs["weights"] = torch.tensor(ratio, dtype=torch.float64)
        total = total + weight * em_loss(entropy[rows], logp[rows], mask[rows], **loss_kwargs)
    (grad,) = torch.autograd.grad(total, th)
    return grad


THETA_SEED = 20240611


@pytest.fixture
def theta():
    # Seeded random logits, scaled so that the entropies are far from uniform.
    gen = torch.Generator().manual_seed(THETA_SEED)
    return (torch.randn(len(PREFIXES), V, dtype=torch.float64, generator=gen) * 1.5).requires_grad_(True)


def exact_grad(theta):
    (g,) = torch.autograd.grad(exact_entropy(theta), theta)
    return g


def _enumerated_grad(theta, per_sequence):
    """sum_y p(y) * grad f(y), with p(y) held constant; ``per_sequence(logp [L], entropy [L])`` is the
    differentiable f(y) built from the per-step log-probs and entropies of y."""
    th = theta.detach().requires_grad_(True)
    total = th.new_zeros(())
    for seq in SEQS:
        rows = torch.stack([th[INDEX[seq[:t]]] for t in range(len(seq))])
        entropy, logp = token_stats(rows, torch.tensor(seq))
        total = total + logp.sum().exp().detach() * per_sequence(logp, entropy)
    (g,) = torch.autograd.grad(total, th)
    return g


def entropy_part(theta):
    """E_y[ sum_t grad H_t ]: the entropies' own gradient at the visited prefixes."""
    return _enumerated_grad(theta, lambda logp, entropy: entropy.sum())


def cost_to_go_part(theta):
    """E_y[ sum_s (sum_{t>s} H_t) grad logp_s ], written out as loops over s and t > s."""
    def f(logp, entropy):
        h = entropy.detach()
        out = logp.new_zeros(())
        for s in range(len(logp)):
            cost = sum((h[t] for t in range(s + 1, len(h))), h.new_zeros(()))
            out = out + cost * logp[s]
        return out

    return _enumerated_grad(theta, f)


def sequence_cost_part(theta):
    """E_y[ R(y) grad log p(y) ] with R = sum_t H_t: what objective="pg" estimates."""
    return _enumerated_grad(theta, lambda logp, entropy: entropy.detach().sum() * logp.sum())


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


@pytest.mark.parametrize("k,baseline", [(1, "none"), (2, "loo")])
def test_em_expectation_is_entropy_term_plus_cost_to_go_term(theta, k, baseline):
    """E grad em = E grad entropy-objective + E[sum_s C_s grad logp_s], each against its own enumeration.

    The two enumerated terms sum to grad H(Y|x) (the identity the objective rests on) and neither is
    negligible, so dropping or corrupting either one shows."""
    ent, to_go = entropy_part(theta), cost_to_go_part(theta)
    assert ent.abs().max() > 1e-2 and to_go.abs().max() > 1e-2
    torch.testing.assert_close(ent + to_go, exact_grad(theta), atol=1e-10, rtol=0)
    ent_obj = expected_surrogate_grad(theta, 1, objective="entropy", baseline="none")
    torch.testing.assert_close(ent_obj, ent, atol=1e-10, rtol=0)
    em = expected_surrogate_grad(theta, k, objective="em", baseline=baseline)
    torch.testing.assert_close(em - ent_obj, to_go, atol=1e-8, rtol=0)


@pytest.mark.parametrize("k,baseline", [(1, "none"), (2, "loo")])
def test_pg_expectation_is_sequence_cost_times_score(theta, k, baseline):
    """E grad pg = E[R(y) grad log p(y)], its own enumeration.

    That equals the cost-to-go term: R - C_s = sum_{t<=s} H_t is fixed by the prefix y_<s, and
    E[grad logp_s | y_<s] = 0.  So in expectation pg is exactly the score-function term of grad H(Y|x)
    (the past entropies only add variance) and misses the entropy term (test_partial_objectives_are_not_exact).
    The same argument makes a cost-to-go that wrongly includes H_s unbiased: only the per-batch test
    test_one_batch_gradient_matches_explicit_loops can see that."""
    want = sequence_cost_part(theta)
    got = expected_surrogate_grad(theta, k, objective="pg", baseline=baseline)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
    torch.testing.assert_close(want, cost_to_go_part(theta), atol=1e-10, rtol=0)


@pytest.mark.parametrize("objective", ["entropy", "pg"])
def test_partial_objectives_are_not_exact(theta, objective):
    want = exact_grad(theta)
    got = expected_surrogate_grad(theta, 1, objective=objective, baseline="none")
    assert (got - want).abs().max() > 1e-3


def explicit_policy_surrogate(theta, seqs, objective, baseline):
    """The score-function part of em_loss (reduction="sum") for one batch, written out with loops:
    cost C_s^k = sum_{t>s} H_t^k ("em") or R^k = sum_t H_t^k ("pg"), baseline 0 ("none") or the mean
    of the other samples' costs ("loo": at the same position for "em", where a shorter sample's cost
    is 0; the other sequences' R^j for "pg", whose baseline is per sequence)."""
    steps = []
    for seq in seqs:
        rows = torch.stack([theta[INDEX[seq[:t]]] for t in range(len(seq))])
        entropy, logp = token_stats(rows, torch.tensor(seq))
        steps.append((logp, [h.item() for h in entropy]))

    def cost(k, s):
        h = steps[k][1]
        if objective == "pg":
            return sum(h)
        return sum(h[t] for t in range(s + 1, len(h)))    # 0 past the end

    K = len(seqs)
    total = theta.new_zeros(())
    for k, (logp, h) in enumerate(steps):
        for s in range(len(h)):
            b = 0.0 if baseline == "none" else sum(cost(j, s) for j in range(K) if j != k) / (K - 1)
            total = total + (cost(k, s) - b) * logp[s]
    return total / K


@pytest.mark.parametrize("baseline", ["none", "loo"])
@pytest.mark.parametrize("objective", ["em", "pg"])
def test_one_batch_gradient_matches_explicit_loops(theta, objective, baseline):
    """Per batch (no expectation): grad em = grad entropy-objective + grad of the score term written
    with loops, and grad pg = grad of its score term; sequences of lengths 1, 2, 3 and 3."""
    seqs = [(0,), (1, 0), (2, 3, 1), (3, 1, 0)]
    stats = batch_stats(theta, seqs)
    (got,) = torch.autograd.grad(em_loss(*stats, objective=objective, baseline=baseline), theta)
    (want,) = torch.autograd.grad(explicit_policy_surrogate(theta, seqs, objective, baseline), theta)
    if objective == "em":
        (g_ent,) = torch.autograd.grad(em_loss(*batch_stats(theta, seqs), objective="entropy"), theta)
        want = want + g_ent
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


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
    gen = torch.Generator().manual_seed(7)
    entropy = torch.rand(3, 5, generator=gen)
    logp = -torch.rand(3, 5, generator=gen)
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


def _coins(seed: int, k: int) -> torch.Tensor:
    return torch.randint(0, 2, (k, 1), generator=torch.Generator().manual_seed(seed)).to(torch.float64)


def test_random_objective_is_pg_with_a_coin_for_reward(theta):
    """One batch: the score term with cost R^k, a fair coin per sample drawn from the generator (the same
    draw a fresh generator with that seed gives), leave-one-out baseline over the coins; no entropy term."""
    seqs = [(0,), (1, 0), (2, 3, 1), (3, 1, 0)]
    coins = _coins(7, len(seqs))
    assert 0 < coins.sum() < len(seqs)  # both rewards occur: a draw ignoring the coins would differ
    loss = em_loss(*batch_stats(theta, seqs), objective="random", generator=torch.Generator().manual_seed(7))
    (got,) = torch.autograd.grad(loss, theta)
    total = theta.new_zeros(())
    for k, seq in enumerate(seqs):
        rows = torch.stack([theta[INDEX[seq[:t]]] for t in range(len(seq))])
        _, logp = token_stats(rows, torch.tensor(seq))
        b = (coins.sum() - coins[k]) / (len(seqs) - 1)
        total = total + (coins[k, 0] - b[0]) * logp.sum()
    (want,) = torch.autograd.grad(total / len(seqs), theta)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k,baseline", [(2, "none"), (3, "loo")])
def test_random_objective_has_zero_expected_gradient(theta, k, baseline):
    """The coins are independent of the samples, so E[(R - b) grad log p(y)] = 0: by enumeration over every
    K-tuple of sequences, each drawing the same coins (a fresh generator, same seed).  A reward that leaked
    the sequences' entropies would not cancel."""
    with torch.no_grad():
        probs = {s: seq_logprob_and_entropies(theta, s)[0].exp().item() for s in SEQS}
    th = theta.detach().requires_grad_(True)
    entropy, logp, mask = batch_stats(th, SEQS)
    total, scale = th.new_zeros(()), th.new_zeros(())
    for combo in itertools.product(range(len(SEQS)), repeat=k):
        weight = math.prod(probs[SEQS[i]] for i in combo)
        rows = list(combo)
        loss = em_loss(entropy[rows], logp[rows], mask[rows], objective="random", baseline=baseline,
                       generator=torch.Generator().manual_seed(11))
        total = total + weight * loss
        scale = scale + weight * loss.abs()  # the per-batch losses are not all zero
    (got,) = torch.autograd.grad(total, th)
    assert scale.item() > 1e-2
    torch.testing.assert_close(got, torch.zeros_like(got), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k,baseline", [(1, "none"), (2, "loo")])
def test_importance_weighted_samples_of_another_model_give_the_exact_gradient(theta, k, baseline):
    """Samples drawn from another model q (as when the loop reuses an earlier step's hypotheses), each weighted by
    p(y)/q(y): the expected gradient of em_loss is grad H(Y|x) of the model now, exactly; without the weights it
    is not (the test can fail)."""
    gen = torch.Generator().manual_seed(5)
    theta_q = theta.detach() + 0.8 * torch.randn(theta.shape, dtype=torch.float64, generator=gen)
    want = exact_grad(theta)
    got = expected_surrogate_grad(theta, k, drawn_from=theta_q, objective="em", baseline=baseline)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=0)
    unweighted = expected_surrogate_grad(theta, k, drawn_from=theta_q, weighted=False, objective="em", baseline=baseline)
    assert (unweighted - want).abs().max() > 1e-3


def test_weights_scale_each_samples_terms(theta):
    """Per batch: with weights w, each sample's own terms (its entropies and its advantage-weighted log-probs) are
    multiplied by w_k, while the leave-one-out baseline still takes every sample's cost as it is; unit weights
    change nothing, bit for bit."""
    seqs = [(0,), (1, 0), (2, 3, 1), (3, 1, 0)]
    entropy, logp, mask = batch_stats(theta, seqs)
    plain = em_loss(entropy, logp, mask)
    assert torch.equal(em_loss(entropy, logp, mask, weights=torch.ones(4, dtype=torch.float64)), plain)
    w = torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=torch.float64)
    got = em_loss(entropy, logp, mask, weights=w)
    # by hand: each sample's own terms (entropy sum and its advantage-weighted log-probs), weighted
    m = mask.double()
    ent = entropy * m
    cost = cost_to_go(ent.detach())
    base = (cost.sum(0, keepdim=True) - cost) / 3
    per = ent.sum(-1) + ((cost - base) * m * logp * m).sum(-1)
    torch.testing.assert_close(got, (w * per).sum() / 4, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="weights"):
        em_loss(entropy, logp, mask, weights=torch.ones(3))
