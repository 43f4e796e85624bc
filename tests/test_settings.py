"""K15Settings, the one declaration of the k1.5 settings, and every host shape checked against it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from k15_plugin.core.settings import (
    K15Settings,
    LengthPenaltySettings,
    SamplerSettings,
    check_value,
    default,
    flat_field,
    help_of,
    paths,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_with_the_extras_off():
    s = K15Settings()
    assert (s.tau, s.log_z_estimator, s.length_normalize) == (1.0, "mean", False)
    assert s.reset_optimizer_each_iteration
    assert s.length_penalty == LengthPenaltySettings(weight=0.0, warmup_steps=0, ramp_steps=0)
    assert s.sampler.name == "uniform" and s.rollout.segment_tokens == 0 and not s.rollout.repeat.detection
    assert s.check() is s  # nothing to normalize
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tau = 2.0


def test_paths_default_and_help_read_the_declaration():
    assert paths()[:2] == ["tau", "log_z_estimator"]
    assert "rollout.repeat.penalty" in paths() and "sampler.difficulty_column" in paths()
    assert len(paths()) == len(set(paths())) == 33
    assert default("sampler.floor") == 0.05 and default("rollout.prefill_batches") == -1
    assert "tau" in help_of("tau") and help_of("sampler.floor")


def test_from_mapping_reads_nested_values_and_makes_numbers_floats():
    s = K15Settings.from_mapping({"tau": 2, "length_penalty": {"weight": 1}, "sampler": {"name": "curriculum"}}, "x")
    assert s.tau == 2.0 and type(s.tau) is float
    assert s.length_penalty.weight == 1.0 and type(s.length_penalty.weight) is float
    assert s.sampler.name == "curriculum" and s.sampler.ramp_steps == 100
    assert K15Settings.from_mapping(None, "x") == K15Settings()


def test_from_mapping_still_reads_the_old_sampler_names():
    s = K15Settings.from_mapping({"sampler": {"type": "curriculum", "difficulty_key": "extra_info.level"}}, "a.k15")
    assert s.sampler == SamplerSettings(name="curriculum", difficulty_column="extra_info.level")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"tau": 0}, "a.k15.tau must be a number > 0, got 0"),
        ({"tau": True}, "a.k15.tau must be a number > 0, got True"),
        ({"tau": float("nan")}, "a.k15.tau must be a number > 0, got nan"),
        ({"log_z_estimator": "median"}, "a.k15.log_z_estimator must be one of ['mean', 'log_mean_exp'], got 'median'"),
        ({"length_normalize": "yes"}, "a.k15.length_normalize must be true or false, got 'yes'"),
        ({"correct_threshold": float("inf")}, "a.k15.correct_threshold must be a finite number, got inf"),
        ({"length_penalty": {"weight": -1}}, "a.k15.length_penalty.weight must be a number >= 0, got -1"),
        ({"length_penalty": {"warmup_steps": 1.5}}, "a.k15.length_penalty.warmup_steps must be an integer >= 0"),
        ({"sampler": {"floor": 0}}, "a.k15.sampler.floor must be a number in (0, 1], got 0"),
        ({"sampler": {"prior": 1.5}}, "a.k15.sampler.prior must be a number in [0, 1], got 1.5"),
        ({"sampler": {"difficulty_column": ""}}, "a.k15.sampler.difficulty_column must be a non-empty string"),
        ({"sampler": {"ramp_steps": 0}}, "a.k15.sampler.ramp_steps must be an integer >= 1, got 0"),
        ({"rollout": {"prefill_batches": -2}}, "a.k15.rollout.prefill_batches must be an integer >= -1, got -2"),
        ({"rollout": {"repeat": {"min_count": 1}}}, "a.k15.rollout.repeat.min_count must be an integer >= 2, got 1"),
        (
            {"rollout": {"repeat": {"max_period": 8}}},
            "a.k15.rollout.repeat.max_period must be an integer >= a.k15.rollout.repeat.min_period=16, got 8",
        ),
        ({"sampler": {"nmae": "x"}}, "a.k15.sampler.nmae: unknown key (known: name, prior, floor"),
        ({"sampler": 3}, "a.k15.sampler must be a mapping, got int"),
    ],
)
def test_a_bad_value_names_its_key_and_the_rule(node, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        K15Settings.from_mapping(node, "a.k15")


def test_check_names_keys_as_the_caller_writes_them():
    bad = K15Settings(sampler=SamplerSettings(floor=2.0))
    with pytest.raises(ValueError, match=r"^prioritized_floor must be"):
        bad.check(lambda path: {"sampler.floor": "prioritized_floor"}[path])
    with pytest.raises(ValueError, match=r"^sampler\.floor must be"):
        bad.check()
    assert check_value("tau", 3, "loss.tau") == 3.0
    with pytest.raises(ValueError, match=r"loss\.tau must be a number > 0, got -1"):
        check_value("tau", -1, "loss.tau")


def test_flat_field_and_from_flat():
    @dataclasses.dataclass
    class Flat:
        sampler_type: str = flat_field("sampler.name")
        prioritized_floor: float = flat_field("sampler.floor")
        other: int = 3

    assert Flat().prioritized_floor == 0.05
    assert dataclasses.fields(Flat)[1].metadata["help"] == help_of("sampler.floor")
    s = K15Settings.from_flat(Flat(sampler_type="prioritized", prioritized_floor=1))
    assert s.sampler.name == "prioritized" and s.sampler.floor == 1.0 and s.tau == 1.0
    with pytest.raises(ValueError, match=r"^sampler_type must be one of"):
        K15Settings.from_flat(Flat(sampler_type="hardest"))


# ------------------------------------------------------------------------------------------------ the host shapes
def test_trl_flat_fields_cover_every_setting_with_its_default():
    from k15_plugin.trl.config import K15Options, KimiMirrorDescentConfig

    flat = {f.metadata["k15_path"]: f for f in dataclasses.fields(KimiMirrorDescentConfig) if "k15_path" in f.metadata}
    assert sorted(flat) == sorted(paths())
    for path, f in flat.items():
        assert f.default == default(path) and f.metadata["help"] == help_of(path), path
    shared = {f.metadata["k15_path"] for f in dataclasses.fields(K15Options) if "k15_path" in f.metadata}
    assert shared == set(paths()) - {"tau", "log_z_estimator", "length_normalize", "reset_optimizer_each_iteration"}


def _schema_leaves(node, prefix=""):
    for f in dataclasses.fields(node):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            yield from _schema_leaves(type(value), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def test_hydra_schema_keys_are_settings_with_their_defaults():
    from k15_plugin.cli import schema
    from k15_plugin.cli.build import hydra_key

    key_of = {hydra_key(p): p for p in paths()}
    groups = {
        "algorithm": schema.KimiMDAlgorithm,
        "sampler": schema.CurriculumSampler,
        "rollout": schema.Rollout,
        "reward.length_penalty": schema.LengthPenalty,
    }
    seen = set()
    for prefix, node in groups.items():
        for key, value in _schema_leaves(node, prefix + "."):
            if key in ("algorithm.name", "algorithm.num_iterations", "sampler.name", "rollout.name"):
                continue  # the group's option, and TRL's own num_iterations
            assert key in key_of, key
            value = getattr(value, "value", value)
            assert value == default(key_of[key]), key
            seen.add(key_of[key])
    for key, _ in _schema_leaves(schema.PrioritizedSampler, "sampler."):
        assert key == "sampler.name" or key in key_of, key
    assert seen == set(paths()) - {"sampler.name", "sampler.prior", "sampler.floor", "sampler.priority"}


def test_conf_yaml_of_the_k15_groups_uses_only_known_keys():
    from k15_plugin.cli.build import hydra_key

    known = {hydra_key(p) for p in paths()}
    for group in ("sampler", "rollout"):
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            node = OmegaConf.to_container(OmegaConf.load(path))
            for key in node:
                if key in ("defaults", "name"):
                    continue
                value = node[key]
                leaves = [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
                for leaf in leaves:
                    assert f"{group}.{leaf}" in known, (path.name, leaf)


def test_verl_algorithm_k15_node_declares_every_setting_but_rollout_with_its_default():
    node = OmegaConf.load(ROOT / "k15_plugin" / "verl" / "config" / "k15_base.yaml").algorithm.k15
    flat = {}

    def walk(n, prefix=""):
        for key, value in n.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(OmegaConf.to_container(node))
    expected = [p for p in paths() if not p.startswith("rollout.")]
    assert sorted(flat) == sorted(expected)
    for path, value in flat.items():
        assert value == default(path), path


def test_openrlhf_settings_are_k15_settings_with_the_algorithm():
    from k15_plugin.openrlhf.config import OpenRLHFSettings

    s = OpenRLHFSettings(algorithm="grpo", tau=0.5)
    assert isinstance(s, K15Settings) and s.tau == 0.5 and s.algorithm == "grpo"
    assert {f.name for f in dataclasses.fields(K15Settings)} < {f.name for f in dataclasses.fields(s)}
    with pytest.raises(ValueError, match="algorithm must be one of"):
        OpenRLHFSettings(algorithm="dapo")


def test_the_math_and_samplers_default_to_the_settings_defaults():
    """The core functions and both hosts' samplers keep explicit keyword defaults (they are usable without the
    settings); each must be the declared setting's default."""
    import inspect

    from k15_plugin.core import length_penalty, prompt_sampler, sampling
    from k15_plugin.trl import samplers

    names = {
        "prior": "sampler.prior",
        "floor": "sampler.floor",
        "priority": "sampler.priority",
        "schedule": "sampler.schedule",
        "switch_step": "sampler.switch_step",
        "hard_fraction": "sampler.hard_fraction",
        "start_fraction": "sampler.start_fraction",
        "ramp_steps": "sampler.ramp_steps",
    }
    callables = [
        sampling.SuccessRateTracker,
        sampling.curriculum_pool,
        sampling.CurriculumPool,
        prompt_sampler.PromptSampler,
        prompt_sampler.PrioritizedPromptSampler,
        prompt_sampler.CurriculumPromptSampler,
        samplers.K15RepeatSampler,
        samplers.PrioritizedSampler,
        samplers.CurriculumSampler,
    ]
    checked = 0
    for fn in callables:
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in names and parameter.default is not inspect.Parameter.empty:
                assert parameter.default == default(names[name]), (fn.__qualname__, name)
                checked += 1
    assert checked >= 15
    lp = inspect.signature(length_penalty.length_penalty_weight).parameters
    assert lp["warmup_steps"].default == default("length_penalty.warmup_steps")
    assert lp["ramp_steps"].default == default("length_penalty.ramp_steps")
