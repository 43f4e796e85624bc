"""The paper's math against hand-computed values, an independent slow version, and gradient checks."""

import math

import pytest
import torch

from k15_plugin.core import (
    length_penalty_weight,
    length_reward,
    log_partition_estimate,
    mirror_descent_advantages,
    mirror_descent_loss,
    mirror_descent_terms,
    sequence_logps,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- log_partition_estimate
def test_log_partition_mean_by_hand():
    # group 0: (1 + 0 + 0 + 1) / 4 = 0.5; group 1: four times 0.25 -> 0.25
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(log_partition_estimate(rewards, tau=0.3), torch.tensor([0.5, 0.25]))


def test_log_partition_log_mean_exp_by_hand():
    # tau = 1, r = (0, ln 3): mean(exp(r)) = (1 + 3) / 2 = 2 -> b = ln 2
    # tau = 0.5, r = (0, 0.5 ln 3): exp(r / tau) = (1, 3) -> b = 0.5 ln 2
    r1 = torch.tensor([[0.0, math.log(3.0)]])
    r2 = torch.tensor([[0.0, 0.5 * math.log(3.0)]])
    assert log_partition_estimate(r1, 1.0, "log_mean_exp").item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert log_partition_estimate(r2, 0.5, "log_mean_exp").item() == pytest.approx(0.5 * math.log(2.0), abs=1e-6)


def test_log_mean_exp_stays_finite_and_exact_at_extremes():
    # tau = 1e-4, r = (1e4, 0): b = tau * (1e8 + log(1 + e^-1e8) - log 2) = 1e4 - 1e-4 * ln 2
    rewards = torch.tensor([[1e4, 0.0], [-1e4, -1e4]])
    b = log_partition_estimate(rewards, 1e-4, "log_mean_exp")
    assert torch.isfinite(b).all()
    assert b[0].item() == pytest.approx(1e4 - 1e-4 * math.log(2.0), rel=1e-7)
    # equal rewards: log mean exp of a constant is the constant
    assert b[1].item() == pytest.approx(-1e4, rel=1e-7)


def test_log_mean_exp_limits():
    # tau -> infinity: the mean; tau -> 0: the max (independent, obvious values)
    rewards = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    big = log_partition_estimate(rewards, 1e6, "log_mean_exp")
    small = log_partition_estimate(rewards, 1e-6, "log_mean_exp")
    assert torch.allclose(big, rewards.mean(1), atol=1e-4)
    assert torch.allclose(small, rewards.max(1).values, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rewards=torch.zeros(2, 2), tau=0.0), "tau"),
        (dict(rewards=torch.zeros(2, 2), tau=-1.0), "tau"),
        (dict(rewards=torch.zeros(2, 2), tau=float("nan")), "tau"),
        (dict(rewards=torch.zeros(2, 2), tau=1.0, estimator="median"), "estimator"),
        (dict(rewards=torch.tensor([[0.0, float("inf")]]), tau=1.0), "rewards"),
        (dict(rewards=torch.tensor([[0.0, float("nan")]]), tau=1.0), "rewards"),
        (dict(rewards=torch.zeros(4), tau=1.0), "rewards"),
    ],
)
def test_log_partition_value_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        log_partition_estimate(**kwargs)


# ---------------------------------------------------------------- mirror_descent_loss
def test_mirror_descent_loss_by_hand():
    # k = 2, one group: r = (1, 0) -> b = 0.5, r - b = (0.5, -0.5); tau = 0.5
    # sample 0: -(0.5)(-1) + 0.25 * (-1 - -1.5)^2 = 0.5 + 0.0625 = 0.5625
    # sample 1: -(-0.5)(-2) + 0.25 * 0          = -1.0
    # mean: (0.5625 - 1.0) / 2 = -0.21875
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -2.0])
    loss = mirror_descent_loss(logp, old, torch.tensor([1.0, 0.0]), num_generations=2, tau=0.5)
    assert loss.item() == pytest.approx(-0.21875)
    loss.backward()
    # d loss / d logp_j = (1/N) [-(r_j - b) + tau (logp_j - old_j)]
    #   j=0: 0.5 * (-0.5 + 0.5 * 0.5) = -0.125 ; j=1: 0.5 * (0.5 + 0) = 0.25
    assert torch.allclose(logp.grad, torch.tensor([-0.125, 0.25]))


