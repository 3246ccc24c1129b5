"""Inference latency of a decoupled network: dense vs gated (masked) vs sparse execution.

For each decoupled checkpoint this measures, on real test images and CPU threads pinned with
``--threads``:

- ``dense``: the original (undecoupled) architecture carrying the checkpoint's conv, BN and
  classifier weights, i.e. the decoupled network with every gate open and no control modules;
- ``gated``: the decoupled network as trained: all filters computed, closed ones masked;
- ``sparse``: the decoupled network under :func:`detector.sparse.sparse_execution`, which runs
  only open filters on non-zero input channels;
- ``gated+path`` / ``sparse+path``: the same through :func:`detector.paths.compute_path` (what a
  detector needs: logits plus the recorded computation path);
- ``pruned`` (small_cnn only): the dense twin with the filters that never open on the check
  images removed (:func:`detector.pruning.pruned_twin`), i.e. static pruning of the silent
  filters, the speed gating has to beat;

at batch 1 and batch 32, interleaving the modes and reporting medians over ``--repeats`` runs,
with latency ratios against ``dense``. It also checks over ``--n-check`` test images, at batch 1
and 32 with every layer sliced, that sparse and gated give the same gate bits, logits and
predictions (a gate whose logit is within float rounding of 0 may fall either way; such inputs
are counted apart, any other difference exits with status 1), that dense equals gated with all
gates forced open, and reports the FLOPs fraction of
:meth:`detector.paths.PathResult.flops_fraction` next to the share of gated-conv
multiply-accumulates sparse mode actually ran.

Usage::

    python benchmarks/speed.py --checkpoint models/cifar10/decoupled --threads 1
    python benchmarks/speed.py --random resnet20:32 --random vgg11_bn:64 --clock cpu

``--dense-above inf`` slices every layer (no dense fallback), ``0`` never slices.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.checkpoint import ModelSpec, load_checkpoint
from detector.gating import gated_layers, strip_gates
from detector.paths import PathResult, compute_path, network_macs
from detector.pruning import open_ever, pruned_twin
from detector.sparse import DENSE_ABOVE, SparseStats, sparse_execution
from training.data import ImageData, load_dataset, to_float

log = logging.getLogger("benchmarks.speed")

DEFAULT_CHECKPOINTS = (Path("models/mnist/decoupled"), Path("models/mnist_wide/decoupled"),
                       Path("models/cifar10/decoupled"))
DEFAULT_DATASETS = ("../shared/data/mnist.npz", "../shared/data/cifar10.npz", "digits")
BATCH_SIZES = (1, 32)
MODES = ("dense", "gated", "sparse", "gated+path", "sparse+path")


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_modes(model: nn.Module, dense: nn.Module, images: torch.Tensor, batch: int,
               repeats: int, dense_above: float, clock: str = "wall",
               extra: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Median time in ms per mode for batches of ``batch`` images cycled from ``images``.

    ``clock``: "wall" (latency) or "cpu" (CPU time of this process: robust to other processes
    on a shared machine; equals the latency with one thread and nothing else running here).
    ``extra``: more networks to time, interleaved with the modes, by name.
    """
    now = CLOCKS[clock]
    n = images.shape[0] // batch
    if n == 0:
        raise ValueError(f"need at least {batch} test images, got {images.shape[0]}")
    batches = [images[i * batch:(i + 1) * batch] for i in range(n)]

    def sparse(x: torch.Tensor) -> torch.Tensor:
        with sparse_execution(dense_above):
            return model(x)

    def sparse_path(x: torch.Tensor) -> object:
        with sparse_execution(dense_above):
            return compute_path(model, x, pooled=False)

    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "dense": dense, "gated": model, "sparse": sparse,
        "gated+path": lambda x: compute_path(model, x, pooled=False), "sparse+path": sparse_path,
        **(extra or {}),
    }
    times: dict[str, list[float]] = {m: [] for m in runs}
    with torch.inference_mode():
        for m in runs:  # warm-up
            for x in batches[:3]:
                runs[m](x)
        for r in range(repeats):  # interleaved so background load hits every mode alike
            x = batches[r % n]
            for m in runs:
                t0 = now()
                runs[m](x)
                times[m].append(now() - t0)
    return {m: 1e3 * statistics.median(t) for m, t in times.items()}


