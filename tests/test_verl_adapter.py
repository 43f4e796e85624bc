"""The verl adapter (k15_plugin.verl) against verl 0.9's real modules, on CPU, without Ray workers or a GPU.

Runs in the verl test environment (README: the verl test command); skipped where verl is not installed.
"""

import importlib.metadata
import json
import logging
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import k15_plugin.verl as k15_verl  # noqa: E402
from k15_plugin.core import length_reward, mirror_descent_advantages, mirror_descent_loss  # noqa: E402
from k15_plugin.verl import advantages as k15_adv  # noqa: E402
from k15_plugin.verl import register as k15_register  # noqa: E402
from k15_plugin.verl.config import K15PolicyLossConfig, k15_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "k15_plugin" / "data" / "demo_checkpoint"
# verl asks for micro-batch sizes and refuses the 8-GPU default layout without them; what a user sets anyway
SMALL = [
    "trainer.n_gpus_per_node=1",
    "data.train_batch_size=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.n=4",
]


def compose_plugin(name: str, overrides=()):
    with initialize_config_dir(config_dir=k15_verl.CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=[*SMALL, *overrides])


@pytest.fixture(autouse=True)
def _no_trainer_step():
    k15_adv.set_trainer_step(None)
    yield
    k15_adv.set_trainer_step(None)


# ----------------------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------------------


