"""The OpenRLHF adapter (k15_plugin.openrlhf, k15-train host=openrlhf) against OpenRLHF 0.11's real modules, on CPU.

Runs in the OpenRLHF test environment (README: the OpenRLHF test command), where OpenRLHF is installed without its
CUDA-only dependencies; the two import stubs of k15_plugin/openrlhf/cpu_stubs stand in for flash-attn's padding
helpers and three vLLM names. Skipped where OpenRLHF is not installed. No GPU, no Ray cluster.
"""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

pytest.importorskip("openrlhf")

from k15_plugin.openrlhf.flags import STUB_DIR

if any(importlib.util.find_spec(name) is None for name in ("vllm", "flash_attn")):
    sys.path.insert(0, str(STUB_DIR))

import openrlhf.trainer.ppo_trainer as upstream_trainer
import openrlhf.trainer.ray.ppo_actor as upstream_actor
from cli_helpers import main_before_the_job
from openrlhf.models import Actor
from openrlhf.trainer.ppo_utils import NaiveReplayBuffer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.samples_generator import _collect_prompt_batch
from transformers import LlamaConfig, LlamaForCausalLM

from k15_plugin.core import length_reward, mirror_descent_advantages, mirror_descent_terms
from k15_plugin.core.settings import LengthPenaltySettings, SamplerSettings
from k15_plugin.errors import ConfigError
from k15_plugin.openrlhf import launch
from k15_plugin.openrlhf import trainer as k15_trainer
from k15_plugin.openrlhf.advantages import K15ExperienceMaker
from k15_plugin.openrlhf.config import OpenRLHFSettings
from k15_plugin.openrlhf.flags import to_flags
from k15_plugin.openrlhf.loss import K15MirrorDescentLoss
from k15_plugin.openrlhf.rewards import make_reward_func

K, G, P, A, V = 4, 2, 3, 5, 32
LENS = torch.tensor([5, 2, 4, 3, 1, 5, 2, 4])
SCORES = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])


def _args(algorithm="kimi_md", estimator="dr_grpo", weight=0.1, log_z="mean"):
    return NS(
        rollout=NS(n_samples_per_prompt=K, micro_batch_size=2, max_new_tokens=A, batch_size=G),
        algo=NS(
            advantage=NS(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False),
            kl=NS(use_loss=False, init_coef=0.0, estimator="k1"),
        ),
        reward=NS(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None),
        data=NS(max_len=P + A),
        train=NS(dynamic_batch_enable=False, max_epochs=1, seed=7),
        actor=NS(entropy_coef=None, aux_loss_coef=0.0),
        ds=NS(packing_samples=False, ring_attn_size=1, tensor_parallel_size=1),
        k15=OpenRLHFSettings(
            algorithm=algorithm,
            tau=0.5,
            log_z_estimator=log_z,
            length_penalty=LengthPenaltySettings(weight=weight, warmup_steps=2),
        ),
    )


def _samples():
    torch.manual_seed(0)
    out = []
    for i in range(G * K):
        seq = torch.randint(1, V, (1, P + A))
        action_mask = torch.zeros(1, A, dtype=torch.bool)
        action_mask[0, : LENS[i]] = True
        attention = torch.ones(1, P + A, dtype=torch.long)
        attention[0, P + LENS[i] :] = 0
        out.append(
            Experience(
                sequences=seq,
                attention_mask=attention,
                action_mask=action_mask,
                rewards=SCORES[i : i + 1].clone(),
                scores=SCORES[i : i + 1].clone(),
                response_length=LENS[i : i + 1].float(),
                truncated=torch.tensor([False]),
                total_length=attention.sum(-1).float(),
                prompts=[f"p{i // K}"],
                labels=["l"],
                info={},
            )
        )
    return out


def _maker(cls, args):
    maker = object.__new__(cls)
    maker.strategy, maker.args, maker.advantage_estimator = NS(args=args), args, args.algo.advantage.estimator
    maker.kl_ctl, maker.tokenizer = NS(value=0.0), NS(pad_token_id=0)
    return maker


def _interleaved(maker, samples):
    """Experiences as OpenRLHF's dynamic batching leaves them: micro-batches mixing the two prompts' samples."""
    for i, s in enumerate(samples):
        s.index = [i]
    parts = [[0, 5], [4, 1], [2, 7], [6, 3]]
    return [Experience.concat_experiences([samples[i] for i in part], 0) for part in parts]


