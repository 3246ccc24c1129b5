"""Image datasets held in memory as uint8 NCHW tensors; batches come out as float32 in [0, 1].

Sources (:func:`load_dataset`):
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download),
  with a fixed stratified 75/25 train/test split;
- a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 NHWC or NHW) and optional
  ``classes`` (the format of the shared MNIST / CIFAR-10 files);
- ``mnist`` / ``cifar10``: torchvision's datasets under ``data_dir`` (``download=True`` fetches);
- a directory in ImageFolder layout: ``train/`` and ``test/`` subfolders of class folders, or
  class folders directly (then split 80/20, stratified, seed 0); images resized to ``image_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.shifts import random_benign_changes
from training.recipe import Augmentation


@dataclass(frozen=True)
class ImageData:
    """x_*: (N, C, H, W) uint8; y_*: (N,) int64 class indices; classes: names by index."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def _nchw(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _shuffled(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


def load_digits() -> ImageData:
    """scikit-learn digits, pixel values 0..16 scaled to 0..255; 1,347 train / 450 test."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    xtr, xte, ytr, yte = train_test_split(
        images, d.target, test_size=0.25, stratify=d.target, random_state=0)
    return ImageData("digits", _nchw(xtr), torch.as_tensor(ytr, dtype=torch.int64),
                     _nchw(xte), torch.as_tensor(yte, dtype=torch.int64),
                     tuple(str(c) for c in range(10)))


def load_npz(path: Path) -> ImageData:
    """A .npz file in the shared data format; the test split is shuffled with a fixed seed."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}")
        ytr = torch.as_tensor(f["y_train"], dtype=torch.int64)
        yte = torch.as_tensor(f["y_test"], dtype=torch.int64)
        n = int(max(ytr.max(), yte.max())) + 1
        classes = tuple(str(c) for c in f["classes"]) if "classes" in f else tuple(
            str(i) for i in range(n))
        xte, yte = _shuffled(_nchw(f["x_test"]), yte, seed=0)
        return ImageData(path.stem, _nchw(f["x_train"]), ytr, xte, yte, classes)


def load_torchvision(name: str, root: Path, download: bool) -> ImageData:
    """torchvision's MNIST or CIFAR10 under ``root``; ``download`` fetches them if missing."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train, test = (cls(str(root), train=t, download=download) for t in (True, False))
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{name} not found under {root} ({e}); pass --download to fetch it, or use an .npz "
            "file such as ../shared/data/{name}.npz") from e
    def arrays(ds: object) -> tuple[torch.Tensor, torch.Tensor]:
        data = ds.data  # type: ignore[attr-defined]
        x = data.numpy() if isinstance(data, torch.Tensor) else data
        return _nchw(np.asarray(x, dtype=np.uint8)), torch.as_tensor(
            np.asarray(ds.targets), dtype=torch.int64)  # type: ignore[attr-defined]
    (xtr, ytr), (xte, yte) = arrays(train), arrays(test)
    return ImageData(name, xtr, ytr, xte, yte, tuple(train.classes))


def load_image_folder(root: Path, image_size: int) -> ImageData:
    """ImageFolder data resized to ``image_size`` squared, RGB; a ``test/`` folder's images are
    shuffled with a fixed seed (ImageFolder lists them by class, and commands read the first
    ones of the test split)."""
    import torchvision
    from torchvision.transforms import v2

    tf = v2.Compose([v2.PILToTensor(), v2.Resize((image_size, image_size), antialias=True)])
    def read(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        ds = torchvision.datasets.ImageFolder(
            str(folder), transform=tf, loader=lambda p: _rgb(p))
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64), ds.classes
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, classes = read(root / "train")
        xte, yte = _shuffled(*read(root / "test")[:2], seed=0)
    else:
        from sklearn.model_selection import train_test_split

        x, y, classes = read(root)
        itr, ite = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(),
                                    random_state=0)
        xtr, ytr, xte, yte = x[itr], y[itr], x[ite], y[ite]
    return ImageData(root.name, xtr, ytr, xte, yte, tuple(classes))


def _rgb(path: str) -> object:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


DATASET_HELP = ("'digits' (embedded, no download), a .npz file (e.g. ../shared/data/mnist.npz), "
                "'mnist' or 'cifar10' (torchvision, see --data-dir/--download), or an "
                "ImageFolder directory")


def load_dataset(spec: str, data_dir: Path = Path("data"), download: bool = False,
                 image_size: int = 64) -> ImageData:
    """Resolve a dataset spec (see module doc); unknown specs raise ValueError naming them."""
    if spec == "digits":
        return load_digits()
    if spec in ("mnist", "cifar10"):
        return load_torchvision(spec, data_dir, download)
    path = Path(spec)
    if spec.endswith(".npz"):
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {spec}")
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path, image_size)
    raise ValueError(f"unknown dataset {spec!r}: use {DATASET_HELP}")


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4,
                      padding: str = "constant", flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop after padding by ``pad`` + horizontal flip; x: (B, C, H, W) float in [0, 1].

    padding: "constant" (zeros) or "reflect". flip: (B,) bool, which images to flip (default:
    each with probability 1/2).
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=padding)  # (B, C, H + 2p, W + 2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)  # (B, C, H, W)
    if flip is None:
        flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            augment: bool | Augmentation = False, seed: int = 0,
            epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, C, H, W) float32 in [0, 1], labels (B,)) from uint8 tensors.

    ``augment``: True for the default :class:`~training.recipe.Augmentation`, or one of them.
    Order and crops are drawn from ``seed + epoch``; with ``alternate_flip`` every image's flip
    state is drawn once from ``seed`` and inverted on odd epochs.
    """
    aug = Augmentation() if augment is True else augment or None
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(y), generator=g) if shuffle else torch.arange(len(y))
    yield from batches_in_order(x, y, order, batch_size, aug, g, seed=seed, epoch=epoch)


def batches_in_order(x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, batch_size: int,
                     augment: Augmentation | None, generator: torch.Generator, *, seed: int,
                     epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` images of x: (N, C, H, W) uint8, y: (N,) taken in ``order``
    (M,) int64 indices, as (images (B, C, H, W) float32 in [0, 1], labels (B,)); crops come
    from ``generator``; with ``alternate_flip`` every image's flip state is drawn once from
    ``seed`` and inverted on odd epochs."""
    flips = None
    if augment is not None and augment.alternate_flip:
        flips = (torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < 0.5)
        flips ^= bool(epoch % 2)
    elif augment is not None and not augment.flip:
        flips = torch.zeros(len(y), dtype=torch.bool)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        xb = to_float(x[idx])
        if augment is not None and augment.crops_or_flips:
            xb = augment_crop_flip(xb, generator, augment.translate, augment.padding,
                                   None if flips is None else flips[idx])
        if augment is not None and augment.benign > 0:
            xb = with_benign_changes(xb, augment.benign, generator)
        yield xb, y[idx]


def with_benign_changes(x: torch.Tensor, share: float, generator: torch.Generator
                        ) -> torch.Tensor:
    """x (B, C, H, W) float in [0, 1] with each image replaced, with probability ``share``, by
    one random benign change of itself (:func:`evaluation.shifts.random_benign_changes`);
    the choices come from ``generator``."""
    pick = torch.nonzero(torch.rand(len(x), generator=generator) < share).view(-1)
    if len(pick) == 0:
        return x
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    out = x.clone()
    out[pick] = random_benign_changes(x[pick], seed)
    return out
