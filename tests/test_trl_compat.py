"""TRL's own GRPO (and RLOO) trainer scenarios, run with the plugin's trainers substituted.

Source: ``tests/test_grpo_trainer.py`` and ``tests/test_rloo_trainer.py`` of huggingface/trl. The tag v1.16.0 is not
in the stored mirror; the scenarios were read from the newest stored snapshot of main (1.10.0.dev0), and every option
used here was checked against the installed TRL 1.16.0 (``trl/trainer/grpo_config.py``, ``grpo_trainer.py``,
``rloo_config.py``, ``rloo_trainer.py``). Adapted to run offline on one CPU thread: tiny models built from configs
(Llama, Qwen2, Qwen3-MoE, GPT-OSS; hidden 32, 2 layers), the plugin's 16-token character tokenizer
(``k15_plugin.data.build.warm_start.build_tokenizer``; a character-only chat template for conversational prompts),
datasets built in code, 1-2 optimizer steps of 8 completions (2 prompts x 4 generations, ``max_completion_length=6``).

Each scenario runs with ``KimiMirrorDescentTrainer`` ("md"), ``K15GRPOTrainer`` ("grpo") and, where TRL has the
scenario for RLOO, ``K15RLOOTrainer`` ("rloo"), and holds the trainers to one contract: **a scenario either trains
(no exception, every trainable parameter changes, the expected metrics are logged) or is refused at construction
(config or trainer ``__init__``) with a ``ValueError`` whose one-line message names the option.** Where the expected
side is known it is asserted exactly:

* ``KimiMirrorDescentConfig`` refuses, at config time, every TRL loss option the mirror-descent loss does not use when
  it is set to a non-default value (``beta``, ``loss_type``, ``epsilon``/``epsilon_high``/``delta``,
  ``scale_rewards``, ``importance_sampling_level``, ``top_entropy_quantile``, ``entropy_coef``,
  ``use_adaptive_entropy``, ``sync_ref_model``, ``off_policy_mask_threshold``, ``use_bias_correction_kl``,
  ``multi_objective_aggregation="normalize_then_sum"``, token-level ``vllm_importance_sampling_mode``), and accepts
  them at their defaults; ``K15GRPOTrainer`` (and ``K15RLOOTrainer`` for the options RLOO has) trains with each
  (orthogonal options share a training run to keep the file fast; each run's id names everything it sets).
* ``mask_truncated_completions=True`` trains with every trainer (TRL zeroes the truncated rows' mask at generation).
* No ``args``: every trainer builds its own default config, as ``GRPOTrainer``/``RLOOTrainer`` do.
* Iterable datasets train with ``sampler_type="uniform"``; ``"prioritized"``/``"curriculum"`` are refused at
  construction.
* Reward functions returning None for every row: TRL's "All reward functions returned None" warning is still issued
  (also with the plugin's ``length_penalty_weight > 0``) and those rows get zero advantage.
* MoE models (tiny Qwen3-MoE, tiny GPT-OSS): every trainer trains and logs ``aux_loss`` (the router load-balancing
  loss TRL adds when ``router_aux_loss_coef`` applies).
* ``environment_factory`` (TRL's experimental environments; "md" and "grpo", ``RLOOTrainer`` takes none), on the
  tool tokenizer below, generation mocked as TRL's tests mock it: ``test_train_with_environment_factory`` and
  ``test_train_with_environment_owned_data`` (no ``train_dataset``) train with ``sampler_type="uniform"``; with
  ``"prioritized"``/``"curriculum"`` they are refused at construction (TRL's rows are then identical placeholders and
  the environment picks each problem); ``test_train_with_environment_owned_reward`` (``get_reward``, no reward
  function) trains too. ``test_train_with_multiple_environments`` trains with both samplers: uniform
  sampling matches TRL's numbers exactly; the prioritized sampler draws other rows in another order, which TRL's
  layout-bound mock cannot answer, so there the mock answers each row from its environment and routing is checked
  (the test's docstring has the finding). These scenarios were read from a newer stored snapshot of TRL's main
  (commit f2cd577) and checked against the installed 1.16.0's ``environment_factory`` code.

Skipped by design (not collected; the reason for each):

* vLLM (``use_vllm``, server/colocate modes, structured outputs, vLLM importance-sampling correction runs, vLLM
  generation kwargs, ``test_train_vllm*``): colocate mode needs a GPU, server mode a running vLLM server. Only the
  config-time refusal of token-level ``vllm_importance_sampling_mode`` by ``KimiMirrorDescentConfig`` is checked.
* Liger kernels (``use_liger_kernel``, ``test_*liger*``, ``TestGRPOTrainerSlow``): GPU-only kernels; liger is not
  installed.
* Vision-language models: ``test_training_vlm``, ``..._beta_non_zero``, ``..._and_importance_sampling``,
  ``..._multi_image`` and ``..._peft`` run at the end of this file on the offline tiny LLaVA and the image task's
  pictures instead of the Hub checkpoints; ``..._and_liger`` (liger), ``..._and_vllm`` (skipped in TRL itself) and
  multimodal tool responses are not collected.
* Hub downloads: ``test_init_minimal``/``test_train`` model ids (replaced by the tiny local models here),
  ``test_trust_remote_code`` (remote code lives on the Hub), ``test_correct_reward_processing_classes_list``/
  ``test_single_reward_model_with_single_processing_class``/``test_mismatched_reward_processing_classes_length``
  (pure TRL argument plumbing around Hub reward models).
* PEFT/LoRA (``test_train_moe_peft_model``, ``test_liger_kernel_with_peft*``; ``test_train_peft_config`` is
  below, collected where peft is installed: the README's test command installs it with mergekit).
* GPU-only generation paths: ``use_transformers_continuous_batching``, bitsandbytes quantization, Hub kernels.
* ``dataloader_num_workers>0`` (``test_train_multiple_dataloader_workers``,
  ``test_iterable_dataset_forces_num_workers_zero``, ``test_iterable_eval_keeps_map_style_train_workers``): worker
  processes are slow to spawn and the test machines have two shared cores; the plugin does not touch the workers.
* ``test_evaluate_with_eval_dataset``, ``test_train_eval_on_start``: evaluation is covered by ``eval_strategy="steps"``.
* ``cast_lm_head_to_fp32``: everything already runs in fp32 on CPU, so it is a no-op here.
* ``chat_template_kwargs`` / ``generation_kwargs`` (beam search): generation-only plumbing the plugin does not touch.
* Unit tests of TRL internals (``TestGetHighEntropyMask``, ``test_get_off_policy_mask*``,
  ``TestGRPORolloutDispatch``/``rollout_func``, ``test_prepare_input_called_with_correct_data``,
  ``test_entropy_bonus_flows_gradients``, ``test_entropy_bonus_scale``, the luspo/vespo/sequence-level warnings):
  they exercise TRL functions the plugin does not override; the options themselves are covered as training scenarios.
* ``test_train_with_unknown_environment_raises`` (TRL's own check inside generation, which the plugin does not touch)
  and the mixes of environment-owned and function rewards (``test_environment_owned_reward_coexists_with_reward_funcs``,
  ``..._mixed_environments``: TRL's reward columns, which the plugin counts as task rewards like any other).
* Async tools (``test_train_with_tools[async_multiply_tool]``): the sync tool below exercises the same trainer code.
  ``test_train_with_tools`` itself runs for "md" and "grpo" (``RLOOTrainer`` takes no tools) with a byte-level
  tokenizer built in code and TRL's Qwen3 chat template (whose tool calls TRL parses), generation mocked as TRL's own
  test mocks it.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import logging
import math
from dataclasses import dataclass

import pytest
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GptOssConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)
from trl.chat_template_utils import qwen3_chat_template

from k15_plugin.data.build.warm_start import build_tokenizer
from k15_plugin.trl import (
    K15GRPOConfig,
    K15GRPOTrainer,
    K15RLOOConfig,
    K15RLOOTrainer,
    KimiMirrorDescentConfig,
    KimiMirrorDescentTrainer,
)

torch.set_num_threads(1)

PEFT_AVAILABLE = importlib.util.find_spec("peft") is not None

TRAINERS = {
    "md": (KimiMirrorDescentConfig, KimiMirrorDescentTrainer),
    "grpo": (K15GRPOConfig, K15GRPOTrainer),
    "rloo": (K15RLOOConfig, K15RLOOTrainer),
}
KINDS = tuple(TRAINERS)

# Metrics every trainer logs at each optimizer step, and what each adds.
COMMON_KEYS = ("loss", "reward", "reward_std", "completions/mean_length")
KIND_KEYS = {
    "md": ("k15/policy_loss", "k15/l2_loss", "k15/baseline"),
    "grpo": ("entropy",),
    "rloo": ("entropy",),
}

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc():
    """accelerate's ``free_memory`` runs ``gc.collect()`` at every ``train()``; with torch, transformers and TRL
    imported that walk takes seconds per call. Freezing the objects alive now (imports, fixtures) leaves it only the
    objects the tests create."""
    gc.freeze()
    yield
    gc.unfreeze()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers, models, datasets, rewards
# ----------------------------------------------------------------------------------------------------------------------

TOK = build_tokenizer()
# Conversational prompts: a chat template that renders only characters of the 16-token vocabulary.
CHAT_TOK = copy.deepcopy(TOK)
CHAT_TOK.chat_template = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


def _ids(**kwargs):
    return dict(pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=64, **kwargs)


def _llama(vocab_size: int = 16):
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
        **_ids(),
    )
    return _seeded(lambda: AutoModelForCausalLM.from_config(config))


def _qwen2():
    config = Qwen2Config(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        tie_word_embeddings=False,
        **_ids(),
    )
    return _seeded(lambda: AutoModelForCausalLM.from_config(config))


def _qwen3_moe():
    config = Qwen3MoeConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        **_ids(),
    )
    return _seeded(lambda: AutoModelForCausalLM.from_config(config))


def _gpt_oss():
    config = GptOssConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        router_aux_loss_coef=0.01,
        **_ids(),
    )
    config._attn_implementation = "eager"
    return _seeded(lambda: AutoModelForCausalLM.from_config(config))


def _reward_model():
    """An ``nn.Module`` reward model (sequence classifier), as TRL's ``test_train_different_reward_model``."""
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        num_labels=1,
        **_ids(),
    )
    model = _seeded(lambda: AutoModelForSequenceClassification.from_config(config))
    model.config._name_or_path = "tiny-reward"  # TRL names the reward column after it
    return model


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory):
    """The tiny Llama on disk: TRL builds reference models (beta > 0) from ``model.config._name_or_path``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    _llama().save_pretrained(path)
    return str(path)


def _with_ref(saved_dir: str, model=None):
    model = model if model is not None else _llama()
    model.config._name_or_path = saved_dir  # same weights as _llama()
    return model


def _pairs(n):
    return [(i, 11 * i + 3) for i in range(n)]


def _dataset(n: int = 8, conversational: bool = False, **columns) -> Dataset:
    pairs = _pairs(n)
    if conversational:
        prompts = [[{"role": "user", "content": f"{a}+{b}"}] for a, b in pairs]
    else:
        prompts = [f"{a}+{b}=" for a, b in pairs]
    data = {"prompt": prompts, "answer": [str(a + b) for a, b in pairs]}
    data.update({name: values[:n] for name, values in columns.items()})
    return Dataset.from_dict(data)


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def distinct_chars(completions, **kwargs):
    """Varies between the random tiny model's completions, so every group carries a learning signal."""
    return [float(len(set(_text(c)))) for c in completions]