def _per_sample(experiences, field):
    out = torch.empty(G * K)
    for e in experiences:
        out[torch.tensor(e.index)] = getattr(e, field)[:, 0] if getattr(e, field).dim() == 2 else getattr(e, field)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The advantage step
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_z", ["mean", "log_mean_exp"])
def test_k15_advantages_equal_the_core_on_interleaved_micro_batches(log_z):
    maker = _maker(K15ExperienceMaker, _args(log_z=log_z))
    maker.k15_step = 2  # the warm-up's last step: the penalty is on
    exps = maker.compute_advantages_and_returns(_interleaved(maker, _samples()))
    rewards = SCORES + 0.1 * length_reward(LENS, SCORES >= 1, K)
    torch.testing.assert_close(_per_sample(exps, "advantages"), mirror_descent_advantages(rewards, K, 0.5, log_z))
    for e in exps:
        a = e.advantages
        assert torch.equal(a, a[:, :1] * e.action_mask), "one advantage per sequence, on its response tokens"
    # by hand, prompt 0 (lengths 5, 2, 4, 3; scores 1, 0, 1, 1): lambda = 0.5 - (len - 2) / 3
    lam = torch.tensor([-0.5, min(0.5, 0.0), -1 / 6, 1 / 6])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0]) + 0.1 * lam
    if log_z == "mean":
        torch.testing.assert_close(_per_sample(exps, "advantages")[:4], r - r.mean())


def test_no_length_penalty_before_the_warm_up_ends():
    maker = _maker(K15ExperienceMaker, _args())
    maker.k15_step = 1
    exps = maker.compute_advantages_and_returns(_interleaved(maker, _samples()))
    torch.testing.assert_close(_per_sample(exps, "advantages"), mirror_descent_advantages(SCORES, K, 0.5, "mean"))


@pytest.mark.parametrize("estimator", ["group_norm", "rloo", "dr_grpo"])
def test_baselines_are_openrlhf_own_estimators_on_the_penalized_rewards(estimator):
    args = _args(algorithm={"group_norm": "grpo"}.get(estimator, estimator), estimator=estimator)
    maker = _maker(K15ExperienceMaker, args)
    maker.k15_step = 5
    for e in (exps := _interleaved(maker, _samples())):
        e.kl = torch.zeros_like(e.action_mask, dtype=torch.float32)
    got = _per_sample(maker.compute_advantages_and_returns(exps), "advantages")

    plain = _maker(RemoteExperienceMaker, copy.copy(args))  # upstream, fed the penalized rewards by hand
    penalized = SCORES + 0.1 * length_reward(LENS, SCORES >= 1, K)
    samples = _samples()
    for i, s in enumerate(samples):
        s.rewards = penalized[i : i + 1].clone()
    for e in (ref := _interleaved(plain, samples)):
        e.kl = torch.zeros_like(e.action_mask, dtype=torch.float32)
    torch.testing.assert_close(got, _per_sample(plain.compute_advantages_and_returns(ref), "advantages"))


# ----------------------------------------------------------------------------------------------------------------------
# The loss through OpenRLHF's real training step
# ----------------------------------------------------------------------------------------------------------------------


class _FakeStrategy:
    """The DeepSpeed strategy's calls ppo_train makes, on one CPU process."""

    ring_attn_group = None
    accumulated_gradient = 1
    ds_device_mesh = None

    def __init__(self, args, model):
        self.args, self.model, self.losses, self.grads = args, model, [], None

    def backward(self, loss, model, optimizer):
        self.losses.append(loss.detach())
        loss.backward()
        self.grads = [p.grad.detach().clone() for p in self.model.parameters()]

    def optimizer_step(self, optimizer, model, scheduler, name=None):
        optimizer.step()
        scheduler.step()

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data):
        return data

    def is_rank_0(self):
        return True


