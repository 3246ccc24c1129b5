"""Filter states of a decoupled network over a data set (the paper's Fig. 4).

A filter is *high-energy* if its gate is open for every input, *silent* if it is never open,
and *dynamic* otherwise (its state depends on the input).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def filter_states(bits: Mapping[str, np.ndarray]) -> dict[str, dict[str, int | float]]:
    """Per layer: counts of high-energy, silent and dynamic filters and the mean open fraction.

    bits: layer name -> (N, C) bool gate states of N inputs.
    """
    states: dict[str, dict[str, int | float]] = {}
    for name, b in bits.items():
        rate = b.mean(axis=0)  # (C,) share of inputs for which each filter is open
        states[name] = {
            "filters": int(b.shape[1]),
            "high_energy": int((rate == 1.0).sum()),
            "silent": int((rate == 0.0).sum()),
            "dynamic": int(((rate > 0.0) & (rate < 1.0)).sum()),
            "open_fraction": float(rate.mean()),
        }
    return states