def constant_one(completions, **kwargs):
    return [1.0] * len(completions)


async def async_length(completions, **kwargs):
    return [float(len(_text(c))) for c in completions]


def always_none(completions, **kwargs):
    """Not applicable to any sample (TRL's ``non_applicable_reward_func``)."""
    return [None] * len(completions)


def none_on_odd_rows(completions, **kwargs):
    return [None if i % 2 else float(len(_text(c))) for i, c in enumerate(completions)]


# ----------------------------------------------------------------------------------------------------------------------
# Building, training, checking
# ----------------------------------------------------------------------------------------------------------------------


def _args(kind: str, tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-2,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    if kind == "rloo":
        base["beta"] = 0.0  # RLOO's default KL term would build a reference model from the model's path
    base.update(overrides)
    return TRAINERS[kind][0](**base)


def _trainer(
    kind: str,
    tmp_path,
    *,
    model=None,
    reward_funcs=(distinct_chars,),
    train_dataset=None,
    trainer_kwargs=None,
    **overrides,
):
    kwargs = {"processing_class": TOK}
    kwargs.update(trainer_kwargs or {})
    return TRAINERS[kind][1](
        model=model if model is not None else _llama(),
        reward_funcs=list(reward_funcs),
        args=_args(kind, tmp_path, **overrides),
        train_dataset=train_dataset if train_dataset is not None else _dataset(),
        **kwargs,
    )


def _kind_of(trainer) -> str:
    if isinstance(trainer, KimiMirrorDescentTrainer):
        return "md"
    return "grpo" if isinstance(trainer, K15GRPOTrainer) else "rloo"


def _step_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


def _train(trainer, *, keys=(), params_change: bool = True) -> list[dict]:
    """Train, then check the contract's "trains" side; returns the per-step logs."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.log_history[-1].get("train_loss") is not None
    logs = _step_logs(trainer)
    assert len(logs) == trainer.args.max_steps
    # Generation metrics are logged at the steps that generate, the loss at every step.
    for key in (*COMMON_KEYS, *KIND_KEYS[_kind_of(trainer)], *keys):
        values = [log[key] for log in logs if key in log]
        assert values, f"{key} not logged; logged: {sorted(set().union(*logs))}"
        assert not any(math.isnan(v) for v in values), (key, values)
    unchanged = [n for n, p in before.items() if torch.equal(p, trainer.model.get_parameter(n))]
    if params_change:
        assert not unchanged, f"parameters not updated: {unchanged}"
    else:
        assert len(unchanged) == len(before), "parameters moved although there was no learning signal"
    return logs


def _assert_refusal(err: BaseException, names) -> None:
    message = str(err)
    assert message.strip() and "\n" not in message.strip(), f"refusal is not one line: {message!r}"
    assert any(name in message for name in names), f"refusal does not name {names}: {message!r}"


def _trains_or_refused(build, names, **train_kwargs):
    """The bare contract, for scenarios whose side is not prescribed."""
    try:
        trainer = build()
    except ValueError as err:
        _assert_refusal(err, names)
        return None
    return _train(trainer, **train_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Scenarios every trainer must train
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_train_standard_prompts(tmp_path, kind, model_name):
    """``test_train`` / ``test_train_reward_func_standard`` on string prompts; the Qwen2 run also pads to a multiple
    of 8 (``test_train_with_pad_to_multiple_of``)."""
    if model_name == "llama":
        trainer = _trainer(kind, tmp_path)
    else:
        trainer = _trainer(kind, tmp_path, model=_qwen2(), pad_to_multiple_of=8)
    _train(trainer, keys=("rewards/distinct_chars/mean",))


@pytest.mark.parametrize("kind", KINDS)
def test_train_conversational_prompts(tmp_path, kind):
    """``test_train_dataset_format[conversational_prompt_only]`` / ``test_train_reward_func_conversational``."""
    seen = []

    def conversational_reward(completions, **kwargs):
        seen.append(completions[0])
        return distinct_chars(completions)

    trainer = _trainer(
        kind,
        tmp_path,
        reward_funcs=[conversational_reward],
        train_dataset=_dataset(conversational=True),
        trainer_kwargs={"processing_class": CHAT_TOK},
    )
    _train(trainer)
    assert seen and seen[0][0]["role"] == "assistant"


@pytest.mark.parametrize("kind", KINDS)
def test_train_reward_model_module_with_weights(tmp_path, kind):
    """``test_train_different_reward_model`` + ``test_train_multiple_mixed_reward_funcs``: an ``nn.Module``
    reward model next to a function, weighted, with its own processing class."""
    trainer = _trainer(
        kind,
        tmp_path,
        reward_funcs=[_reward_model(), distinct_chars],
        reward_weights=[0.5, 1.0],
        trainer_kwargs={"reward_processing_classes": [TOK, None]},
    )
    _train(trainer, keys=("rewards/tiny-reward/mean", "rewards/distinct_chars/mean"))


@pytest.mark.parametrize("kind", KINDS)
def test_train_weighted_sync_and_async_reward_funcs(tmp_path, kind):
    """``test_train_multiple_reward_funcs_with_weights``, ``test_train_sync_and_async_reward_funcs``,
    ``test_reward_metric_reflects_reward_weights``: the logged reward is the weighted sum of the per-function means."""
    weights = [0.7, 0.3, 0.1]
    trainer = _trainer(
        kind, tmp_path, reward_funcs=[distinct_chars, constant_one, async_length], reward_weights=weights
    )
    logs = _train(trainer)
    names = ["distinct_chars", "constant_one", "async_length"]
    for log in (log for log in logs if "reward" in log):
        expected = sum(w * log[f"rewards/{name}/mean"] for w, name in zip(weights, names, strict=True))
        assert log["reward"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_penalty_weight", [0.0, 0.5])
def test_train_reward_funcs_with_none_output(tmp_path, kind, length_penalty_weight):
    """``test_train_multiple_reward_funcs_with_None_output``: one function applies, one returns None for every row,
    one for every other row; also with the plugin's length penalty on."""
    trainer = _trainer(
        kind,
        tmp_path,
        reward_funcs=[distinct_chars, always_none, none_on_odd_rows],
        length_penalty_weight=length_penalty_weight,
        length_penalty_correct_threshold=3.0,
    )
    _train(trainer, keys=("rewards/distinct_chars/mean",))


@pytest.mark.parametrize("kind", KINDS)
def test_train_reward_func_additional_columns_and_kwargs(tmp_path, kind):
    """``test_train_reward_func_additional_column``, ``..._accessing_trainer_state``, ``..._with_log_extra``,
    ``..._with_log_metric``: extra dataset columns and TRL's keyword arguments reach the reward function."""
    calls = []

    def column_reward(completions, answer, some_values, trainer_state, log_metric, log_extra, **kwargs):
        assert len(answer) == len(some_values) == len(completions)
        assert hasattr(trainer_state, "global_step")
        calls.append(len(completions))
        log_metric("custom_accuracy", 0.75)
        log_extra("test_column", [_text(c)[:3] for c in completions])
        return [
            float(abs(len(_text(c)) - v % 7)) + len(set(_text(c)))
            for c, v in zip(completions, some_values, strict=True)
        ]

    dataset = _dataset(some_values=list(range(8)))
    trainer = _trainer(kind, tmp_path, reward_funcs=[column_reward], train_dataset=dataset)
    _train(trainer, keys=("custom_accuracy",))
    assert calls
    assert "test_column" in trainer._logs["extra"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"num_iterations": 2, "max_steps": 2}, id="num_iterations=2"),
        pytest.param({"steps_per_generation": 2, "per_device_train_batch_size": 4, "max_steps": 2}, id="spg=2"),
        # test_train_num_generations_larger_than_batch_size: 8 generations over 2 micro-batches of 4
        pytest.param(
            {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 4, "num_generations": 8}, id="ga=2"
        ),
    ],
)
def test_train_batch_layouts(tmp_path, kind, overrides):
    """``test_train_multiple_iterations``, ``steps_per_generation``, gradient accumulation."""
    logs = _train(_trainer(kind, tmp_path, **overrides))
    if kind == "md" and overrides.get("num_iterations") == 2:
        # second update of the same rollout batch: the policy has moved away from pi_i
        assert logs[0]["k15/l2_loss"] == 0.0 and logs[1]["k15/l2_loss"] > 0.0


