"""Programmatic rewards for ``recipe: rlhf`` (``reward_function: tunelab.train.rewards:NAME``).

A reward function takes the prompts and the sampled completions (text) and returns one float
per completion; TRL passes further keyword arguments (completion_ids, trainer_state, dataset
columns), so accept ``**kwargs``. Your own lives in any importable module or a ``file.py``.
"""

from __future__ import annotations


def plain_text(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Share of a completion's characters that are lowercase ASCII letters or spaces: dense, cheap,
    and movable even for a tiny model (a demonstration reward, not a quality measure)."""
    return [sum((ch.isascii() and ch.islower()) or ch == " " for ch in c) / max(len(c), 1) for c in completions]
