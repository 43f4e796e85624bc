"""The math-verify reward (paper section 2.3): equivalences, extraction modes, garbage, pickling, and time limits."""

import pickle
import signal
import threading
import time

import pytest

import k15_plugin.rewards.math as math_module
from k15_plugin.rewards import MathReward, get_math_reward
from k15_plugin.rewards.math import extract_final_answer, last_boxed


@pytest.fixture(scope="module")
def reward() -> MathReward:
    return get_math_reward()


# (completion, reference answer, expected reward) with extraction="auto"
EQUIVALENCES = [
    ("The answer is $\\boxed{0.5}$.", "\\frac{1}{2}", 1.0),
    ("So $x = \\frac{1}{2}$.", "0.5", 1.0),
    ("\\boxed{3}", "3", 1.0),
    ("We get \\boxed{1,000} apples.", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("The rate is \\boxed{10\\%}.", "10\\%", 1.0),
    ("The rate is \\boxed{10\\%}.", "10", 1.0),  # a percentage against its number
    ("Solving, \\boxed{x=5}.", "5", 1.0),
    ("\\boxed{5}", "x=5", 1.0),
    ("The side is \\boxed{5\\text{ cm}}.", "5", 1.0),  # units stripped
    ("It costs \\boxed{\\$18}.", "18", 1.0),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", 1.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{4} or maybe \\boxed{6}", "6", 0.0),  # auto: several boxes are one set answer; hedging earns nothing
    ("\\boxed{4} or maybe \\boxed{6}", "\\{4, 6\\}", 1.0),
    ("The total is 72.", "72", 1.0),  # no box: math-verify's last expression
    ("\\boxed{6}", "5", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{3}", 0.0),
    ("\\boxed{x=6}", "5", 0.0),
    ("First \\boxed{6}, finally \\boxed{4}.", "6", 0.0),
    ("\\boxed{[1,2]}", "\\{1,2\\}", 0.0),  # an interval is not a set
    ("I don't know.", "5", 0.0),
]


@pytest.mark.parametrize("completion, answer, expected", EQUIVALENCES)
def test_equivalences(reward, completion, answer, expected):
    assert reward([completion], answer=[answer]) == [expected]


def test_worked_solutions_as_references(reward):
    # MATH's solution column (ends in \boxed{}) and GSM8K's (ends in "#### x") work as references too.
    assert reward(["\\boxed{\\frac{3}{4}}"], answer=["... so the probability is $\\boxed{\\dfrac34}$."]) == [1.0]
    assert reward(["she pays \\boxed{18}"], answer=["16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18"]) == [1.0]


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        "   ",
        [],
        {},
        42,
        [{"role": "user", "content": "\\boxed{5}"}],
        "\\boxed{",
        "\\frac{1}{",
        "$$$",
        "\\boxed{\\frac}",
        "{" * 500 + "5",
    ],
)
def test_garbage_completions_score_zero(reward, bad):
    assert reward([bad], answer=["5"]) == [0.0]


@pytest.mark.parametrize("answer", [None, "", "   ", "\\frac{", float("nan")])
def test_garbage_references_score_zero(reward, answer):
    assert reward(["\\boxed{5}"], answer=[answer]) == [0.0]


def test_chat_completions_use_the_assistant_content(reward):
    chat = [{"role": "assistant", "content": "Thinking... the answer is $\\boxed{42}$"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{42}"}]}]
    assert reward([chat, parts], answer=["42", "42"]) == [1.0, 1.0]


def test_extraction_modes():
    text = "Step 1 gives 12. Then 3/4 of it... #### 9\nCheck: \\boxed{10} and finally 11"
    assert extract_final_answer(text, "boxed") == "10"
    assert extract_final_answer(text, "gsm8k") == "9"
    assert extract_final_answer(text, "last_number") == "11"
    assert extract_final_answer("no answer here", "gsm8k") is None
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{a_{1}}") == "a_{1}"
    assert last_boxed("\\boxed{unclosed") is None

    assert get_math_reward(extraction="boxed")(["the answer is 7"], answer=["7"]) == [0.0]  # no box, no answer
    assert get_math_reward(extraction="boxed")(["7, so \\boxed{7}"], answer=["7"]) == [1.0]
    assert get_math_reward(extraction="boxed")(["\\boxed{4} no, \\boxed{6}"], answer=["6"]) == [1.0]  # the last box
    assert get_math_reward(extraction="gsm8k")(["3 + 4 = 7\n#### 7"], answer=["7"]) == [1.0]
    assert get_math_reward(extraction="gsm8k")(["3 + 4 = 7"], answer=["7"]) == [0.0]
    assert get_math_reward(extraction="last_number")(["we get 1,234.5 then -3/4"], answer=["-0.75"]) == [1.0]
    with pytest.raises(ValueError, match="extraction"):
        get_math_reward(extraction="regex")


def test_trl_call_signature_and_name(reward):
    # TRL passes prompts, completion_ids, every dataset column and a few trainer hooks as keyword arguments.
    metrics = {}
    got = reward(
        prompts=["p", "q"],
        completions=["\\boxed{1}", "\\boxed{2}"],
        completion_ids=[[1], [2]],
        answer=["1", "3"],
        difficulty=[0.1, 0.2],
        trainer_state=None,
        log_metric=lambda name, value: metrics.update({name: value}),
        log_extra=lambda *a: None,
    )
    assert got == [1.0, 0.0] and metrics == {"math/timeouts": 0.0}
    assert reward.__name__ == "math_verify"
    with pytest.raises(TypeError, match="answer"):
        reward(completions=["\\boxed{1}"])
    assert get_math_reward(answer_column="solution")(["\\boxed{2}"], solution=["2"]) == [1.0]


def test_pickle_round_trip():
    original = get_math_reward(extraction="boxed", timeout_seconds=2.5)
    clone = pickle.loads(pickle.dumps(original))
    assert (clone.extraction, clone.timeout_seconds, clone.__name__) == ("boxed", 2.5, "math_verify")
    assert clone(["\\boxed{\\frac{2}{4}}"], answer=["0.5"]) == [1.0]


def test_timeout_in_the_main_thread(monkeypatch):
    def slow_check(completion, reference, extraction):
        time.sleep(30)  # a pathological SymPy expression
        return 1.0

    monkeypatch.setattr(math_module, "check_answer", slow_check)
    reward = get_math_reward(timeout_seconds=0.3)
    metrics = {}
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="timeout_seconds"):
        got = reward(["\\boxed{1}", "\\boxed{2}"], answer=["1", "2"], log_metric=lambda k, v: metrics.update({k: v}))
    assert got == [0.0, 0.0] and time.monotonic() - start < 3
    assert metrics == {"math/timeouts": 2.0} and reward.num_timeouts == 2
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None)  # restored
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_timeout_in_a_thread_uses_a_helper_process():
    # math-verify's own signal.alarm timeout raises outside the main thread; ours falls back to a killable process.
    reward = get_math_reward(timeout_seconds=3.0)  # the second check must fit in it on a loaded machine
    out = {}

    def call():
        start = time.monotonic()
        out["rewards"] = reward(["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}"], answer=["5", "0.5"])
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=call)
    with pytest.warns(RuntimeWarning):
        thread.start()
        thread.join(60)
    assert out["rewards"] == [0.0, 1.0]  # the helper was killed on the first and restarted for the second
    assert out["seconds"] < 30 and reward.num_timeouts == 1


