"""Typed schemas for the Hydra configs in ``conf/``: OmegaConf checks names and types at compose time.

Each config group option's YAML starts from one of these schemas (``defaults: [<schema name>, _self_]``), so a typo
in a key or a value of the wrong type fails while composing, before anything loads. The k1.5 keys (algorithm's tau
and its neighbours, the sampler, the rollout, the length penalty) take their defaults from
:class:`~k15_plugin.core.settings.K15Settings`, whose rules check their ranges (``k15_plugin.cli.build``); a test
checks that every key here has its setting there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from k15_plugin.core.off_policy import CORRECTIONS
from k15_plugin.core.partial_rollouts import EMIT_ORDERS, STALE_ACTIONS
from k15_plugin.core.settings import default
from k15_plugin.rewards.registry import VERIFIERS


# ---------------------------------------------------------------------------------------------------- algorithm
@dataclass
class KimiMDAlgorithm:
    """``algorithm=kimi_md``: online policy mirror descent (section 2.3); the k1.5 keys default to
    :class:`~k15_plugin.core.settings.K15Settings`, ``num_iterations`` is TRL's passes over each rollout batch."""

    name: str = "kimi_md"
    tau: float = default("tau")
    log_z_estimator: str = default("log_z_estimator")
    length_normalize: bool = default("length_normalize")
    reset_optimizer_each_iteration: bool = default("reset_optimizer_each_iteration")
    num_iterations: int = 2


@dataclass
class GRPOAlgorithm:
    """TRL's GRPOTrainer; ``grpo``, ``dr_grpo`` and ``dapo`` differ in loss_type / scale_rewards / clipping."""

    name: str = "grpo"
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    mask_truncated_completions: bool = False
    num_iterations: int = 1


@dataclass
class PPOAlgorithm:
    """OpenRLHF's PPO with a critic (host=openrlhf only)."""

    name: str = "ppo"
    beta: float = 0.0
    epsilon: float = 0.2
    num_iterations: int = 1


@dataclass
class RLOOAlgorithm:
    """``algorithm=rloo``: TRL's RLOOTrainer (leave-one-out baseline, PPO-clip)."""

    name: str = "rloo"
    beta: float = 0.0
    epsilon: float = 0.2
    normalize_advantages: bool = False
    num_iterations: int = 1


# ---------------------------------------------------------------------------------------------------- sampler
@dataclass
class UniformSampler:
    """``sampler=uniform``: the host's own shuffled sampling."""

    name: str = "uniform"


@dataclass
class PrioritizedSampler:
    """``sampler=prioritized``: prompts drawn by 1 - success rate (section 2.3.4)."""

    name: str = "prioritized"
    floor: float = default("sampler.floor")
    priority: str = default("sampler.priority")
    prior: float = default("sampler.prior")


@dataclass
class CurriculumSampler:
    """``sampler=curriculum``: easy-to-hard by a difficulty column (section 2.3.4)."""

    name: str = "curriculum"
    difficulty_column: str = default("sampler.difficulty_column")
    schedule: str = default("sampler.schedule")
    switch_step: int = default("sampler.switch_step")
    hard_fraction: float = default("sampler.hard_fraction")
    start_fraction: float = default("sampler.start_fraction")
    ramp_steps: int = default("sampler.ramp_steps")


# ---------------------------------------------------------------------------------------------------- rollout
class RolloutMode(str, Enum):
    """``rollout.name``: full rollouts, or partial rollouts with a token budget per rollout batch."""

    full = "full"
    partial = "partial"


class RolloutLossMask(str, Enum):
    """``rollout.loss_mask``: which tokens of a partial trajectory are in the loss."""

    all = "all"
    latest = "latest"


# ``rollout.correction``: the off-policy correction of tokens from older policies (core.off_policy.CORRECTIONS).
RolloutCorrection = Enum("RolloutCorrection", {c: c for c in CORRECTIONS}, type=str)
# ``rollout.emit_order`` and ``rollout.stale_action`` (core.partial_rollouts.EMIT_ORDERS, STALE_ACTIONS).
RolloutEmitOrder = Enum("RolloutEmitOrder", {o: o for o in EMIT_ORDERS}, type=str)
RolloutStaleAction = Enum("RolloutStaleAction", {a: a for a in STALE_ACTIONS}, type=str)