def _fake_generate(rows):
    """TRL's ``test_train_with_mask_truncated_completions`` mock: fixed completions appended to the prompts."""

    def generate(input_ids=None, attention_mask=None, **kwargs):
        n = input_ids.size(0)
        completions = torch.tensor([rows[i % len(rows)] for i in range(n)], device=input_ids.device)
        return torch.cat([input_ids, completions], dim=1)

    return generate


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("all_truncated", [False, True], ids=["some_truncated", "all_truncated"])
def test_train_mask_truncated_completions(tmp_path, kind, all_truncated, monkeypatch):
    """``test_train_with_mask_truncated_completions`` (+ ``..._all_masked``): truncated completions leave the loss.
    With every completion truncated there is no learning signal left, so the loss is 0 and nothing moves."""
    if all_truncated:  # no EOS anywhere; the rewards still differ, so only the mask can silence them
        rows = [[3, 4, 5, 6, 7, 8], [3, 3, 3, 3, 3, 3], [4, 5, 4, 5, 4, 5]]
    else:  # truncated / EOS inside / EOS as the last allowed token
        rows = [[3, 4, 5, 6, 7, 8], [9, 10, EOS, PAD, PAD, PAD], [3, 5, 7, 9, 11, EOS]]
    trainer = _trainer(kind, tmp_path, mask_truncated_completions=True)
    monkeypatch.setattr(trainer.model, "generate", _fake_generate(rows))
    _train(trainer, params_change=not all_truncated)
    if all_truncated:
        assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_train_iterable_dataset_uniform_sampler(tmp_path, kind):
    """``test_train_with_iterable_dataset``: streaming data with TRL's own sampler (``sampler_type="uniform"``)."""
    trainer = _trainer(kind, tmp_path, train_dataset=_dataset().to_iterable_dataset(), max_steps=2)
    assert trainer.args.accelerator_config.dispatch_batches is False
    _train(trainer)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler_type", ["prioritized", "curriculum"])
