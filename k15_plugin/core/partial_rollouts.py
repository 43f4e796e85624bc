"""Partial rollouts (paper section 2.6.2): the replay buffer of unfinished trajectories, host-independent.

Each rollout phase (one k1.5 iteration) admits fresh groups of ``k`` samples of one prompt; every unfinished member of
every buffered group then gets at most ``segment_tokens`` new tokens per round, continuing from prompt + tokens so far.
A member finishes at EOS, at its length cap (``max_completion_length`` tokens in all, or ``max_iterations`` segments),
or when its new tokens complete a repeat (:mod:`k15_plugin.core.repeats`; it is cut at the first detection point; a
member that reached EOS is not checked).
A group is *ready* only when all ``k`` members have finished, so the group baseline and the length penalty see whole
groups. Which groups a phase emits for training (:data:`EMIT_ORDERS`): the oldest *ready* ones (``ready``; short
groups overtake long ones, so batches come out sorted by length: phases of all-short groups, then long-heavy ones), or
the oldest *admitted* ones (``admission``; the phase runs at least one round, then more until all of them are ready,
so each batch keeps the prompts' arrival order and the population's length mix, while later groups progress in the
same rounds).

A staleness cap (``max_staleness``, in policy versions) is enforced at the start of each phase, before its rounds
(:meth:`PartialRolloutBuffer.enforce_staleness`): a member holding a token generated more than ``max_staleness``
versions before the current one is regenerated from its prompt, its group dropped and its prompt re-admitted, or the
old tokens are kept out of the loss (:data:`STALE_ACTIONS`). The version does not change during a phase's rounds, so
what the phase emits then satisfies the cap.

The buffer holds plain Python data only (token ids, segments with the policy version that generated them, each
token's behaviour log-prob under that policy, statuses)
and decides everything from that data, so every process of a multi-process run that applies the same results in the
same order holds the same buffer; :meth:`PartialRolloutBuffer.state_dict` is what a checkpoint saves. How segments
are generated (transformers ``generate``, vLLM) is the host adapter's business.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from k15_plugin.core.repeats import RepeatDetector, RepeatRule

STATUSES = ("running", "eos", "length", "repeat")
LOSS_MASKS = ("all", "latest")
EMIT_ORDERS = ("ready", "admission")  # which groups a phase trains: the oldest ready ones, or the oldest admitted ones
STALE_ACTIONS = ("regenerate", "drop", "mask")  # what happens to a token older than the staleness cap


@dataclass
class Segment:
    """One contiguous piece of a member's completion: ``completion_ids[start:start + length]``."""

    start: int
    length: int
    version: int  # the policy version (optimizer steps done) that generated it
    phase: int  # the rollout phase it was generated in


@dataclass
class Member:
    """One of a group's ``k`` trajectories."""

    completion_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    status: str = "running"
    # Per completion token, its behaviour log-prob: log mu_v(token) under the distribution the engine sampled it from
    # (after temperature, top-k, top-p), v being its segment's version. None where the engine gave none; None while no
    # segment came with log-probs.
    logprobs: list[float | None] | None = None

    @property
    def finished(self) -> bool:
        """True once the member stopped (EOS, the length cap or a repeat): it gets no more segments."""
        return self.status != "running"


@dataclass
class Group:
    """``k`` trajectories of one prompt. ``row`` is the host's opaque prompt record (dataset row), kept as given."""

    uid: int  # admission order: first in, first out, the same on every process
    admitted_phase: int
    prompt_ids: list[int]
    row: Any
    members: list[Member]

    @property
    def ready(self) -> bool:
        """True when all ``k`` members have finished, so the group can be emitted for training."""
        return all(m.finished for m in self.members)


@dataclass(frozen=True)
class Work:
    """One member to continue: generate at most ``budget`` tokens after ``prefix`` (prompt + completion so far)."""

    uid: int
    member: int
    prefix: list[int]
    budget: int
    generated: int  # completion tokens already in the prefix (0: a fresh start)