@dataclass
class Repeat:
    """``rollout.repeat``: repeat detection (section 2.6.2)."""

    detection: bool = default("rollout.repeat.detection")
    min_period: int = default("rollout.repeat.min_period")
    max_period: int = default("rollout.repeat.max_period")
    min_count: int = default("rollout.repeat.min_count")
    min_span: int = default("rollout.repeat.min_span")
    penalty: float = default("rollout.repeat.penalty")


@dataclass
class Rollout:
    """The ``rollout`` group: full or partial rollouts and repeat detection."""

    name: RolloutMode = RolloutMode.full
    segment_tokens: int | None = default("rollout.segment_tokens")
    max_iterations: int = default("rollout.max_iterations")
    prefill_batches: int = default("rollout.prefill_batches")
    loss_mask: RolloutLossMask = RolloutLossMask.all
    correction: RolloutCorrection = RolloutCorrection.none
    is_cap: float = default("rollout.is_cap")
    emit_order: RolloutEmitOrder = RolloutEmitOrder.ready
    max_staleness: int = default("rollout.max_staleness")
    stale_action: RolloutStaleAction = RolloutStaleAction.regenerate
    repeat: Repeat = field(default_factory=Repeat)


# ---------------------------------------------------------------------------------------------------- reward
@dataclass
class LengthPenalty:
    """``reward.length_penalty``: the length reward of section 2.3.3 and what counts as correct."""

    weight: float = default("length_penalty.weight")
    warmup_steps: int = default("length_penalty.warmup_steps")
    ramp_steps: int = default("length_penalty.ramp_steps")
    correct_threshold: float = default("correct_threshold")


# Which checker scores a completion (``reward.verifier``): exactly the names of k15_plugin.rewards.registry, as a
# ``str`` enum so a typo fails at compose time. task: the data config's own checker (demo: exact answer + EOS;
# Hub/JSONL: data.answer_extraction match); math: math-verify on the `answer` column; code: sandboxed test cases of
# the `tests` column.
Verifier = Enum("Verifier", {name: name for name in VERIFIERS}, type=str)


class MathExtraction(str, Enum):
    """``reward.math.extraction``: where math-verify finds the completion's answer."""

    auto = "auto"
    boxed = "boxed"
    gsm8k = "gsm8k"
    last_number = "last_number"


class Isolation(str, Enum):
    """``reward.code.isolation``: how the code sandbox isolates a program."""

    allowlist = "allowlist"  # a root of the interpreter, its libraries and allow_paths only
    denylist = "denylist"  # the host's file system read-only, minus the trainer's directories
    none = "none"  # no namespaces (no network or file-system isolation)


class Cgroup(str, Enum):
    """``reward.code.cgroup``: whether a slot's memory and process limits use a cgroup (auto: where delegated)."""

    auto = "auto"
    require = "require"
    off = "off"


@dataclass
class MathVerifier:
    """``reward.math``: the math verifier's settings."""

    extraction: MathExtraction | None = None  # None: data.answer_extraction
    timeout_seconds: float = 5.0


@dataclass
class CodeVerifier:
    """``reward.code``: the code verifier's settings (the sandbox's limits and isolation)."""

    partial_credit: bool = True
    timeout_seconds: float = 5.0
    memory_mb: int = 512
    concurrency: int = 0
    isolation: Isolation = Isolation.allowlist
    allow_paths: list[str] = field(default_factory=list)
    cgroup: Cgroup = Cgroup.auto


@dataclass
class Reward:
    """The ``reward`` group: which verifier scores a completion, its settings, and the length penalty."""

    name: str = "correctness"
    verifier: Verifier = Verifier.task
    math: MathVerifier = field(default_factory=MathVerifier)
    code: CodeVerifier = field(default_factory=CodeVerifier)
    length_penalty: LengthPenalty = field(default_factory=LengthPenalty)


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class Lora:
    """``model.lora``: LoRA adapters through PEFT (the real-model configs)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass
class Model:
    """The ``model`` group: a Hub id, a built-in demo model or a saved directory, and how its weights are held."""

    name: str = MISSING
    path: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora: Lora = field(default_factory=Lora)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """The ``data`` group: the built-in task, a Hub dataset or a JSONL file, its columns and its held-out split."""

    name: str = MISSING
    source: str = "demo_arithmetic"
    path: str | None = None
    config_name: str | None = None
    split: str = "train"
    heldout_split: str | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    answer_extraction: str = "last_number"
    prompt_template: str = "{prompt}"
    chat: bool = False
    heldout_size: int = 500
    num_train: int | None = None
    filler_max: int = 0
    terms: int = 2
    terms_min: int = 2
    terms_max: int = 8


# ---------------------------------------------------------------------------------------------------- launcher
@dataclass
class Launcher:
    """The ``launcher`` group: how many processes and which accelerate config the run is started with."""

    name: str = "local"
    num_processes: int = 1
    accelerate_config: str | None = None


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class Trainer:
    """The ``trainer`` group: TRL's training, generation, logging and checkpoint fields as k15-train passes them."""

    max_steps: int = 1200
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    steps_per_generation: int = 1
    num_generations: int = 8
    max_completion_length: int = 4
    temperature: float = 1.0
    logging_steps: int = 25
    save_steps: int = 0
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None
    eval_steps: int = 200
    eval_size: int = 500
    save_final_model: bool = True
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_gpu_memory_utilization: float = 0.3
    use_cpu: bool = True
    bf16: bool = False
    torch_threads: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


