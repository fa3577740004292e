"""Resolving a model reference: a packaged name, a local folder, or a Hugging Face hub id."""

from tunelab.models.resolve import PACKAGED, list_models, pull, resolve

__all__ = ["PACKAGED", "list_models", "pull", "resolve"]
