"""The partial-rollout buffer (core): segments, group-atomic emission, repeats across segments, exact resume."""

import json
import random

import pytest

from k15_plugin.core.partial_rollouts import PartialRolloutBuffer
from k15_plugin.core.repeats import RepeatRule, first_repeat

EOS = 0


def _script(seed, groups, k, max_len):
    """What the "policy" would write for every member: random lengths, EOS-terminated or running past the cap."""
    rng = random.Random(seed)
    return {
        (g, i): [rng.randrange(1, 50) for _ in range(rng.randrange(1, max_len + 6))] + [EOS]
        for g in range(groups)
        for i in range(k)
    }


def _round(buffer, script, version):
    """Generate every piece of work from the script, the way an engine capped at ``budget`` new tokens would."""
    results = []
    for work in buffer.work():
        group = next(g for g in buffer.groups if g.uid == work.uid)
        done = len(work.prefix) - len(group.prompt_ids)
        new = script[work.uid, work.member][done : done + work.budget]
        eos = bool(new) and new[-1] == EOS
        results.append((work.uid, work.member, new, eos))
    buffer.apply(results, version)


def _phase(buffer, script, fresh, emit, version):
    buffer.admit([([100 + u, 101], {"index": u}) for u in fresh])
    rounds = 0
    while buffer.ready_groups < emit:
        _round(buffer, script, version)
        rounds += 1
    ready = [g.uid for g in buffer.groups if g.ready]
    groups = buffer.emit(emit)
    assert [g.uid for g in groups] == sorted(ready)[:emit]  # the oldest ready groups, oldest first
    return groups, rounds


def test_trajectories_are_the_uninterrupted_ones_and_groups_leave_whole_and_in_order():
    k, length, budget, per_phase = 4, 24, 5, 3
    script = _script(0, 30, k, length)
    buffer = PartialRolloutBuffer(k, budget, length)
    emitted, version = [], 0
    for phase in range(8):
        groups, rounds = _phase(buffer, script, range(phase * per_phase, (phase + 1) * per_phase), per_phase, version)
        assert rounds <= length // budget + 1
        emitted += groups
        version += 2
    uids = [g.uid for g in emitted]
    assert len(uids) == len(set(uids)) == 8 * per_phase
    for group in emitted:
        assert group.row == {"index": group.uid} and group.prompt_ids == [100 + group.uid, 101]
        for i, member in enumerate(group.members):
            want = script[group.uid, i][:length]
            assert member.completion_ids == want  # continued exactly where it stopped, capped at the length
            assert member.status == ("eos" if want[-1] == EOS else "length")
            assert [s.start for s in member.segments] == [
                sum(s.length for s in member.segments[:j]) for j in range(len(member.segments))
            ]
            assert sum(s.length for s in member.segments) == len(member.completion_ids)
            assert all(s.length <= budget for s in member.segments)


def test_a_short_group_overtakes_a_long_one():
    buffer = PartialRolloutBuffer(group_size=1, segment_tokens=2, max_completion_length=6)
    long_uid, short_uid = buffer.admit([([1], "long"), ([2], "short")])
    buffer.apply([(long_uid, 0, [5, 6], False), (short_uid, 0, [7, EOS], True)], version=0)
    assert [g.row for g in buffer.emit(1)] == ["short"]
    buffer.apply([(long_uid, 0, [8, EOS], True)], version=1)
    (group,) = buffer.emit(1)
    assert group.row == "long" and group.admitted_phase == 0 and buffer.phase == 2


def test_a_group_waits_for_its_slowest_member_and_finished_members_get_no_work():
    buffer = PartialRolloutBuffer(group_size=2, segment_tokens=3, max_completion_length=9)
    (uid,) = buffer.admit([([7], "row")])
    buffer.apply([(uid, 0, [5, EOS], True), (uid, 1, [5, 6, 7], False)], version=0)
    assert buffer.ready_groups == 0
    assert [(w.member, w.prefix, w.budget) for w in buffer.work()] == [(1, [7, 5, 6, 7], 3)]
    with pytest.raises(ValueError, match="already finished"):
        buffer.apply([(uid, 0, [1], False)], version=1)
    with pytest.raises(ValueError, match="0 groups are ready"):
        buffer.emit(1)
    buffer.apply([(uid, 1, [8, 9, 10], False)], version=1)
    buffer.apply([(uid, 1, [11, 12, 13, 14], False)], version=2)  # more than the room left: capped at 9 in all
    (group,) = buffer.emit(1)
    assert group.members[1].completion_ids == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert group.members[1].status == "length" and group.members[1].segments[-1].length == 3


