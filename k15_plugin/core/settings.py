"""The k1.5 settings, declared and checked once: :class:`K15Settings`.

Every host reads the same settings, in the shape it prefers, from this one declaration (default, allowed values and
help of each field, in the field's metadata):

* TRL: flat fields of the trainers' configs (``length_penalty_weight``, ``sampler_type``, ``tau``, ...), declared
  with :func:`flat_field`, which takes the default and the help from here; ``__post_init__`` checks them through
  :meth:`K15Settings.from_flat`;
* ``k15-train``'s Hydra schema (``cli/schema.py``): its k1.5 keys take their defaults from :func:`default`, and a
  test checks the names against :func:`paths`;
* verl's ``algorithm.k15`` node (:meth:`K15Settings.from_mapping`) and its loss config (:func:`check_value`);
* OpenRLHF's ``args.k15`` (a :class:`K15Settings` subclass with the algorithm's name).

A bad value raises ``ValueError`` as ``<key> must be <rule>, got <value>``, where ``<key>`` is the host's name of the
setting (``algorithm.k15.tau``, ``length_penalty_weight``, ``reward.length_penalty.weight``), so the user reads the
name they wrote. Torch and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any

from k15_plugin.core.mirror_descent import ESTIMATORS
from k15_plugin.core.off_policy import CORRECTIONS
from k15_plugin.core.partial_rollouts import EMIT_ORDERS, LOSS_MASKS, STALE_ACTIONS
from k15_plugin.core.sampling import CURRICULUM_SCHEDULES, PRIORITIES

SAMPLERS = ("uniform", "prioritized", "curriculum")
# Old names still read from a mapping (verl's algorithm.k15 before the names were unified), with the new name.
RENAMED = {"sampler.type": "sampler.name", "sampler.difficulty_key": "sampler.difficulty_column"}


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """What values a setting allows: ``test(value)`` and the words that say so (``a number > 0``)."""

    test: Callable[[Any], bool]
    text: str
    kind: type = object  # the Python type the value is stored as (int values of float settings become floats)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(low: float | None = None, *, above: bool = False, high: float | None = None) -> Rule:
    """A finite number, optionally ``>= low`` (``> low`` with ``above``) and ``<= high``."""
    if low is None:
        return Rule(_is_number, "a finite number", float)
    if high is not None:
        opening = "(" if above else "["
        return Rule(
            lambda v: _is_number(v) and (v > low if above else v >= low) and v <= high,
            f"a number in {opening}{low:g}, {high:g}]",
            float,
        )
    return Rule(
        lambda v: _is_number(v) and (v > low if above else v >= low),
        f"a number {'>' if above else '>='} {low:g}",
        float,
    )


def integer(low: int) -> Rule:
    """An integer ``>= low``."""
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}", int)


def one_of(options: tuple[str, ...]) -> Rule:
    """One of the strings ``options``."""
    return Rule(lambda v: v in options, f"one of {list(options)}", str)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false", bool)
NAME = Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string", str)


def setting(default: Any, rule: Rule, help: str) -> Any:
    """A settings field: its default, its rule and one line of help, the one place each is written."""
    return field(default=default, metadata={"rule": rule, "help": help})


# ------------------------------------------------------------------------------------------------ the settings
@dataclass(frozen=True)
class LengthPenaltySettings:
    """The length penalty of section 2.3.3, added to the task reward per group of k samples."""

    weight: float = setting(0.0, number(0), "Weight of the length reward added to the task reward; 0 switches it off.")
    warmup_steps: int = setting(
        0, integer(0), "Trainer steps (rollout batches, or TRL optimizer steps) before the penalty switches on."
    )
    ramp_steps: int = setting(
        0, integer(0), "After the warm-up, steps over which the weight rises linearly to its value (0: at once)."
    )


@dataclass(frozen=True)
class SamplerSettings:
    """Prompt sampling of section 2.3.4: uniform (the host's own), prioritized or curriculum."""

    name: str = setting("uniform", one_of(SAMPLERS), f"Prompt sampler, one of {list(SAMPLERS)}.")
    prior: float = setting(0.5, number(0, high=1), "Success rate credited to prompts not attempted yet.")
    floor: float = setting(
        0.05,
        number(0, above=True, high=1),
        "Prioritized: smallest weight a prompt keeps (so solved ones still appear).",
    )
    priority: str = setting(
        "failure",
        one_of(PRIORITIES),
        "Prioritized: a prompt's weight, failure (1 - s, the paper's) or learnability (s * (1 - s): prompts "
        "sometimes solved, which alone give a gradient).",
    )
    difficulty_column: str = setting(
        "difficulty", NAME, "Curriculum: the dataset column with each prompt's difficulty (higher is harder)."
    )
    schedule: str = setting(
        "staged",
        one_of(CURRICULUM_SCHEDULES),
        "Curriculum: staged (the whole set, then only the hardest part from switch_step) or gradual (the easiest "
        "part first, widening to the whole set).",
    )
    switch_step: int = setting(0, integer(0), "Staged curriculum: step from which only the hardest prompts are drawn.")
    hard_fraction: float = setting(
        0.5, number(0, above=True, high=1), "Staged curriculum: share of the set, hardest first, kept after the switch."
    )
    start_fraction: float = setting(
        0.3, number(0, above=True, high=1), "Gradual curriculum: share of the set, easiest first, drawn from at step 0."
    )
    ramp_steps: int = setting(100, integer(1), "Gradual curriculum: steps until the pool is the whole set.")


@dataclass(frozen=True)
class RepeatSettings:
    """Repeat detection of section 2.6.2: stop and penalize a generation that loops."""

    detection: bool = setting(False, BOOLEAN, "Stop and penalize looping generations.")
    min_period: int = setting(16, integer(1), "Repeat detection: shortest block length, in tokens.")
    max_period: int = setting(1024, integer(1), "Repeat detection: longest block length (>= min_period).")
    min_count: int = setting(4, integer(2), "Repeat detection: back-to-back copies of a block needed.")
    min_span: int = setting(64, integer(1), "Repeat detection: fewest tokens a loop spans.")
    penalty: float = setting(0.5, number(0), "Repeat detection: a stopped generation's reward is -penalty.")


@dataclass(frozen=True)
class RolloutSettings:
    """Partial rollouts of section 2.6.2: a token budget per trajectory per rollout batch."""

    segment_tokens: int = setting(
        0, integer(0), "Partial rollouts: new tokens per trajectory per rollout batch (0: full rollouts)."
    )
    max_iterations: int = setting(
        0,
        integer(0),
        "Partial rollouts: segments one trajectory may take, a length cap of max_iterations x segment_tokens tokens "
        "that ends it as max_completion_length does (0: no limit).",
    )
    prefill_batches: int = setting(
        -1, integer(-1), "Partial rollouts: extra batches of prompts admitted at the start (-1: automatic)."
    )
    loss_mask: str = setting(
        "all",
        one_of(LOSS_MASKS),
        f"Partial rollouts: tokens in the loss, one of {list(LOSS_MASKS)} (latest: the current policy's only).",
    )
    correction: str = setting(
        "none",
        one_of(CORRECTIONS),
        f"Partial rollouts: off-policy correction of tokens from older policies, one of {list(CORRECTIONS)}.",
    )
    is_cap: float = setting(
        2.0,
        number(1, above=True),
        "Partial rollouts: bound of the correction's ratio pi_i/mu: token_is truncates at it, the masks keep "
        "[1/is_cap, is_cap].",
    )
    emit_order: str = setting(
        "ready",
        one_of(EMIT_ORDERS),
        f"Partial rollouts: which groups a rollout batch trains, one of {list(EMIT_ORDERS)} (ready: the oldest "
        "finished ones; admission: the oldest admitted ones, generating until they have finished).",
    )
    max_staleness: int = setting(
        0,
        integer(0),
        "Partial rollouts: the staleness cap, in policy versions (optimizer steps): a token generated more than this "
        "many versions before the rollout batch that trains it is handled by stale_action (0: no cap).",
    )
    stale_action: str = setting(
        "regenerate",
        one_of(STALE_ACTIONS),
        f"Partial rollouts: what happens to a trajectory holding a token beyond max_staleness, one of "
        f"{list(STALE_ACTIONS)} (regenerate it from the prompt; drop its group and re-admit the prompt; mask the old "
        "tokens out of the loss).",
    )
    repeat: RepeatSettings = field(default_factory=RepeatSettings)


@dataclass(frozen=True)
class K15Settings:
    """Every k1.5 setting, nested as the hosts' configs nest them; frozen; :meth:`check` validates them all.

    Example:
    ```python
    >>> from k15_plugin.core.settings import K15Settings
    >>> K15Settings.from_mapping({"tau": 0.5, "sampler": {"name": "prioritized"}}, "algorithm.k15").sampler.floor
    0.05
    >>> K15Settings.from_mapping({"tau": 0}, "algorithm.k15")
    Traceback (most recent call last):
    ...
    ValueError: algorithm.k15.tau must be a number > 0, got 0

    ```
    """

    tau: float = setting(
        1.0, number(0, above=True), "KL weight tau of the mirror-descent objective (> 0); b = tau log Z."
    )
    log_z_estimator: str = setting(
        "mean", one_of(ESTIMATORS), f"Estimator of tau*log Z, one of {list(ESTIMATORS)} (mean: the paper's practice)."
    )
    length_normalize: bool = setting(
        False, BOOLEAN, "Divide sequence log-probs by the completion length (default: the paper's sum)."
    )
    correct_threshold: float = setting(
        1.0, number(), "A reward >= this counts as correct (for the length penalty and the samplers' success rates)."
    )
    reset_optimizer_each_iteration: bool = setting(
        True, BOOLEAN, "Clear the optimizer state at each new rollout batch (paper: yes)."
    )
    length_penalty: LengthPenaltySettings = field(default_factory=LengthPenaltySettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)

    def check(self, name: Callable[[str], str] | str = "") -> K15Settings:
        """Every value checked; returns a copy with numbers stored as their declared type.

        ``name`` turns a dotted path (``sampler.floor``) into the key the user wrote: a prefix (``"algorithm.k15"``)
        or a function. Raises ``ValueError`` naming that key.
        """
        key = name if callable(name) else (lambda path: f"{name}.{path}" if name else path)
        out = _checked(self, "", key)
        repeat = out.rollout.repeat
        if repeat.max_period < repeat.min_period:
            raise ValueError(
                f"{key('rollout.repeat.max_period')} must be an integer >= {key('rollout.repeat.min_period')}="
                f"{repeat.min_period}, got {repeat.max_period!r}"
            )
        return out

    @classmethod
    def from_mapping(cls, node: Mapping | None, prefix: str) -> K15Settings:
        """Read and check a nested mapping (verl's ``algorithm.k15``; None: the defaults). Unknown keys are refused,
        naming ``prefix.key`` and the known ones; the old names in :data:`RENAMED` are still read."""
        return cls(**_read(cls, node, prefix, "")).check(prefix)

    @classmethod
    def from_flat(cls, obj: Any, name: Callable[[str], str] | None = None) -> K15Settings:
        """The settings held in the flat fields of ``obj`` (a TRL config whose fields were made by :func:`flat_field`),
        checked; missing fields keep their defaults, and errors name the flat field."""
        flat = {f.metadata["k15_path"]: f.name for f in fields(obj) if "k15_path" in f.metadata}
        values = {path: getattr(obj, attr) for path, attr in flat.items()}
        return cls.from_paths(values).check(name or (lambda path: flat.get(path, path)))

    @classmethod
    def from_paths(cls, values: Mapping[str, Any]) -> K15Settings:
        """Settings from ``{dotted path: value}`` (others keep their defaults); not checked."""
        tree: dict[str, Any] = {}
        for path, value in values.items():
            *parents, leaf = path.split(".")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return _build(cls, tree)


def _checked(obj: Any, prefix: str, key: Callable[[str], str]) -> Any:
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        if is_dataclass(value):
            checked = _checked(value, path + ".", key)
            if checked is not value:
                changes[f.name] = checked
            continue
        rule: Rule = f.metadata["rule"]
        if not rule.test(value):
            raise ValueError(f"{key(path)} must be {rule.text}, got {value!r}")
        if rule.kind is float and type(value) is not float:
            changes[f.name] = float(value)
    return replace(obj, **changes) if changes else obj


def _build(cls: type, tree: Mapping[str, Any]) -> Any:
    values = {}
    for f in fields(cls):
        if f.name in tree:
            nested = f.default_factory if f.default_factory is not MISSING else None
            values[f.name] = _build(nested, tree[f.name]) if nested is not None else tree[f.name]
    return cls(**values)


def _read(cls: type, node: Mapping | None, prefix: str, path: str) -> dict[str, Any]:
    node = {} if node is None else node
    where = f"{prefix}.{path}".rstrip(".") if path else prefix
    if not isinstance(node, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(node).__name__}")
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for raw in node:
        name = RENAMED.get(path + str(raw), path + str(raw)).rsplit(".", 1)[-1]
        if name not in known:
            raise ValueError(f"{where}.{raw}: unknown key (known: {', '.join(known)})")
        f = known[name]
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            values[name] = f.default_factory(**_read(f.default_factory, node[raw], prefix, f"{path}{name}."))
        else:
            values[name] = node[raw]
    return values


# ------------------------------------------------------------------------------------------------ other shapes
def _field_at(path: str):
    cls: Any = K15Settings
    *parents, leaf = path.split(".")
    for part in parents:
        cls = next(f for f in fields(cls) if f.name == part).default_factory
    return next(f for f in fields(cls) if f.name == leaf)


def paths(cls: type = K15Settings, prefix: str = "") -> list[str]:
    """Every leaf setting's dotted path (``tau``, ``sampler.floor``, ``rollout.repeat.penalty``, ...)."""
    out = []
    for f in fields(cls):
        if f.default_factory is not MISSING and is_dataclass(f.default_factory):
            out += paths(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def default(path: str) -> Any:
    """The default of the setting at ``path`` (``"sampler.floor"`` -> 0.05)."""
    return _field_at(path).default


def help_of(path: str) -> str:
    """The one line of help of the setting at ``path``."""
    return _field_at(path).metadata["help"]


def flat_field(path: str) -> Any:
    """A flat dataclass field (a TRL config's ``length_penalty_weight``) for the setting at ``path``: its default and
    help come from :class:`K15Settings`, and :meth:`K15Settings.from_flat` finds it by ``path``."""
    f = _field_at(path)
    return field(default=f.default, metadata={"help": f.metadata["help"], "k15_path": path})


def check_value(path: str, value: Any, key: str) -> Any:
    """One setting checked by its rule, named ``key`` in the error (a host's own copy, e.g. verl's loss config)."""
    rule: Rule = _field_at(path).metadata["rule"]
    if not rule.test(value):
        raise ValueError(f"{key} must be {rule.text}, got {value!r}")
    return float(value) if rule.kind is float else value