def test_the_loss_in_openrlhfs_training_step_equals_the_core_with_its_gradients(monkeypatch):
    args = _args(weight=0.0)
    config = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    actor = Actor(model)
    actor.packing_samples = False
    maker = _maker(K15ExperienceMaker, args)
    exps = _interleaved(maker, _samples())
    with torch.no_grad():  # pi_i: the actor's own forward at experience time
        for e in exps:
            e.action_log_probs = actor(e.sequences, e.action_mask, e.attention_mask)
            e.kl, e.values, e.base_action_log_probs = torch.zeros_like(e.action_log_probs), None, None
    exps = maker.compute_advantages_and_returns(exps)

    # the reference: the core's loss on the whole batch, at theta = pi_i (the first update of a rollout batch)
    full = Experience.concat_experiences(exps, 0)
    mask = full.action_mask.float()
    logp = actor(full.sequences, full.action_mask, full.attention_mask)
    seq, old = (logp * mask).sum(-1), (full.action_log_probs * mask).sum(-1)
    policy, l2 = mirror_descent_terms(seq, old, full.advantages[:, 0], 0.5)
    want = (policy + l2).mean()
    want.backward()
    want_grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad()

    trainer = object.__new__(upstream_actor.ActorPPOTrainer)
    strategy = _FakeStrategy(args, model)
    optimizer = torch.optim.SGD(actor.parameters(), lr=0.0)
    trainer.__dict__.update(
        strategy=strategy,
        args=args,
        actor=actor,
        ema_model=None,
        actor_optim=optimizer,
        aux_loss=False,
        actor_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
        max_epochs=1,
        actor_loss_fn=K15MirrorDescentLoss(tau=0.5),
        dataloader_pin_memory=False,
    )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the buffer names a CUDA device; CPU here
    trainer.replay_buffer = NaiveReplayBuffer(G * K, 0, True, False, False)  # one micro-batch: the whole batch
    trainer.replay_buffer.target_device = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # ppo_train moves batches to it
    for e in exps:
        trainer.replay_buffer.append(e)
    status = trainer.ppo_train(kl_ctl=0.0)
    assert len(strategy.losses) == 1 and "policy_loss" in status
    torch.testing.assert_close(strategy.losses[0], want.detach(), rtol=1e-5, atol=1e-6)
    for got, ref in zip(strategy.grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_micro_batch_losses_add_up_to_the_core_mean():
    torch.manual_seed(1)
    logp = (torch.randn(8, A) * 0.3 - 1).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(8, A)
    mask = torch.arange(A)[None, :] < LENS[:, None]
    adv = mirror_descent_advantages(SCORES, K, 0.5, "mean").unsqueeze(-1) * mask
    loss_fn = K15MirrorDescentLoss(0.5)
    micro = ([0, 5, 2], [1, 7], [3, 4, 6])
    total = sum(loss_fn(logp[r], old[r], adv[r], mask[r], global_batch_size=8)[0] for r in micro)
    m = mask.float()
    policy, l2 = mirror_descent_terms((logp * m).sum(-1), (old * m).sum(-1), adv[:, 0], 0.5)
    torch.testing.assert_close(total, (policy + l2).mean())
    # two data-parallel ranks, each with half of the samples, are averaged by DeepSpeed: dp_size compensates
    half = loss_fn(logp[:4], old[:4], adv[:4], mask[:4], dp_size=2, global_batch_size=8)[0]
    other = loss_fn(logp[4:], old[4:], adv[4:], mask[4:], dp_size=2, global_batch_size=8)[0]
    torch.testing.assert_close((half + other) / 2, (policy + l2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# The controller: sampler through OpenRLHF's prompt loader and its checkpointed state
# ----------------------------------------------------------------------------------------------------------------------


class _Prompts(torch.utils.data.Dataset):
    """What OpenRLHF's PromptDataset offers the loader: processed prompts and its collate_fn."""

    def __init__(self, n):
        self.prompts, self.labels = [f"question {i}" for i in range(n)], [str(i) for i in range(n)]

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return "src", self.prompts[i], self.labels[i], None

    collate_fn = upstream_trainer.PromptDataset.collate_fn


def _controller(sampler_type="prioritized", n=12):
    ctrl = object.__new__(k15_trainer._K15PPOTrainer)
    args = _args()
    args.k15 = OpenRLHFSettings(sampler=SamplerSettings(name=sampler_type, floor=0.02))
    ctrl.strategy, ctrl.k15 = NS(args=args), args.k15
    dataset = _Prompts(n)
    ctrl.prompts_dataloader = NS(dataset=dataset)
    ctrl.samples_generator = NS(prompts_dataloader=None)
    ctrl._k15_rows = k15_trainer.collections.defaultdict(k15_trainer.collections.deque)
    ctrl._k15_install_sampler()
    return ctrl


def _steps(ctrl, it, steps, rng):
    seen = []
    for _ in range(steps):
        prompts, _, _, exhausted = _collect_prompt_batch(it["iter"], G)
        if exhausted:
            it["iter"] = iter(ctrl.prompts_dataloader)
            prompts, _, _, _ = _collect_prompt_batch(it["iter"], G)
        seen.append(prompts)
        samples = [
            Experience(prompts=[p], scores=torch.tensor([float(rng.random() < 0.5)]), rewards=torch.zeros(1))
            for p in prompts
            for _ in range(K)
        ]
        rng.shuffle(samples)  # vLLM returns them in any order
        assert ctrl.k15_record(samples) == G
    return seen


def test_the_controller_sampler_resumes_exactly_through_openrlhfs_loader_state():
    import random

    ctrl = _controller()
    assert ctrl.samples_generator.prompts_dataloader is ctrl.prompts_dataloader
    rng = random.Random(0)
    it = {"iter": iter(ctrl.prompts_dataloader)}
    _steps(ctrl, it, 7, rng)  # 12 prompts / 2 per rollout batch: crosses an epoch
    state = copy.deepcopy(ctrl.prompts_dataloader.state_dict())  # as OpenRLHF's client_states
    rng_state = rng.getstate()
    want = _steps(ctrl, it, 6, rng)

    resumed = _controller()
    resumed.prompts_dataloader.load_state_dict(state)  # as PPOTrainer.fit on resume
    rng.setstate(rng_state)
    assert _steps(resumed, {"iter": iter(resumed.prompts_dataloader)}, 6, rng) == want
    assert torch.equal(resumed.k15_sampler.tracker.attempts, ctrl.k15_sampler.tracker.attempts)


def test_the_prioritized_controller_sampler_favours_failing_prompts():
    ctrl = _controller(n=12)
    counts = torch.zeros(12)
    it = {"iter": iter(ctrl.prompts_dataloader)}
    for _ in range(60):
        prompts, _, _, exhausted = _collect_prompt_batch(it["iter"], G)
        if exhausted:
            it["iter"] = iter(ctrl.prompts_dataloader)
            prompts, _, _, _ = _collect_prompt_batch(it["iter"], G)
        rows = [int(p.split()[1]) for p in prompts]
        counts[rows] += 1
        ctrl.k15_record(
            [
                Experience(prompts=[p], scores=torch.tensor([float(r >= 6)]), rewards=torch.zeros(1))
                for p, r in zip(prompts, rows, strict=True)
                for _ in range(K)
            ]
        )
    assert counts[:6].sum() > 3 * counts[6:].sum()


def test_uniform_keeps_openrlhfs_loader():
    ctrl = _controller("uniform")
    assert ctrl.k15_sampler is None and isinstance(ctrl.prompts_dataloader, NS)


def test_the_actor_classes_are_ray_actors_over_openrlhfs_own():
    assert issubclass(
        k15_trainer.plain_class(k15_trainer.K15PPOTrainer), k15_trainer.plain_class(upstream_trainer.PPOTrainer)
    )
    assert issubclass(
        k15_trainer.plain_class(k15_trainer.K15PolicyModelActor),
        k15_trainer.plain_class(upstream_actor.PolicyModelActor),
    )
    assert hasattr(k15_trainer.K15PPOTrainer, "remote") and hasattr(k15_trainer.K15PolicyModelActor, "remote")


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer reset, policy actor
# ----------------------------------------------------------------------------------------------------------------------


def _trained(optimizer_cls, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = optimizer_cls(model.parameters(), **kwargs)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def test_reset_optimizer_moments_equals_a_fresh_optimizer_inside_a_zero_wrapper():
    model, opt = _trained(torch.optim.AdamW, lr=0.1)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(twin.parameters(), lr=0.1)
    held = [t for s in opt.state.values() for t in s.values()]
    assert k15_trainer.reset_optimizer_moments(NS(optimizer=opt)) == 6  # as DeepSpeed's ZeRO optimizer wraps it
    assert all(t is u for t, u in zip(held, [t for s in opt.state.values() for t in s.values()], strict=True))
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="not a torch optimizer"):
        k15_trainer.reset_optimizer_moments(NS(optimizer=object()))


def test_the_policy_actor_resets_a_real_deepspeed_engine_in_place(tmp_path):
    """The actor's reset on the optimizer ``deepspeed.initialize`` returns, built from OpenRLHF's own DeepSpeed config
    (ZeRO-2, ZeRO-3, ZeRO-3 with adam_offload's DeepSpeedCPUAdam; one process, gloo, DeepSpeed's CPU accelerator): the
    state is zeroed in place, the update after it is a fresh AdamW's first, and DeepSpeed still reads the moments the
    optimizer holds (``tests/openrlhf_deepspeed_reset.py``; a process of its own, for its process group)."""
    import os
    import socket

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # DeepSpeed compiles its CPU ops on first use into a folder named after the op only, with this environment's
    # paths: one folder per environment, or each environment rebuilds what the other built (minutes)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    script = Path(__file__).with_name("openrlhf_deepspeed_reset.py")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = {r["name"]: r for r in map(json.loads, result.stdout.splitlines()[-3:])}
    assert {n: (r["zero_optimizer"], r["optimizer"]) for n, r in runs.items()} == {
        "zero2": ("DeepSpeedZeroOptimizer", "AdamW"),
        "zero3": ("DeepSpeedZeroOptimizer_Stage3", "AdamW"),
        "zero3_adam_offload": ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),
    }
    for name, run in runs.items():
        assert run["resets"] == 1 and run["in_place"] and run["steps"] == [1], name
        assert run["fresh_error"] < 1e-4 and run["fresh_error_without_reset"] > 0.1, name
        assert run["moments_seen_by_deepspeed"] == pytest.approx(run["moments_held"], rel=1e-6), name


def test_the_policy_actor_swaps_the_loss_and_resets_before_each_update(monkeypatch):
    base = k15_trainer.plain_class(upstream_actor.PolicyModelActor)
    _, opt = _trained(torch.optim.AdamW, lr=0.1)
    monkeypatch.setattr(base, "init_model_from_pretrained", lambda self, strategy, *a, **k: None)
    moments = []
    monkeypatch.setattr(
        base,
        "fit",
        lambda self, kl_ctl=0: (
            moments.append(float(sum(t.abs().sum() for s in self.actor_optim.state.values() for t in s.values()))) or {}
        ),
    )
    actor = object.__new__(k15_trainer._K15PolicyModelActor)
    args = _args()
    actor.strategy, actor.actor_optim, actor.trainer = NS(args=args), opt, NS(actor_loss_fn=None)
    actor.init_model_from_pretrained(actor.strategy, "path")
    assert isinstance(actor.trainer.actor_loss_fn, K15MirrorDescentLoss) and actor.trainer.actor_loss_fn.tau == 0.5
    status = actor.fit(0.0)
    assert moments == [0.0] and status["k15/optimizer_resets"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Flags, launch, reward file, k15-train host=openrlhf
# ----------------------------------------------------------------------------------------------------------------------


def test_to_flags_maps_a_nested_node():
    node = {
        "actor": {"adam": {"lr": 1e-6, "betas": [0.9, 0.95]}},
        "train": {"colocate_all": True, "x": False},
        "ckpt": {"path": None},
    }
    assert to_flags(node) == ["--actor.adam.lr", "1e-06", "--actor.adam.betas", "0.9", "0.95", "--train.colocate_all"]


def _parsed(argvs):
    """OpenRLHF's parser in this process (k15-train's own check runs it in a subprocess, tested below)."""
    from k15_plugin.openrlhf.flags import _parse

    return [None if r.get("ok") else r["error"] for r in _parse(argvs)]


def test_check_flags_uses_openrlhfs_parser():
    ok, choice, unknown, kind = _parsed(
        [
            ["--actor.adam.lr", "1e-6", "--algo.advantage.estimator", "dr_grpo"],
            ["--algo.advantage.estimator", "bogus"],
            ["--nope", "1"],
            ["--actor.adam.lr", "fast"],
        ]
    )
    assert ok is None
    assert "invalid choice: 'bogus'" in choice
    assert "unrecognized arguments: --nope" in unknown
    assert "argument --actor.adam.lr: invalid float value: 'fast'" in kind


def test_launch_puts_the_plugin_classes_in_place_and_attaches_k15(monkeypatch):
    seen = {}

    def fake_run_module(name, run_name):
        import argparse

        import openrlhf.utils.config as config

        seen["trainer"] = upstream_trainer.PPOTrainer
        seen["actor"] = upstream_actor.PolicyModelActor
        seen["argv"] = list(sys.argv)
        seen["args"] = config.hierarchize(argparse.Namespace(**{"actor.adam.lr": 1e-6}))

    monkeypatch.setattr(launch.runpy, "run_module", fake_run_module)
    before = (upstream_trainer.PPOTrainer, upstream_actor.PolicyModelActor)
    settings = OpenRLHFSettings(tau=0.3)
    launch.run(["--actor.adam.lr", "1e-6"], settings)
    assert seen["trainer"] is k15_trainer.K15PPOTrainer and seen["actor"] is k15_trainer.K15PolicyModelActor
    assert seen["argv"][1:] == ["--actor.adam.lr", "1e-6"]
    assert seen["args"].k15 is settings and seen["args"].actor.adam.lr == 1e-6
    assert (upstream_trainer.PPOTrainer, upstream_actor.PolicyModelActor) == before  # restored


def test_reward_file_scores_the_response_part():
    reward = make_reward_func({"verifier": "task", "extraction": "last_number"})
    out = reward(["3+4= 7</s>", "3+4= 8"], ["3+4=", "3+4="], ["7", "7"])
    assert out["scores"].tolist() == [1.0, 0.0] and out["rewards"].tolist() == [1.0, 0.0]
    prompt = "What is 2 + 5? The answer at the end is 7"  # the prompt's own numbers do not count
    math = make_reward_func({"verifier": "math"})
    assert math([prompt + " so \\boxed{7}"], [prompt], ["7"])["scores"].tolist() == [1.0]


def test_every_algorithm_composes_to_flags_openrlhf_accepts(tmp_path):
    from hydra import compose, initialize_config_dir

    from k15_plugin.cli.hosts.openrlhf import build_plan
    from k15_plugin.cli.train import config_dir

    plans = {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for algorithm in ("kimi_md", "grpo", "dr_grpo", "rloo", "ppo"):
            cfg = compose(
                "config", [f"algorithm={algorithm}", "host=openrlhf", "sampler=prioritized", "reward=length_penalty"]
            )
            plans[algorithm] = build_plan(cfg, tmp_path)
        for experiment in ("demo", "gsm8k_qwen0.5b"):  # the shipped recipes, on OpenRLHF
            plans[experiment] = build_plan(compose("config", [f"experiment={experiment}", "host=openrlhf"]), tmp_path)
    assert _parsed([p.argv for p in plans.values()]) == [None] * len(plans)  # OpenRLHF's parser accepts them
    assert "Qwen/Qwen2.5-0.5B-Instruct" in plans.pop("gsm8k_qwen0.5b").argv and plans.pop("demo").argv
    for algorithm, plan in plans.items():
        estimator = {"kimi_md": "dr_grpo", "grpo": "group_norm", "ppo": "gae"}.get(algorithm, algorithm)
        assert plan.argv[plan.argv.index("--algo.advantage.estimator") + 1] == estimator
        assert plan.argv[plan.argv.index("--rollout.n_samples_per_prompt") + 1] == "8"
        assert plan.settings.algorithm == algorithm and plan.settings.sampler.name == "prioritized"
        assert plan.settings.length_penalty.weight > 0
    assert plans["kimi_md"].argv[plans["kimi_md"].argv.index("--train.max_epochs") + 1] == "2"


def _plan(tmp_path, overrides):
    from hydra import compose, initialize_config_dir

    from k15_plugin.cli.hosts.openrlhf import build_plan
    from k15_plugin.cli.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return build_plan(compose("config", ["host=openrlhf", *overrides]), tmp_path)


def _flag(plan, flag):
    return plan.argv[plan.argv.index(flag) + 1]


def test_batch_sizes_follow_the_policy_ranks_openrlhf_starts(tmp_path):
    """8 policy GPUs: the same per-device batch as on TRL, and shapes OpenRLHF's and DeepSpeed's start-up asserts pass
    (before, the sizes came from launcher.num_processes: 8 prompts and 32 samples per step, 1/8 of the batch)."""
    eight = [
        "host.flags.actor.num_gpus_per_node=8",
        "trainer.per_device_train_batch_size=32",
        "trainer.num_generations=4",
    ]
    plan = _plan(tmp_path, eight)
    assert _flag(plan, "--rollout.batch_size") == "64" and _flag(plan, "--train.batch_size") == "256"
    n, prompts, micro = 4, 64, int(_flag(plan, "--rollout.micro_batch_size"))
    assert n * prompts // micro >= 8  # OpenRLHF's launcher assertion
    assert 256 // int(_flag(plan, "--train.micro_batch_size")) // 8 >= 1  # DeepSpeed's gradient accumulation
    assert _parsed([plan.argv]) == [None]
    one = _plan(tmp_path, ["trainer.per_device_train_batch_size=32", "trainer.num_generations=4"])
    assert _flag(one, "--rollout.batch_size") == "8" and _flag(one, "--train.batch_size") == "32"
    assert _flag(_plan(tmp_path, [*eight, "launcher=accelerate_ddp"]), "--train.batch_size") == "256"  # 8 = 8
    with pytest.raises(ConfigError, match=r"^launcher.num_processes=8: OpenRLHF trains the policy on .* = 1 rank"):
        _plan(tmp_path, ["launcher=accelerate_ddp"])
    with pytest.raises(ConfigError, match=r"^host.flags.rollout.micro_batch_size|^trainer.per_device_train_batch_size"):
        _plan(tmp_path, [*eight, "trainer.per_device_train_batch_size=4", "host.flags.rollout.micro_batch_size=16"])
    with pytest.raises(ConfigError, match=r"train.batch_size=.* must be a multiple of train.micro_batch_size"):
        _plan(tmp_path, [*eight, "host.flags.train.micro_batch_size=3"])


def test_step_counted_settings_become_rollout_batches_as_on_verl(tmp_path):
    """k15-train counts optimizer steps (TRL's); OpenRLHF's controller counts rollout batches: kimi_md's 2 passes
    make 2 optimizer steps per rollout batch, so a 5-step warm-up is 3 rollout batches (rounded up), as on verl."""
    steps = ["reward=length_penalty", "reward.length_penalty.warmup_steps=5", "reward.length_penalty.ramp_steps=4"]
    curriculum = ["sampler=curriculum", "sampler.switch_step=7", "sampler.ramp_steps=9"]
    plan = _plan(tmp_path, ["algorithm=kimi_md", *steps, *curriculum])
    lp, sampler = plan.settings.length_penalty, plan.settings.sampler
    assert (lp.warmup_steps, lp.ramp_steps, sampler.switch_step, sampler.ramp_steps) == (3, 2, 4, 5)
    one = _plan(tmp_path, ["algorithm=grpo", *steps]).settings.length_penalty  # 1 pass: unchanged
    assert (one.warmup_steps, one.ramp_steps) == (5, 4)


def test_combinations_that_would_run_silently_wrong_are_refused(tmp_path):
    dynamic = "+host.flags.algo.dynamic_filtering_enable=true"
    with pytest.raises(ConfigError, match=r"^host.flags.algo.dynamic_filtering_enable with sampler=prioritized: "):
        _plan(tmp_path, ["algorithm=grpo", "sampler=prioritized", dynamic])
    assert "--algo.dynamic_filtering_enable" in _plan(tmp_path, ["algorithm=grpo", dynamic]).argv  # uniform: fine
    with pytest.raises(ConfigError, match=r"^host.flags.algo.advantage.is_correction_level: algorithm=kimi_md"):
        _plan(tmp_path, ["algorithm=kimi_md", "+host.flags.algo.advantage.is_correction_level=token"])
    with pytest.raises(ConfigError, match=r"^host.flags.actor.policy_loss_type: algorithm=kimi_md"):
        _plan(tmp_path, ["algorithm=kimi_md", "+host.flags.actor.policy_loss_type=gspo"])
    assert _plan(tmp_path, ["algorithm=grpo", "+host.flags.algo.advantage.is_correction_level=token"]).argv


def test_the_reward_file_refuses_a_query_without_its_prompt():
    from k15_plugin.openrlhf.rewards import completion_of

    assert completion_of("Q: 1+1= 2", "Q: 1+1=") == " 2" and completion_of(" 2", "") == " 2"
    with pytest.raises(ValueError, match="cannot find the prompt"):
        completion_of("Q:1+1= 2", "Q: 1+1=")  # decode(encode(prompt)) != prompt: scoring all of it would be wrong


def test_the_reset_also_zeroes_a_zero3_backup_optimizer():
    _, opt = _trained(torch.optim.AdamW, lr=0.1)
    _, backup = _trained(torch.optim.AdamW, lr=0.1)
    assert k15_trainer.reset_optimizer_moments(NS(optimizer=opt, backup_optimizer=backup)) == 12
    for o in (opt, backup):
        assert all(float(t.abs().sum()) == 0 for s in o.state.values() for t in s.values() if torch.is_tensor(t))


def test_a_bad_openrlhf_flag_stops_k15_train_with_one_line(tmp_path, monkeypatch, capsys):
    code, err = main_before_the_job(
        ["host=openrlhf", "+host.flags.algo.advantage.estimator=bogus"], tmp_path, monkeypatch, capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "host.flags.algo.advantage.estimator: OpenRLHF argument --algo.advantage.estimator: invalid choice" in err
    code, err = main_before_the_job(
        ["host=openrlhf", "+host.flags.train.async_enable=true"], tmp_path, monkeypatch, capsys
    )
    assert code == 2 and "host.flags.train.async_enable" in err
    multirun = ["-m", "host=openrlhf", "algorithm=kimi_md,rloo", "host.flags.train.num_episodes=x"]
    code, err = main_before_the_job(multirun, tmp_path, monkeypatch, capsys)
    assert code == 2 and "host.flags.train.num_episodes: OpenRLHF argument --train.num_episodes: invalid int" in err


def test_dry_run_prints_the_command_and_writes_no_run_files(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "k15_plugin.cli.train",
        "host=openrlhf",
        "algorithm=kimi_md",
        "host.dry_run=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if " -m openrlhf.cli.train_ppo_ray " in x)
    argv = line.split(" -m openrlhf.cli.train_ppo_ray ", 1)[1].split()
    assert _parsed([argv]) == [None]
    assert str(tmp_path / "run" / "openrlhf" / "train.jsonl") in line
    assert not (tmp_path / "run" / "openrlhf").exists()


def test_the_run_files_are_written_for_openrlhf(tmp_path):
    from hydra import compose, initialize_config_dir

    from k15_plugin.cli.hosts.openrlhf import build_plan, write_files
    from k15_plugin.cli.train import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["host=openrlhf", "data.num_train=40", "data.heldout_size=10"])
    plan = build_plan(cfg, tmp_path)
    write_files(cfg, plan)
    rows = [json.loads(x) for x in (tmp_path / "openrlhf" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"prompt", "answer", "difficulty"} <= set(rows[0])
    spec = importlib.util.spec_from_file_location("reward_func", tmp_path / "openrlhf" / "reward_func.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # as OpenRLHF loads --reward.remote_url
    answer = rows[0]["answer"]
    assert module.reward_func([rows[0]["prompt"] + answer], [rows[0]["prompt"]], [answer])["scores"].tolist() == [1.0]


def test_the_curriculum_reads_difficulty_from_the_prompt_file_as_openrlhf_loads_it(tmp_path):
    rows = [{"prompt": f"question {i}", "answer": str(i), "difficulty": float(i % 3)} for i in range(12)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ctrl = object.__new__(k15_trainer._K15PPOTrainer)
    args = _args()
    args.data = NS(prompt_dataset=str(path), prompt_probs=None, max_samples=100, prompt_split="train")
    args.k15 = OpenRLHFSettings(sampler=SamplerSettings(name="curriculum", schedule="staged", hard_fraction=0.25))
    ctrl.strategy, ctrl.k15 = NS(args=args, print=lambda *a, **k: None, is_rank_0=lambda: True), args.k15
    ctrl.prompts_dataloader, ctrl.samples_generator = NS(dataset=_Prompts(12)), NS(prompts_dataloader=None)
    ctrl._k15_install_sampler()  # reads the file through OpenRLHF's blending_datasets
    torch.testing.assert_close(ctrl.k15_sampler.difficulty, torch.arange(12, dtype=torch.float64) % 3)
    assert all(int(p.split()[1]) % 3 == 2 for p in _collect_prompt_batch(iter(ctrl.prompts_dataloader), G)[0])
    args.k15 = OpenRLHFSettings(sampler=SamplerSettings(name="curriculum", difficulty_column="level"))
    ctrl.k15 = args.k15
    with pytest.raises(ValueError, match="no column 'level'"):
        ctrl._k15_install_sampler()
