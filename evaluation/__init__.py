"""The detection-evaluation protocol as a library: split by image, crafting, held-out threshold,
metrics, worst case, baselines and attacks (torchattacks and adaptive ones).

Used by ``training.fit_detector`` and the ``benchmarks/`` scripts. Imports ``detector`` (never
``training`` or ``service``); ``service`` imports nothing from here.
"""
