"""Adaptive attacks: the attacker knows the network, the gates and the detector, and wants an
input that is misclassified *and* not flagged.

- :mod:`~evaluation.adaptive.pgd`: detector-aware PGD (``DetectorAwarePGD``, a
  ``torchattacks.Attack``): BPDA through the gates, the shipped path features, a surrogate of
  the detector;
- :mod:`~evaluation.adaptive.surrogate`: that differentiable stand-in of the detector's verdict
  and its fitting on the attack's iterates;
- :mod:`~evaluation.adaptive.square`: detector-aware Square (``DetectorAwareSquare``), black-box
  on the real pipeline's score;
- :mod:`~evaluation.adaptive.judge`: success judged by the real pipeline (misclassified and not
  flagged; also after rounding to 8 bits);
- :mod:`~evaluation.adaptive.evaluate`: adaptive attacks named in an evaluation
  (``--eval-attacks pgd-aware:0.1``), crafted against the fitted bundle and measured like the
  others;
- :mod:`~evaluation.adaptive.benchmark`: the adaptive benchmark (``benchmarks/adaptive.py``).

By name (``pgd-aware``, ``square-aware``) they are in :mod:`evaluation.attacks` with every other
attack; they need the fitted detector (:class:`evaluation.attacks.Defence`).
"""
