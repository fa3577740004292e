"""Errors a user can act on. The CLI prints them as one line, never a traceback."""

from __future__ import annotations


class TunelabError(Exception):
    """A mistake or missing piece the user can fix; the message says how."""


class ConfigError(TunelabError):
    """Every problem found in a recipe, collected and reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{len(problems)} problem(s) in {source or 'the config'}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


class ConfigFileError(ConfigError):
    """A config file that cannot be read as YAML settings at all (missing, a folder, unreadable, binary,
    not UTF-8, not YAML, not a mapping): one line that names the file and the fix."""

    def __init__(self, problem: str, source: str | None = None):
        self.problems = [problem]
        self.source = source
        TunelabError.__init__(self, problem)


class MissingExtra(TunelabError):
    """An optional dependency is not installed."""