def test_iterable_dataset_refuses_plugin_samplers(tmp_path, kind, sampler_type):
    """The plugin's samplers index the dataset: an iterable one is refused when the trainer is built."""
    dataset = _dataset(difficulty=[float(i) for i in range(8)]).to_iterable_dataset()
    with pytest.raises(ValueError) as info:
        _trainer(kind, tmp_path, train_dataset=dataset, sampler_type=sampler_type)
    _assert_refusal(info.value, ("sampler_type",))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sampler_type", ["uniform", "prioritized"])
def test_train_remove_unused_columns(tmp_path, kind, sampler_type):
    """``remove_unused_columns=True`` drops every column but the prompt before the data reaches the trainer. With TRL's
    sampler it trains; with the plugin's prioritized sampler (which keys its statistics by a row-index column) it must
    train or be refused at construction."""

    def build():
        return _trainer(kind, tmp_path, remove_unused_columns=True, sampler_type=sampler_type)

    if sampler_type == "uniform":
        _train(build())
    else:
        _trains_or_refused(build, ("remove_unused_columns", "sampler_type"))


@pytest.mark.parametrize(
    "kind, num_generations_eval", [*((k, None) for k in KINDS), ("md", 1), ("grpo", 1)], ids=lambda v: str(v)
)
def test_train_with_eval(tmp_path, kind, num_generations_eval):
    """``test_train_with_eval`` / ``test_train_with_num_generations_eval``: ``eval_strategy="steps"``."""
    trainer = _trainer(
        kind,
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        num_generations_eval=num_generations_eval,
        trainer_kwargs={"eval_dataset": _dataset(4)},
    )
    _train(trainer)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert evals and "eval_reward" in evals[-1] and not math.isnan(evals[-1]["eval_loss"])


@pytest.mark.parametrize("kind", KINDS)
def test_init_with_eval_dataset(tmp_path, kind):
    """``test_init_with_eval_dataset[dict_of_dataset / iterable_dataset]``: a dict holding a map-style and an
    iterable eval set is kept as given (and the iterable one switches ``dispatch_batches`` off)."""
    eval_split = _dataset(4)
    eval_dataset = {"map": eval_split, "stream": eval_split.to_iterable_dataset()}
    trainer = _trainer(kind, tmp_path, trainer_kwargs={"eval_dataset": eval_dataset})
    assert set(trainer.eval_dataset) == {"map", "stream"}
    assert trainer.args.accelerator_config.dispatch_batches is False


@pytest.mark.parametrize("kind", KINDS)
def test_train_without_args_builds_default_config(tmp_path, kind, saved_llama, monkeypatch):
    """``test_init_minimal``: no ``args``; the trainer builds its default config, as ``GRPOTrainer`` does.

    TRL's default configs ask for bf16 (``bf16=None`` -> True), which ``TrainingArguments`` refuses on a machine
    without a bf16 GPU, for TRL's own trainers too; the check is patched so the default config can be built (CPU
    autocast handles bf16). The default output directory is relative, hence the chdir.
    """
    if not torch.cuda.is_available():
        monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.chdir(tmp_path)
    # Saved model: RLOO's default beta=0.05 builds a reference model from the model's path.
    model = AutoModelForCausalLM.from_pretrained(saved_llama)
    config_cls, trainer_cls = TRAINERS[kind]
    trainer = trainer_cls(model, [distinct_chars], train_dataset=_dataset(), processing_class=TOK)
    assert type(trainer.args) is config_cls
    trainer.args.max_steps = 1  # the defaults would train 3 epochs
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1].get("train_loss") is not None
    assert any(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in before.items())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", ["qwen3_moe", "gpt_oss"])
def test_train_moe_logs_aux_loss(tmp_path, kind, model_name):
    """``test_train[tiny-Qwen3MoeForCausalLM / tiny-GptOssForCausalLM]``: the router load-balancing loss
    (``router_aux_loss_coef`` from the model config) is added to the loss and logged as ``aux_loss``."""
    model = _qwen3_moe() if model_name == "qwen3_moe" else _gpt_oss()
    trainer = _trainer(kind, tmp_path, model=model)
    assert trainer.aux_loss_enabled
    _train(trainer, keys=("aux_loss",))


def multiply_tool(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


def _tool_tokenizer(*tool_sets) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code, with TRL's Qwen3 chat template, so TRL can render and parse tool calls.

    ``tool_sets``: the tools each prompt can be rendered with (one list per environment)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"])
    tokenizer.chat_template = qwen3_chat_template
    # The system block that lists the tools is ~600 bytes: one token for it keeps the prompts short.
    for tools in tool_sets:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=tools, tokenize=False)
        tokenizer.add_tokens([rendered.split("<|im_start|>user")[0]])
    return tokenizer


