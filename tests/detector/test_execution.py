"""Choosing masked or sparse execution by timing both (detector.execution)."""

import time

import pytest
import torch

from detector.execution import ExecutionPlan, fixed_plan, median_times_ms, plan_execution


def slow_mode(slow: dict[int, str]):
    """A run(images, mode) that sleeps 3 ms in the mode ``slow[batch]``, and records calls."""
    calls = []

    def run(images: torch.Tensor, mode: str) -> None:
        calls.append((images.shape, mode))
        assert images.min() >= 0 and images.max() <= 1
        if slow[len(images)] == mode:
            time.sleep(0.003)
    return run, calls


@pytest.mark.parametrize(("slow", "single", "batched"), [
    ({1: "masked", 8: "sparse"}, "sparse", "masked"),
    ({1: "sparse", 8: "masked"}, "masked", "sparse"),
])
def test_plan_keeps_the_faster_mode_per_batch_size(slow, single, batched):
    run, calls = slow_mode(slow)
    plan = plan_execution(run, (1, 8, 8), batch_sizes=(8, 1), repeats=3)
    assert (plan.single, plan.batched) == (single, batched)
    assert (plan.for_batch(1), plan.for_batch(2), plan.for_batch(8)) == (single, batched, batched)
    assert set(plan.timings_ms) == {1, 8}
    assert plan.timings_ms[1][slow[1]] > plan.timings_ms[1][single] + 2.0
    # one warm-up and three timed calls per mode and batch size, on images of the given shape
    assert len(calls) == 2 * 2 * 4
    assert {shape for shape, _ in calls} == {(1, 1, 8, 8), (8, 1, 8, 8)}
    assert plan.describe().startswith(f"batch 1: {single} (masked ")


def test_plan_on_a_real_network_is_one_of_the_modes():
    from detector.checkpoint import ModelSpec
    from detector.paths import compute_path
    from detector.sparse import sparse_execution

    model = ModelSpec("small_cnn", (1, 8, 8), tuple("0123456789"), decoupled=True).build().eval()

    def run(images: torch.Tensor, mode: str) -> None:
        with torch.no_grad():
            if mode == "sparse":
                with sparse_execution():
                    compute_path(model, images)
            else:
                compute_path(model, images)

    plan = plan_execution(run, (1, 8, 8), repeats=2)
    assert {plan.single, plan.batched} <= {"masked", "sparse"}
    assert all(t > 0 for times in plan.timings_ms.values() for t in times.values())


def test_plan_keeps_masked_unless_sparse_is_clearly_faster():
    timings = {1: {"masked": 10.0, "sparse": 9.5}, 32: {"masked": 100.0, "sparse": 80.0}}
    plan = ExecutionPlan.from_timings(timings)  # margin 0.1: 5 % faster is not enough
    assert (plan.single, plan.batched) == ("masked", "sparse")
    assert ExecutionPlan.from_timings(timings, margin=0.0).single == "sparse"
    assert ExecutionPlan.from_timings(timings, margin=0.25).batched == "masked"
    assert plan.describe() == ("batch 1: masked (masked 10.00 ms, sparse 9.50 ms); "
                               "batch 32: sparse (masked 100.00 ms, sparse 80.00 ms)")
    with pytest.raises(ValueError, match="no timings"):
        ExecutionPlan.from_timings({})


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"repeats": 0}, "repeats"),
    ({"margin": 1.0}, "margin"),
    ({"batch_sizes": ()}, "batch sizes"),
    ({"batch_sizes": (0, 4)}, "batch sizes"),
])
def test_plan_rejects_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        plan_execution(lambda images, mode: None, (1, 4, 4), **kwargs)


def test_fixed_plan():
    assert fixed_plan("sparse") == ExecutionPlan("sparse", "sparse", {})
    assert fixed_plan("masked").for_batch(32) == "masked"
    with pytest.raises(ValueError, match="'fast'"):
        fixed_plan("fast")


def test_median_times_interleave_runs_and_cycle_inputs():
    """Warm-up calls on the first inputs, then one call of every run per round, round r on
    input r mod n; the medians order the runs by their cost."""
    calls = []
    inputs = [torch.full((1,), float(i)) for i in range(3)]

    def run(name: str, sleep_s: float):
        def f(x: torch.Tensor) -> None:
            calls.append((name, int(x)))
            time.sleep(sleep_s)
        return f

    ms = median_times_ms({"fast": run("fast", 0.0), "slow": run("slow", 0.003)}, inputs,
                         repeats=4, warmup=2)
    assert calls == [("fast", 0), ("fast", 1), ("slow", 0), ("slow", 1),
                     ("fast", 0), ("slow", 0), ("fast", 1), ("slow", 1),
                     ("fast", 2), ("slow", 2), ("fast", 0), ("slow", 0)]
    assert set(ms) == {"fast", "slow"} and ms["slow"] > ms["fast"] + 2.0
    cpu = median_times_ms({"slow": run("slow", 0.003)}, inputs, repeats=2, clock="cpu")
    assert cpu["slow"] < 2.0  # sleeping costs no CPU time


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"clock": "sun"}, "clock"),
    ({"inputs": []}, "inputs"),
])
def test_median_times_reject_bad_arguments(kwargs, named):
    args = {"runs": {"a": lambda x: None}, "inputs": [torch.zeros(1)], "repeats": 1} | kwargs
    with pytest.raises(ValueError, match=named):
        median_times_ms(**args)
