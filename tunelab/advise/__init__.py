"""Decide and size a job before running it: the decision advisor and the memory/compute/cost estimator."""
