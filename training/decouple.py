"""``python -m training.decouple``: add gates to a trained base classifier and fine-tune it with
the decoupling losses (cross-entropy + KL alignment + mutual information + sparsity).

Output: ``<out>/weights.safetensors``, ``model.json``, ``config.json``, ``metrics.json``,
``filter_states.json`` and ``filter_states.png`` (high-energy / dynamic / silent filters per
gated layer over the test split), and ``class_heads.safetensors``: the variational classifiers
q(y | z^l) of the MI loss, one per gated layer, which the detector reads as each layer's class
evidence.

``--init RUN`` continues an earlier decoupled run of the same base (its gates, weights and, if
it kept them, class heads) with a fresh schedule, so decoupling can run in several sittings.

``--adversarial-eps 8/255`` trains on single-step adversarial examples (N-FGSM, or FGSM-RS)
instead of clean images (fast adversarial training, :mod:`training.adversarial`); the gates
learn their paths from attacked images too (every decoupling loss sees the attacked batch).
``metrics.json`` then adds the per-epoch clean and PGD-10 accuracy on held-out training
images (``check_accuracy``, ``pgd_accuracy``), the epoch kept and the PGD-10 accuracy on test
images.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from detector.checkpoint import (
    ModelSpec,
    load_checkpoint,
    load_class_heads,
    save_checkpoint,
    save_class_heads,
    weights_sha256,
)
from detector.filter_states import filter_states
from detector.gating import decouple, gated_layers
from detector.paths import compute_path, network_macs
from training.adversarial import AdversarialTraining
from training.cli import (
    add_adversarial_args,
    add_data_args,
    add_runtime_args,
    finite,
    load_data,
    positive,
    run_command,
    share,
)
from training.distributed import Rank, process_group
from training.engine import collect_paths, evaluate, fit
from training.losses import DecouplingLoss, LossWeights
from training.presets import preset_for
from training.recipe import RECIPES, parameter_groups, whiten_bias_schedule
from training.report import plot_filter_states, write_json

log = logging.getLogger("training.decouple")

# Fine-tuning for a few epochs on CPU: a target active ratio (the paper's ImageNet formulation,
# the ratio comes from the data set's preset)
# reaches a sparse path quickly where the CIFAR setting (target 0, lambda_s 1.5e-4) needs 200
# epochs, and a larger MI weight with faster-learning gates makes the gates input-dependent
# (dynamic) within those few epochs rather than a static pruning mask (see docs/RESULTS.md).
DEFAULT_WEIGHTS = LossWeights(kl=1.0, mi=0.2, sparse=0.01)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.decouple", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=None,
                   help="base run directory from training.train (default: runs/<dataset>/base)")
    p.add_argument("--init", type=Path, default=None, metavar="RUN",
                   help="continue this decoupled run directory of the same base instead of "
                        "adding fresh gates (the learning-rate schedule starts afresh)")
    add_data_args(p)
    g = p.add_argument_group("fine-tuning (defaults come from the data set's preset)")
    g.add_argument("--epochs", type=positive(int), help="fine-tuning epochs")
    g.add_argument("--batch-size", type=positive(int), help="mini-batch size")
    g.add_argument("--lr", type=positive(float), help="peak learning rate of the schedule")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="SGD weight decay (default: the preset's: 1e-4, 1.33e-3 for CIFAR-10)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="optimisation recipe, as for training.train (default: the preset's, "
                        "airbench for CIFAR-10)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="the recipe's translation + flip augmentation (default: on for colour "
                        "data sets)")
    g.add_argument("--benign-augment", type=share, default=None, metavar="SHARE",
                   help="share in [0, 1] of every batch replaced by a random benign change "
                        "(noise, JPEG, brightness, contrast, shift, rotation), so that the "
                        "classifier survives them (default: the preset's: 0.5 for MNIST, else 0)")
    g.add_argument("--reduction", type=positive(int), default=4,
                   help="bottleneck factor of the gates' FC1, C_in -> C_in/r "
                        "(default: %(default)s)")
    g.add_argument("--gate-input-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="standardise each control module's pooled input (batch statistics in "
                        "training, running ones at inference), so that small differences "
                        "between images reach the gates (default: the preset's: on for "
                        "CIFAR-10, else off)")
    g.add_argument("--gate-init-logit", type=finite, default=1.0,
                   help="mean starting logit of the new gates (FC2 bias): 1 is the authors' "
                        "initialisation (about a quarter of the filters start closed at "
                        "random); 4 starts them almost all open, for a base with little accuracy "
                        "to spare such as an adversarially trained one (default: %(default)s)")
    g.add_argument("--gate-lr-mult", type=positive(float), default=None,
                   help="peak learning rate of the new gates (and MI heads) relative to --lr; "
                        "they start from scratch while the conv weights are fine-tuned "
                        "(default: the preset's: 10, 1 for CIFAR-10)")
    w = p.add_argument_group("loss weights")
    d = DEFAULT_WEIGHTS
    w.add_argument("--lambda-k", type=float, default=d.kl,
                   help="KL alignment (default: %(default)s)")
    w.add_argument("--kl-detach", action=argparse.BooleanOptionalAction, default=None,
                   help="treat the layer output as a fixed target of the KL term, so that it "
                        "trains the gates only, not the conv features (default: the data set's "
                        "preset: on for CIFAR-10, else off)")
    w.add_argument("--lambda-m", type=float, default=d.mi,
                   help="mutual information (default: %(default)s)")
    w.add_argument("--lambda-s", type=float, default=d.sparse,
                   help="sparsity (default: %(default)s)")
    w.add_argument("--distill", type=float, default=None,
                   help="share alpha in [0, 1] of the cross-entropy term replaced by matching "
                        "the base network's softened outputs (knowledge distillation; costs one "
                        "extra forward pass of the base per batch; default: the data set's "
                        "preset: 0.5 for CIFAR-10, else 0)")
    w.add_argument("--temperature", type=positive(float), default=d.temperature,
                   help="softmax temperature of --distill (default: %(default)s)")
    w.add_argument("--isolate-gates", action=argparse.BooleanOptionalAction, default=None,
                   help="feed the control modules a detached copy of their input, so the MI, "
                        "KL (gate side) and sparsity losses train the gates only and do not "
                        "reshape the conv features before them (default: the data set's "
                        "preset: on for CIFAR-10, else off)")
    w.add_argument("--target", type=float, default=None,
                   help="target share of active filters in [0, 1); 0 = plain L1 "
                        "(default: the data set's preset: 0.7 for digits and MNIST, 0.64 for "
                        "CIFAR-10, 0.5 for others)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<dataset>/decoupled)")
    add_adversarial_args(p)
    add_runtime_args(p)
    return p


def main(args: argparse.Namespace) -> None:
    """Run the command; under ``torchrun --nproc_per_node N`` every rank fine-tunes on its share
    of each global batch (:mod:`training.distributed`) and rank 0 alone writes the run directory."""
    with process_group(args.device) as (rank, device):
        _decouple(argparse.Namespace(**{**vars(args), "device": device}), rank)


def _decouple(args: argparse.Namespace, rank: Rank | None) -> None:
    if args.target is not None and not 0.0 <= args.target < 1.0:
        raise ValueError(f"--target must be in [0, 1), got {args.target}")
    if args.distill is not None and not 0.0 <= args.distill <= 1.0:
        raise ValueError(f"--distill must be in [0, 1], got {args.distill}")
    data = load_data(args)
    preset = preset_for(data)
    target = preset.target if args.target is None else args.target
    distill = preset.distill if args.distill is None else args.distill
    isolate = preset.isolate_gates if args.isolate_gates is None else args.isolate_gates
    kl_detach = preset.kl_detach if args.kl_detach is None else args.kl_detach
    base_dir = args.base or Path("runs") / data.name / "base"
    base, base_spec = load_checkpoint(base_dir)
    if base_spec.decoupled:
        raise ValueError(f"--base {base_dir} is already decoupled")
    if base_spec.input_shape != data.input_shape:
        raise ValueError(f"--base {base_dir} expects images {base_spec.input_shape}, dataset "
                         f"{args.dataset!r} has {data.input_shape}")
    out = args.out or Path("runs") / data.name / "decoupled"
    recipe_name = args.recipe or preset.recipe
    recipe = RECIPES[recipe_name]
    weight_decay = (preset.decouple_weight_decay if args.weight_decay is None
                    else args.weight_decay)
    gate_lr_mult = args.gate_lr_mult or preset.gate_lr_mult
    gate_norm = preset.gate_input_norm if args.gate_input_norm is None else args.gate_input_norm
    weights = LossWeights(args.lambda_k, args.lambda_m, args.lambda_s, target,
                          kl_detach, distill, args.temperature, recipe.label_smoothing)
    spec = replace(base_spec, decoupled=True, reduction=args.reduction,
                   gate_input_norm=gate_norm)
    init = _load_init(args.init, spec) if args.init else None
    config = {
        "command": "decouple", "base": str(base_dir),
        "base_sha256": weights_sha256(base_dir),
        "init": None if args.init is None else str(args.init),
        "init_sha256": None if args.init is None else weights_sha256(args.init),
        "dataset": args.dataset,
        "data_name": data.name, "arch": base_spec.arch,
        "epochs": args.epochs or preset.decouple_epochs,
        "batch_size": args.batch_size or preset.batch_size,
        "lr": args.lr or preset.decouple_lr, "weight_decay": weight_decay,
        "recipe": recipe_name,
        "augment": preset.augment if args.augment is None else args.augment,
        "benign_augment": (preset.benign_augment if args.benign_augment is None
                           else args.benign_augment),
        "reduction": args.reduction, "gate_input_norm": gate_norm,
        "gate_init_logit": args.gate_init_logit,
        "gate_lr_mult": gate_lr_mult,
        "loss_weights": asdict(weights), "isolate_gates": isolate,
        "seed": args.seed,
        "threads": torch.get_num_threads(), "precision": args.precision,
        "device": args.device, "processes": 1 if rank is None else rank.world,
        "adversarial_eps": args.adversarial_eps,
        "adversarial_method": None if args.adversarial_eps is None else args.adversarial_method,
    }
    adversarial = AdversarialTraining.from_args(args, data)
    base_test = evaluate(base, data.x_test, data.y_test)
    init_test = None if init is None else evaluate(init, data.x_test, data.y_test)["accuracy"]
    model = (init if init is not None else decouple(base, args.reduction, gate_norm,
                                                           args.gate_init_logit))
    model = model.to(args.device)
    layers = gated_layers(model)
    loss_fn = DecouplingLoss({n: m.conv.out_channels for n, m in layers.items()},
                             base_spec.num_classes, weights).to(args.device)
    init_heads = None if args.init is None else load_class_heads(args.init)
    if init_heads is not None:
        loss_fn.load_class_heads(init_heads)
    log.info("decoupling %s: %d gated layers, base accuracy %.4f", base_spec.arch, len(layers),
             base_test["accuracy"])

    teacher = base.to(args.device).eval() if weights.distill > 0 else None

    def step(net: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor
             ) -> dict[str, torch.Tensor]:
        if adversarial is not None:  # every loss, the gates' included, sees the attacked batch
            xb = adversarial.inputs(net, xb, yb)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(xb)
        path = compute_path(net, xb, detach_gate_input=isolate)
        return loss_fn(path, yb, soft)

    start = time.perf_counter()
    gate_params = [p for m in layers.values() for p in m.control.parameters()]
    groups = [
        *parameter_groups(model, weight_decay, exclude=gate_params),
        {"params": [*gate_params, *loss_fn.parameters()], "lr_mult": gate_lr_mult},
    ]
    x_train, y_train = (data.x_train, data.y_train) if adversarial is None else \
        adversarial.training_images(data.x_train, data.y_train)
    history = fit(model, x_train, y_train, step, groups, epochs=config["epochs"],
                  batch_size=config["batch_size"], lr=config["lr"],
                  weight_decay=weight_decay, augment=config["augment"],
                  benign_augment=config["benign_augment"],
                  seed=args.seed, desc=f"decouple {base_spec.arch}",
                  precision=args.precision, recipe=recipe,
                  before_epoch=whiten_bias_schedule(model, 0),  # the stem stays as trained
                  after_epoch=None if adversarial is None else adversarial.monitor(model))
    seconds = time.perf_counter() - start
    if rank is not None and not rank.main:
        return
    model.cpu()
    chosen = {} if adversarial is None else adversarial.keep_best(model)
    metrics = summarize(model, spec, data.x_test, data.y_test)
    metrics.update(base_test_accuracy=base_test["accuracy"], train_seconds=seconds,
                   loss_curve=history)
    if init_test is not None:
        metrics["init_test_accuracy"] = init_test
    if adversarial is not None:
        metrics.update(chosen, pgd_test_accuracy=adversarial.test_accuracy(
            model, data.x_test, data.y_test))
    states = metrics.pop("filter_states")
    save_checkpoint(out, model, spec)
    save_class_heads(out, loss_fn.class_heads())
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    write_json(out / "filter_states.json", states)
    plot_filter_states(states, out / "filter_states.png",
                       f"Filter states: decoupled {spec.arch} on {data.name} (test split)")
    print(json.dumps({k: metrics[k] for k in (  # noqa: T201
        "test_accuracy", "base_test_accuracy", "active_fraction", "flops_fraction")}))
    print(f"decoupled {spec.arch} on {data.name} in {seconds:.0f}s -> {out}")  # noqa: T201


def _load_init(run: Path, expected: ModelSpec) -> torch.nn.Module:
    """The decoupled network of run ``run`` (train mode), checked to match ``expected``."""
    model, spec = load_checkpoint(run)
    if not spec.decoupled:
        raise ValueError(f"--init {run} is not decoupled; give a training.decouple run")
    if spec != expected:
        raise ValueError(f"--init {run} holds {spec.arch} {spec.arch_kwargs} for "
                         f"{spec.input_shape} with gate reduction {spec.reduction} and input "
                         f"norm {spec.gate_input_norm}, the base and options give "
                         f"{expected.arch} {expected.arch_kwargs} for {expected.input_shape} "
                         f"with reduction {expected.reduction} and input norm "
                         f"{expected.gate_input_norm}")
    return model.train()


def summarize(model: torch.nn.Module, spec: ModelSpec, x: torch.Tensor,
              y: torch.Tensor) -> dict[str, object]:
    """Accuracy, active-filter fractions, FLOPs and filter states of a decoupled model."""
    test = evaluate(model, x, y)
    dense = network_macs(model, spec.input_shape)
    bits, flops = collect_paths(model, x, dense)
    states = filter_states(bits)
    all_bits = np.concatenate(list(bits.values()), axis=1)
    return {
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "active_fraction": float(np.mean([s["open_fraction"] for s in states.values()])),
        "active_fraction_all_filters": float(all_bits.mean()),
        "active_fraction_per_layer": {k: s["open_fraction"] for k, s in states.items()},
        "dense_macs_per_input": dense,
        "gated_macs_per_input": float(np.mean(flops) * dense),
        "flops_fraction": float(np.mean(flops)),
        "filter_states": states,
    }


def cli(argv: list[str] | None = None) -> None:
    run_command(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
