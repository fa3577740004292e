"""The pruning hook: validation losses reach Optuna, and a trial worse than the median stops its Trainer."""

from __future__ import annotations

import pytest


def test_callback_reports_and_stops_a_bad_trial():
    optuna = pytest.importorskip("optuna")
    from transformers import TrainerControl, TrainerState

    from tunelab.train.tune import _pruning_callback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for loss in (1.0, 1.2):  # two finished trials that reported at step 2
        t = study.ask()
        t.report(loss, step=2)
        study.tell(t, loss)

    def evaluate(trial, loss):
        hook, state, control = _pruning_callback(trial), TrainerState(), TrainerControl()
        state.global_step = 2
        hook.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        return hook, control

    good, c_good = evaluate(study.ask(), 0.8)
    assert good.pruned_at is None and not c_good.should_training_stop
    bad, c_bad = evaluate(study.ask(), 3.0)
    assert bad.pruned_at == 2 and c_bad.should_training_stop
    assert study.trials[-1].intermediate_values == {2: 3.0}
