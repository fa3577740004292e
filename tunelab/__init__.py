"""tunelab: open, self-hosted platform for customizing foundation models."""

__version__ = "0.1.0"
