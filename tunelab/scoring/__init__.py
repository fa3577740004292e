"""The scoring library: metrics by name (``scoring.metrics``) and their bootstrap statistics
(``scoring.stats``), pure functions of predictions and references.

It sits below training and evaluation alike: a training recipe's own report (distillation's
teacher-versus-student comparison, a pretraining run's perplexity) and ``tunelab eval`` /
``tunelab compare`` score with the same code, so a number means the same thing wherever it is shown.
"""