def test_mirror_descent_loss_log_mean_exp_by_hand():
    # k = 2, tau = 1, r = (0, ln 3): b = ln 2; r - b = (-ln 2, ln 3 - ln 2); old == logp -> no l2 term
    # loss = mean(-(r_j - b) * logp_j) with logp = (-1, -1) -> ((-ln2) + (ln3 - ln2)) / 2 * 1 = (ln 3 - 2 ln 2) / 2
    logp = torch.tensor([-1.0, -1.0])
    r = torch.tensor([0.0, math.log(3.0)])
    loss = mirror_descent_loss(logp, logp.clone(), r, 2, 1.0, "log_mean_exp")
    assert loss.item() == pytest.approx((math.log(3.0) - 2 * math.log(2.0)) / 2, abs=1e-6)


def _slow_loss(seq_logps, old, rewards, k, tau, estimator):
    """Independent per-sample loop, straight from the paper's formula."""
    n = len(rewards)
    total = 0.0
    for g in range(n // k):
        group = [float(rewards[g * k + j]) for j in range(k)]
        if estimator == "mean":
            b = sum(group) / k
        else:
            m = max(group)
            b = m + tau * math.log(sum(math.exp((r - m) / tau) for r in group) / k)
        for j in range(k):
            i = g * k + j
            total = total + (-(group[j] - b) * seq_logps[i] + tau / 2 * (seq_logps[i] - float(old[i])) ** 2)
    return total / n


@pytest.mark.parametrize("estimator", ["mean", "log_mean_exp"])
@pytest.mark.parametrize("tau", [0.1, 1.0, 3.0])
def test_mirror_descent_loss_matches_slow_version(estimator, tau):
    gen = torch.Generator().manual_seed(1)
    k, g = 4, 3
    logp = -torch.rand(g * k, generator=gen, dtype=torch.float64) * 5
    old = logp + 0.3 * torch.randn(g * k, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 2, (g * k,), generator=gen).double() + 0.1 * torch.randn(g * k, generator=gen).double()
    fast = mirror_descent_loss(logp, old, rewards, k, tau, estimator)
    slow = _slow_loss(logp.tolist(), old, rewards, k, tau, estimator)
    assert fast.item() == pytest.approx(slow, rel=1e-10, abs=1e-12)


def test_gradient_equals_negated_paper_eq3_on_a_model():
    """grad of the loss w.r.t. parameters == -(1/k) sum_j [grad logp_j (r_j - b) - tau/2 grad (logp_j - old_j)^2]."""
    torch.manual_seed(0)
    k, tau = 6, 0.7
    vocab, length = 5, 3
    logits_param = torch.nn.Parameter(torch.randn(length, vocab, dtype=torch.float64))
    tokens = torch.randint(0, vocab, (k, length))

    def seq_logp(j):
        return torch.log_softmax(logits_param, -1).gather(1, tokens[j].unsqueeze(1)).sum()

    old = torch.stack([seq_logp(j).detach() for j in range(k)]) + 0.2 * torch.randn(k, dtype=torch.float64)
    rewards = torch.rand(k, dtype=torch.float64)
    b = rewards.mean()

    logps = torch.stack([seq_logp(j) for j in range(k)])
    (grad_loss,) = torch.autograd.grad(mirror_descent_loss(logps, old, rewards, k, tau), logits_param)

    direction = torch.zeros_like(logits_param)  # the paper's eq. 3, one sample at a time
    for j in range(k):
        (g_logp,) = torch.autograd.grad(seq_logp(j), logits_param)
        (g_sq,) = torch.autograd.grad((seq_logp(j) - old[j]) ** 2, logits_param)
        direction += g_logp * (rewards[j] - b) - tau / 2 * g_sq
    direction /= k
    assert torch.allclose(grad_loss, -direction, atol=1e-12)


def test_l2_term_has_zero_gradient_at_the_reference():
    logp = torch.tensor([-1.0, -3.0, -2.0, -0.5], requires_grad=True)
    _, l2 = mirror_descent_terms(logp, logp.detach().clone(), torch.zeros(4), tau=2.0)
    l2.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(4))


