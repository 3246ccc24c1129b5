"""``python -m training.train``: train a base (dense) classifier and write its run directory.

Output: ``<out>/weights.safetensors``, ``model.json``, ``config.json``, ``metrics.json``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from detector.checkpoint import ModelSpec, save_checkpoint
from detector.paths import network_macs
from training.cli import (
    add_data_args,
    add_runtime_args,
    check_arch,
    load_data,
    positive,
    preset_for,
    run_command,
)
from training.engine import evaluate, fit
from training.report import write_json

log = logging.getLogger("training.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    g = p.add_argument_group("model and optimisation (defaults come from the data set's preset)")
    g.add_argument("--arch", help="architecture: small_cnn, resnet20, resnet56, resnet18, ...")
    g.add_argument("--epochs", type=positive(int), help="training epochs")
    g.add_argument("--batch-size", type=positive(int), help="mini-batch size")
    g.add_argument("--lr", type=positive(float),
                   help="peak learning rate of the one-cycle schedule")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for colour data sets)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<dataset>/base)")
    add_runtime_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    data = load_data(args)
    preset = preset_for(data)
    arch = args.arch or preset.arch
    check_arch(arch, data)
    out = args.out or Path("runs") / data.name / "base"
    config = {
        "command": "train", "dataset": args.dataset, "data_name": data.name, "arch": arch,
        "epochs": args.epochs or preset.epochs, "batch_size": args.batch_size or preset.batch_size,
        "lr": args.lr or preset.lr, "weight_decay": args.weight_decay,
        "augment": preset.augment if args.augment is None else args.augment, "seed": args.seed,
        "threads": torch.get_num_threads(), "precision": args.precision,
        "device": args.device,
    }
    spec = ModelSpec(arch=arch, input_shape=data.input_shape, classes=data.classes)
    model = spec.build().to(args.device)
    log.info("training %s on %s: %d train / %d test images", arch, data.name,
             len(data.y_train), len(data.y_test))

    def step(xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": F.cross_entropy(model(xb), yb)}

    start = time.perf_counter()
    history = fit(model, data.x_train, data.y_train, step, model.parameters(),
                  epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
                  weight_decay=config["weight_decay"], augment=config["augment"],
                  seed=args.seed, desc=f"train {arch}", precision=args.precision)
    seconds = time.perf_counter() - start
    model.cpu()
    test = evaluate(model, data.x_test, data.y_test)
    metrics = {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "train_seconds": seconds, "loss_curve": [h["total"] for h in history],
        "dense_macs_per_input": network_macs(model, data.input_shape),
    }
    save_checkpoint(out, model, spec)
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    print(f"{arch} on {data.name}: test accuracy {test['accuracy']:.4f} "  # noqa: T201
          f"after {config['epochs']} epochs in {seconds:.0f}s -> {out}")


def cli(argv: list[str] | None = None) -> None:
    run_command(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
