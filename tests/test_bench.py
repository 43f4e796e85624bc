"""Each benchmark runs with its smallest settings, so the benchmarks cannot rot (no timing assertions here).

Each runs through its own ``main`` in this process (the benchmarks start the processes they need themselves: the
overhead benchmark's memory runs, the GPU check's ``k15-train`` run), so no test pays a fresh process's imports for
nothing.
"""

import importlib
import json
import sys

import pytest
import torch


@pytest.mark.parametrize(
    "bench, keys",
    [
        ("overhead", ["step_time_ratio_median", "rss_ratio"]),
        ("sample_efficiency", ["k15_final_acc", "grpo_final_acc", "k15_samples_to_target", "grpo_samples_to_target"]),
        ("length_penalty", ["tokens_ratio", "accuracy_delta"]),
        ("gpu_step", ["step_time_ratio", "weights_changed_by_one_lr1e-6_step", "k15_train"]),
        ("sandbox", ["programs_per_second", "allowlist_per_core"]),
        (
            "partial_rollouts",
            ["throughput_ratio", "generation_throughput_ratio", "accuracy_delta", "accuracy_delta_stderr", "seeds"],
        ),
        (
            "partial_rollouts --task demo_chain",
            ["throughput_ratio", "generation_throughput_ratio", "accuracy_delta", "ess", "padding_share", "task"],
        ),
        ("long2short", ["long", "methods", "best", "best_tokens_ratio", "best_accuracy_delta", "seeds", "task"]),
        (
            "long2short --task demo_chain",
            ["long", "methods", "best", "best_tokens_ratio", "best_accuracy_delta", "seeds", "task", "models_built"],
        ),
        (
            "ablations",
            [
                "opmd_vs_rest",
                "k15_vs_grpo",
                "curriculum_vs_uniform",
                "prioritized_vs_uniform",
                "length_penalty",
                "seeds",
            ],
        ),
        ("vision", ["k15_accuracy", "grpo_accuracy", "seeds", "difference"]),
        (
            "ablations --task demo_chain",
            ["opmd_vs_rest", "k15_vs_grpo", "optimizer_reset", "prioritized_vs_uniform", "length_penalty", "task"],
        ),
    ],
)
def test_benchmark_smoke(bench, keys, monkeypatch, capsys):
    bench, *options = bench.split()  # a benchmark's name, then options of its own
    module = importlib.import_module(f"bench.{bench}")
    monkeypatch.setattr(sys, "argv", [f"bench.{bench}", "--smoke", *options])
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")  # for the processes a benchmark starts
    try:
        module.main()
    finally:
        torch.set_num_threads(1)  # a benchmark may change it; the rest of the suite runs on one thread
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == bench
    for key in keys:
        assert key in last, key
    if bench == "partial_rollouts":  # a block per arm, each non-full arm paired with full and costed
        assert {"full", "partial"} <= set(last["arms"])
        assert {"accuracy_delta_stderr", "throughput_ratio", "cost_model"} <= set(last["arms"]["partial"])
    if "--task" in options:  # the task the options chose
        assert last["task"] == options[options.index("--task") + 1]
    if bench == "gpu_step":  # the real k15-train run inside it went through, and every check of the run held
        assert last["k15_train"]["ok"], last["k15_train"]
        assert last["ok"], last["checks"]


def test_run_jobs_resumes_from_its_cache(tmp_path):
    from bench.common import run_jobs

    cache = tmp_path / "results" / "runs.jsonl"  # its folder is made on the first write
    calls = []

    def one_run(arm, seed):
        calls.append((arm, seed))
        return {"arm": arm, "seed": seed, "value": seed * 10}

    jobs = [("a", 0), ("a", 1)]
    first = run_jobs("unused", one_run, jobs, 0, cache)
    assert calls == jobs and [r["value"] for r in first] == [0, 10]
    with cache.open("a") as f:
        f.write('{"job": ["a", 2], "resu')  # a line cut short by an interruption is ignored
    again = run_jobs("unused", one_run, [*jobs, ("a", 2)], 0, cache)
    assert calls == [*jobs, ("a", 2)] and again == [*first, {"arm": "a", "seed": 2, "value": 20}]
    assert run_jobs("unused", one_run, [("a", 2)], 0, cache) == [again[2]] and len(calls) == 3  # kept after the cut
    assert run_jobs("unused", one_run, [("a", 1)], 0, None) == [first[1]] and calls[-1] == ("a", 1)


def test_partial_rollouts_cost_model():
    from bench.partial_rollouts import end_to_end_gain

    # generation 18 % of a step, 3.3x faster: 1 / (0.82 + 0.18 / 3.3) = 1 / 0.874545... = 1.1435
    assert end_to_end_gain(0.18, 3.3) == pytest.approx(1.1435, abs=1e-4)
    assert end_to_end_gain(0.9, 2.0) == pytest.approx(1 / 0.55)  # 0.1 + 0.45
    assert end_to_end_gain(0.7, 1.0) == 1.0  # no generation speed-up, no gain


def test_partial_rollouts_settings_segment_their_length_cap():
    """Every task setting's segment divides its length cap, as the trainer requires (the smoke settings alone do not
    show it for the measured ones)."""
    from bench.partial_rollouts import TASKS

    for task in TASKS.values():
        for name in ("full", "quick", "smoke"):
            setting = task[name]
            assert setting["max_tokens"] % setting["segment"] == 0, (task["prefix"], name)


def test_partial_rollouts_arms_name_every_option(monkeypatch):
    """Each partial arm writes out the paper's options, so a cached run is never reused after the shipped defaults
    change; the shipped arm runs only when the defaults differ from the paper's."""
    import bench.partial_rollouts as pr

    setting = pr.TASKS["longtail"]["full"]
    for arm in pr.ARMS[1:]:
        assert set(pr.PAPER) <= set(pr.arm_options(arm, setting)), arm
    assert pr.arm_options("token_is", setting)["rollout_correction"] == "token_is"
    assert pr.arm_options("partial", setting)["rollout_correction"] == "none"
    shipped = {**pr.PAPER, "rollout_is_cap": 3.0, "rollout_stale_action": "drop"}  # no cap, no correction: unused
    monkeypatch.setattr(pr, "shipped_options", lambda: shipped)
    assert pr.shipped_as(setting, list(pr.ARMS)) == "partial"
    monkeypatch.setattr(pr, "shipped_options", lambda: {**shipped, "rollout_max_staleness": 2})
    assert pr.shipped_as(setting, list(pr.ARMS)) == "cap2_drop"  # a cap of 2 with the drop action
    monkeypatch.setattr(
        pr, "shipped_options", lambda: {**shipped, "rollout_max_staleness": 2, "rollout_stale_action": "regenerate"}
    )
    assert pr.shipped_as(setting, ["full", "partial", "cap2_regenerate"]) == "cap2_regenerate"
    assert pr.shipped_as(setting, ["full", "partial"]) is None
    monkeypatch.setattr(pr, "shipped_options", lambda: {**shipped, "rollout_correction": "token_is"})
    assert pr.shipped_as(setting, ["full", "partial", "token_mask"]) is None
    assert pr.arm_options("shipped", setting)["rollout_correction"] == "token_is"