def test_the_entry_point_registers_everything_on_import_verl():
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert [ep.value for ep in eps if ep.name == "k15"] == ["k15_plugin.verl.register"]
    # a fresh process: what `import verl` alone gives (the acceptance command), and the lazy trainer
    code = (
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn, get_adv_estimator_fn\n"
        "get_policy_loss_fn('k15_md'); [get_adv_estimator_fn(n) for n in ('k15_md', 'k15_grpo', 'k15_rloo')]\n"
        "print('trainer before v1:', 'k15_plugin.verl.trainer' in sys.modules)\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "print('trainer:', get_trainer_cls('k15_sync').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainer before v1: False" in out.stdout
    assert "trainer: K15SyncTrainer" in out.stdout


def test_a_failed_trainer_registration_is_logged_at_warning(monkeypatch, caplog):
    def broken(name):
        raise ImportError("no module named transfer_queue (simulated)")

    monkeypatch.setattr(k15_register.importlib, "import_module", broken)
    with caplog.at_level(logging.WARNING, logger="k15_plugin.verl"):
        k15_register._register_trainer()
    assert any("k15_sync" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert "simulated" in caplog.text


def test_config_dir_command(capsys):
    from k15_plugin.verl.__main__ import main

    assert main(["--config-dir"]) == 0
    assert capsys.readouterr().out.strip() == k15_verl.CONFIG_DIR
    assert main(["--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list(k15_verl.CONFIG_NAMES)
    assert all((Path(k15_verl.CONFIG_DIR) / f"{n}.yaml").is_file() for n in names)


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", k15_verl.CONFIG_NAMES)
def test_each_shipped_config_composes_on_verl_and_validates(name):
    cfg = compose_plugin(name)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # what verl's worker builds
    options = k15_settings(cfg.algorithm)
    assert cfg.trainer.v1.trainer_mode == "k15_sync"
    assert cfg.data.dataloader_num_workers == 0
    assert cfg.actor_rollout_ref.rollout.n == 4
    if name == "k15_md":
        assert isinstance(actor.policy_loss, K15PolicyLossConfig)
        assert actor.policy_loss.loss_mode == "k15_md"
        assert cfg.algorithm.adv_estimator == "k15_md"
        assert options.reset_optimizer_each_iteration
    else:
        assert type(actor.policy_loss).__name__ == "PolicyLossConfig"
        assert actor.policy_loss.loss_mode == "vanilla"
        assert cfg.algorithm.adv_estimator in ("k15_grpo", "k15_rloo")
        assert not options.reset_optimizer_each_iteration
    assert cfg.algorithm.norm_adv_by_std_in_grpo is (name != "k15_dr_grpo")


def test_tau_is_one_value_for_the_loss_and_the_baseline():
    cfg = compose_plugin("k15_md", ["algorithm.k15.tau=0.25"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.policy_loss.tau == 0.25
    assert k15_settings(cfg.algorithm).tau == 0.25


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.k15.tau=0", "algorithm.k15.tau must be a number > 0"),
        ("algorithm.k15.log_z_estimator=median", "algorithm.k15.log_z_estimator must be one of"),
        ("algorithm.k15.sampler.name=hardest", "algorithm.k15.sampler.name must be one of"),
        ("algorithm.k15.length_penalty.weight=-1", "algorithm.k15.length_penalty.weight must be a number >= 0"),
        ("+algorithm.k15.length_penalty.wieght=1", "algorithm.k15.length_penalty.wieght: unknown key"),
        ("algorithm.k15.reset_optimizer_each_iteration=maybe", "must be true or false"),
    ],
)
def test_a_bad_k15_value_names_its_key(override, message):
    cfg = compose_plugin("k15_md", [override])
    with pytest.raises(ValueError, match=re.escape(message)):
        k15_settings(cfg.algorithm)


def test_a_bad_loss_tau_is_refused_when_verl_builds_the_actor_config():
    cfg = compose_plugin("k15_md", ["actor_rollout_ref.actor.policy_loss.tau=-1"])
    with pytest.raises(Exception, match=r"actor_rollout_ref\.actor\.policy_loss\.tau must be a number > 0"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_shipped_configs_comment_every_key():
    for path in Path(k15_verl.CONFIG_DIR).glob("*.yaml"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*[A-Za-z_][\w.]*:", line):
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("#"), f"{path.name}:{i + 1} {line.strip()!r} has no comment above it"


def test_verl_launcher_composes_the_plugin_config(tmp_path):
    """verl's own entry point, `--cfg job`: composes and prints without starting Ray."""
    cmd = [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        f"--config-dir={k15_verl.CONFIG_DIR}",
        "--config-name=k15_md",
        "algorithm.k15.tau=0.3",
        "algorithm.k15.sampler.name=prioritized",
        "--cfg",
        "job",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    job = OmegaConf.create(out.stdout)
    assert job.algorithm.adv_estimator == "k15_md"
    assert job.algorithm.k15.sampler.name == "prioritized"
    assert job.actor_rollout_ref.actor.policy_loss.loss_mode == "k15_md"
    assert OmegaConf.to_container(job, resolve=True)["actor_rollout_ref"]["actor"]["policy_loss"]["tau"] == 0.3


# ----------------------------------------------------------------------------------------------------------------------
# Advantages through verl's compute_advantage
# ----------------------------------------------------------------------------------------------------------------------

G, K, T = 3, 4, 7
# rows of the three prompts interleaved, as verl's balancing can leave them
UIDS = np.array(["a", "b", "c"] * K, dtype=object)
LENS = torch.tensor([7, 2, 4, 3, 5, 6, 1, 2, 7, 5, 3, 4])
SCORES = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
ORDER = torch.tensor([0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11])  # makes the groups consecutive (a, b, c)


def _data():
    mask = (torch.arange(T)[None, :] < LENS[:, None]).float()  # (N, T)
    tlr = torch.zeros(G * K, T)
    tlr[torch.arange(G * K), LENS - 1] = SCORES  # verl puts a sequence's reward on its last token
    return DataProto.from_dict(tensors={"token_level_rewards": tlr, "response_mask": mask}, non_tensors={"uid": UIDS})


def _advantages(estimator, overrides=(), step=None):
    cfg = compose_plugin("k15_md", overrides)
    k15_adv.set_trainer_step(step)
    out = compute_advantage(
        _data(),
        adv_estimator=estimator,
        num_repeat=K,
        config=cfg.algorithm,
        norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo,
    )
    adv = out.batch["advantages"]  # (N, T)
    mask = out.batch["response_mask"]
    assert torch.equal(adv, adv[:, :1].expand_as(adv) * mask), "one advantage per row, on its response tokens"
    return adv[:, 0]


def _ungroup(x):
    out = torch.empty_like(x)
    out[ORDER] = x
    return out


@pytest.mark.parametrize("estimator", ["mean", "log_mean_exp"])
def test_k15_md_advantages_equal_the_core_on_interleaved_groups(estimator):
    got = _advantages("k15_md", [f"algorithm.k15.log_z_estimator={estimator}", "algorithm.k15.tau=0.5"])
    want = _ungroup(mirror_descent_advantages(SCORES[ORDER], K, 0.5, estimator))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # by hand for prompt "a" (rows 0, 3, 6, 9: rewards 1, 1, 1, 0), mean baseline 0.75
    if estimator == "mean":
        torch.testing.assert_close(got[[0, 3, 6, 9]], torch.tensor([0.25, 0.25, 0.25, -0.75]))


def test_length_penalty_on_whole_groups_after_its_warm_up():
    overrides = ["algorithm.k15.length_penalty.weight=0.2", "algorithm.k15.length_penalty.warmup_steps=3"]
    before = _advantages("k15_md", overrides, step=2)
    after = _advantages("k15_md", overrides, step=3)
    plain = _ungroup(mirror_descent_advantages(SCORES[ORDER], K, 1.0, "mean"))
    torch.testing.assert_close(before, plain, rtol=0, atol=1e-6)
    penalized = SCORES[ORDER] + 0.2 * length_reward(LENS[ORDER], SCORES[ORDER] >= 1, K)
    torch.testing.assert_close(after, _ungroup(mirror_descent_advantages(penalized, K, 1.0, "mean")), rtol=0, atol=1e-6)
    # by hand, prompt "a": lengths 7, 3, 1, 5, correct 1, 1, 1, 0 -> lambda = 0.5 - (len - 1) / 6 = -0.5, 1/6, 0.5,
    # and min(-1/6, 0) for the wrong one
    lam = torch.tensor([-0.5, 1 / 6, 0.5, -1 / 6])
    r = torch.tensor([1.0, 1.0, 1.0, 0.0]) + 0.2 * lam
    torch.testing.assert_close(after[[0, 3, 6, 9]], r - r.mean(), rtol=0, atol=1e-6)


def test_a_warm_up_without_the_plugin_trainer_is_refused():
    overrides = ["algorithm.k15.length_penalty.weight=0.2", "algorithm.k15.length_penalty.warmup_steps=3"]
    with pytest.raises(ValueError, match="trainer_mode=k15_sync"):
        _advantages("k15_md", overrides, step=None)


def test_groups_of_other_sizes_are_their_own_groups():
    # verl's padding rows share one uid; an agent loop may drop a trajectory: groups of 4, 3 and 2 rows here
    uids = np.array(["a", "b", "pad", "a", "b", "a", "pad", "b", "a"], dtype=object)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    cfg = compose_plugin("k15_md")
    adv, _ = core_algos.get_adv_estimator_fn("k15_md")(
        rewards.unsqueeze(-1), torch.ones(9, 1), uids, config=cfg.algorithm
    )
    # a: 1, 0, 1, 0 (mean 0.5); b: 0, 1, 1 (mean 2/3); pad: 0, 0
    want = torch.tensor([0.5, -2 / 3, 0.0, -0.5, 1 / 3, 0.5, 0.0, 1 / 3, -0.5])
    torch.testing.assert_close(adv[:, 0], want)


@pytest.mark.parametrize(("estimator", "norm"), [("k15_grpo", True), ("k15_grpo", False), ("k15_rloo", True)])
def test_baseline_estimators_are_verl_own_on_the_penalized_rewards(estimator, norm):
    overrides = ["algorithm.k15.length_penalty.weight=0.2", f"algorithm.norm_adv_by_std_in_grpo={norm}"]
    got = _advantages(estimator, overrides, step=0)
    penalized = _ungroup(SCORES[ORDER] + 0.2 * length_reward(LENS[ORDER], SCORES[ORDER] >= 1, K))
    data = _data()
    tlr = torch.zeros(G * K, T)
    tlr[torch.arange(G * K), LENS - 1] = penalized
    if estimator == "k15_grpo":
        want, _ = core_algos.compute_grpo_outcome_advantage(
            tlr, data.batch["response_mask"], UIDS, norm_adv_by_std_in_grpo=norm
        )
    else:
        want, _ = core_algos.compute_rloo_outcome_advantage(tlr, data.batch["response_mask"], UIDS)
    torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# The loss through verl's ppo_loss
# ----------------------------------------------------------------------------------------------------------------------

PROMPT_LENS = torch.tensor([3, 2, 4, 1, 2, 3, 2, 2, 1, 3, 2, 4])


def _ppo_loss_on(rows, actor_cfg, token_logp, old, adv, mask, global_batch_size):
    """verl's ppo_loss on a micro-batch of ``rows``: model output in verl's no-padding layout (prompt + response
    tokens per sequence, response log-probs shifted left by one)."""
    prompts = torch.zeros(len(rows), int(PROMPT_LENS.max()), dtype=torch.long)
    responses = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros(len(rows), prompts.shape[1] + T, dtype=torch.long)
    flat = []
    for i, row in enumerate(rows):
        p, r = int(PROMPT_LENS[row]), int(LENS[row])
        attention[i, prompts.shape[1] - p : prompts.shape[1] + r] = 1
        segment = torch.zeros(p + r)
        segment = segment.index_put((torch.arange(p - 1, p - 1 + r),), token_logp[row, :r])
        flat.append(segment)
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "attention_mask": attention,
            "response_mask": mask[rows],
            "old_log_probs": old[rows],
            "advantages": adv[rows],
        },
        batch_size=[len(rows)],
    )
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=global_batch_size)
    loss, _ = ppo_loss(actor_cfg, {"log_probs": torch.cat(flat)}, data)
    return loss


def test_k15_md_loss_through_ppo_loss_equals_the_core_with_micro_batches():
    cfg = compose_plugin("k15_md", ["algorithm.k15.tau=0.5"])
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    torch.manual_seed(0)
    mask = (torch.arange(T)[None, :] < LENS[:, None]).float()  # (N, T)
    logp = (torch.randn(G * K, T) * 0.3 - 1.0).requires_grad_(True)  # the policy being trained
    old = (logp.detach() + 0.2 * torch.randn(G * K, T)) * mask  # pi_i, after an earlier update of the batch
    adv = _advantages("k15_md", ["algorithm.k15.tau=0.5"]).unsqueeze(-1) * mask  # (N, T) from verl's compute_advantage
    # one mini-batch of all rows, in three micro-batches of interleaved rows, as verl's engine accumulates them
    micro = [[0, 5, 10, 3], [1, 6, 11, 8], [2, 7, 4, 9]]
    total = sum(_ppo_loss_on(rows, actor_cfg, logp, old, adv, mask, G * K) for rows in micro)
    total.backward()
    grad = logp.grad.clone()
    logp.grad = None
    seq, old_seq = (logp * mask).sum(-1), (old * mask).sum(-1)
    want = mirror_descent_loss(seq[ORDER], old_seq[ORDER], SCORES[ORDER], K, 0.5, "mean")
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-6, atol=1e-7)
    assert float((logp.grad * (1 - mask)).abs().sum()) == 0  # padding gets no gradient


def test_k15_md_loss_asks_for_tau_when_the_stock_config_is_used():
    cfg = compose_plugin("k15_grpo", ["actor_rollout_ref.actor.policy_loss.loss_mode=k15_md"])
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    fn = core_algos.get_policy_loss_fn("k15_md")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"K15PolicyLossConfig"):
        fn(old_log_prob=x, log_prob=x, advantages=x, response_mask=torch.ones(2, 3, dtype=torch.bool), config=actor_cfg)


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: sampler through verl's loader and checkpoint, reset, refusals
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def train_files(tmp_path):
    import pandas as pd

    rows = [
        {
            "data_source": "k15_demo",
            "prompt": [{"role": "user", "content": f"{i}+{i % 7}="}],
            "reward_model": {"style": "rule", "ground_truth": str(i + i % 7)},
            "extra_info": {"index": i, "level": i % 5},
            "difficulty": float(i % 5),
        }
        for i in range(24)
    ]
    path = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _trainer(train_files, overrides=()):
    from verl.trainer.ppo.v1 import get_trainer_cls

    cfg = compose_plugin(
        "k15_md",
        [
            f"data.train_files={train_files}",
            f"data.val_files={train_files}",
            f"actor_rollout_ref.model.path={DEMO_MODEL}",
            "data.filter_overlong_prompts=false",
            "data.train_batch_size=4",
            "data.seed=3",
            *overrides,
        ],
    )
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    return trainer


def _play(trainer, steps, rng):
    """``steps`` rollout batches: verl's own fetch, then fake rewards fed back as the step would."""
    seen = []
    for _ in range(steps):
        batch = trainer._fetch_one_gen_batch()
        uids = list(batch["uid"])
        seen.append([trainer._k15_rows[u] for u in uids])
        traj = np.repeat(np.array(uids, dtype=object), 4)  # rollout.n = 4 trajectories per prompt
        trainer.k15_record_scores(traj, torch.tensor(rng.random(len(traj)) < 0.5, dtype=torch.float32))
    return seen


@pytest.mark.parametrize("sampler", ["prioritized", "curriculum"])
def test_sampler_state_round_trips_through_verl_data_checkpoint(train_files, tmp_path, sampler):
    extra = [
        f"algorithm.k15.sampler.name={sampler}",
        "algorithm.k15.sampler.schedule=gradual",
        "algorithm.k15.sampler.ramp_steps=4",
    ]
    trainer = _trainer(train_files, extra)
    assert trainer.config.trainer.v1.trainer_mode == "sync"  # behaves as verl's sync trainer
    assert trainer.train_dataloader.sampler is trainer.k15_sampler
    rng = np.random.default_rng(0)
    first = _play(trainer, 8, rng)  # 24 prompts / 4 per batch: crosses an epoch boundary
    torch.save(trainer.train_dataloader.state_dict(), tmp_path / "data.pt")  # as verl's _save_checkpoint
    rng_state = rng.bit_generator.state
    uninterrupted = _play(trainer, 5, rng)

    resumed = _trainer(train_files, extra)
    resumed.train_dataloader.load_state_dict(torch.load(tmp_path / "data.pt", weights_only=False))  # _load_checkpoint
    rng.bit_generator.state = rng_state
    assert _play(resumed, 5, rng) == uninterrupted
    torch.testing.assert_close(resumed.k15_sampler.tracker.attempts, trainer.k15_sampler.tracker.attempts)
    assert all(len(set(rows)) == 4 for rows in first + uninterrupted)  # distinct prompts per rollout batch
    if sampler == "curriculum":  # gradual from 30 % easiest: step 0 only draws the easiest labels
        assert max(float(i % 5) for i in first[0]) <= 1


def test_prioritized_sampler_favours_what_fails(train_files):
    trainer = _trainer(train_files, ["algorithm.k15.sampler.name=prioritized", "algorithm.k15.sampler.floor=0.01"])
    counts = np.zeros(24)
    for _ in range(60):
        batch = trainer._fetch_one_gen_batch()
        uids = list(batch["uid"])
        rows = [trainer._k15_rows[u] for u in uids]
        counts[rows] += 1
        traj = np.repeat(np.array(uids, dtype=object), 4)
        ok = torch.tensor(np.repeat([float(r >= 12) for r in rows], 4))  # rows 12..23 always solved
        trainer.k15_record_scores(traj, ok)
    assert counts[:12].sum() > 3 * counts[12:].sum()


def test_uniform_keeps_verls_own_sampler(train_files):
    trainer = _trainer(train_files)
    assert trainer.k15_sampler is None
    assert type(trainer.train_dataloader.sampler).__name__ == "RandomSampler"


def test_optimizer_reset_runs_before_verls_actor_update(train_files):
    trainer = _trainer(train_files)
    calls = []
    trainer.actor_rollout_wg = types.SimpleNamespace(
        k15_reset_optimizer=lambda: calls.append("reset"),
        update_actor=lambda batch: calls.append("update") or {"metrics": {"mfu": 0.0, "pg_loss": 1.0}},
    )
    batch = types.SimpleNamespace(extra_info={})
    metrics = {}
    for _ in range(2):
        trainer._update_actor(batch, metrics)
    assert calls == ["reset", "update", "reset", "update"]
    assert metrics["k15/optimizer_resets"] == 2
    assert batch.extra_info["epochs"] == trainer.config.actor_rollout_ref.actor.ppo_epochs  # verl's own method ran


def test_the_actor_worker_is_extended_with_the_reset(train_files):
    from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch

    from k15_plugin.verl.workers import K15ActorRolloutRefWorker

    trainer = _trainer(train_files)
    trainer._init_resource_pool_mgr()  # verl's own mapping, then the swap (no Ray started)
    classes = [cls.__ray_metadata__.modified_class.__ray_actor_class__ for cls in trainer.role_worker_mapping.values()]
    assert K15ActorRolloutRefWorker in classes
    attrs = getattr(K15ActorRolloutRefWorker.k15_reset_optimizer, MAGIC_ATTR)
    assert attrs["dispatch_mode"] == Dispatch.ONE_TO_ALL


def test_reset_optimizer_state_equals_a_fresh_optimizer():
    from k15_plugin.verl.workers import reset_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.1)
    assert reset_optimizer_state(opt) == 2
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="set it to false"):
        reset_optimizer_state(object())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor_rollout_ref.actor.strategy=megatron"], "reset_optimizer_each_iteration=true is implemented for"),
        (["algorithm.k15.sampler.name=prioritized", "data.dataloader_num_workers=8"], "dataloader_num_workers=0"),
        # Found by a review against verl 0.9.1: each ran silently wrong before.
        (
            ["algorithm.k15.sampler.name=prioritized", "algorithm.filter_groups.enable=true"],
            "algorithm.filter_groups.enable=true with algorithm.k15.sampler.name=prioritized: the groups verl evicts",
        ),
        (
            ["algorithm.k15.sampler.name=curriculum", "trainer.v1.sampler.sync_refill_failed_groups=true"],
            "trainer.v1.sampler.sync_refill_failed_groups=true with algorithm.k15.sampler.name=curriculum",
        ),
        (["algorithm.rollout_correction.bypass_mode=true"], "algorithm.rollout_correction.bypass_mode=true with"),
        (["algorithm.rollout_correction.rollout_rs=token_k1"], "algorithm.rollout_correction.rollout_rs=token_k1"),
        (["trainer.v1.trainer_mode=colocate_async"], "reset_optimizer_each_iteration=true needs trainer.v1"),
        (["trainer.use_v1=false"], "reset_optimizer_each_iteration=true needs trainer.v1.trainer_mode=k15_sync"),
        (
            [
                "trainer.v1.trainer_mode=sync",
                "algorithm.k15.reset_optimizer_each_iteration=false",
                "algorithm.k15.sampler.name=prioritized",
            ],
            "algorithm.k15.sampler.name=prioritized needs trainer.v1.trainer_mode=k15_sync",
        ),
    ],
)
def test_the_trainer_refuses_what_it_cannot_do(train_files, overrides, message):
    from k15_plugin.verl.trainer import check_config

    cfg = compose_plugin("k15_md", overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(cfg)


def test_group_filtering_with_a_uniform_sampler_and_baselines_in_other_modes_pass(train_files):
    from k15_plugin.verl.trainer import check_config

    check_config(compose_plugin("k15_md", ["algorithm.filter_groups.enable=true"]))
    check_config(
        compose_plugin("k15_grpo", ["trainer.v1.trainer_mode=sync", "algorithm.rollout_correction.bypass_mode=true"])
    )


def test_estimators_outside_the_plugins_trainer_refuse_a_sampler_and_warn_of_the_reset():
    from verl.trainer.ppo import core_algos

    from k15_plugin.verl import advantages as k15_adv

    k15_adv.set_trainer_step(None)
    rewards = torch.zeros(4, 3)
    rewards[[0, 2], -1] = 1.0
    args = (rewards, torch.ones(4, 3), np.array(["a", "a", "b", "b"]))
    cfg = OmegaConf.create({"k15": {"sampler": {"name": "prioritized"}, "reset_optimizer_each_iteration": False}})
    for name in ("k15_md", "k15_grpo", "k15_rloo"):
        with pytest.raises(ValueError, match=r"^algorithm.k15.sampler.name=prioritized needs trainer.v1"):
            core_algos.get_adv_estimator_fn(name)(*args, config=cfg)
    k15_adv._warned_reset = False
    with pytest.warns(UserWarning, match="reset_optimizer_each_iteration=true has no effect"):
        core_algos.get_adv_estimator_fn("k15_md")(*args, config=OmegaConf.create({"k15": {}}))
    k15_adv.set_trainer_step(0)  # the plugin's trainer: no refusal
    core_algos.get_adv_estimator_fn("k15_md")(*args, config=cfg)
    k15_adv.set_trainer_step(None)


def test_curriculum_without_the_difficulty_column_names_the_key(train_files):
    with pytest.raises(ValueError, match=r"algorithm\.k15\.sampler\.difficulty_column=hardness"):
        _trainer(
            train_files, ["algorithm.k15.sampler.name=curriculum", "algorithm.k15.sampler.difficulty_column=hardness"]
        )


def test_curriculum_reads_a_dotted_difficulty_path(train_files):
    trainer = _trainer(
        train_files,
        ["algorithm.k15.sampler.name=curriculum", "algorithm.k15.sampler.difficulty_column=extra_info.level"],
    )
    torch.testing.assert_close(trainer.k15_sampler.difficulty, torch.arange(24, dtype=torch.float64) % 5)


def test_compute_advantage_feeds_the_sampler_and_sets_the_step(train_files, monkeypatch):
    """verl's own _compute_advantage with the plugin's override, TransferQueue replaced by a dict."""
    from verl.trainer.ppo.v1 import trainer_base

    extra = [
        "algorithm.k15.sampler.name=prioritized",
        "algorithm.k15.length_penalty.weight=0.1",
        "algorithm.k15.length_penalty.warmup_steps=5",
    ]
    trainer = _trainer(train_files, extra)
    batch = trainer._fetch_one_gen_batch()
    uids = list(batch["uid"])
    rows = [trainer._k15_rows[u] for u in uids]
    traj_uids = [u for u in uids for _ in range(4)] + ["pad0"]  # a padding row of verl's balancing (own uid)
    n = len(traj_uids)
    lens = torch.tensor([1 + i % 5 for i in range(n)])
    scores = torch.tensor([float(i % 3 == 0) for i in range(n)])
    rm = [
        torch.zeros(int(length)).index_fill(0, torch.tensor([int(length) - 1]), float(s))
        for length, s in zip(lens, scores, strict=True)
    ]
    nested = lambda ts: torch.nested.as_nested_tensor(ts, layout=torch.jagged)  # noqa: E731
    store = TensorDict(
        {"rm_scores": nested(rm), "response_mask": nested([torch.ones(int(x)) for x in lens])}, batch_size=[n]
    )
    tu.assign_non_tensor(store, uid=traj_uids)
    written = {}

    class FakeTQ:
        @staticmethod
        def kv_batch_get(keys, partition_id, select_fields):
            return store.select(*[f for f in select_fields if f in store.keys()] + ["uid"])

        @staticmethod
        def kv_batch_put(keys, partition_id, fields=None, tags=None):
            written.update(fields.items())
            return KVBatchMeta(partition_id=partition_id, keys=keys, tags=[{}] * n)

    monkeypatch.setattr(trainer_base, "tq", FakeTQ)
    from transfer_queue import KVBatchMeta

    meta = KVBatchMeta(
        partition_id="train", keys=[f"k{i}" for i in range(n)], tags=[{}] * (n - 1) + [{"is_padding": True}]
    )
    trainer.global_steps = 7  # the 7th step: 6 rollout batches before it, past the 5-step warm-up
    metrics = {}
    trainer._compute_advantage(meta, metrics)
    assert metrics["k15/length_penalty_weight"] == pytest.approx(0.1)
    assert metrics["k15/sampler_updates"] == n - 1
    attempts = trainer.k15_sampler.tracker.attempts
    assert int(attempts.sum()) == n - 1 and all(int(attempts[r]) == 4 for r in rows)
    assert trainer._k15_rows == {}
    assert "advantages" in written


def test_gpu_check_script_overrides_compose_and_validate(tmp_path):
    from bench.verl_gpu_check import verl_command, write_data

    train, val = write_data(tmp_path, 8, seed=0)
    cmd = verl_command(k15_verl.CONFIG_DIR, "Qwen/Qwen2.5-0.5B-Instruct", train, val, tmp_path, 3)
    start = cmd.index("-m")
    assert cmd[start + 1 : start + 4] == [
        "verl.trainer.main_ppo",
        f"--config-dir={k15_verl.CONFIG_DIR}",
        "--config-name=k15_md",
    ]
    with initialize_config_dir(config_dir=k15_verl.CONFIG_DIR, version_base=None):
        cfg = compose(config_name="k15_md", overrides=cmd[start + 4 :])
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    assert k15_settings(cfg.algorithm).sampler.name == "prioritized"


def test_compute_score_loads_through_verls_custom_reward_function():
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = compose_plugin(
        "k15_md",
        [
            "reward.custom_reward_function.path=pkg://k15_plugin.verl.rewards",
            "+reward.custom_reward_function.reward_kwargs.verifier=math",
            "+reward.custom_reward_function.reward_kwargs.extraction=boxed",
        ],
    )
    score = get_custom_reward_fn(cfg)  # verl's own loader, with the reward_kwargs bound
    assert score(data_source="k15", solution_str="so the answer is \\boxed{\\frac{1}{2}}", ground_truth="0.5") == 1.0
    assert score(data_source="k15", solution_str="\\boxed{3}", ground_truth="0.5") == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# k15-train host=verl
# ----------------------------------------------------------------------------------------------------------------------


def _k15_config(overrides=()):
    """A composed k15-train config with host=verl."""
    from hydra.core.global_hydra import GlobalHydra

    from k15_plugin.cli.train import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", ["host=verl", *overrides])


def _verl_config(plan):
    """The plan's verl config, composed as verl's launcher composes it."""
    with initialize_config_dir(config_dir=k15_verl.CONFIG_DIR, version_base=None):
        return compose(config_name=plan.config_name, overrides=plan.overrides)


# trainer shape: 32 completions per device x 2 micro-batches per rollout batch / 4 samples = 16 prompts per rollout
# batch, 32 / 4 = 8 prompts per optimizer step; kimi_md's 2 passes: S = 4 optimizer steps per rollout batch
SHAPE = [
    "trainer.per_device_train_batch_size=32",
    "trainer.steps_per_generation=2",
    "trainer.gradient_accumulation_steps=1",
    "trainer.num_generations=4",
    "trainer.max_steps=10",
    "trainer.learning_rate=3e-5",
]


def test_k15_train_dry_run_prints_a_command_verls_launcher_composes(tmp_path):
    """`k15-train host=verl host.dry_run=true`: the printed command, run by verl's own launcher with `--cfg job`."""
    from k15_plugin.cli.hosts.verl import RAW_TEMPLATE

    run_dir = tmp_path / "run"
    args = [
        "host=verl",
        "host.dry_run=true",
        f"model.path={DEMO_MODEL}",
        "algorithm.tau=0.3",
        "sampler=curriculum",
        "reward=length_penalty",
        "data.num_train=64",
        "data.heldout_size=16",
        *SHAPE,
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "k15_plugin.cli.train", *args], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if " -m verl.trainer.main_ppo " in x)
    argv = shlex.split(line)
    assert argv[1:7] == ["-m", "verl.trainer.main_ppo", "--config-dir", k15_verl.CONFIG_DIR, "--config-name", "k15_md"]
    job = subprocess.run([*argv, "--cfg", "job"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    cfg = OmegaConf.create(job.stdout)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    actor = resolved["actor_rollout_ref"]["actor"]
    assert cfg.data.train_batch_size == 16 and actor["ppo_mini_batch_size"] == 8 and actor["ppo_epochs"] == 2
    assert actor["ppo_micro_batch_size_per_gpu"] == 32 and cfg.actor_rollout_ref.rollout.n == 4
    assert cfg.trainer.total_training_steps == 3  # 10 optimizer steps / 4 per rollout batch, rounded up
    assert cfg.trainer.total_epochs == 3  # as many epochs as steps: the steps end the run, not verl's 30 epochs
    assert actor["optim"]["lr"] == 3e-5 and actor["optim"]["betas"] == [0.9, 0.99]
    assert cfg.algorithm.k15.tau == 0.3 and actor["policy_loss"]["tau"] == 0.3
    sampler = cfg.algorithm.k15.sampler
    assert (sampler.name, sampler.difficulty_column, sampler.switch_step) == (
        "curriculum",
        "extra_info.difficulty",
        150,
    )
    assert cfg.algorithm.k15.length_penalty.weight > 0
    assert cfg.reward.custom_reward_function.path == "pkg://k15_plugin.verl.rewards"
    assert OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs) == {
        "verifier": "task",
        "extraction": "last_number",
    }
    model = cfg.actor_rollout_ref.model
    assert model.path == str(DEMO_MODEL) and model.custom_chat_template == RAW_TEMPLATE
    assert cfg.data.max_prompt_length == 60 and cfg.data.max_response_length == 4  # the demo model's 64 positions
    assert cfg.data.train_files == str(run_dir / "verl" / "train.parquet")
    assert (run_dir / "verl" / "train.parquet").is_file() and (run_dir / "verl" / "heldout.parquet").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["host"] == "verl" and summary["dry_run"] and summary["command"] == line


@pytest.mark.parametrize("algorithm", ["kimi_md", "grpo", "dr_grpo", "rloo"])
def test_dry_run_of_each_algorithm_composes_and_validates(algorithm, tmp_path, capsys):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    from k15_plugin.cli.hosts import HOSTS
    from k15_plugin.cli.hosts.verl import CONFIG_NAMES, build_plan, validate

    k15 = _k15_config([f"algorithm={algorithm}", "host.dry_run=true", "data.num_train=16", "data.heldout_size=8"])
    assert HOSTS["verl"].dry_run
    summary = HOSTS["verl"].run(k15, tmp_path / "run")
    printed = capsys.readouterr().out
    assert summary["command"] in printed and summary["returncode"] is None and summary["algorithm"] == algorithm
    plan = build_plan(k15, tmp_path / "run")
    assert plan.config_name == CONFIG_NAMES[algorithm] and f"--config-name {plan.config_name}" in printed
    validate(plan)
    cfg = _verl_config(plan)
    validate_config(cfg, need_reference_policy(cfg), need_critic(cfg))
    estimator = {"kimi_md": "k15_md", "rloo": "k15_rloo"}.get(algorithm, "k15_grpo")
    assert cfg.algorithm.adv_estimator == estimator
    assert cfg.actor_rollout_ref.actor.ppo_epochs == k15.algorithm.num_iterations
    # the demo: 128 completions per rollout batch of 16 prompts x 8, one optimizer step per pass
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.actor.ppo_mini_batch_size) == (16, 16)
    assert cfg.trainer.total_training_steps == -(-k15.trainer.max_steps // k15.algorithm.num_iterations)
    assert k15_settings(cfg.algorithm).reset_optimizer_each_iteration is (algorithm == "kimi_md")
    if algorithm in ("grpo", "dr_grpo"):
        assert cfg.algorithm.norm_adv_by_std_in_grpo is (algorithm == "grpo")
        mode = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}[algorithm]
        assert cfg.actor_rollout_ref.actor.loss_agg_mode == mode  # TRL's loss_type
    assert (tmp_path / "run" / "verl" / "train.parquet").is_file()