TIE = 1e-4
"""A gate logit below TIE x (the layer's largest |logit|) is within float rounding of 0."""


@dataclass
class Agreement:
    """Sparse vs gated over ``images`` inputs; a path differs from its first differing layer on.

    same_path: inputs with identical gate bits everywhere.
    ties: inputs whose first difference is a gate whose logit is within rounding of 0 (|G| <
        TIE x layer scale): both results are right, rounding picked different sides.
    mismatches: inputs whose first difference is any other gate (a bug).
    same_pred: inputs with the same predicted class; max_diff: max |logit difference| over the
        inputs with the same path.
    """

    images: int = 0
    same_path: int = 0
    ties: int = 0
    mismatches: int = 0
    same_pred: int = 0
    max_diff: float = 0.0

    def add(self, ref: PathResult, got: PathResult) -> None:
        """Compare two results for the same batch of inputs."""
        first = torch.full((ref.logits.shape[0],), -1.0)  # |G| of the first flipped gate
        for name, r in ref.layers.items():
            flip = r.bits != got.layers[name].bits  # (B, C)
            scale = float(r.logits.abs().max()) or 1.0
            size = torch.where(flip, r.logits.abs() / scale, torch.zeros_like(r.logits))
            new = (first < 0) & flip.any(dim=1)
            first[new] = size[new].amax(dim=1)
        same = first < 0
        self.images += len(first)
        self.same_path += int(same.sum())
        self.ties += int(((first >= 0) & (first < TIE)).sum())
        self.mismatches += int((first >= TIE).sum())
        self.same_pred += int((ref.logits.argmax(1) == got.logits.argmax(1)).sum())
        if same.any():
            diff = float((ref.logits[same] - got.logits[same]).abs().max())
            self.max_diff = max(self.max_diff, diff)

    def line(self) -> str:
        return (f"same path {self.same_path}/{self.images}, {self.ties} differ from a gate within "
                f"rounding of 0, {self.mismatches} otherwise; same prediction "
                f"{self.same_pred}/{self.images}; max |logit diff| {self.max_diff:.1e}")


def _accumulate(total: SparseStats, part: SparseStats) -> None:
    for f in fields(SparseStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))


def check(model: nn.Module, dense: nn.Module, images: torch.Tensor,
          dense_above: float) -> dict[str, Any]:
    """Equivalence checks and work shares over ``images`` (N, C, H, W) in [0, 1].

    Sparse runs are compared with gated runs of the same batches (batch composition changes
    float rounding of the dense convs too).
    """
    macs = network_macs(model, tuple(images.shape[1:]))  # type: ignore[arg-type]
    out: dict[str, Any] = {"b1": Agreement(), "b32": Agreement()}
    ideal, stats1, stats32 = SparseStats(), SparseStats(), SparseStats()  # summed over blocks
    with torch.inference_mode():
        for i in range(images.shape[0]):
            x = images[i:i + 1]
            ref = compute_path(model, x, pooled=False)
            with sparse_execution(math.inf) as st:  # every layer sliced: each input's own path
                out["b1"].add(ref, compute_path(model, x, pooled=False))
            _accumulate(ideal, st)
            with sparse_execution(dense_above) as st:
                model(x)
            _accumulate(stats1, st)
        for i in range(0, images.shape[0], 32):
            x = images[i:i + 32]
            ref = compute_path(model, x, pooled=False)
            with sparse_execution(math.inf):  # union of the batch's paths, every layer sliced
                out["b32"].add(ref, compute_path(model, x, pooled=False))
            with sparse_execution(dense_above) as st:
                model(x)
            _accumulate(stats32, st)
        gated = compute_path(model, images, pooled=False)
        opened = compute_path(model, images, force_open=True, pooled=False)
        dense_logits = dense(images)
    out["dense_vs_open_diff"] = float((dense_logits - opened.logits).abs().max())
    out["dense_agrees"] = float((dense_logits.argmax(1) == gated.logits.argmax(1)).float().mean())
    out["flops_fraction"] = float(gated.flops_fraction(macs).mean())
    out["open_fraction"] = float(gated.open_fraction().mean())
    out["gated_conv_share_ideal"] = ideal.executed_fraction
    out["gated_conv_share_b1"] = stats1.executed_fraction
    out["gated_conv_share_b32"] = stats32.executed_fraction
    # paths.py's per-input count, restricted to the gated convs (control modules removed):
    controls = {n: g.control.fc1.weight.numel() + g.control.fc2.weight.numel()
                for n, g in gated_layers(model).items()}
    executed = sum(float((p.executed_macs - controls[n]).sum()) for n, p in gated.layers.items())
    out["paths_conv_share"] = executed / (images.shape[0] * sum(
        p.dense_macs for p in gated.layers.values()))
    return out


