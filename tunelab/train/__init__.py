"""Training recipes, one file per method, sharing numerics from _numerics.py."""
