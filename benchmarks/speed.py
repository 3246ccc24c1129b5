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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detector.checkpoint import ModelSpec, load_checkpoint
from detector.execution import CLOCKS, median_times_ms
from detector.gating import gated_layers, strip_gates
from detector.path_agreement import sparse_agreement
from detector.paths import compute_path, network_macs, to_inference_layout
from detector.pruning import open_ever, pruned_twin
from detector.sparse import DENSE_ABOVE, SparseStats, sparse_execution
from training.data import ImageData, load_dataset, to_float

log = logging.getLogger("benchmarks.speed")

DEFAULT_CHECKPOINTS = (Path("models/mnist/decoupled"), Path("models/mnist_wide/decoupled"),
                       Path("models/cifar10/decoupled"))
DEFAULT_DATASETS = ("../shared/data/mnist.npz", "../shared/data/cifar10.npz", "digits")
BATCH_SIZES = (1, 32)
MODES = ("dense", "gated", "sparse", "gated+path", "sparse+path")


def time_modes(model: nn.Module, dense: nn.Module, images: torch.Tensor, batch: int,
               repeats: int, dense_above: float, clock: str = "wall",
               extra: dict[str, nn.Module] | None = None) -> dict[str, float]:
    """Median time in ms per mode (:data:`MODES`, then ``extra``: more networks by name) for
    batches of ``batch`` images cycled from ``images``, interleaved; ``clock``: see
    :data:`detector.execution.CLOCKS`."""
    n = images.shape[0] // batch
    if n == 0:
        raise ValueError(f"need at least {batch} test images, got {images.shape[0]}")
    # laid out as every inference pass runs (compute_path does it itself; the bare modes need it)
    batches = [to_inference_layout(images[i * batch:(i + 1) * batch]) for i in range(n)]

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
    with torch.inference_mode():
        return median_times_ms(runs, batches, repeats, warmup=3, clock=clock)


def sparse_work(model: nn.Module, images: torch.Tensor, batch: int,
                dense_above: float) -> SparseStats:
    """Work of the gated convs of ``model`` under sparse execution as timed (dense fallback
    above ``dense_above``), in batches of ``batch`` of ``images``, summed."""
    work = SparseStats()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            with sparse_execution(dense_above) as stats:
                model(to_inference_layout(images[i:i + batch]))
            work.add(stats)
    return work


def check(model: nn.Module, dense: nn.Module, images: torch.Tensor,
          dense_above: float) -> dict[str, Any]:
    """Equivalence checks and work shares over ``images`` (N, C, H, W) in [0, 1]: sparse (every
    layer sliced) against gated at batch 1 and 32
    (:func:`detector.path_agreement.sparse_agreement`), the dense twin against the gated network
    with every gate forced open, and the share of the gated convs' multiply-accumulates each mode
    runs."""
    macs = network_macs(model, tuple(images.shape[1:]))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    out["b1"], ideal = sparse_agreement(model, images, 1)  # each input's own path
    out["b32"], _ = sparse_agreement(model, images, 32)  # union of the batch's paths
    with torch.inference_mode():
        gated = compute_path(model, images, pooled=False)
        opened = compute_path(model, images, force_open=True, pooled=False)
        dense_logits = dense(to_inference_layout(images))
    out["dense_vs_open_diff"] = float((dense_logits - opened.logits).abs().max())
    out["dense_agrees"] = float((dense_logits.argmax(1) == gated.logits.argmax(1)).float().mean())
    out["flops_fraction"] = float(gated.flops_fraction(macs).mean())
    out["open_fraction"] = float(gated.open_fraction().mean())
    out["gated_conv_share_ideal"] = ideal.executed_fraction
    out["gated_conv_share_b1"] = sparse_work(model, images, 1, dense_above).executed_fraction
    out["gated_conv_share_b32"] = sparse_work(model, images, 32, dense_above).executed_fraction
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