def _tool_model(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _seeded(lambda: AutoModelForCausalLM.from_config(config))


def _encoder(tokenizer):
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _padded(rows, pad_id, input_ids):
    width = max(map(len, rows))
    rows = [row + [pad_id] * (width - len(row)) for row in rows]
    return torch.cat([input_ids, torch.tensor(rows, device=input_ids.device)], dim=1)


@pytest.mark.parametrize("kind", ["md", "grpo"])
def test_train_with_tools(tmp_path, kind, monkeypatch):
    """``test_train_with_tools``: per group of 4, two valid tool calls, one with a wrong argument name (the tool call
    fails), one plain answer; the tool results go back to the model, which answers "Done!"."""
    tokenizer = _tool_tokenizer([multiply_tool])
    model = _tool_model(tokenizer)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} times 4?"}] for i in range(8)]})
    trainer = _trainer(
        kind,
        tmp_path,
        model=model,
        train_dataset=dataset,
        max_completion_length=128,
        trainer_kwargs={"processing_class": tokenizer, "tools": [multiply_tool]},
    )

    encode = _encoder(tokenizer)
    call = '<tool_call>\n{{"name": "multiply_tool", "arguments": {{"a": 3, "{}": 4}}}}\n</tool_call><|im_end|>'
    first = [
        encode(call.format("b")),
        encode(call.format("c")),
        encode("I don't know<|im_end|>"),
        encode(call.format("b")),
    ]
    done = encode("Done!<|im_end|>")
    tool_response = tokenizer.convert_tokens_to_ids("<tool_response>")

    def fake_generate(input_ids=None, attention_mask=None, **kwargs):
        after_tool = bool((input_ids == tool_response).any())  # second turn: only the rows that called the tool
        rows = [done if after_tool else first[i % len(first)] for i in range(input_ids.size(0))]
        return _padded(rows, tokenizer.pad_token_id, input_ids)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    logs = _train(trainer, keys=("tools/call_frequency", "tools/failure_frequency"))
    assert logs[0]["tools/call_frequency"] == pytest.approx(3 / 4)
    assert logs[0]["tools/failure_frequency"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------------------------
# environment_factory (TRL 1.16, experimental): environments as tools, environment-owned data, several environments
# ----------------------------------------------------------------------------------------------------------------------

ENV_KINDS = ("md", "grpo")  # RLOOTrainer takes no environment_factory
INCREMENT_CALL = '<tool_call>\n{"name": "increment", "arguments": {"step": 1}}\n</tool_call><|im_end|>'
SHOUT_CALL = '<tool_call>\n{"name": "shout", "arguments": {"text": "hi"}}\n</tool_call><|im_end|>'


class CounterEnvironment:
    """TRL's ``DummyEnvironment``: a counter the model increments through its one tool."""

    def reset(self, **kwargs):
        self._counter = 0

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self._counter += step
        return self._counter


class ScoringCounterEnvironment(CounterEnvironment):
    """TRL's environment that owns the reward: the final counter."""

    def get_reward(self) -> float:
        return float(self._counter)


class GuessTheWordEnvironment:
    """TRL's environment that owns the data: ``reset()`` returns the prompt."""

    def reset(self, **kwargs):
        return "Guess the 5-letter word."


def _env_trainer(
    kind, tmp_path, tokenizer, environment_factory, train_dataset=None, reward_funcs=(distinct_chars,), **overrides
):
    return TRAINERS[kind][1](
        model=_tool_model(tokenizer),
        reward_funcs=list(reward_funcs) or None,  # None: the environment owns the reward
        args=_args(kind, tmp_path, **overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        environment_factory=environment_factory,
    )


@pytest.fixture
def _experimental(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.mark.usefixtures("_experimental")
@pytest.mark.parametrize("kind", ENV_KINDS)
@pytest.mark.parametrize("owned_reward", [False, True], ids=["reward_func", "environment_owned_reward"])
def test_train_with_environment_factory(tmp_path, kind, owned_reward, monkeypatch):
    """``test_train_with_environment_factory``: no dataset, one environment per rollout; per group of 3, a valid
    ``increment`` call, a call to a tool that does not exist, and a plain answer. Trains with TRL's own sampler.
    ``test_train_with_environment_owned_reward``: the same with no reward function, the environment's
    ``get_reward()`` (the final counter: 1, 0, 0) scores the rollouts."""
    environment = ScoringCounterEnvironment if owned_reward else CounterEnvironment
    tokenizer = _tool_tokenizer([environment().increment])
    trainer = _env_trainer(
        kind,
        tmp_path,
        tokenizer,
        environment,
        reward_funcs=() if owned_reward else (distinct_chars,),
        per_device_train_batch_size=3,
        num_generations=3,
        max_steps=2,  # TRL: required when the environment owns the data; two batches of the one placeholder row
        max_completion_length=128,
    )
    encode = _encoder(tokenizer)
    first = [
        encode(INCREMENT_CALL),
        encode(INCREMENT_CALL.replace("increment", "decrement").replace("1", "2")),
        encode("I won't increment<|im_end|>"),
    ]
    done = encode("Done!<|im_end|>")
    tool_response = tokenizer.convert_tokens_to_ids("<tool_response>")

    def fake_generate(input_ids=None, attention_mask=None, **kwargs):
        after_tool = bool((input_ids == tool_response).any())
        rows = [done if after_tool else first[i % len(first)] for i in range(input_ids.size(0))]
        return _padded(rows, tokenizer.pad_token_id, input_ids)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    logs = _train(trainer, keys=("tools/call_frequency", "tools/failure_frequency"))
    assert [log["tools/call_frequency"] for log in logs] == pytest.approx([2 / 3] * 2)
    assert [log["tools/failure_frequency"] for log in logs] == pytest.approx([1 / 2] * 2)
    assert [env._counter for env in trainer.environments] == [1, 0, 0]  # only the valid call counted
    if owned_reward:
        assert [log["rewards/ScoringCounterEnvironment/mean"] for log in logs] == pytest.approx([1 / 3] * 2)


@pytest.mark.usefixtures("_experimental")
@pytest.mark.parametrize("kind", ENV_KINDS)
def test_train_with_environment_owned_data(tmp_path, kind, monkeypatch):
    """``test_train_with_environment_owned_data``: no dataset, and ``reset()`` returns the prompt; completions of
    three lengths scored by their length. Trains with TRL's own sampler."""
    tokenizer = _tool_tokenizer()
    trainer = _env_trainer(
        kind,
        tmp_path,
        tokenizer,
        GuessTheWordEnvironment,
        reward_funcs=[lambda completions, **kwargs: [float(len(c[-1]["content"])) for c in completions]],
        per_device_train_batch_size=3,
        num_generations=3,
        max_steps=2,
        max_completion_length=16,  # bytes: "DoneDoneDone!" and the end of turn
    )
    encode = _encoder(tokenizer)
    rows = [encode("Done" * k + "!<|im_end|>") for k in (1, 2, 3)]
    seen = []

    def fake_generate(input_ids=None, attention_mask=None, **kwargs):
        seen.extend(tokenizer.batch_decode(input_ids))
        return _padded([rows[i % 3] for i in range(input_ids.size(0))], tokenizer.pad_token_id, input_ids)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    _train(trainer)
    assert len(seen) == 6 and all("<|im_start|>user\nGuess the 5-letter word.<|im_end|>" in p for p in seen)


@pytest.mark.parametrize("kind", ENV_KINDS)
@pytest.mark.parametrize("sampler_type", ["prioritized", "curriculum"])
@pytest.mark.parametrize("environment", [CounterEnvironment, GuessTheWordEnvironment], ids=lambda e: e.__name__)
def test_environment_owned_data_refuses_plugin_samplers(tmp_path, kind, sampler_type, environment):
    """The two scenarios above with the plugin's samplers. Without a ``train_dataset`` TRL feeds identical empty
    placeholder rows and the environment's ``reset()`` picks each problem, so there is nothing to prioritize or order
    by difficulty (before, training ended in ``KeyError: 'k15_index'``): refused when the trainer is built."""
    with pytest.raises(ValueError) as info:
        _env_trainer(kind, tmp_path, _tool_tokenizer(), environment, max_steps=1, sampler_type=sampler_type)
    _assert_refusal(info.value, ("sampler_type",))
    assert str(info.value).startswith(f"sampler_type={sampler_type!r} needs a train_dataset")


@pytest.mark.usefixtures("_experimental")
@pytest.mark.parametrize("kind", ENV_KINDS)
@pytest.mark.parametrize("sampler_type", ["uniform", "prioritized"])
def test_train_with_multiple_environments(tmp_path, kind, sampler_type, monkeypatch):
    """``test_train_with_multiple_environments``: a dict ``environment_factory``; each row's ``environment`` field picks
    its environment, whose tools are the only ones its prompt lists and its calls reach.

    Uniform sampling matches TRL exactly: with ``shuffle_dataset=False`` the batch is [counter, counter, echo, echo],
    TRL's mock answers the first row of each group with that environment's tool call, both calls succeed.

    Why the prioritized sampler's run differs from TRL's (``tools/failure_frequency`` 0.5 against 0.0 there): it
    draws other rows in another order (it ignores ``shuffle_dataset``; seed 0 draws row 11, an echo row, then row 6,
    a counter row), while TRL's mock hard-codes the uniform layout. Its ``increment`` call then lands on an echo row
    and its ``shout`` call on a counter row; each environment exposes only its own tool, so both calls fail ("Tool
    increment not found."): failure frequency 1.0 in this one-step run. That is the sampler's legitimate choice, not
    broken routing: every row got the environment its ``environment`` field names. So here the mock answers each row
    from the environment its prompt shows, and the run must route every call right. One real defect was found on the
    way and fixed: the sampler's ``k15_index`` column reached ``reset(**row)`` (a ``reset`` taking only the dataset's
    fields failed with a TypeError); it now travels beside the rows and still feeds the sampler.
    """
    resets = {"counter": [], "echo": []}
    calls = {"increment": [], "shout": []}

    class Counter:
        def reset(self, **kwargs):
            resets["counter"].append(kwargs)
            return "Count."

        def increment(self, step: int) -> int:
            """
            Increment the internal counter.

            Args:
                step: Value to add to the counter.
            """
            calls["increment"].append(step)
            return step

    class Echo:
        def reset(self, **kwargs):
            resets["echo"].append(kwargs)
            return "Echo."

        def shout(self, text: str) -> str:
            """
            Shout the given text.

            Args:
                text: Text to shout.
            """
            calls["shout"].append(text)
            return text.upper()

    tokenizer = _tool_tokenizer([Counter().increment], [Echo().shout])
    dataset = Dataset.from_dict({"environment": ["counter", "echo"] * 8})
    trainer = _env_trainer(
        kind,
        tmp_path,
        tokenizer,
        {"counter": Counter, "echo": Echo},
        train_dataset=dataset,
        per_device_train_batch_size=4,  # 2 prompts x 2 generations
        num_generations=2,
        shuffle_dataset=False,
        max_completion_length=128,
        sampler_type=sampler_type,
    )
    assert [t.__name__ for t in trainer._env_tools["counter"]] == ["increment"]
    assert [t.__name__ for t in trainer._env_tools["echo"]] == ["shout"]
    encode = _encoder(tokenizer)
    answers = {  # (tool call, plain answer) per environment; the first row of each group calls the tool
        "counter": (encode(INCREMENT_CALL), encode("I won't<|im_end|>")),
        "echo": (encode(SHOUT_CALL), encode("Done!<|im_end|>")),
    }
    done = encode("Done!<|im_end|>")
    tool_response = tokenizer.convert_tokens_to_ids("<tool_response>")

    def fake_generate(input_ids=None, attention_mask=None, **kwargs):
        if (input_ids == tool_response).any():
            rows = [done] * input_ids.size(0)
        elif sampler_type == "uniform":  # TRL's mock: the layout [counter, counter, echo, echo]
            rows = [answers[name][i % 2] for i, name in enumerate(["counter", "counter", "echo", "echo"])]
        else:
            shown = ["counter" if "Count.<|im_end|>" in p else "echo" for p in tokenizer.batch_decode(input_ids)]
            rows = [answers[name][i % 2] for i, name in enumerate(shown)]
        return _padded(rows, tokenizer.pad_token_id, input_ids)

    monkeypatch.setattr(trainer.model, "generate", fake_generate)
    logs = _train(trainer, keys=("tools/call_frequency", "tools/failure_frequency"))
    assert logs[0]["tools/call_frequency"] == pytest.approx(2 / 4)
    assert logs[0]["tools/failure_frequency"] == 0.0
    # the rows' own fields only: `environment` is TRL's control field, `k15_index` the plugin's
    assert all(kwargs == {} for kwargs in resets["counter"] + resets["echo"])
    if sampler_type == "uniform":
        assert trainer._batch_environments == ["counter", "counter", "echo", "echo"]
        assert calls == {"increment": [1], "shout": ["hi"]}
        return
    chunk = trainer._k15_sampler._records[0].tolist()  # the 2 rows the sampler drew for this batch
    drawn = [dataset[i]["environment"] for i in chunk]
    assert trainer._batch_environments == [name for name in drawn for _ in range(2)]
    assert len(calls["increment"]) == drawn.count("counter") and len(calls["shout"]) == drawn.count("echo")
    attempts = trainer._k15_sampler.tracker.attempts
    assert attempts[chunk].tolist() == [2, 2] and int(attempts.sum()) == 4  # the row index still reached the sampler


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions returning None for every row
# ----------------------------------------------------------------------------------------------------------------------

LOGGERS = {"md": "trl.trainer.grpo_trainer", "grpo": "trl.trainer.grpo_trainer", "rloo": "trl.trainer.rloo_trainer"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length_penalty_weight", [0.0, 0.5])
def test_all_rewards_none_warns_and_zeroes_advantages(tmp_path, kind, length_penalty_weight, caplog):
    """``test_warning_raised_all_rewards_none``: TRL warns, and the unscorable rows get zero advantage, also when the
    plugin's length penalty adds a reward column of its own."""
    trainer = _trainer(kind, tmp_path, reward_funcs=[always_none], length_penalty_weight=length_penalty_weight)
    advantages = []
    generate_and_score = trainer._generate_and_score_completions

    def recording(inputs):
        output = generate_and_score(inputs)
        advantages.append(output["advantages"].detach().clone())
        return output

    trainer._generate_and_score_completions = recording
    with caplog.at_level(logging.WARNING, logger=LOGGERS[kind]):
        trainer.train()
    warnings = [
        r
        for r in caplog.records
        if r.name == LOGGERS[kind] and "All reward functions returned None for the following kwargs:" in r.getMessage()
    ]
    assert warnings, caplog.text
    assert advantages and all(torch.equal(a, torch.zeros_like(a)) for a in advantages), advantages


# ----------------------------------------------------------------------------------------------------------------------
# Construction-time refusals TRL itself makes: the plugin keeps them one-line ValueErrors naming the option
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["no_train_dataset", "dispatch_batches", "router_aux_loss_coef"])
def test_trl_construction_refusals(tmp_path, kind, case):
    """``test_dataset_required_without_environment`` / ``test_train_dataset_required``,
    ``test_iterable_dataset_requires_dispatch_batches_false``, ``router_aux_loss_coef`` on a dense model."""
    trainer_cls = TRAINERS[kind][1]
    with pytest.raises(ValueError) as info:
        if case == "no_train_dataset":
            trainer_cls(model=_llama(), reward_funcs=[distinct_chars], args=_args(kind, tmp_path), processing_class=TOK)
        elif case == "dispatch_batches":
            _trainer(
                kind,
                tmp_path,
                train_dataset=_dataset().to_iterable_dataset(),
                accelerator_config={"dispatch_batches": True},
            )
        else:
            _trainer(kind, tmp_path, router_aux_loss_coef=0.01)
    names = {"no_train_dataset": "train_dataset"}.get(case, case)
    _assert_refusal(info.value, (names,))


# ----------------------------------------------------------------------------------------------------------------------
# TRL's GRPO loss options: refused by KimiMirrorDescentConfig, trained by K15GRPOTrainer (and K15RLOOTrainer)
# ----------------------------------------------------------------------------------------------------------------------


# Each option alone, set away from its default: KimiMirrorDescentConfig must refuse it (config only, no trainer).
MD_REFUSED = [
    {"beta": 0.1},
    *({"loss_type": t} for t in ("grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")),
    {"epsilon": 0.1},
    {"epsilon_high": 0.28},
    {"delta": 2.0},
    *({"scale_rewards": v} for v in ("batch", "none", False)),
    {"importance_sampling_level": "sequence"},
    {"top_entropy_quantile": 0.2},
    {"entropy_coef": 0.1},
    {"use_adaptive_entropy": True},
    {"sync_ref_model": True},
    {"off_policy_mask_threshold": 0.5},
    {"use_bias_correction_kl": False},
    {"multi_objective_aggregation": "normalize_then_sum"},
    {"vllm_importance_sampling_mode": "token_truncate"},
    {"vllm_importance_sampling_mode": "token_mask"},
]


def _option_id(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items())


@pytest.mark.parametrize("overrides", MD_REFUSED, ids=_option_id)
def test_mirror_descent_config_refuses_unused_grpo_options(tmp_path, overrides):
    """The mirror-descent loss uses none of these: ``KimiMirrorDescentConfig`` refuses them before any trainer exists,
    with a one-line message naming the option."""
    with pytest.raises(ValueError) as info:
        _args("md", tmp_path, **overrides)
    _assert_refusal(info.value, tuple(overrides))


def _ref_params_moved(trainer, ref_before):
    moved = [n for n, p in trainer.ref_model.named_parameters() if not torch.equal(p, ref_before[n])]
    assert moved, "sync_ref_model did not update the reference model"
    return True


@dataclass(frozen=True)
class Case:
    overrides: dict
    trains: tuple[str, ...] = ("grpo",)  # RLOO only where RLOOConfig has the option(s)
    needs_ref: bool = False  # beta > 0: TRL builds the reference model from the model's path
    reward_funcs: tuple = (distinct_chars,)
    keys: tuple[str, ...] = ()
    check: object = None  # check(trainer, ref_before) -> bool, after training


# TRL's option scenarios (test_train_loss_types, test_train_scale_rewards, test_train_delta_clipping,
# test_train_with_entropy_filter, test_train_with_static_entropy / _adaptive_entropy, test_train_with_off_policy_mask,
# test_train_sequence_importance_sampling, test_train_normalize_then_sum_aggregation, test_train_beta_non_zero,
# test_train_with_sync_ref_model; RLOO: test_train_with_normalized_advantages, test_train_with_clipped_rewards).
# Orthogonal options share a run to keep the file fast; each case id names everything it sets.
CASES = [
    Case({"loss_type": "grpo", "scale_rewards": "batch"}),
    Case({"loss_type": "bnpo", "scale_rewards": "none"}),
    Case({"loss_type": "dr_grpo", "scale_rewards": False}),
    Case({"loss_type": "cispo", "epsilon_high": 5.0}),  # cispo's epsilon_max
    Case({"loss_type": "sapo", "top_entropy_quantile": 0.2}),
    Case({"loss_type": "vespo", "off_policy_mask_threshold": 0.5}),
    Case({"loss_type": "luspo", "importance_sampling_level": "sequence", "num_iterations": 2, "max_steps": 2}),
    Case({"epsilon": 0.1, "epsilon_high": 0.28, "delta": 2.0}),
    Case({"entropy_coef": 0.1}, keys=("entropy_coef",)),
    Case(
        {"entropy_coef": 0.01, "use_adaptive_entropy": True, "entropy_target": 15.0},
        keys=("entropy_coef",),
        check=lambda trainer, _: trainer.entropy_coef > 0.01,  # entropy below target: the coefficient grew
    ),
    Case({"multi_objective_aggregation": "normalize_then_sum"}, reward_funcs=(distinct_chars, async_length)),
    Case(
        {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 1},
        trains=("grpo", "rloo"),
        needs_ref=True,
        keys=("kl",),
        check=_ref_params_moved,
    ),
    Case({"epsilon": 0.1, "epsilon_high": 0.28}, trains=("rloo",)),
    Case({"normalize_advantages": True, "reward_clip_range": (1.5, 4.5)}, trains=("rloo",)),
]


@pytest.mark.parametrize(
    "kind, case", [pytest.param(k, c, id=f"{k}-{_option_id(c.overrides)}") for c in CASES for k in c.trains]
)
def test_train_with_grpo_options(tmp_path, kind, case, saved_llama):
    """``K15GRPOTrainer`` (TRL's loss) and ``K15RLOOTrainer`` train with TRL's loss options."""
    model = _with_ref(saved_llama) if case.needs_ref else _llama()
    trainer = _trainer(kind, tmp_path, model=model, reward_funcs=case.reward_funcs, **case.overrides)
    ref_before = None
    if case.needs_ref:
        assert trainer.ref_model is not None
        ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    _train(trainer, keys=case.keys)
    if case.check is not None:
        assert case.check(trainer, ref_before)


@pytest.mark.parametrize(
    "overrides",
    [
        {"beta": 0.0},
        {"loss_type": "dapo"},
        {"epsilon": 0.2},
        {"epsilon_high": None},
        {"delta": None},
        {"scale_rewards": "group"},
        {"scale_rewards": True},
        {"importance_sampling_level": "token"},
        {"top_entropy_quantile": 1.0},
        {"entropy_coef": 0.0},
        {"use_adaptive_entropy": False},
        {"sync_ref_model": False},
        {"off_policy_mask_threshold": None},
        {"use_bias_correction_kl": True},
        {"multi_objective_aggregation": "sum_then_normalize"},
        {"vllm_importance_sampling_mode": "sequence_mask"},
        {"vllm_importance_sampling_mode": "sequence_truncate"},
        {"mask_truncated_completions": True},
    ],
    ids=_option_id,
)
def test_mirror_descent_config_accepts_defaults(tmp_path, overrides):
    """The options are refused only away from their defaults (``scale_rewards=True`` is TRL's alias of "group")."""
    _args("md", tmp_path, **overrides)


# ----------------------------------------------------------------------------------------------------------------------
# PEFT (collected only where peft is installed: the merge extra brings it)
# ----------------------------------------------------------------------------------------------------------------------


def _train_only_lora_moves(trainer):
    """Train ``trainer``: it logs a training loss, its LoRA weights move and every base weight stays as it was."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1].get("train_loss") is not None
    for n, p in before.items():
        moved = not torch.equal(p, trainer.model.get_parameter(n))
        assert moved == ("lora" in n), n


if PEFT_AVAILABLE:

    @pytest.mark.parametrize("kind", KINDS)
    def test_train_peft_config(tmp_path, kind):
        """``test_train_peft_config``: LoRA adapters train, the base weights do not."""
        from peft import LoraConfig

        # 2 steps: LoRA's B starts at zero, so A gets no gradient until B has moved once
        trainer = _trainer(
            kind, tmp_path, max_steps=2, trainer_kwargs={"peft_config": LoraConfig(target_modules=["q_proj", "v_proj"])}
        )
        _train_only_lora_moves(trainer)


# ----------------------------------------------------------------------------------------------------------------------
# Vision-language scenarios: TRL's test_training_vlm* on the shipped tiny LLaVA (k15_plugin/data/demo_checkpoint_vision)
# ----------------------------------------------------------------------------------------------------------------------
# TRL runs them on hub checkpoints (tiny Qwen2-VL / Qwen2.5-VL / Gemma 3 / LLaVA-NeXT) and the zen-image datasets; here
# the model is the offline LLaVA and the rows are the image task's pictures with its conversational prompt. The
# reward is TRL's (longer completions score more). As in TRL's tests, the vision tower and the projector are left
# out of the "every parameter changes" check (TRL: the tiny models' init lets little gradient reach them); the text
# model's parameters must all change. TRL's liger and vLLM-server VLM scenarios are not here: liger is not installed
# and TRL skips its own vLLM one; k15-train refuses vLLM with image prompts (README).

VLM_SKIP = ("model.vision_tower.", "model.multi_modal_projector.")


def longer_completion(completions, **kwargs):
    return [float(len(_text(c))) for c in completions]


def _vlm_rows(n: int = 8, images_per_row: int = 1):
    from k15_plugin.data.vision import make_vision_datasets

    train, _ = make_vision_datasets(num_train=n * images_per_row, seed=5, heldout_size=3)
    if images_per_row == 1:
        return train.select_columns(["prompt", "image"])
    pictures = list(train["image"])
    content = [*({"type": "image"} for _ in range(images_per_row)), {"type": "text", "text": "How many red squares?"}]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": content}] for _ in range(n)],
            "images": [pictures[i * images_per_row : (i + 1) * images_per_row] for i in range(n)],
        }
    )


def _vlm_trainer(kind, tmp_path, train_dataset=None, peft_config=None, **overrides):
    from k15_plugin.data.vision import load_vision_checkpoint

    model, processor = load_vision_checkpoint()
    overrides = {"max_completion_length": 2, "learning_rate": 0.1, **overrides}
    return TRAINERS[kind][1](
        model=model,
        reward_funcs=[longer_completion],
        args=_args(kind, tmp_path, **overrides),
        train_dataset=train_dataset if train_dataset is not None else _vlm_rows(),
        processing_class=processor,
        peft_config=peft_config,
    )


def _train_vlm(trainer) -> None:
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.log_history[-1].get("train_loss") is not None
    logs = _step_logs(trainer)
    assert len(logs) == trainer.args.max_steps and all(math.isfinite(log["loss"]) for log in logs)
    unchanged = [
        n for n, p in before.items() if not n.startswith(VLM_SKIP) and torch.equal(p, trainer.model.get_parameter(n))
    ]
    assert not unchanged, f"parameters not updated: {unchanged}"


@pytest.mark.parametrize("kind", KINDS)
def test_train_vlm(tmp_path, kind):
    """``test_training_vlm`` (GRPO and RLOO): an ``image`` column and conversational prompts."""
    _train_vlm(_vlm_trainer(kind, tmp_path))


@pytest.mark.parametrize("kind", KINDS)
def test_train_vlm_beta_non_zero(tmp_path, kind):
    """``test_training_vlm_beta_non_zero``: a KL term against a reference model built from the VLM; the mirror-descent
    config refuses ``beta`` (its squared term is the regulariser), the others train."""
    if kind == "md":
        with pytest.raises(ValueError) as err:
            _vlm_trainer(kind, tmp_path, beta=0.1)
        _assert_refusal(err.value, ["beta"])
        return
    _train_vlm(_vlm_trainer(kind, tmp_path, beta=0.1))


@pytest.mark.parametrize("kind", KINDS)
def test_train_vlm_importance_sampling(tmp_path, kind):
    """``test_training_vlm_and_importance_sampling``: ``steps_per_generation=2`` (TRL's importance sampling across
    the steps of one generation); trains or is refused in one line."""
    try:
        trainer = _vlm_trainer(kind, tmp_path, steps_per_generation=2, per_device_train_batch_size=4, max_steps=2)
    except ValueError as err:
        _assert_refusal(err, ["steps_per_generation"])
        return
    _train_vlm(trainer)


@pytest.mark.parametrize("kind", KINDS)
def test_train_vlm_multi_image(tmp_path, kind):
    """``test_training_vlm_multi_image``: an ``images`` column with two pictures per prompt."""
    _train_vlm(_vlm_trainer(kind, tmp_path, train_dataset=_vlm_rows(images_per_row=2)))


if PEFT_AVAILABLE:

    @pytest.mark.parametrize("kind", KINDS)
    def test_train_vlm_peft(tmp_path, kind):
        """``test_training_vlm_peft``: LoRA on the text model's q_proj and v_proj; the base weights do not move."""
        from peft import LoraConfig

        trainer = _vlm_trainer(kind, tmp_path, max_steps=2, peft_config=LoraConfig(target_modules=["q_proj", "v_proj"]))
        _train_only_lora_moves(trainer)
