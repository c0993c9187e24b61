"""An interrupted local search resumes: the trial it was running is marked failed and its values are
queued again, so the next run trains it first; a finished study's direction cannot be flipped."""
import optuna
import pytest
from optuna.trial import TrialState

from twotower_lit.tuning.local import TuneConfig, _requeue_interrupted, _study, tune


def test_the_interrupted_trial_runs_again_first(tmp_path):
    study = _study(TuneConfig(), str(tmp_path), seed=0)
    done = study.ask({"embedding_lr": optuna.distributions.FloatDistribution(0.005, 0.3, log=True)})
    study.tell(done, 0.2)
    cut = study.ask({"embedding_lr": optuna.distributions.FloatDistribution(0.005, 0.3, log=True)})  # never told
    resumed = _study(TuneConfig(), str(tmp_path), seed=0, load_only=True)  # as a new process sees it
    assert _requeue_interrupted(resumed) == 1
    states = [t.state for t in resumed.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    again = resumed.ask()
    assert again.user_attrs["retry_of"] == cut.number
    assert again.suggest_float("embedding_lr", 0.005, 0.3, log=True) == cut.params["embedding_lr"]
    assert _requeue_interrupted(resumed) == 1  # (the retry itself, now running, if this run is cut too)


def test_a_study_keeps_its_direction(tmp_path):
    _study(TuneConfig(metric="val_recall@10"), str(tmp_path), seed=0)
    with pytest.raises(ValueError, match="was created to maximize"):
        tune({"data_dir": str(tmp_path / "none"), "output_dir": str(tmp_path)},
             TuneConfig(metric="val_logloss"))
