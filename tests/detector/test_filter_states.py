"""Filter states (high-energy / silent / dynamic) from hand-built gate bits."""

import numpy as np
import pytest

from detector.filter_states import filter_states


def test_filter_states_hand_built():
    bits = {
        "b": np.array([[1, 0, 1, 0],
                       [1, 0, 0, 0],
                       [1, 0, 1, 1]], dtype=bool),
        "a": np.ones((3, 2), dtype=bool),
    }
    states = filter_states(bits)
    assert list(states) == ["b", "a"]  # input order kept
    assert states["b"] == {"filters": 4, "high_energy": 1, "silent": 1, "dynamic": 2,
                           "open_fraction": pytest.approx(0.5)}
    assert states["a"] == {"filters": 2, "high_energy": 2, "silent": 0, "dynamic": 0,
                           "open_fraction": 1.0}
    for s in states.values():
        assert s["high_energy"] + s["silent"] + s["dynamic"] == s["filters"]
        assert isinstance(s["open_fraction"], float)
        assert all(isinstance(s[k], int) for k in ("filters", "high_energy", "silent", "dynamic"))


def test_filter_states_single_input_has_no_dynamic_filters():
    states = filter_states({"l": np.array([[0, 1, 1, 0, 1]], dtype=bool)})
    assert states["l"]["dynamic"] == 0
    assert states["l"]["high_energy"] == 3
    assert states["l"]["silent"] == 2
    assert states["l"]["open_fraction"] == pytest.approx(0.6)


def test_filter_states_empty():
    assert filter_states({}) == {}