# ---------------------------------------------------------------------------------------------------- host
@dataclass
class Host:
    """The ``host`` group: which host runs the job (``k15_plugin.cli.hosts``), its dry run and its own flags."""

    name: str = "trl"
    dry_run: bool = False
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class K15TrainConfig:
    """The whole composed ``k15-train`` config, one node per config group."""

    seed: int = 0
    algorithm: Any = MISSING
    reward: Reward = MISSING
    sampler: Any = MISSING
    rollout: Rollout = MISSING
    model: Model = MISSING
    data: Data = MISSING
    launcher: Launcher = MISSING
    trainer: Trainer = field(default_factory=Trainer)
    host: Any = MISSING


SCHEMAS = {
    (None, "k15_train_schema"): K15TrainConfig,
    ("algorithm", "kimi_md_schema"): KimiMDAlgorithm,
    ("algorithm", "grpo_schema"): GRPOAlgorithm,
    ("algorithm", "rloo_schema"): RLOOAlgorithm,
    ("algorithm", "ppo_schema"): PPOAlgorithm,
    ("host", "host_schema"): Host,
    ("sampler", "uniform_schema"): UniformSampler,
    ("sampler", "prioritized_schema"): PrioritizedSampler,
    ("sampler", "curriculum_schema"): CurriculumSampler,
    ("reward", "reward_schema"): Reward,
    ("rollout", "rollout_schema"): Rollout,
    ("model", "model_schema"): Model,
    ("data", "data_schema"): Data,
    ("launcher", "launcher_schema"): Launcher,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore under the name its YAML files start from."""
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)


# ---------------------------------------------------------------------------------------------------- unknown keys
# Where a new key is welcome: OpenRLHF's flags (`+host.flags.<flag>=...`), passed through as they are.
FREE_KEYS = ("host.flags",)


def unknown_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(key, schema name)`` for every key of a composed config that its schema does not have.

    OmegaConf's struct mode already rejects ``key=value`` for a key the schema lacks, but Hydra's ``+key=value`` (and
    ``++key=value``) adds the key with struct mode lifted, and the ``algorithm`` and ``sampler`` groups are typed
    ``Any`` at the top: the composed config then carries a key nothing reads. Every node made from a schema keeps its
    dataclass (``OmegaConf.get_type``), so the key sets are compared node by node; a plain ``dict`` node
    (``host.flags``) takes any key.
    """
    found: list[tuple[str, str]] = []

    def walk(node: DictConfig, path: str) -> None:
        schema = OmegaConf.get_type(node)
        if not (isinstance(schema, type) and is_dataclass(schema)) or path in FREE_KEYS:
            return
        known = {f.name for f in fields(schema)}
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            if key not in known:
                found.append((full, schema.__name__))
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, full)

    walk(cfg, "")
    return found


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have (see :func:`unknown_keys`) with one line naming them."""
    unknown = unknown_keys(cfg)
    if not unknown:
        return
    from k15_plugin.cli.build import ConfigError

    hint = "+key=value adds new keys only under host.flags, the OpenRLHF flags"
    if len(unknown) == 1:
        ((key, schema),) = unknown
        raise ConfigError(f"{key}: Key '{key.rpartition('.')[2]}' not in '{schema}' (an unknown key; {hint})")
    keys = ", ".join(key for key, _ in unknown)
    schemas = ", ".join(dict.fromkeys(schema for _, schema in unknown))
    raise ConfigError(f"{keys}: unknown keys (not in {schemas}); {hint}")