def test_loss_mask_versions_and_metrics_by_hand():
    buffer = PartialRolloutBuffer(group_size=1, segment_tokens=2, max_completion_length=8)
    (uid,) = buffer.admit([([1], None)])
    buffer.apply([(uid, 0, [4, 5], False)], version=3)
    buffer.apply([(uid, 0, [6, 7], False)], version=5)
    buffer.apply([(uid, 0, [EOS], True)], version=6)
    (group,) = buffer.emit(1)
    member = group.members[0]
    assert PartialRolloutBuffer.loss_mask(member, "all") == [1, 1, 1, 1, 1]
    assert PartialRolloutBuffer.loss_mask(member, "latest", 6) == [0, 0, 0, 0, 1]
    assert PartialRolloutBuffer.token_versions(member) == [3, 3, 5, 5, 6]
    metrics = buffer.metrics([group], version=6)
    assert metrics["segments_per_trajectory"] == 3.0 and metrics["oldest_token_age"] == 3.0
    assert metrics["stale_token_share"] == pytest.approx(4 / 5) and metrics["buffer_groups"] == 0.0
    with pytest.raises(ValueError, match="loss mask"):
        PartialRolloutBuffer.loss_mask(member, "first")
    with pytest.raises(ValueError, match="current policy version"):
        PartialRolloutBuffer.loss_mask(member, "latest")


def _mixed_version_group():
    """Member 0 finishes at version 0 (3 tokens); member 1 gets 4 tokens at version 0, 4 at version 2 and 2 at
    version 4, ending in EOS; the group is emitted at version 4."""
    buffer = PartialRolloutBuffer(group_size=2, segment_tokens=4, max_completion_length=12)
    (uid,) = buffer.admit([([1], None)])
    buffer.apply([(uid, 0, [5, 6, EOS], True), (uid, 1, [5, 6, 7, 8], False)], version=0)
    buffer.emit(0)
    buffer.apply([(uid, 1, [9, 10, 11, 12], False)], version=2)
    buffer.emit(0)
    buffer.apply([(uid, 1, [13, EOS], True)], version=4)
    return buffer, buffer.emit(1)


def test_latest_trains_the_current_policys_tokens_only():
    """The paper's "only the current iteration requires on-policy computation [...] certain segments can be
    excluded": under ``latest`` a token is trained only if the policy that trains on it generated it. A member that
    finished in an earlier rollout batch trains nothing (it still counts in its group), and a last segment generated
    several versions ago is not trained either."""
    _, (group,) = _mixed_version_group()
    finished_early, continued = group.members
    assert PartialRolloutBuffer.loss_mask(finished_early, "latest", 4) == [0, 0, 0]
    assert PartialRolloutBuffer.loss_mask(continued, "latest", 4) == [0] * 8 + [1, 1]
    # a last segment from version 2, trained at version 5: stale, so not trained
    assert PartialRolloutBuffer.loss_mask(continued, "latest", 5) == [0] * 10
    assert PartialRolloutBuffer.loss_mask(continued, "all", 4) == [1] * 10


def test_staleness_metrics_count_the_tokens_the_loss_trains():
    buffer, emitted = _mixed_version_group()
    everything = buffer.metrics(emitted, version=4)  # loss mask "all": 11 of the 13 tokens are from older policies
    assert everything["stale_token_share"] == pytest.approx(11 / 13) and everything["oldest_token_age"] == 4.0
    latest = buffer.metrics(emitted, version=4, loss_mask="latest")  # 2 trained tokens, both current
    assert latest["stale_token_share"] == 0.0 and latest["oldest_token_age"] == 0.0
    assert latest["segments_per_trajectory"] == everything["segments_per_trajectory"] == 2.0  # all segments