def test_advantages_per_group():
    # groups (1, 0, 1, 0) and (0, 0, 0, 1): means 0.5 and 0.25
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    adv = mirror_descent_advantages(r, 4, tau=1.0)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.5, -0.5, -0.25, -0.25, -0.25, 0.75]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_generations=3), "num_generations"),
        (dict(num_generations=0), "num_generations"),
        (dict(tau=0.0), "tau"),
        (dict(estimator="max"), "estimator"),
        (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 0.0])), "rewards"),
        (dict(rewards=torch.zeros(3)), "rewards"),
        (dict(old_seq_logps=torch.zeros(2)), "old_seq_logps"),
    ],
)
def test_mirror_descent_loss_value_errors(kwargs, name):
    args = dict(
        seq_logps=torch.zeros(4), old_seq_logps=torch.zeros(4), rewards=torch.zeros(4), num_generations=2, tau=1.0
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        mirror_descent_loss(**args)


def test_sequence_logps_sum_and_length_normalized():
    # row 0: -1 - 2 (third token masked) = -3, 2 tokens -> -1.5; row 1: -0.5 * 3 = -1.5, 3 tokens -> -0.5
    per_token = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(sequence_logps(per_token, mask), torch.tensor([-3.0, -1.5]))
    assert torch.allclose(sequence_logps(per_token, mask, length_normalize=True), torch.tensor([-1.5, -0.5]))


# ---------------------------------------------------------------- length_reward
def test_length_reward_by_hand():
    # group 0: lengths (10, 20, 30, 10), min 10, max 30 -> lambda = 0.5 - (len - 10) / 20 = (0.5, 0, -0.5, 0.5)
    #   correct (T, T, F, F) -> (0.5, 0, min(0, -0.5) = -0.5, min(0, 0.5) = 0)
    # group 1: lengths (7, 7, 7, 7) all equal -> 0 whatever the correctness
    lengths = torch.tensor([10, 20, 30, 10, 7, 7, 7, 7])
    correct = torch.tensor([True, True, False, False, True, False, True, False])
    out = length_reward(lengths, correct, num_generations=4)
    assert torch.allclose(out, torch.tensor([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))


def test_length_reward_matches_slow_version():
    gen = torch.Generator().manual_seed(3)
    k = 5
    lengths = torch.randint(1, 50, (4 * k,), generator=gen)
    correct = torch.rand(4 * k, generator=gen) > 0.5
    out = length_reward(lengths, correct, k)
    for g in range(4):
        group = lengths[g * k : (g + 1) * k].tolist()
        lo, hi = min(group), max(group)
        for j, n in enumerate(group):
            lam = 0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo)
            expected = lam if correct[g * k + j] else min(0.0, lam)
            assert out[g * k + j].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "lengths, correct, k, name",
    [
        (torch.tensor([1, 2, 3]), torch.tensor([True, True, True]), 2, "num_generations"),
        (torch.tensor([1, 2]), torch.tensor([True]), 2, "correct"),
        (torch.tensor([1, 2]), torch.tensor([1, 0]), 2, "correct"),
        (torch.tensor([1, -2]), torch.tensor([True, True]), 2, "lengths"),
    ],
)
def test_length_reward_value_errors(lengths, correct, k, name):
    with pytest.raises(ValueError, match=name):
        length_reward(lengths, correct, k)


def test_length_penalty_weight_schedule():
    # warm-up 10 steps, ramp 4: 0 for steps 0..9, then 1/4, 2/4, 3/4, 4/4 of the weight, then the weight
    w = [length_penalty_weight(s, 0.8, warmup_steps=10, ramp_steps=4) for s in range(8, 16)]
    assert w == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert length_penalty_weight(3, 0.5, warmup_steps=3) == 0.5
    with pytest.raises(ValueError, match="weight"):
        length_penalty_weight(0, -1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        length_penalty_weight(0, 1.0, warmup_steps=-1)


# ---------------------------------------------------------------- unscorable samples, importance weights
def test_baseline_and_advantages_skip_unscorable_samples_by_hand():
    # group 0: scored rewards (1, 0, 1), the third sample unscorable (NaN): mean b = 2/3
    #   advantages (1/3, -2/3, 0 [unscorable], 1/3)
    # group 1: nothing scored -> every advantage 0
    nan = float("nan")
    rewards = torch.tensor([1.0, 0.0, nan, 1.0, nan, nan, nan, nan])
    scorable = ~torch.isnan(rewards)
    adv = mirror_descent_advantages(rewards, 4, tau=1.0, scorable=scorable)
    assert torch.allclose(adv, torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3, 0.0, 0.0, 0.0, 0.0]))
    # log_mean_exp over the three scored samples, tau = 1: b = log((e + 1 + e) / 3)
    b = math.log((2 * math.e + 1) / 3)
    adv = mirror_descent_advantages(rewards, 4, tau=1.0, estimator="log_mean_exp", scorable=scorable)
    assert adv[:4].tolist() == pytest.approx([1 - b, -b, 0.0, 1 - b], abs=1e-6)
    assert adv[4:].abs().sum().item() == 0.0