def test_reward_kwargs_of_every_verifier_reach_compute_score(tmp_path):
    """The registry's spec, nested dicts and lists included, through Hydra's override syntax to verl's loader."""
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from k15_plugin.cli.hosts.verl import build_plan
    from k15_plugin.rewards.registry import spec_of

    data = tmp_path / "code.jsonl"
    data.write_text(json.dumps({"prompt": "echo", "tests": [{"input": "1", "output": "1"}]}) + "\n")
    odd = tmp_path / "it's a dir"
    odd.mkdir()
    cases = {
        "task": [],
        "math": ["reward=math", "reward.math.extraction=boxed"],
        "code": [
            "reward=code",
            "data=jsonl",
            f"data.path={data}",
            "data.chat=false",
            f"reward.code.allow_paths=[{json.dumps(str(odd))}]",
        ],
    }
    for verifier, overrides in cases.items():
        k15 = _k15_config(overrides)
        cfg = _verl_config(build_plan(k15, tmp_path))
        got = OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs)
        assert got == spec_of(k15.reward, k15.data), verifier
        assert get_custom_reward_fn(cfg).args[1] == got  # verl binds them to compute_score
    assert got["sandbox"]["allow_paths"] == [str(odd)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["algorithm=dapo"], "algorithm=dapo does not run on host=verl (it runs on host=trl only)"),
        (["algorithm=ppo"], "algorithm=ppo does not run on host=verl (host=openrlhf runs PPO with a critic)"),
        (["rollout=partial"], "rollout: partial rollouts and repeat detection run on host=trl only"),
        (["rollout.repeat.detection=true"], "rollout: partial rollouts and repeat detection run on host=trl only"),
        (["model.lora.enabled=true"], "model.lora.enabled: k15-train does not map LoRA onto verl"),
        (
            ["trainer.steps_per_generation=2", "trainer.gradient_accumulation_steps=4"],
            "trainer.steps_per_generation=2 must be a multiple of trainer.gradient_accumulation_steps=4 on verl",
        ),
        (
            ["+host.flags.actor_rollout_ref.actor.ppo_mini_bach_size=4"],
            "host.flags.actor_rollout_ref.actor.ppo_mini_bach_size: verl's config: Could not override",
        ),
        (
            ["+host.flags.actor_rollout_ref.actor.loss_agg_mode=bogus"],
            "host.flags.actor_rollout_ref.actor.loss_agg_mode: verl refuses the config: ",
        ),
        (
            ["+host.flags.actor_rollout_ref.actor.ppo_mini_batch_size=64"],
            "host.flags.actor_rollout_ref.actor.ppo_mini_batch_size: verl refuses the config: train_batch_size (16) "
            "must be >= actor.ppo_mini_batch_size (64)",
        ),
        (
            ["sampler=prioritized", "+host.flags.data.dataloader_num_workers=2"],
            "host.flags.data.dataloader_num_workers: verl refuses the config: algorithm.k15.sampler.name=prioritized "
            "needs data.dataloader_num_workers=0",
        ),
    ],
)
def test_k15_train_host_verl_refuses_in_one_line(args, expected, tmp_path, monkeypatch, capsys):
    from cli_helpers import assert_one_line, main_before_the_job

    code, stderr = main_before_the_job(["host=verl", *args], tmp_path, monkeypatch, capsys)
    assert_one_line(code, stderr, expected, tmp_path)


