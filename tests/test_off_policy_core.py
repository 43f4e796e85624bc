"""The off-policy correction of stale tokens (core): ratios, weights, gradients and metrics, computed by hand."""

import math

import pytest
import torch

from k15_plugin.core import (
    effective_sample_size,
    gradient_weighted,
    importance_log_ratios,
    mirror_descent_terms,
    off_policy_weights,
    outside_share,
    sequence_logps,
)

LN = math.log


def test_log_ratios_are_pi_i_over_mu_on_stale_tokens_with_a_known_behaviour_log_prob():
    logps = torch.tensor([[-1.0, -2.0, -3.0, -0.5]])
    behaviour = torch.tensor([[-1.5, math.nan, -1.0, -0.5]])
    stale = torch.tensor([[True, True, False, True]])
    # -1 - (-1.5) = 0.5; unknown mu: 0 (ratio 1); current token: 0; -0.5 - (-0.5) = 0
    assert importance_log_ratios(logps, behaviour, stale).tolist() == [[0.5, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="stale must be a bool tensor"):
        importance_log_ratios(logps, behaviour, stale.int())
    with pytest.raises(ValueError, match="behaviour_logps must have shape"):
        importance_log_ratios(logps, behaviour[:, :2], stale)


# ratios 4, 1/4, 1.5, 1 (row 0) and 3, 1.5, 1, 1 with the last token padding (row 1); cap 2
LOG_RATIOS = torch.tensor([[LN(4), LN(0.25), LN(1.5), 0.0], [LN(3), LN(1.5), 0.0, LN(100)]])
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.mark.parametrize(
    ("correction", "expected"),
    [
        ("none", [[1, 1, 1, 1], [1, 1, 1, 1]]),
        ("token_is", [[2, 0.25, 1.5, 1], [2, 1.5, 1, 2]]),  # min(rho, 2); rho 1/4 stays (no lower bound)
        ("token_mask", [[0, 0, 1.5, 1], [0, 1.5, 1, 0]]),  # rho inside [1/2, 2], else 0
        # row 0: 4 * 1/4 * 1.5 * 1 = 1.5, inside: 1.5 on every token; row 1: 3 * 1.5 * 1 = 4.5 (padding left out) > 2
        ("sequence_mask", [[1.5, 1.5, 1.5, 1.5], [0, 0, 0, 0]]),
    ],
)
def test_weights_of_each_correction_by_hand(correction, expected):
    weights = off_policy_weights(LOG_RATIOS, MASK, correction, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))


def test_mask_bounds_are_inclusive_and_bad_arguments_are_refused():
    at_bounds = torch.tensor([[LN(2.0), LN(0.5)]])
    assert off_policy_weights(at_bounds, torch.ones(1, 2), "token_mask", 2.0)[0].tolist() == pytest.approx([2.0, 0.5])
    with pytest.raises(ValueError, match="correction must be one of"):
        off_policy_weights(LOG_RATIOS, MASK, "token_truncate", 2.0)
    with pytest.raises(ValueError, match="cap must be a finite number > 1"):
        off_policy_weights(LOG_RATIOS, MASK, "token_is", 1.0)


def test_gradient_weighted_keeps_values_and_scales_each_tokens_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    weights = torch.tensor([[2.0, 0.0, 0.25]])
    out = gradient_weighted(logps, weights)
    assert out.tolist() == logps.tolist()
    (grad,) = torch.autograd.grad(out.sum(), logps)
    assert grad.tolist() == [[2.0, 0.0, 0.25]]
    # through a ratio to pi_i, as a PPO-style loss takes it: d/dl exp(sum l - old) = exp(...) * w per token
    old = torch.tensor([-3.0])
    (grad,) = torch.autograd.grad(torch.exp(gradient_weighted(logps, weights).sum(1) - old).sum(), logps)
    c1 = math.exp(-3.5 + 3.0)
    torch.testing.assert_close(grad, torch.tensor([[2 * c1, 0.0, 0.25 * c1]]))


def test_the_corrected_mirror_descent_gradient_by_hand():
    """One sample, two tokens with log-probs l = (-1, -2), pi_i = (-1.5, -2) (a later pass), advantage A = 0.5,
    tau = 1, token weights w = (2, 1/4): the policy term's gradient is -A w_t = (-1, -0.125); the squared term's is
    tau * (sum l - sum pi_i) = 0.5 on each token, unweighted; in all (-0.5, 0.375)."""
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    pi_i = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2)
    w = torch.tensor([[2.0, 0.25]])
    old = sequence_logps(pi_i, mask)
    corrected = sequence_logps(gradient_weighted(logps, w), mask)
    policy_term, l2_term = mirror_descent_terms(
        sequence_logps(logps, mask), old, torch.tensor([0.5]), 1.0, None, corrected
    )
    assert policy_term.item() == pytest.approx(1.5)  # -0.5 * (-3): the value of the uncorrected term
    assert l2_term.item() == pytest.approx(0.125)  # 1/2 * (-3 + 3.5)^2
    (grad,) = torch.autograd.grad((policy_term + l2_term).sum(), logps)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.375]]))
    # without a correction the policy term's gradient is -A on every token: -0.5 + 0.5 = 0
    policy_term, l2_term = mirror_descent_terms(sequence_logps(logps, mask), old, torch.tensor([0.5]), 1.0)
    (grad,) = torch.autograd.grad((policy_term + l2_term).sum(), logps)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="policy_seq_logps must have 1 elements"):
        mirror_descent_terms(old, old, torch.tensor([0.5]), 1.0, None, torch.zeros(2))


def test_effective_sample_size_by_hand():
    assert effective_sample_size(torch.zeros(4)) == pytest.approx(1.0)  # equal weights
    assert effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf, -math.inf])) == pytest.approx(0.25)
    assert effective_sample_size(torch.tensor([LN(2), 0.0])) == pytest.approx(9 / 10)  # (2+1)^2 / (2 * (4+1))
    masked = effective_sample_size(torch.tensor([[LN(2), 0.0, LN(50)]]), torch.tensor([[1, 1, 0]]))
    assert masked == pytest.approx(9 / 10)
    # sequence ratios e^1000 and 1: no overflow, one sample dominates: ESS 1/2
    assert effective_sample_size(torch.tensor([1000.0, 0.0])) == pytest.approx(0.5)
    assert effective_sample_size(torch.full((3,), -math.inf)) == 0.0  # every weight 0
    assert effective_sample_size(torch.zeros(0)) == 1.0  # nothing to weigh


def test_outside_share_by_hand():
    log_ratios = torch.tensor([[LN(3), LN(0.4), LN(1.9), 0.0]])
    assert outside_share(log_ratios, torch.ones(1, 4), 2.0) == pytest.approx(2 / 4)  # 3 and 0.4 are outside
    assert outside_share(log_ratios, torch.tensor([[0, 1, 1, 1]]), 2.0) == pytest.approx(1 / 3)
    assert outside_share(log_ratios, torch.zeros(1, 4), 2.0) == 0.0