def test_a_loop_across_segments_is_cut_where_the_whole_sequence_first_repeats():
    rule = RepeatRule(min_period=2, max_period=4, min_count=3, min_span=6)
    rng = random.Random(1)
    for trial in range(40):
        prefix = [rng.randrange(10, 60) for _ in range(rng.randrange(0, 9))]
        loop = [rng.randrange(1, 9) for _ in range(rng.randrange(2, 5))] * rng.randrange(1, 5)
        completion = (prefix + loop + [rng.randrange(10, 60) for _ in range(30)])[:30]  # runs to the cap
        buffer = PartialRolloutBuffer(1, segment_tokens=rng.randrange(1, 7), max_completion_length=30, repeat_rule=rule)
        (uid,) = buffer.admit([([1], None)])
        while buffer.ready_groups == 0:
            (work,) = buffer.work()
            done = len(work.prefix) - 1
            buffer.apply([(uid, 0, completion[done : done + work.budget], False)], version=0)
        (group,) = buffer.emit(1)
        member = group.members[0]
        cut = first_repeat(completion, rule)
        if cut is None:
            assert member.status == "length" and member.completion_ids == completion, trial
        else:
            assert member.status == "repeat" and member.completion_ids == completion[:cut], trial
            assert sum(s.length for s in member.segments) == cut


def test_resume_from_a_saved_buffer_continues_exactly_as_the_uninterrupted_run():
    k, length, budget = 3, 20, 4
    script = _script(2, 40, k, length)
    rule = RepeatRule(min_period=2, max_period=3, min_count=3, min_span=6)

    def run(buffer, phases, version=0):
        out = []
        for phase in phases:
            groups, _ = _phase(buffer, script, range(phase * 4, phase * 4 + 4), 4, version + phase)
            out += [(g.uid, [m.completion_ids for m in g.members], [m.status for m in g.members]) for g in groups]
        return out

    whole = run(PartialRolloutBuffer(k, budget, length, rule), range(6))
    first = PartialRolloutBuffer(k, budget, length, rule)
    before = run(first, range(3))
    saved = json.loads(json.dumps(first.state_dict()))  # plain data: JSON round-trips it
    resumed = PartialRolloutBuffer(k, budget, length, rule)
    resumed.load_state_dict(saved)
    assert before + run(resumed, range(3, 6)) == whole
    with pytest.raises(ValueError, match=r"segment_tokens.*not \[3, 5, 20"):
        PartialRolloutBuffer(k, 5, length, rule).load_state_dict(saved)


def test_a_member_the_engine_cannot_continue_ends_instead_of_waiting_forever():
    buffer = PartialRolloutBuffer(group_size=1, segment_tokens=4, max_completion_length=8)
    (uid,) = buffer.admit([([1], None)])
    buffer.apply([(uid, 0, [5, 6], False)], version=0)
    buffer.apply([(uid, 0, [], False)], version=0)  # no new token and no EOS: a full context window, say
    assert buffer.work() == [] and buffer.emit(1)[0].members[0].status == "length"


def test_max_iterations_is_a_length_cap_in_tokens_like_max_completion_length():
    """``max_iterations`` m caps a trajectory at m segments, m * segment_tokens tokens: a member that reaches it
    without EOS ends there as length-capped, exactly as if ``max_completion_length`` were m * segment_tokens, however
    many rounds each phase runs (a cap in phases would fall at a length that depends on the buffer's schedule)."""
    k, budget, length = 3, 2, 12
    for seed in range(20):
        script = _script(seed, 10, k, length)
        rng = random.Random(seed)
        schedule = [rng.randrange(0, 4) for _ in range(12)]  # rounds per phase (0: a phase that only emits)
        runs = []
        for buffer in (
            PartialRolloutBuffer(k, budget, length, max_iterations=2),
            PartialRolloutBuffer(k, budget, 2 * budget),
        ):
            buffer.admit([([100 + u, 101], {"index": u}) for u in range(10)])
            for rounds in schedule:
                for _ in range(rounds):
                    if buffer.work():
                        _round(buffer, script, version=buffer.phase)
                buffer.emit(0)
            while buffer.work():
                _round(buffer, script, version=buffer.phase)
            runs.append([(m.completion_ids, m.status) for g in buffer.groups for m in g.members])
        assert runs[0] == runs[1], seed
        assert all(len(ids) <= 2 * budget for ids, _ in runs[0])


