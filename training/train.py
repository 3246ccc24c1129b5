"""``python -m training.train``: train a base (dense) classifier and write its run directory.

Output: ``<out>/weights.safetensors``, ``model.json``, ``config.json``, ``metrics.json``.

``--init RUN`` starts from the weights of an earlier base run (same architecture and data shape)
with a fresh learning-rate schedule: a base can be trained in several sittings (e.g. 40 epochs,
then 20 more at a lower ``--lr``), each writing its own run directory.

``--adversarial-eps 8/255`` trains on single-step adversarial examples (N-FGSM, or FGSM-RS)
instead of clean images (fast adversarial training, :mod:`training.adversarial`).
``metrics.json`` then adds the per-epoch clean and PGD-10 accuracy on held-out training
images (``check_accuracy``, ``pgd_accuracy``), the epoch kept and the PGD-10 accuracy on test
images. On airbench give it ``--whiten-eps 0.1`` too: the stem's
default gain on rare patch directions makes single-step training overfit catastrophically.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from detector.airbench import WHITEN_EPS, init_whitening
from detector.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, weights_sha256
from detector.paths import network_macs
from training.adversarial import AdversarialTraining
from training.cli import (
    add_adversarial_args,
    add_data_args,
    add_runtime_args,
    check_arch,
    load_data,
    positive,
    run_command,
    share,
)
from training.data import ImageData, to_float
from training.distributed import Rank, process_group
from training.engine import evaluate, fit
from training.presets import preset_for
from training.recipe import RECIPES, parameter_groups, whiten_bias_schedule
from training.report import write_json

log = logging.getLogger("training.train")

WHITENING_IMAGES = 5000  # training images whose 2x2 patches set airbench's whitening conv
WHITEN_BIAS_EPOCHS = 3  # airbench's whitening bias trains for this many epochs, then freezes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    g = p.add_argument_group("model and optimisation (defaults come from the data set's preset)")
    g.add_argument("--arch", help="architecture: small_cnn, resnet20, resnet56, resnet18, ... "
                   "(default: the preset's, or --init's)")
    g.add_argument("--width", type=positive(int), default=None,
                   help="filters of small_cnn's first layers (the last two have twice as many; "
                        "default: 32)")
    g.add_argument("--widths", type=positive(int), nargs=3, default=None, metavar="W",
                   help="airbench's three group widths (default: the preset's, 32 128 128 on "
                        "CIFAR-10; the network's own default is 64 256 256)")
    g.add_argument("--whiten-eps", type=positive(float), default=None, metavar="EPS",
                   help="airbench's whitening stem scales each 2x2 patch direction by 1 / "
                        "sqrt(eigenvalue + EPS); larger values amplify the low-variance "
                        "(high-frequency) directions less, which adversarial training needs "
                        f"(RESULTS 1.5; default: {WHITEN_EPS})")
    g.add_argument("--init", type=Path, default=None, metavar="RUN",
                   help="start from the weights of this base run directory instead of a random "
                        "initialisation (the learning-rate schedule starts afresh)")
    g.add_argument("--epochs", type=positive(int), help="training epochs")
    g.add_argument("--batch-size", type=positive(int), help="mini-batch size")
    g.add_argument("--lr", type=positive(float),
                   help="peak learning rate of the recipe's schedule")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="SGD weight decay (default: the preset's: 5e-4, airbench's 1.33e-3)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="optimisation recipe: one_cycle (momentum 0.9, one-cycle lr) or "
                        "airbench (Jordan 2024: momentum 0.85, warm-up + linear decay, label "
                        "smoothing 0.2, lookahead EMA, alternating flips, channels_last; "
                        "default: the preset's, airbench for CIFAR-10)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the recipe's translation + flip augmentation (default: on for colour "
                        "data sets)")
    g.add_argument("--benign-augment", type=share, default=None, metavar="SHARE",
                   help="share in [0, 1] of every batch replaced by a random benign change "
                        "(noise, JPEG, brightness, contrast, shift, rotation), so that the "
                        "classifier survives them (default: the preset's: 0.5 for MNIST, else 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<dataset>/base)")
    add_adversarial_args(p)
    add_runtime_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    """Run the command; under ``torchrun --nproc_per_node N`` every rank trains on its share of
    each global batch (:mod:`training.distributed`) and rank 0 alone writes the run directory."""
    with process_group(args.device) as (rank, device):
        _train(argparse.Namespace(**{**vars(args), "device": device}), rank)


def _train(args: argparse.Namespace, rank: Rank | None) -> None:
    data = load_data(args)
    preset = preset_for(data)
    init, init_spec = _load_init(args.init, data) if args.init else (None, None)
    arch = args.arch or (init_spec.arch if init_spec else preset.arch)
    check_arch(arch, data)
    arch_kwargs = dict(init_spec.arch_kwargs if init_spec else
                       preset.arch_kwargs if arch == preset.arch else {})
    if args.width is not None:
        if arch != "small_cnn":
            raise ValueError(f"--width applies to small_cnn only, not to --arch {arch!r}")
        arch_kwargs["width"] = args.width
    if args.widths is not None:
        if arch != "airbench":
            raise ValueError(f"--widths applies to airbench only, not to --arch {arch!r}")
        arch_kwargs["widths"] = list(args.widths)
    if args.whiten_eps is not None and arch != "airbench":
        raise ValueError(f"--whiten-eps applies to airbench only, not to --arch {arch!r}")
    if args.whiten_eps is not None and init is not None:
        raise ValueError(f"--whiten-eps sets up a fresh network's whitening stem; --init "
                         f"{args.init} keeps its own")
    # the stem of a fresh airbench network is set from the training images (None: no stem to set)
    whiten_eps = (args.whiten_eps or WHITEN_EPS) if arch == "airbench" and init is None else None
    spec = ModelSpec(arch=arch, input_shape=data.input_shape, classes=data.classes,
                     arch_kwargs=arch_kwargs)
    if init_spec is not None and (spec.arch, spec.arch_kwargs) != (init_spec.arch,
                                                                   init_spec.arch_kwargs):
        raise ValueError(f"--init {args.init} holds {init_spec.arch} {init_spec.arch_kwargs}, "
                         f"not {spec.arch} {spec.arch_kwargs}")
    out = args.out or Path("runs") / data.name / "base"
    config = {
        "command": "train", "dataset": args.dataset, "data_name": data.name, "arch": arch,
        "epochs": args.epochs or preset.epochs, "batch_size": args.batch_size or preset.batch_size,
        "lr": args.lr or preset.lr,
        "weight_decay": preset.weight_decay if args.weight_decay is None else args.weight_decay,
        "recipe": args.recipe or preset.recipe,
        "augment": preset.augment if args.augment is None else args.augment,
        "benign_augment": (preset.benign_augment if args.benign_augment is None
                           else args.benign_augment), "seed": args.seed,
        "threads": torch.get_num_threads(), "precision": args.precision,
        "device": args.device, "arch_kwargs": arch_kwargs,
        "init": None if args.init is None else str(args.init),
        "init_sha256": None if args.init is None else weights_sha256(args.init),
        "processes": 1 if rank is None else rank.world,
        "whiten_eps": whiten_eps,
        "adversarial_eps": args.adversarial_eps,
        "adversarial_method": None if args.adversarial_eps is None else args.adversarial_method,
    }
    adversarial = AdversarialTraining.from_args(args, data)
    init_test = None if init is None else evaluate(init, data.x_test, data.y_test)["accuracy"]
    model = init if init is not None else spec.build()
    if whiten_eps is not None:
        init_whitening(model, to_float(data.x_train[:WHITENING_IMAGES]), eps=whiten_eps)
    model = model.to(args.device)
    recipe = RECIPES[config["recipe"]]
    log.info("training %s on %s: %d train / %d test images", arch, data.name,
             len(data.y_train), len(data.y_test))

    def step(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        if adversarial is not None:
            xb = adversarial.inputs(net, xb, yb)
        return {"total": F.cross_entropy(net(xb), yb, label_smoothing=recipe.label_smoothing)}

    start = time.perf_counter()
    x_train, y_train = (data.x_train, data.y_train) if adversarial is None else \
        adversarial.training_images(data.x_train, data.y_train)
    history = fit(model, x_train, y_train, step,
                  parameter_groups(model, config["weight_decay"]),
                  epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                  weight_decay=config["weight_decay"], augment=config["augment"],
                  benign_augment=config["benign_augment"],
                  seed=args.seed, desc=f"train {arch}", precision=args.precision,
                  recipe=recipe,
                  before_epoch=whiten_bias_schedule(model, WHITEN_BIAS_EPOCHS),
                  after_epoch=None if adversarial is None else adversarial.monitor(model))
    seconds = time.perf_counter() - start
    if rank is not None and not rank.main:
        return
    model.cpu()
    chosen = {} if adversarial is None else adversarial.keep_best(model)
    test = evaluate(model, data.x_test, data.y_test)
    metrics = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "train_seconds": seconds, "loss_curve": [h["total"] for h in history],
        **({} if adversarial is None else {
            "pgd_accuracy_curve": [h["pgd_accuracy"] for h in history],
            "check_accuracy_curve": [h["check_accuracy"] for h in history], **chosen,
            "pgd_test_accuracy": adversarial.test_accuracy(model, data.x_test, data.y_test)}),
        "dense_macs_per_input": network_macs(model, data.input_shape),
    }
    if init_test is not None:
        metrics["init_test_accuracy"] = init_test
    save_checkpoint(out, model, spec)
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    print(f"{arch} on {data.name}: test accuracy {test['accuracy']:.4f} "  # noqa: T201
          f"after {config['epochs']} epochs in {seconds:.0f}s -> {out}")


def _load_init(run: Path, data: ImageData) -> tuple[nn.Module, ModelSpec]:
    """The network of base run ``run`` (in train mode) and its spec, checked against ``data``."""
    model, spec = load_checkpoint(run)
    if spec.decoupled:
        raise ValueError(f"--init {run} is a decoupled network; give a base run")
    if (spec.input_shape, spec.classes) != (data.input_shape, data.classes):
        raise ValueError(f"--init {run} expects images {spec.input_shape} and "
                         f"{len(spec.classes)} classes; dataset {data.name!r} has "
                         f"{data.input_shape} and {len(data.classes)}")
    return model.train(), spec


def cli(argv: list[str] | None = None) -> None:
    run_command(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
