"""Crafting across ranks (training.distributed_crafting): 2 gloo processes vs 1 process.

``torchrun --nproc_per_node 2 -m training.fit_detector`` on the embedded digits data with the
tiny decoupled checkpoint must write the adversarial sets a single process writes, image for
image, with both ranks crafting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.attacks import AttackSpec
from evaluation.crafting import assign_attacks
from training.distributed_crafting import Job, Side, job_cost, plan, share
from training.fit_detector import ADVERSARIAL
from training.fit_detector import cli as fit_detector_cli

ROOT = Path(__file__).resolve().parents[2]
FIT = ("fgsm:0.2", "pgd:0.2")
EVAL = ("fgsm:0.2", "deepfool", "square:0.3")  # Square: seeded random squares on a rank


def args(checkpoint: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--max-fit", "60", "--max-eval", "60",
            "--max-profile", "300", "--fit-attacks", *FIT, "--eval-attacks", *EVAL,
            "--detector", "logistic", "--compare", "logistic", "--square-queries", "50",
            "--threads", "1", "--seed", "3", "--out", str(out)]


def arrays(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / ADVERSARIAL, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.distributed
def test_two_ranks_craft_the_single_process_sets(tiny_decoupled_checkpoint, tmp_path):
    fit_detector_cli([*args(tiny_decoupled_checkpoint, tmp_path / "single"), "--quiet"])
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.fit_detector", *args(tiny_decoupled_checkpoint, tmp_path / "ddp")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = arrays(tmp_path / "single"), arrays(tmp_path / "ddp")
    assert one.keys() == two.keys()
    assert sum(k.endswith("_label") for k in one) == len(FIT) + len(EVAL)
    for k in one:  # identical adversarial images, labels, source images and attempts
        np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text())
              for d in ("single", "ddp"))
    assert m2["config"].pop("processes") == 2 and m1["config"].pop("processes") == 1
    for m in (m1, m2):  # wall-clock measurements differ from run to run
        del m["seconds"]
        for variant in m["variants"].values():
            for key in ("score_us", "network_us", "stability_us", "score_ratio", "size_bytes"):
                del variant[key]
    assert m2 == m1
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == \
        {p.name for p in (tmp_path / "single").iterdir()}
    # Both ranks crafted (the plan gives rank 0 DeepFool, rank 1 the rest).
    assert "eval DEEPFOOL: crafted on rank 0" in done.stderr
    assert "fit FGSM eps=0.2: crafted on rank 1" in done.stderr


def test_share_gives_each_job_once_longest_first():
    assert share([5.0, 1.0, 4.0, 3.0, 3.0], 2) == [[0, 4], [2, 3, 1]]
    assert share([1.0, 2.0], 3) == [[1], [0], []]
    shares = share([float(c) for c in range(17)], 4)
    assert sorted(j for s in shares for j in s) == list(range(17))


def test_plan_follows_the_single_process_order_and_skips_empty_attacks():
    x, y = torch.zeros(5, 1, 8, 8), torch.arange(5)
    specs = [AttackSpec.parse(a) for a in ("fgsm:0.1", "pgd:0.1", "cw", "square:0.3")]
    jobs = plan([Side("fit", x, y, specs, 3, 1), Side("eval", x, y, specs[:2], 4, None)])
    assigned = assign_attacks(5, specs, seed=3, per_image=1)
    fit = [j for j in jobs if j.side == 0]
    assert [j.spec.label for j in fit] == [s.label for s in specs if len(assigned[s.label])]
    for j in fit:
        np.testing.assert_array_equal(j.idx, assigned[j.spec.label])
    assert sum(len(j.idx) for j in fit) == 5  # one attack per image
    assert [(j.side, j.spec.label, len(j.idx)) for j in jobs if j.side == 1] == \
        [(1, "FGSM eps=0.1", 5), (1, "PGD eps=0.1", 5)]


def test_job_cost_ranks_attacks_by_work():
    def cost(text: str, n: int = 10, queries: int = 1000) -> float:
        return job_cost(Job(0, AttackSpec.parse(text), np.arange(n)), queries)

    assert cost("fgsm:0.1") < cost("pgd:0.1") < cost("cw") < cost("square:0.1")
    assert cost("pgd:0.1", n=20) == 2 * cost("pgd:0.1")
    assert cost("square:0.1", queries=30) == 100.0  # 10 images x 30 forward passes