def test_engine_logprobs_follow_their_tokens_through_segments_and_cuts():
    rule = RepeatRule(min_period=1, max_period=2, min_count=3, min_span=3)
    buffer = PartialRolloutBuffer(group_size=1, segment_tokens=4, max_completion_length=12, repeat_rule=rule)
    (uid,) = buffer.admit([([1], None)])
    buffer.apply([(uid, 0, [4, 5, 6, 7], False)], version=0)  # no log-probs (transformers backend, say)
    buffer.apply([(uid, 0, [8, 9, 9, 9], False, [-0.1, -0.2, -0.3, -0.4])], version=1)  # 9 9 9: a loop, cut there
    member = buffer.emit(1)[0].members[0]
    assert member.status == "repeat" and member.completion_ids == [4, 5, 6, 7, 8, 9, 9, 9]
    assert member.logprobs == [None] * 4 + [-0.1, -0.2, -0.3, -0.4]
    with pytest.raises(ValueError, match="2 log-probs for 3 tokens"):
        other = PartialRolloutBuffer(group_size=1, segment_tokens=4, max_completion_length=12)
        (uid,) = other.admit([([1], None)])
        other.apply([(uid, 0, [4, 5, 6], False, [-1.0, -1.0])], version=0)


def test_one_segment_per_trajectory_is_full_rollouts():
    buffer = PartialRolloutBuffer(group_size=2, segment_tokens=6, max_completion_length=6)
    (uid,) = buffer.admit([([1], None)])
    assert [w.budget for w in buffer.work()] == [6, 6]
    buffer.apply([(uid, 0, [4, 5, 6, 7, 8, 9], False), (uid, 1, [4, EOS], True)], version=0)
    assert [m.status for m in buffer.emit(1)[0].members] == ["length", "eos"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="segment_tokens"):
        PartialRolloutBuffer(2, 21, 20)
    with pytest.raises(ValueError, match="max_iterations"):
        PartialRolloutBuffer(2, 2, 20, max_iterations=0)
    with pytest.raises(ValueError, match="group_size"):
        PartialRolloutBuffer(0, 2, 20)


# ----------------------------------------------------------------------------------------------------------------------
# Emission order and the staleness cap
# ----------------------------------------------------------------------------------------------------------------------


def _long(u):
    return u % 4 == 3  # one prompt in four has a long answer


def _lengths_script(prompts):
    """One member per group; prompt u's answer: 13 tokens + EOS if long (4 segments of 4), else 1 token + EOS."""
    return {(u, 0): [1 + u % 7] * (13 if _long(u) else 1) + [EOS] for u in range(prompts)}


def _run(buffer, script, phases, per_phase=4, prefill=3, order="ready", steps_per_phase=1, start=0):
    """Phases ``start`` .. ``phases - 1`` as the TRL loop runs them: the cap, admission (phase 0 also admits
    ``prefill`` extra batches), rounds while :meth:`needs_round`, emission. The row of a group is its prompt's index
    in ``script``; the version is the phase times ``steps_per_phase``. Returns per phase: (emitted groups, rounds,
    the cap's counts)."""
    out = []
    next_prompt = 0 if start == 0 else per_phase * (prefill + start)
    for phase in range(start, phases):
        version = phase * steps_per_phase
        counts = buffer.enforce_staleness(version)
        fresh = per_phase * (1 + prefill) if phase == 0 else per_phase
        buffer.admit([([100 + u, 101], u) for u in range(next_prompt, next_prompt + fresh)])
        next_prompt += fresh
        rounds = 0
        while buffer.needs_round(per_phase, order, rounds):
            results = []
            for work in buffer.work():
                group = next(g for g in buffer.groups if g.uid == work.uid)
                new = script[group.row, work.member][work.generated : work.generated + work.budget]
                results.append((work.uid, work.member, new, bool(new) and new[-1] == EOS))
            buffer.apply(results, version)
            rounds += 1
        out.append((buffer.emit(per_phase, order), rounds, counts))
    return out


