"""Compare the path scoring of this checkout with that of an earlier git revision, side by side.

For each bundle: the same test images go through the network once; their paths are then scored
by both revisions' ``detector.features`` (the old module is loaded from ``git show``) and the
bundle's detector. Prints the largest feature and score differences, how many verdicts differ,
and the median single-image time of path -> score for both (measured interleaved, one thread).
Used to check that a refactor of the scoring step changes no number.

    python tools/compare_scoring.py --rev 529e9fe --bundle models/mnist/bundle \\
        --dataset ../shared/data/mnist.npz --n 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from detector.analysis import score_paths
from detector.bundle import load_bundle
from detector.features import PathBatch
from detector.paths import compute_path
from training.data import load_dataset, to_float

ROOT = Path(__file__).resolve().parents[1]


def old_module(rev: str, path: str = "detector/features.py") -> ModuleType:
    """The module at ``path`` as it was at git revision ``rev``."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    file = Path(tempfile.mkdtemp()) / "old_features.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("old_features", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="git revision with the earlier scoring")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--dataset", required=True, help="npz data set (its test split is used)")
    p.add_argument("--n", type=int, default=2000, help="test images (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=200,
                   help="single-image timings per revision (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    old = old_module(args.rev)
    bundle = load_bundle(args.bundle)
    data = load_dataset(args.dataset, Path("data"))
    x = to_float(data.x_test[:args.n])
    with torch.inference_mode():
        result = compute_path(bundle.model, x, pooled=False)
    new_paths = PathBatch.from_result(result)
    new = score_paths(bundle.profile, bundle.detector, new_paths)
    old_profile = old.PathProfile.from_arrays(bundle.profile.layer_names,
                                              bundle.profile.to_arrays(),
                                              bundle.profile.include_raw)
    old_paths = old.PathBatch.from_result(result)
    old_features = old_profile.transform(old_paths)
    old_scores = bundle.detector.predict_proba(old_features)[:, 1]
    feature_diff = np.abs(new.features.numpy() - old_features)
    rel = feature_diff / np.maximum(np.abs(old_features), 1e-6)
    score_diff = np.abs(new.scores.numpy() - old_scores)
    flips = int(((old_scores > bundle.detector.threshold_) != new.flagged.numpy()).sum())
    w = sys.stdout.write
    w(f"{args.bundle}: {len(x)} images, {feature_diff.shape[1]} features\n")
    w(f"  features: max |diff| {feature_diff.max():.2e}, max relative {rel.max():.2e}\n")
    w(f"  scores:   max |diff| {score_diff.max():.2e}; verdicts that differ: {flips}\n")

    def time_one(score: object, i: int) -> float:
        t0 = time.perf_counter()
        score(i)  # type: ignore[operator]
        return time.perf_counter() - t0

    def new_one(i: int) -> None:
        with torch.inference_mode():
            score_paths(bundle.profile, bundle.detector, PathBatch.from_result(
                compute_path(bundle.model, x[i:i + 1], pooled=False)))

    def old_one(i: int) -> None:
        with torch.inference_mode():
            paths = old.PathBatch.from_result(compute_path(bundle.model, x[i:i + 1],
                                                           pooled=False))
        bundle.detector.predict_proba(old_profile.transform(paths))

    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.repeats):  # interleaved, so drift hits both alike
        i = r % len(x)
        times["old"].append(time_one(old_one, i))
        times["new"].append(time_one(new_one, i))
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    w(f"  single image (network + path -> score), median of {args.repeats}: "
      f"old {med['old']:.2f} ms, new {med['new']:.2f} ms ({med['new'] / med['old']:.2f}x)\n")


if __name__ == "__main__":
    main()
