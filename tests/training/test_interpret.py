"""``python -m training.interpret``: the path report's numbers and one run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.interpret import cli, drift, dynamic_filters, prototypes, similarity


def test_prototypes_similarity_and_drift_by_hand():
    bits = {"a": np.array([[1, 0], [1, 1], [0, 0], [0, 0]], dtype=float)}
    labels = np.array([0, 0, 1, 1])
    proto = prototypes(bits, labels, 3)
    np.testing.assert_allclose(proto["a"][:2], [[1.0, 0.5], [0.0, 0.0]])
    assert np.isnan(proto["a"][2]).all()  # a class without images
    sim = similarity(proto["a"][:2])
    np.testing.assert_allclose(sim, [[1.0, 0.25], [0.25, 1.0]])
    # an image of class 0 whose path is class 1's prototype sits at position 1
    d = drift({"a": np.array([[0.0, 0.0], [1.0, 0.5]])}, proto, np.array([0, 0]),
              np.array([1, 1]))
    np.testing.assert_allclose(d["position"][:, 0], [1.0, 0.0])
    np.testing.assert_allclose(d["d_source"][:, 0], [0.75, 0.0])


def test_dynamic_filters_are_the_most_input_dependent():
    bits = {"a": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=float)}
    logits = {"a": np.array([[3, 0.5, -1], [2, -2, -1], [1, 2.0, -1], [0, -1, -1]])}
    [f] = dynamic_filters(bits, logits, np.array([0, 1, 0, 1]), 2, top=1, grid=2)
    assert (f.layer, f.index, f.open_rate) == ("a", 1, 0.5)
    assert f.class_rates == [1.0, 0.0] and f.top_images == [2, 0]


def test_report_end_to_end(tiny_decoupled_checkpoint, tmp_path):
    out = tmp_path / "report"
    cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--dataset", "digits", "--images",
         "120", "--attacked", "12", "--attack", "fgsm:0.3", "--top-filters", "3", "--grid",
         "4", "--out", str(out), "--threads", "1", "-q"])
    for name in ("report.html", "report.json", "filter_states.png", "prototypes.png",
                 "similarity.png", "dynamic_filters.png", "drift.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    assert report["images"] == 120 and len(layers) == 3
    assert set(report["filter_states"]) == set(layers)
    assert np.asarray(report["prototypes"][layers[0]]).shape[0] == 10
    sim = np.asarray(report["similarity"][layers[-1]])
    assert sim.shape == (10, 10) and np.allclose(np.diag(sim), 1.0)
    assert len(report["dynamic_filters"]) == 3
    drift_report = report["drift"]
    assert drift_report["attack"] == "FGSM eps=0.3" and drift_report["successful"] >= 2
    assert len(drift_report["adversarial_position"]) == len(layers)
    page = (out / "report.html").read_text()
    assert "drift.png" in page and "Class path prototypes" in page


def test_report_refuses_a_base_checkpoint(tiny_base_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--checkpoint", str(tiny_base_checkpoint), "--dataset", "digits", "--out",
             str(tmp_path), "-q"])
    assert e.value.code == 2 and "not decoupled" in capsys.readouterr().err


def test_drift_position_is_undefined_where_the_path_matches_both_prototypes():
    proto = {"static": np.array([[1.0, 0.0], [1.0, 0.0]])}
    d = drift({"static": np.array([[1.0, 0.0]])}, proto, np.array([0]), np.array([1]))
    assert np.isnan(d["position"]).all() and (d["d_source"] == 0).all()