def test_ready_order_sorts_batches_by_length_and_admission_order_keeps_the_arrival_mix():
    """The review's finding: emitting the oldest *ready* groups lets short groups overtake long ones, so batches are
    all short for several phases, then long-heavy. Emitting the oldest *admitted* groups keeps the prompts' arrival
    order, so every batch holds one long group in four, as the population does (and as full rollouts would); with
    the pipeline filled, one round per phase is enough."""
    script = _lengths_script(100)
    ready = _run(PartialRolloutBuffer(1, 4, 16), script, 12, order="ready")
    assert [sum(_long(g.row) for g in groups) for groups, _, _ in ready] == [0, 0, 0, 0, 0, 0, 4, 0, 3, 0, 2, 0]
    assert [rounds for _, rounds, _ in ready] == [1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0]  # phases with no generation
    admission = _run(PartialRolloutBuffer(1, 4, 16), script, 12, order="admission")
    assert [[g.row for g in groups] for groups, _, _ in admission] == [list(range(4 * p, 4 * p + 4)) for p in range(12)]
    assert [sum(_long(g.row) for g in groups) for groups, _, _ in admission] == [1] * 12
    # the first phase generates its oldest groups to the end (the pipeline is empty); then one round per phase
    assert [rounds for _, rounds, _ in admission] == [4] + [1] * 11
    for groups, _, _ in admission:  # the same trajectories as uninterrupted generation
        assert all(g.members[0].completion_ids == script[g.row, 0] for g in groups)


def test_admission_order_waits_for_the_oldest_group_and_emits_nothing_younger_first():
    buffer = PartialRolloutBuffer(group_size=1, segment_tokens=2, max_completion_length=6)
    long_uid, short_uid = buffer.admit([([1], "long"), ([2], "short")])
    buffer.apply([(long_uid, 0, [5, 6], False), (short_uid, 0, [7, EOS], True)], version=0)
    assert buffer.ready_count("ready") == 1 and buffer.ready_count("admission") == 0
    assert buffer.needs_round(1, "admission", rounds=1) and not buffer.needs_round(1, "ready", rounds=1)
    with pytest.raises(ValueError, match="0 groups are ready ahead of the oldest unfinished one, 1 asked for"):
        buffer.emit(1, "admission")
    buffer.apply([(long_uid, 0, [8, EOS], True)], version=0)
    assert buffer.ready_count("admission") == 2
    assert [g.row for g in buffer.emit(2, "admission")] == ["long", "short"]
    # a first round runs under admission whenever something is unfinished, even with enough groups ready
    a, _ = buffer.admit([([3], "a"), ([4], "b")])
    buffer.apply([(a, 0, [EOS], True)], version=1)
    assert buffer.ready_count("admission") == 1
    assert buffer.needs_round(1, "admission", rounds=0) and not buffer.needs_round(1, "admission", rounds=1)
    assert not buffer.needs_round(1, "ready", rounds=0)
    with pytest.raises(ValueError, match="emit order must be one of"):
        buffer.ready_count("shortest")


def _aged_buffer(action, max_staleness=2):
    """Two groups of two at segment 2: group 0's member 0 finished at version 0 ([5, EOS]), its member 1 has
    [6, 7] from version 0 and [8, 9] from version 3; group 1 (admitted at version 3) has [4, 4] on both members."""
    buffer = PartialRolloutBuffer(2, 2, 8, max_staleness=max_staleness, stale_action=action)
    (old,) = buffer.admit([([1], {"index": 10})])
    buffer.apply([(old, 0, [5, EOS], True, [-0.5, -0.25]), (old, 1, [6, 7], False)], version=0)
    buffer.emit(0)
    (young,) = buffer.admit([([2], {"index": 11})])
    buffer.apply([(old, 1, [8, 9], False), (young, 0, [4, 4], False), (young, 1, [4, 4], False)], version=3)
    buffer.emit(0)
    return buffer, old, young


