"""Baseline adversarial-example detectors, fitted and measured on exactly the split, sets, seed
and target false-positive rate of one ``training.fit_detector`` run
(:class:`evaluation.detector_run.DetectorRun`), one module each, each with
``fit_and_evaluate(run, ...)``:

- :mod:`~evaluation.baselines.path_detector` ("ours"): the run's own detector, refitted;
- :mod:`~evaluation.baselines.pooled`: the same detector on pooled activations;
- :mod:`~evaluation.baselines.mahalanobis`: Lee et al. 2018;
- :mod:`~evaluation.baselines.lid`: Ma et al. 2018;
- :mod:`~evaluation.baselines.deep_knn`: Papernot and McDaniel 2018 (layer-wise class
  consistency of the nearest training images).

Thresholds are set by :class:`detector.threshold.FPRThresholdClassifier` at the run's target FPR
on held-out clean fitting images; :mod:`~evaluation.baselines.report` writes the comparison.
"""
