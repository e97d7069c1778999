"""Ray Tune sweeps: a shared kit (``kit.py``) at the bottom, one module per sweep above it."""