def test_tokens_within_the_cap_are_left_alone():
    # at version 2 every token is at most 2 versions old: nothing to do, whatever the action
    for action in ("regenerate", "drop", "mask"):
        buffer, _, _ = _aged_buffer(action)
        before = buffer.state_dict()
        assert buffer.enforce_staleness(2) == {"cap_regenerated_members": 0.0, "cap_requeued_groups": 0.0}
        assert buffer.state_dict() == before
    buffer, _, _ = _aged_buffer("regenerate", max_staleness=0)  # 0: no cap at all
    before = buffer.state_dict()
    assert buffer.enforce_staleness(100) == {"cap_regenerated_members": 0.0, "cap_requeued_groups": 0.0}
    assert buffer.state_dict() == before


def test_regenerate_restarts_the_members_holding_a_too_old_token_and_the_group_keeps_its_place():
    buffer, old, young = _aged_buffer("regenerate")
    # at version 3 the cap is version 1: group 0's two members hold version-0 tokens (the finished one too)
    assert buffer.enforce_staleness(3) == {"cap_regenerated_members": 2.0, "cap_requeued_groups": 0.0}
    assert [g.uid for g in buffer.groups] == [old, young]
    for member in buffer.groups[0].members:
        assert (member.completion_ids, member.segments, member.status, member.logprobs) == ([], [], "running", None)
    assert [m.completion_ids for m in buffer.groups[1].members] == [[4, 4], [4, 4]]  # version 3: kept
    assert [(w.uid, w.member, w.prefix, w.generated) for w in buffer.work()] == [
        (old, 0, [1], 0),
        (old, 1, [1], 0),
        (young, 0, [2, 4, 4], 2),
        (young, 1, [2, 4, 4], 2),
    ]
    buffer.apply([(old, 0, [7, EOS], True), (old, 1, [7, EOS], True)], version=3)
    (group,) = buffer.emit(1, "admission")
    assert group.uid == old and buffer.metrics([group], 3)["oldest_token_age"] == 0.0


def test_drop_requeues_the_prompt_as_a_fresh_group_at_the_back_with_the_same_row():
    buffer, old, young = _aged_buffer("drop")
    row = buffer.groups[0].row
    assert buffer.enforce_staleness(3) == {"cap_regenerated_members": 0.0, "cap_requeued_groups": 1.0}
    assert [g.uid for g in buffer.groups] == [young, 2]  # the new uid, behind every group held
    requeued = buffer.groups[1]
    assert requeued.row is row and requeued.prompt_ids == [1] and requeued.admitted_phase == buffer.phase == 2
    assert all(m.completion_ids == [] and m.status == "running" for m in requeued.members)
    # this phase's new prompts come after it; the dropped group itself is never emitted
    buffer.admit([([3], {"index": 12})])
    results = [(w.uid, w.member, [9, EOS], True) for w in buffer.work()]
    buffer.apply(results, version=3)
    emitted = buffer.emit(3, "admission")
    assert [g.row["index"] for g in emitted] == [11, 10, 12] and old not in [g.uid for g in emitted]


def test_mask_keeps_the_tokens_and_takes_the_too_old_ones_out_of_the_loss():
    buffer, old, young = _aged_buffer("mask")
    before = buffer.state_dict()
    assert buffer.enforce_staleness(3) == {"cap_regenerated_members": 0.0, "cap_requeued_groups": 0.0}
    assert buffer.state_dict() == before and buffer.mask_staleness == 2
    buffer.apply([(old, 1, [EOS], True), (young, 0, [EOS], True), (young, 1, [EOS], True)], version=3)
    emitted = buffer.emit(2, "admission")
    finished_early, continued = emitted[0].members
    cap = buffer.mask_staleness
    assert PartialRolloutBuffer.loss_mask(finished_early, "all", 3, cap) == [0, 0]  # version 0 < 3 - 2
    assert PartialRolloutBuffer.loss_mask(continued, "all", 3, cap) == [0, 0, 1, 1, 1]
    assert PartialRolloutBuffer.loss_mask(continued, "latest", 3, cap) == [0, 0, 1, 1, 1]  # all from version 3
    assert PartialRolloutBuffer.loss_mask(continued, "all", 6, cap) == [0, 0, 0, 0, 0]  # trained at 6: 3 < 6 - 2
    metrics = buffer.metrics(emitted, 3)
    # trained: continued's 3 tokens and young's 2 x 3, all from version 3; masked by the cap: 4 version-0 tokens
    assert metrics["cap_masked_tokens"] == 4.0 and metrics["oldest_token_age"] == 0.0
    assert metrics["stale_token_share"] == 0.0
    assert "cap_masked_tokens" not in PartialRolloutBuffer(2, 2, 8).metrics(emitted, 3)  # no cap: not logged
    assert _aged_buffer("regenerate")[0].mask_staleness == 0  # only the mask action masks