def random_decoupled(arch: str, size: int, seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    """A randomly initialised decoupled ``arch`` for (C, size, size) inputs (C = 1 for small_cnn,
    else 3) whose gates depend on the input and leave about half of the filters open."""
    torch.manual_seed(seed)
    channels = 1 if arch == "small_cnn" else 3
    spec = ModelSpec(arch, (channels, size, size), tuple(str(i) for i in range(10)),
                     decoupled=True)
    model = spec.build()
    with torch.no_grad():
        for g in gated_layers(model).values():
            nn.init.normal_(g.control.fc1.weight, 0.0, 0.5)
            nn.init.normal_(g.control.fc2.bias, 0.0, 1.5)
            g.bn.running_mean.normal_(0.0, 0.1)
            g.bn.running_var.uniform_(0.5, 2.0)
    return model.eval(), spec


def _dataset_for(spec: ModelSpec, specs: list[str], cache: dict[str, ImageData | None]
                 ) -> ImageData | None:
    for s in specs:
        if s not in cache:
            try:
                cache[s] = load_dataset(s)
            except (FileNotFoundError, ValueError) as e:
                log.warning("skipping dataset %s: %s", s, e)
                cache[s] = None
        data = cache[s]
        if data is not None and data.input_shape == tuple(spec.input_shape):
            return data
    return None


def run_model(label: str, model: nn.Module, spec: ModelSpec, datasets: list[str],
              cache: dict[str, ImageData | None], args: argparse.Namespace) -> None:
    """Time and check one decoupled model; prints its table."""
    dense = strip_gates(model).eval()
    data = _dataset_for(spec, datasets, cache)
    need = max(args.n_check, 32 * 4)
    if data is None:
        log.warning("no dataset of shape %s given; using uniform random images", spec.input_shape)
        images = torch.rand(need, *spec.input_shape, generator=torch.Generator().manual_seed(0))
        source = "random"
    else:
        images = to_float(data.x_test[:need])
        source = data.name
    w = sys.stdout.write
    w(f"\n{label}  ({spec.arch}, input {tuple(spec.input_shape)}, images: {source}, "
      f"threads {torch.get_num_threads()}, {args.clock} clock, median of {args.repeats}, "
      f"dense_above {args.dense_above})\n")
    alive = open_ever(model, images[:args.n_check])
    twin = pruned_twin(dense, alive)
    extra = {} if twin is None else {"pruned": twin}
    columns = [*MODES, *extra]
    w(f"{'batch':>5}  " + "  ".join(f"{m:>11}" for m in columns) + "   ms; ratio = mode / dense\n")
    for b in BATCH_SIZES:
        ms = time_modes(model, dense, images, b, args.repeats, args.dense_above, args.clock,
                        extra)
        w(f"{b:>5}  " + "  ".join(f"{ms[m]:>11.3f}" for m in columns) + "\n")
        w(f"{'':>5}  " + "  ".join(f"{ms[m] / ms['dense']:>10.2f}x" for m in columns) + "\n")
    if twin is not None:
        with torch.inference_mode():
            agree = float((twin(images[:args.n_check]).argmax(1)
                           == model(images[:args.n_check]).argmax(1)).float().mean())
        kept = sum(int(a.sum()) for a in alive.values())
        w(f"pruned: dense twin without the filters never open on the {args.n_check} check images "
          f"(static pruning; keeps {kept} of {sum(len(a) for a in alive.values())} gated "
          f"filters, runs them all); its predictions equal the gated network's on {agree:.4f}\n")
    c = check(model, dense, images[:args.n_check], args.dense_above)
    for b in ("b1", "b32"):
        w(f"sparse (every layer sliced) vs gated, batch {b[1:]:>2}: {c[b].line()}\n")
    w(f"dense twin == gated with gates forced open: max |logit diff| "
      f"{c['dense_vs_open_diff']:.2e}; dense agrees with gated on {c['dense_agrees']:.4f}\n")
    w(f"open filters {c['open_fraction']:.3f}; FLOPs fraction (paths.py, whole net, per input) "
      f"{c['flops_fraction']:.3f}\n")
    w(f"share of gated-conv MACs run: every layer sliced at batch 1 "
      f"{c['gated_conv_share_ideal']:.3f} (paths.py per-input count {c['paths_conv_share']:.3f});"
      f" sparse mode as timed (dense fallback where slicing does not pay): "
      f"{c['gated_conv_share_b1']:.3f} at batch 1, {c['gated_conv_share_b32']:.3f} at batch 32\n")
    if c["b1"].mismatches or c["b32"].mismatches:
        log.error("sparse execution disagrees with the gated network on %s", label)
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append",
                   help="decoupled checkpoint directory, repeatable (default: "
                        + ", ".join(map(str, DEFAULT_CHECKPOINTS)) + "; missing ones skipped)")
    p.add_argument("--dataset", action="append",
                   help="test images: .npz file or 'digits', repeatable; each checkpoint uses the "
                        "first whose image shape fits, else random images (default: "
                        + ", ".join(DEFAULT_DATASETS) + ")")
    p.add_argument("--random", action="append", default=[], metavar="ARCH:SIZE",
                   help="also a random decoupled ARCH (e.g. resnet20:32, vgg11_bn:64) with about "
                        "half its filters closed, input-dependently; repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: latency; cpu: process CPU time, robust to other load on a shared "
                        "machine (use with --threads 1) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=200,
                   help="timed runs per mode and batch size (default: %(default)s)")
    p.add_argument("--n-check", type=int, default=512,
                   help="test images for the equivalence check (default: %(default)s)")
    p.add_argument("--dense-above", type=float, default=DENSE_ABOVE,
                   help="sparse mode's dense fallback threshold (default: %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    checkpoints = args.checkpoint or ([] if args.random else list(DEFAULT_CHECKPOINTS))
    datasets = args.dataset or list(DEFAULT_DATASETS)
    cache: dict[str, ImageData | None] = {}
    found = False
    for d in checkpoints:
        if not (d / "model.json").is_file():
            log.warning("skipping %s: no checkpoint there", d)
            continue
        model, spec = load_checkpoint(d)
        if not spec.decoupled:
            log.warning("skipping %s: not a decoupled checkpoint", d)
            continue
        found = True
        run_model(str(d), model, spec, datasets, cache, args)
    for item in args.random:
        arch, _, size = item.partition(":")
        model, spec = random_decoupled(arch, int(size or 32))
        found = True
        run_model(f"random {arch}", model, spec, datasets, cache, args)
    if not found:
        log.error("no decoupled checkpoint found; pass --checkpoint DIR or --random ARCH:SIZE")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
