"""Drive a running pathguard server: start one the way users do, load it, and feed it hostile and
abusive inputs.

Used by the ``benchmarks/`` load, serve, abuse and hostile-corpus scripts, by
``tools/page_screenshots.py`` and by the service tests. Imports ``detector`` and ``service``
(it drives the server), never ``training``, ``evaluation`` or ``benchmarks``: test images come
from the caller.
"""