def test_a_running_alarm_of_the_caller_is_left_alone():
    reward = get_math_reward(timeout_seconds=5.0)
    previous = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    start = time.monotonic()
    try:
        assert reward(["\\boxed{\\frac{1}{2}}"], answer=["0.5"]) == [1.0]  # checked in the helper process
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        # still the caller's 100 s alarm, running down (not cancelled, not replaced by the 5 s timeout)
        assert remaining == pytest.approx(100.0 - (time.monotonic() - start), abs=1.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_process_backend_and_validation():
    reward = get_math_reward(timeout_backend="process", timeout_seconds=2.0)
    assert reward(["\\boxed{1,000}", "\\boxed{7}", None], answer=["1000", "8", "1"]) == [1.0, 0.0, 0.0]
    for bad in (0, -1, float("inf"), "5"):
        with pytest.raises(ValueError, match="timeout_seconds"):
            MathReward(timeout_seconds=bad)
    with pytest.raises(ValueError, match="timeout_backend"):
        MathReward(timeout_backend="thread")


# ----------------------------------------------------------------------------------------------------------------------
# Wiring: Hydra's reward=math, and a short TRL run calling the reward the way TRL does
# ----------------------------------------------------------------------------------------------------------------------


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from k15_plugin.cli.train import _register, config_dir

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def test_reward_math_config_builds_the_math_reward(tmp_path):
    from k15_plugin.cli.hosts.trl import check_config
    from k15_plugin.data.build.warm_start import build_tokenizer
    from k15_plugin.data.tasks import load_task

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(f'{{"prompt": "What is {i} / 2?", "answer": "\\\\frac{{{i}}}{{2}}"}}\n' for i in range(10)))
    cfg = _compose(
        [
            "reward=math",
            "data=jsonl",
            f"data.path={rows}",
            "data.answer_extraction=boxed",
            "reward.math.timeout_seconds=2",
        ]
    )
    check_config(cfg)
    task = load_task(cfg.data, build_tokenizer(), 0, 8, cfg.reward)
    (reward,) = task.reward_funcs
    assert isinstance(reward, MathReward) and (reward.extraction, reward.timeout_seconds) == ("boxed", 2.0)
    assert reward(["\\boxed{2.5}"], answer=["\\frac{5}{2}"]) == [1.0]

    demo = load_task(_compose(["reward=math"]).data, build_tokenizer(), 0, 4, _compose(["reward=math"]).reward)
    assert demo.reward_funcs[0].extraction == "last_number"  # null: the data config's answer_extraction
    bad = _compose(["reward=math", "reward.math.timeout_seconds=0"])
    with pytest.raises(ValueError, match=r"reward\.math: timeout_seconds"):
        load_task(bad.data, build_tokenizer(), 0, 4, bad.reward)
    default = _compose([])
    assert type(load_task(default.data, build_tokenizer(), 0, 4, default.reward).reward_funcs[0]).__name__ == (
        "ArithmeticReward"
    )  # verifier=task: unchanged


def test_math_reward_inside_a_trl_run(tmp_path):
    from k15_plugin.data.arithmetic import make_datasets
    from k15_plugin.data.build.warm_start import build_tokenizer, tiny_test_model
    from k15_plugin.trl import K15GRPOConfig, K15GRPOTrainer

    tokenizer = build_tokenizer()
    train, _ = make_datasets(num_train=16, seed=0)
    reward = get_math_reward(extraction="last_number", timeout_seconds=2.0)
    args = K15GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = K15GRPOTrainer(
        model=tiny_test_model(tokenizer),
        reward_funcs=[reward],
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/math_verify/mean" in h]
    assert len(logged) == 2 and all("math/timeouts" in h for h in logged)
