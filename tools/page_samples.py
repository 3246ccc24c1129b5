"""Write the web page's sample images: one test image per class for each data set.

    python tools/page_samples.py   # writes service/page/samples/{digits,mnist,cifar10}/

Each is the first image of its class in the test split (the order ``training.data`` gives)
that the data set's committed bundle classifies correctly and does not flag, so the page's
samples show what a clean image of the class looks like to the model. ``index.json`` holds
the input shape and class names the server matches against the served bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detector.bundle import load_bundle
from training.data import load_digits, load_npz, to_float

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "service" / "page" / "samples"
SETS = {  # name -> (data, bundle used to pick images, or None for any image)
    "digits": (load_digits, ROOT / "runs" / "digits" / "detector" / "bundle"),
    "mnist": (lambda: load_npz(ROOT.parent / "shared" / "data" / "mnist.npz"),
              ROOT / "models" / "mnist" / "bundle"),
    "cifar10": (lambda: load_npz(ROOT.parent / "shared" / "data" / "cifar10.npz"),
                ROOT / "models" / "cifar10" / "bundle"),
}


def main() -> None:
    for name, (load, bundle_dir) in SETS.items():
        data = load()
        x, y = data.x_test[:500], data.y_test[:500].numpy()
        ok = np.ones(len(y), dtype=bool)
        if bundle_dir.is_dir():
            bundle = load_bundle(bundle_dir)
            result = bundle.analyze(to_float(x))
            ok = (result.predictions == y) & ~result.flagged
        else:
            print(f"{name}: no bundle at {bundle_dir}, taking the first image of each class")  # noqa: T201
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        images = []
        for c, label in enumerate(data.classes):
            i = int(np.flatnonzero((y == c) & ok)[0])
            pixels = x[i].permute(1, 2, 0).numpy()
            im = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            file = f"{c}-{label}.png" if label != str(c) else f"{c}.png"
            im.save(out / file, "PNG", optimize=True)
            images.append({"file": file, "label": label})
        meta = {"data": name, "input_shape": list(data.input_shape),
                "labels": list(data.classes), "images": images}
        (out / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(f"{name}: {len(images)} images -> {out}")  # noqa: T201


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
