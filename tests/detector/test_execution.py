"""Choosing masked or sparse execution by timing both (detector.execution)."""

import time

import pytest
import torch

from detector.execution import ExecutionPlan, fixed_plan, plan_execution


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