class PartialRolloutBuffer:
    """Unfinished and finished-but-waiting groups, with the rules that move them along.

    Args:
        group_size: ``k``, samples per prompt.
        segment_tokens: new tokens per member per round (the paper's fixed output-token budget).
        max_completion_length: the cap on a trajectory's tokens over all its segments. ``segment_tokens ==
            max_completion_length`` is one segment per trajectory (full rollouts, still with repeat detection).
        repeat_rule: stop a member whose completion ends in a loop (None: no repeat detection).
        max_iterations: at most this many segments per member, so a length cap of ``max_iterations *
            segment_tokens`` tokens (:attr:`length_cap`) below ``max_completion_length``; None: no such cap. A member
            that reaches it without EOS ends there (status ``length``) exactly as one that reaches
            ``max_completion_length``: a cap in tokens, the same whatever the number of rounds each phase runs.
        max_staleness: the staleness cap, in policy versions: a token generated by version v is too old at version V
            when ``v < V - max_staleness``; 0: no cap.
        stale_action: what :meth:`enforce_staleness` does with a member holding a too-old token, one of
            :data:`STALE_ACTIONS`: ``regenerate`` (cleared: it starts again from the prompt, its group keeps its
            place), ``drop`` (its group is removed and its prompt re-admitted as a fresh group at the back, same row)
            or ``mask`` (kept, its too-old tokens out of the loss: :attr:`mask_staleness`).

    The cap and the emission order are decisions taken at each phase about whatever the buffer holds, not rules its
    groups were built under: a saved buffer can be restored under another cap or order.
    """

    def __init__(
        self,
        group_size: int,
        segment_tokens: int,
        max_completion_length: int,
        repeat_rule: RepeatRule | None = None,
        max_iterations: int | None = None,
        max_staleness: int = 0,
        stale_action: str = "regenerate",
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not 1 <= segment_tokens <= max_completion_length:
            raise ValueError(
                f"segment_tokens must be in [1, max_completion_length={max_completion_length}], got {segment_tokens}"
            )
        if max_iterations is not None and max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1 or None, got {max_iterations}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0: no cap), got {max_staleness}")
        if stale_action not in STALE_ACTIONS:
            raise ValueError(f"stale_action must be one of {list(STALE_ACTIONS)}, got {stale_action!r}")
        self.group_size = group_size
        self.segment_tokens = segment_tokens
        self.max_completion_length = max_completion_length
        self.repeat_rule = repeat_rule
        self.max_iterations = max_iterations
        self.max_staleness = max_staleness
        self.stale_action = stale_action
        self.length_cap = max_completion_length  # tokens a member may have in all
        if max_iterations is not None:
            self.length_cap = min(max_completion_length, max_iterations * segment_tokens)
        self.groups: list[Group] = []  # in admission order
        self.phase = 0
        self.next_uid = 0

    # -- the phase ------------------------------------------------------------------------------------------------
    def admit(self, prompts: Sequence[tuple[list[int], Any]]) -> list[int]:
        """Fresh groups, one per ``(prompt_ids, row)``; returns their uids."""
        uids = []
        for prompt_ids, row in prompts:
            members = [Member() for _ in range(self.group_size)]
            self.groups.append(Group(self.next_uid, self.phase, list(prompt_ids), row, members))
            uids.append(self.next_uid)
            self.next_uid += 1
        return uids

    def enforce_staleness(self, version: int) -> dict[str, float]:
        """The staleness cap at the start of a phase, before its rounds, at policy ``version``: a member is too old
        when it holds a token generated by a version ``v < version - max_staleness``. Under ``regenerate`` each such
        member is cleared (no tokens, running: the phase's rounds start it again from the prompt; its group keeps its
        place); under ``drop`` each group holding one is removed and its prompt re-admitted as a fresh group (a new
        uid, the same ``prompt_ids`` and ``row``) behind every group the buffer holds, in the order the dropped ones
        had; under ``mask`` nothing changes here (:meth:`loss_mask` with :attr:`mask_staleness` keeps the old tokens
        out of the loss). Returns the counts: ``cap_regenerated_members`` and ``cap_requeued_groups``."""
        regenerated = requeued = 0
        if self.max_staleness and self.stale_action != "mask":
            oldest_allowed = version - self.max_staleness

            def too_old(m: Member) -> bool:
                return any(s.length and s.version < oldest_allowed for s in m.segments)

            kept, dropped = [], []
            for g in self.groups:
                stale = [m for m in g.members if too_old(m)]
                if not stale:
                    kept.append(g)
                elif self.stale_action == "drop":
                    dropped.append(g)
                else:
                    for m in stale:
                        m.completion_ids, m.segments, m.status, m.logprobs = [], [], "running", None
                    regenerated += len(stale)
                    kept.append(g)
            self.groups = kept
            self.admit([(g.prompt_ids, g.row) for g in dropped])
            requeued = len(dropped)
        return {"cap_regenerated_members": float(regenerated), "cap_requeued_groups": float(requeued)}

    def work(self) -> list[Work]:
        """Every unfinished member of every buffered group, oldest group first."""
        for g in self.groups:
            for m in g.members:
                if not m.finished and len(m.completion_ids) >= self.length_cap:
                    m.status = "length"  # only a buffer restored from a run with a longer cap gets here
        return [
            Work(
                g.uid,
                i,
                g.prompt_ids + m.completion_ids,
                min(self.segment_tokens, self.length_cap - len(m.completion_ids)),
                len(m.completion_ids),
            )
            for g in self.groups
            for i, m in enumerate(g.members)
            if not m.finished
        ]

    def apply(self, results: Sequence[tuple], version: int) -> None:
        """Append each ``(uid, member, new_ids, ended_with_eos)`` or ``(uid, member, new_ids, ended_with_eos,
        logprobs)`` as a segment generated by policy ``version``; mark members finished (EOS, the length cap, a
        repeat). Tokens beyond the length cap are dropped. Apply the same results in the same order on every
        process."""
        by_uid = {g.uid: g for g in self.groups}
        touched = []
        for uid, index, new_ids, eos, *rest in results:
            logprobs = rest[0] if rest else None
            member = by_uid[uid].members[index]
            if member.finished:
                raise ValueError(f"group {uid} member {index} has already finished ({member.status})")
            room = self.length_cap - len(member.completion_ids)
            new_ids = list(new_ids)[:room]
            start = len(member.completion_ids)
            if logprobs is not None or member.logprobs is not None:
                if member.logprobs is None:
                    member.logprobs = [None] * start
                new_logprobs = [None] * len(new_ids) if logprobs is None else list(logprobs)[: len(new_ids)]
                if len(new_logprobs) != len(new_ids):
                    raise ValueError(
                        f"group {uid} member {index}: {len(new_logprobs)} log-probs for {len(new_ids)} tokens"
                    )
                member.logprobs += new_logprobs
            member.completion_ids += new_ids
            member.segments.append(Segment(start, len(new_ids), version, self.phase))
            if eos:
                member.status = "eos"
            elif len(member.completion_ids) >= self.length_cap or not new_ids:
                member.status = "length"  # at the cap, or the engine could not continue it (its context is full)
            touched.append((member, start))
        if self.repeat_rule is not None:
            self._stop_repeats(touched)

    def _stop_repeats(self, touched: list[tuple[Member, int]]) -> None:
        """Cut members whose new tokens complete a loop at its first detection point (status ``repeat``)."""
        rule = self.repeat_rule
        window = max(rule.min_count * rule.max_period, rule.min_span + rule.max_period)  # longest detectable loop
        candidates = [(m, start) for m, start in touched if m.status != "eos" and len(m.completion_ids) > start]
        if not candidates:
            return
        old = [m.completion_ids[max(0, start - window) : start] for m, start in candidates]
        new = [m.completion_ids[start:] for m, start in candidates]
        width_old, width_new = max(map(len, old)), max(map(len, new))
        pad = iter(range(-2, -(2 + len(candidates) * (width_old + width_new)) - 1, -1))  # never equal to anything
        rows = [
            [next(pad) for _ in range(width_old - len(o))] + o + n + [next(pad) for _ in range(width_new - len(n))]
            for o, n in zip(old, new, strict=True)
        ]
        detector = RepeatDetector(len(rows), rule)
        first = torch.full((len(rows),), -1, dtype=torch.long)
        for column_index, column in enumerate(torch.tensor(rows).T):
            hit = detector.update(column)
            if column_index >= width_old:  # only loops that end in the new tokens (older ones were caught before)
                first = torch.where((first < 0) & hit, column_index - width_old + 1, first)
        for (member, start), cut in zip(candidates, first.tolist(), strict=True):
            if 0 < cut <= len(member.completion_ids) - start:
                del member.completion_ids[start + cut :]
                if member.logprobs is not None:
                    del member.logprobs[start + cut :]
                member.segments[-1].length = cut
                member.status = "repeat"

    @property
    def ready_groups(self) -> int:
        """How many buffered groups are ready (all members finished): how many ``emit(count, "ready")`` can take
        now."""
        return self.ready_count("ready")

    def ready_count(self, order: str = "ready") -> int:
        """How many groups :meth:`emit` can take now in ``order``: every ready group (``ready``), or the ready ones
        in front of the oldest group that is not (``admission``)."""
        _check_order(order)
        if order == "ready":
            return sum(g.ready for g in self.groups)
        count = 0
        for g in self.groups:
            if not g.ready:
                break
            count += 1
        return count

    def needs_round(self, count: int, order: str = "ready", rounds: int = 0) -> bool:
        """Whether a phase that will ``emit(count, order)`` runs another round, ``rounds`` rounds having run in it:
        while :meth:`ready_count` is below ``count``; under ``admission`` also a first round whenever a member is
        unfinished, so every trajectory in flight gets a segment in every phase. (Without it a phase whose oldest
        groups are already ready gives the others no token, and the pipeline moves in bursts: groups admitted
        together stay in step, one phase generates all of them to the end and the next ones generate nothing.)"""
        if self.ready_count(order) < count:
            return True
        return order == "admission" and rounds == 0 and any(not m.finished for g in self.groups for m in g.members)

    def emit(self, count: int, order: str = "ready") -> list[Group]:
        """``count`` groups removed from the buffer, oldest first; the phase ends. ``order`` (:data:`EMIT_ORDERS`):
        the ``count`` oldest ready groups (``ready``), or the ``count`` oldest admitted groups, which must all be
        ready (``admission``). Raises ValueError when :meth:`ready_count` is below ``count``: run more rounds."""
        available = self.ready_count(order)
        if available < count:
            what = "groups are ready" if order == "ready" else "groups are ready ahead of the oldest unfinished one"
            raise ValueError(f"{available} {what}, {count} asked for: run more rounds first")
        taken = [g for g in self.groups if g.ready][:count] if order == "ready" else self.groups[:count]
        uids = {g.uid for g in taken}
        self.groups = [g for g in self.groups if g.uid not in uids]
        self.phase += 1
        return taken

    # -- what the loss and the logs need --------------------------------------------------------------------------
    @property
    def mask_staleness(self) -> int:
        """The cap :meth:`loss_mask` applies: ``max_staleness`` under the ``mask`` action, else 0 (``regenerate`` and
        ``drop`` leave no token beyond the cap in what a phase emits)."""
        return self.max_staleness if self.stale_action == "mask" else 0

    @staticmethod
    def loss_mask(member: Member, mode: str = "all", version: int | None = None, max_staleness: int = 0) -> list[int]:
        """Per completion token, 1 if the loss covers it: ``all`` tokens, or (``latest``) only the tokens generated by
        the current policy, ``version`` (the paper: only the current iteration is on-policy, earlier segments can be
        excluded). Under ``latest`` a member that finished in an earlier phase trains no token, and neither does a
        last segment generated by an older policy; both still count in their group (baseline, length penalty).
        ``max_staleness`` > 0 (the cap's ``mask`` action, :attr:`mask_staleness`) also masks every token generated
        by a version older than ``version - max_staleness``; the member still counts in its group."""
        if mode not in LOSS_MASKS:
            raise ValueError(f"loss mask must be one of {list(LOSS_MASKS)}, got {mode!r}")
        if mode == "all" and not max_staleness:
            return [1] * len(member.completion_ids)
        if version is None:
            cap = f" with max_staleness={max_staleness}" if max_staleness else ""
            raise ValueError(f"the {mode!r} loss mask{cap} needs the current policy version")
        oldest = version - max_staleness if max_staleness else None
        return [
            int((mode == "all" or v == version) and (oldest is None or v >= oldest))
            for v in PartialRolloutBuffer.token_versions(member)
        ]

    @staticmethod
    def token_versions(member: Member) -> list[int]:
        """Per completion token, the policy version that generated it."""
        return [s.version for s in member.segments for _ in range(s.length)]

    def metrics(self, emitted: Sequence[Group], version: int, loss_mask: str = "all") -> dict[str, float]:
        """Buffer size, segments per trajectory, and, over the tokens the loss trains (``loss_mask`` at policy
        ``version``, with the cap's mask: :attr:`mask_staleness`), the age of the oldest one (in policy versions) and
        the share generated by older policies, over the ``emitted`` groups. With a staleness cap, also
        ``cap_masked_tokens``: the tokens ``loss_mask`` alone would train that the cap's mask keeps out."""
        members = [m for g in emitted for m in g.members]
        cap = self.mask_staleness
        versions, masked = [], 0
        for m in members:
            for v, trained, capped in zip(
                self.token_versions(m),
                self.loss_mask(m, loss_mask, version),
                self.loss_mask(m, loss_mask, version, cap),
                strict=True,
            ):
                if capped:
                    versions.append(v)
                masked += trained and not capped
        out = {
            "buffer_groups": float(len(self.groups)),
            "buffer_running_members": float(sum(not m.finished for g in self.groups for m in g.members)),
            "segments_per_trajectory": sum(len(m.segments) for m in members) / max(1, len(members)),
            "oldest_token_age": float(version - min(versions)) if versions else 0.0,
            "stale_token_share": sum(v < version for v in versions) / max(1, len(versions)),
            "repeat_stopped": float(sum(m.status == "repeat" for m in members)),
        }
        if self.max_staleness:
            out["cap_masked_tokens"] = float(masked)
        return out

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _settings(self) -> list:
        rule = None if self.repeat_rule is None else asdict(self.repeat_rule)
        return [self.group_size, self.segment_tokens, self.max_completion_length, rule, self.max_iterations]

    def state_dict(self) -> dict[str, Any]:
        """The buffer as plain data for a checkpoint: its settings, phase, next uid and every group (JSON-able when
        the groups' rows are)."""
        return {
            "format": 2,
            "settings": self._settings(),
            "phase": self.phase,
            "next_uid": self.next_uid,
            "groups": groups_to_state(self.groups),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the phase, next uid and groups with those of a :meth:`state_dict`.

        Raises ValueError when the state is of another format or was saved with other settings (group size, segment
        tokens, length cap, repeat rule, max iterations): its groups would not fit this buffer's rules.
        """
        if state.get("format") != 2 or list(state["settings"]) != self._settings():
            raise ValueError(
                "the saved partial-rollout buffer was made with (group_size, segment_tokens, max_completion_length, "
                f"repeat_rule, max_iterations) = {state.get('settings')}, not {self._settings()}"
            )
        self.phase, self.next_uid = state["phase"], state["next_uid"]
        self.groups = groups_from_state(state["groups"])


def _check_order(order: str) -> None:
    if order not in EMIT_ORDERS:
        raise ValueError(f"emit order must be one of {list(EMIT_ORDERS)}, got {order!r}")


def groups_to_state(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Groups as plain data (JSON-able when their rows are)."""
    return [asdict(g) for g in groups]


def groups_from_state(data: Sequence[dict[str, Any]]) -> list[Group]:
    """The inverse of :func:`groups_to_state`."""
    return [
        Group(
            g["uid"],
            g["admitted_phase"],
            list(g["prompt_ids"]),
            copy.deepcopy(g["row"]),
            [
                Member(
                    list(m["completion_ids"]),
                    [Segment(**s) for s in m["segments"]],
                    m["status"],
                    None if m.get("logprobs") is None else list(m["logprobs"]),
                )
                for m in g["members"]
            ],
        )
        for g in data
    ]
