"""What a detector costs next to the network it guards: microseconds per image at batch 1, and
its size on disk.

The detector's step is path -> features -> score (:func:`detector.analysis.score_paths`) on a
path that the network already recorded; the network's step is its bare forward pass (logits
only). Stability features need one more forward pass, of the transformed copies stacked
(:mod:`detector.stability`): that is network work, counted apart (``stability_us``). Timings
are medians of interleaved single-image runs on one thread (the server's default), so the
ratios hold on a busy machine too.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from detector.analysis import score_paths
from detector.differentiable import torch_detector
from detector.estimator import PathDetector
from detector.execution import median_times_ms
from detector.features import PathProfile
from detector.paths import to_inference_layout
from detector.stability import record_paths, with_companions


@dataclass(frozen=True)
class DetectorCost:
    """score_us: path -> score per image at batch 1 (microseconds); network_us: the bare
    network's forward pass, measured in the same run; stability_us: the extra forward pass of
    the stability transforms' copies (0 without); size_bytes: the detector's compressed skops file;
    exported: whether the score ran as torch operations (:mod:`detector.differentiable`)."""

    score_us: float
    network_us: float
    stability_us: float
    size_bytes: int
    exported: bool

    @property
    def score_ratio(self) -> float:
        """score_us / network_us: the issue's budget is 0.25."""
        return self.score_us / self.network_us


def detector_size(detector: PathDetector) -> int:
    """Bytes of the detector saved as in a bundle (skops, deflate level 9)."""
    import skops.io as sio

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        out.writestr("detector.skops", sio.dumps(detector))
    return len(buffer.getvalue())


def detector_costs(model: nn.Module, images: torch.Tensor,
                   detectors: Mapping[str, tuple[PathProfile, PathDetector]],
                   repeats: int = 200) -> dict[str, DetectorCost]:
    """Cost of each named (profile, fitted detector) on ``model``; images: (M, C, H, W) in
    [0, 1], M >= 1 single-image inputs cycled through the timed rounds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.eval()
        singles = [images[i:i + 1] for i in range(len(images))]
        index = [torch.tensor(i) for i in range(len(singles))]
        with torch.inference_mode():
            stability = sorted({t for profile, _ in detectors.values() for t in profile.stability})
            paths = [record_paths(model, x, stability) for x in singles]
            exported = {name: torch_detector(det) for name, (_, det) in detectors.items()}
            bare = [to_inference_layout(x) for x in singles]  # as the analysis runs it
            runs = {"network": lambda i: model(bare[int(i)])}
            stacks = {tuple(profile.stability) for profile, _ in detectors.values()}
            runs |= {_stability_run(s): (lambda i, s=s: with_companions(
                model, singles[int(i)], paths[int(i)], s)) for s in stacks if s}
            # each call scores a new PathBatch of the recorded path (replace() leaves out the
            # arrays PathBatch.flat caches), as a request does; the companions keep theirs,
            # computed by the stability pass
            runs |= {name: (lambda i, p=profile, d=det, e=exported[name]: score_paths(
                p, d, replace(paths[int(i)]), e)) for name, (profile, det) in detectors.items()}
            ms = median_times_ms(runs, index, repeats=repeats, warmup=3)
    finally:
        torch.set_num_threads(threads)
    return {name: DetectorCost(
        score_us=1e3 * ms[name], network_us=1e3 * ms["network"],
        stability_us=1e3 * ms[_stability_run(tuple(profile.stability))] if profile.stability
        else 0.0,
        size_bytes=detector_size(det), exported=exported[name] is not None)
        for name, (profile, det) in detectors.items()}


def _stability_run(transforms: tuple[str, ...]) -> str:
    return "stability:" + "+".join(transforms)
