"""Drive a running pathguard server: start one the way users do, load it, and feed it hostile and
abusive inputs. Used by the ``benchmarks/`` load and abuse scripts and by the service tests."""