def test_masked_estimates_equal_the_estimates_of_the_scored_subset():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(6, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 8, generator=g) < 0.6
    mask[:, 0] = True  # every group keeps one scored sample
    for estimator in ("mean", "log_mean_exp"):
        masked = log_partition_estimate(rewards.masked_fill(~mask, float("nan")), 0.7, estimator, mask=mask)
        for i in range(6):
            subset = rewards[i][mask[i]].unsqueeze(0)
            assert masked[i].item() == pytest.approx(log_partition_estimate(subset, 0.7, estimator).item(), rel=1e-12)


def test_length_reward_ignores_unscorable_lengths_by_hand():
    # scored lengths (3, 9, 5), the unscorable one has length 1: min 3, max 9, span 6
    #   lambda = 0.5 - (3-3)/6 = 0.5; 0.5 - 6/6 = -0.5; 0.5 - 2/6 = 1/6; unscorable -> 0
    lengths = torch.tensor([3, 9, 1, 5])
    correct = torch.tensor([True, False, False, True])
    scorable = torch.tensor([True, True, False, True])
    out = length_reward(lengths, correct, 4, scorable=scorable)
    assert out.tolist() == pytest.approx([0.5, -0.5, 0.0, 1 / 6])
    # every sample unscorable: all zero, no NaN
    assert length_reward(lengths, correct, 4, scorable=torch.zeros(4, dtype=torch.bool)).tolist() == [0.0] * 4


def test_importance_weights_scale_each_sample_and_its_gradient():
    # w = (2, 0.5), adv = (1, -1), tau = 1, old = (0, 0), logp = (-1, -2) leaf:
    #   policy = -w*adv*logp = (2, -1); l2 = w*0.5*logp^2 = (1, 1)
    #   d/dlogp = -w*adv + w*logp = (-2 - 2, 0.5 - 1) = (-4, -0.5)
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy, l2 = mirror_descent_terms(logp, torch.zeros(2), torch.tensor([1.0, -1.0]), 1.0, torch.tensor([2.0, 0.5]))
    assert policy.tolist() == pytest.approx([2.0, -1.0]) and l2.tolist() == pytest.approx([1.0, 1.0])
    (policy + l2).sum().backward()
    assert logp.grad.tolist() == pytest.approx([-4.0, -0.5])


@pytest.mark.parametrize("reset", ["clear", "zero"])
def test_an_optimizer_reset_makes_the_next_step_a_fresh_optimizers_first(reset):
    from k15_plugin.core.optimizer import clear_optimizer_state, zero_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    for _ in range(3):  # moments and step counts build up
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.1)
    count = clear_optimizer_state(opt) if reset == "clear" else zero_optimizer_state(opt)
    assert count == (2 if reset == "clear" else 6)  # 2 parameters; 3 tensors each (step, exp_avg, exp_avg_sq)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_in_place_reset_refuses_optimizer_state_swapped_to_nvme():
    """DeepSpeed ZeRO-3 with the optimizer offloaded to NVMe empties the state tensors between steps and reads the
    moments back from disk at the next one: zeroing them in place would change nothing, so it is refused."""
    from types import SimpleNamespace

    from k15_plugin.core.optimizer import zero_optimizer_state

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="offloaded to NVMe"):
        zero_optimizer_state(SimpleNamespace(optimizer=opt, swap_optimizer=True))
    assert zero_optimizer_state(SimpleNamespace(optimizer=opt, swap_optimizer=False)) == 0  # no state yet
