"""Data preparation steps: small, one-method transforms/filters over canonical records."""