def test_free_verl_nodes_take_new_keys_from_host_flags(tmp_path):
    from k15_plugin.cli.hosts.verl import build_plan, validate

    k15 = _k15_config(
        [
            "+host.flags.actor_rollout_ref.rollout.engine_kwargs.vllm.enforce_eager=true",
            "+host.flags.reward.custom_reward_function.reward_kwargs.extraction=gsm8k",
            "+host.flags.trainer.val_before_train=false",
        ]
    )
    plan = build_plan(k15, tmp_path)
    assert "+actor_rollout_ref.rollout.engine_kwargs.vllm.enforce_eager=true" in plan.overrides
    assert "trainer.val_before_train=false" in plan.overrides
    validate(plan)
    cfg = _verl_config(plan)
    assert cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.enforce_eager is True
    assert cfg.reward.custom_reward_function.reward_kwargs.extraction == "gsm8k"  # the user's flag wins
    assert plan.sources["reward.custom_reward_function.reward_kwargs.extraction"].startswith("host.flags.")


def test_the_run_files_load_through_verls_dataset_and_trainer(tmp_path):
    """The parquet files as verl's own trainer reads them: its tokenizer (with the raw-prompt template), RLHFDataset,
    and the curriculum sampler reading ``extra_info.difficulty``."""
    from verl.trainer.ppo.v1 import get_trainer_cls

    from k15_plugin.cli.hosts.verl import build_plan, write_files
    from k15_plugin.data.tasks import task_rows

    overrides = ["sampler=curriculum", "data.num_train=40", "data.heldout_size=10", *SHAPE]
    k15 = _k15_config(overrides)
    plan = build_plan(k15, tmp_path)
    paths = write_files(k15, plan)
    train, heldout = task_rows(k15.data, k15.seed, k15.trainer.max_completion_length, k15.reward)
    cfg = _verl_config(plan)
    with open_dict(cfg):
        cfg.data.filter_overlong_prompts = True  # tokenizes every prompt through the chat template
    trainer = get_trainer_cls(cfg.trainer.v1.trainer_mode)(cfg)
    trainer._init_tokenizer()
    trainer._init_dataloader()
    dataset = trainer.train_dataset
    assert len(dataset) == 40 and len(trainer.val_dataset) == len(heldout) == 10
    tokenizer = trainer.tokenizer
    for i in (0, 17):
        item = dataset[i]
        assert item["raw_prompt"] == [{"role": "user", "content": train[i]["prompt"]}]
        assert item["reward_model"]["ground_truth"] == train[i]["answer"]
        assert item["extra_info"]["difficulty"] == train[i]["difficulty"] and item["index"] == i
        ids = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == tokenizer(train[i]["prompt"])["input_ids"]  # the ids TRL generates from
    torch.testing.assert_close(trainer.k15_sampler.difficulty, torch.tensor(train["difficulty"], dtype=torch.float64))
    assert paths["heldout"].name == "heldout.parquet"