@pytest.mark.parametrize("order", ["ready", "admission"])
@pytest.mark.parametrize("action", ["regenerate", "drop", "mask"])
def test_the_cap_holds_for_every_emitted_token_and_no_prompt_is_lost_or_trained_twice(order, action):
    """Random lengths, 2 optimizer steps per phase, a cap of 3 steps and a pipeline 3 batches deep (tokens up to 6
    steps old without the cap): under regenerate and drop no emitted token is older than the cap, under mask none is
    trained; every admitted prompt is either emitted once or still in the buffer; phases always end."""
    k, budget, length = 3, 4, 16
    script = _script(5, 400, k, length)
    buffer = PartialRolloutBuffer(k, budget, length, max_staleness=3, stale_action=action)
    runs = _run(buffer, script, 16, order=order, steps_per_phase=2, prefill=3)
    emitted_rows, masked = [], 0
    for phase, (groups, _, _) in enumerate(runs):
        version = 2 * phase
        for g in groups:
            emitted_rows.append(g.row)
            for m in g.members:
                versions = PartialRolloutBuffer.token_versions(m)
                trained = PartialRolloutBuffer.loss_mask(m, "all", version, buffer.mask_staleness)
                masked += trained.count(0)
                assert all(version - v <= 3 for v, t in zip(versions, trained, strict=True) if t)
                if action != "mask":
                    assert all(version - v <= 3 for v in versions)
                assert m.completion_ids == script[g.row, g.members.index(m)][:length]  # restarts write the same
    assert len(emitted_rows) == len(set(emitted_rows)) == 16 * 4
    admitted = 4 * 4 + 15 * 4
    assert sorted(emitted_rows + [g.row for g in buffer.groups]) == list(range(admitted))
    fired = sum(counts["cap_regenerated_members"] + counts["cap_requeued_groups"] for _, _, counts in runs)
    assert (fired > 0) == (action != "mask") and (masked > 0) == (action == "mask")


def test_resume_under_a_cap_and_admission_order_continues_exactly_and_the_cap_is_not_a_saved_setting():
    script = _lengths_script(200)

    def snapshot(runs):
        return [([(g.uid, g.row, [m.completion_ids for m in g.members]) for g in groups], c) for groups, _, c in runs]

    def make():
        return PartialRolloutBuffer(1, 4, 16, max_staleness=2, stale_action="drop")

    whole = snapshot(_run(make(), script, 10, order="admission", steps_per_phase=1, prefill=3))
    first = make()
    before = snapshot(_run(first, script, 4, order="admission", steps_per_phase=1, prefill=3))
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["format"] == 2 and saved["settings"] == [1, 4, 16, None, None]
    resumed = make()
    resumed.load_state_dict(saved)
    rest = _run(resumed, script, 10, order="admission", steps_per_phase=1, prefill=3, start=4)
    assert before + snapshot(rest) == whole
    assert any(c["cap_requeued_groups"] for _, c in whole)
    # a buffer saved without a cap restores under one (the cap applies from the next phase on)
    plain = PartialRolloutBuffer(1, 4, 16)
    _run(plain, script, 3, prefill=3)
    capped = make()
    capped.load_state_dict(plain.state_dict())
    assert capped.enforce_staleness(10)["cap_requeued_groups"] > 0


def test_cap_settings_are_validated():
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        PartialRolloutBuffer(2, 2, 20, max_staleness=-1)
    with pytest.raises(ValueError, match="stale_action must be one of"):
        PartialRolloutBuffer(2, 2, 20, max_staleness=2, stale_action="truncate")
    with pytest.raises(ValueError, match="emit order must be one of"):
        PartialRolloutBuffer(2, 2, 20).emit(0, "newest")
