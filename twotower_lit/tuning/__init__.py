"""Hyperparameter search: the search space (`space`) and the local Optuna search (`local`)."""