def test_a_code_row_keeps_its_tests_as_the_label():
    from k15_plugin.cli.hosts.verl import verl_rows
    from k15_plugin.rewards.registry import scorer

    tests = [{"input": "", "output": "1"}]
    (row,) = verl_rows(
        [{"prompt": [{"role": "user", "content": "print 1"}], "tests": tests}], "tests", "k15/x", "train"
    )
    assert row["prompt"] == [{"role": "user", "content": "print 1"}] and row["ability"] == "code"
    assert json.loads(row["reward_model"]["ground_truth"]) == tests and "difficulty" not in row["extra_info"]
    assert scorer({"verifier": "code", "sandbox": {"isolation": "none"}})  # parses a JSON label (registry)


def test_the_run_starts_verls_launcher_and_reports_its_status(tmp_path, monkeypatch):
    from k15_plugin.cli.hosts import verl as verl_host

    calls = []

    def fake_run(argv, cwd):
        calls.append((argv, cwd))
        return types.SimpleNamespace(returncode=len(calls) - 1)

    monkeypatch.setattr(verl_host.subprocess, "run", fake_run)
    k15 = _k15_config(["data.num_train=16", "data.heldout_size=8"])
    summary = verl_host.run(k15, tmp_path / "run")
    argv, cwd = calls[0]
    assert cwd == tmp_path / "run" and argv[1:3] == ["-m", "verl.trainer.main_ppo"]
    assert summary == {
        "algorithm": "kimi_md",
        "host": "verl",
        "command": shlex.join(argv),
        "returncode": 0,
        "run_dir": str(tmp_path / "run"),
    }
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    with pytest.raises(SystemExit) as failed:
        verl_host.run(k15, tmp_path / "run")
    assert failed.value.code == 1


@pytest.mark.parametrize(
    "value", ["plain", "1e-06", "true", "it's a path/x", "pkg://a.b", "", "{% if x %}{{ y['z'] }}{% endif %}"]
)
def test_hydra_values_come_back_as_written(value):
    from k15_plugin.cli.hosts.verl import hydra_value

    for written in (value, [value, 1.5], {"a": value, "b": [None, True, float("inf")]}):
        cfg = compose_plugin("k15_md", [f"+reward.custom_reward_function.reward_kwargs.x={hydra_value(written)}"])
        assert OmegaConf.to_container(cfg.reward.custom_reward_function.reward_kwargs)["x"] == written
