"""The hyperparameter search space, defined once (`search_space.yaml` beside this file) and used by
both routes: Optuna's suggestions for `entrypoints.tune`, SageMaker's parameter ranges for
`entrypoints.sagemaker_tune`.

Every name is a leaf option of `TrainConfig` (the command line's ``--name`` with underscores);
`load_space` refuses a file naming anything else, so a renamed option fails here, not in a trial.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from twotower_lit.config import TrainConfig
from twotower_lit.options import iter_fields

DEFAULT_SPACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_space.yaml")
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    """One tuned option: a float or int range (optionally on a log scale) or a list of choices."""

    name: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


def option_types(cls: type = TrainConfig) -> Dict[str, type]:
    """``{option name: type}`` of a config class's leaves (a field's ``option`` metadata names it
    where it has one, as `twotower_lit.options.from_dict` reads it)."""
    return {f.metadata.get("option", f.name): tp for _, f, tp in iter_fields(cls)}


def load_space(path: Optional[str] = None) -> List[Param]:
    """The parameters of a search-space file (default: the project's), checked: each name a
    training option, each kind known, ranges ordered (positive for log), choices of the option's
    type. Errors name the file and the parameter."""
    import yaml

    path = path or DEFAULT_SPACE
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise FileNotFoundError(f"search space {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"search space {path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("parameters"), dict) or not doc["parameters"]:
        raise ValueError(f"search space {path}: expected a mapping 'parameters' of option name -> range")
    types = option_types()
    params = []
    for name, spec in doc["parameters"].items():
        where = f"search space {path}: parameters.{name}"
        if name not in types:
            raise ValueError(f"{where}: not a training option (python -m entrypoints.train --help lists them, "
                             f"written with underscores)")
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise ValueError(f"{where}: expected {{type: {'|'.join(KINDS)}, ...}}, got {spec!r}")
        unknown = set(spec) - {"type", "low", "high", "log", "choices"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: type, low, high, log, choices")
        tp = types[name]
        if spec["type"] == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: a categorical parameter needs a non-empty list 'choices'")
            bad = [c for c in choices if not _fits(c, tp)]
            if bad:
                raise ValueError(f"{where}: choices {bad} are not of the option's type {tp.__name__}")
            params.append(Param(name, "categorical", choices=tuple(choices)))
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        number = int if spec["type"] == "int" else (int, float)
        if not (isinstance(low, number) and isinstance(high, number)) or isinstance(low, bool) \
                or isinstance(high, bool) or not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise ValueError(f"{where}: needs numbers low < high{' (integers)' if spec['type'] == 'int' else ''}, "
                             f"got low={low!r} high={high!r}")
        if log and low <= 0:
            raise ValueError(f"{where}: a log-scale range must be positive, got low={low}")
        if spec["type"] == "float" and tp is not float or spec["type"] == "int" and tp is not int:
            raise ValueError(f"{where}: type {spec['type']}, but the option is {tp.__name__}")
        params.append(Param(name, spec["type"], float(low) if spec["type"] == "float" else int(low),
                            float(high) if spec["type"] == "float" else int(high), log))
    return params


def _fits(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def suggest(trial, params: List[Param]) -> Dict[str, Any]:
    """One Optuna trial's values: ``{option name: value}``."""
    out: Dict[str, Any] = {}
    for p in params:
        if p.kind == "float":
            out[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
        elif p.kind == "int":
            out[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log)
        else:
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return out


def parameter_ranges(params: List[Param]) -> Dict[str, List[Dict[str, Any]]]:
    """SageMaker's ``ParameterRanges`` (of CreateHyperParameterTuningJob) for the space: values as
    strings, as the API takes them; the job receives each as ``--name value`` and parses it back."""
    ranges: Dict[str, List[Dict[str, Any]]] = {"ContinuousParameterRanges": [], "IntegerParameterRanges": [],
                                               "CategoricalParameterRanges": []}
    for p in params:
        if p.kind == "categorical":
            ranges["CategoricalParameterRanges"].append({"Name": p.name, "Values": [str(c) for c in p.choices]})
        else:
            key = "ContinuousParameterRanges" if p.kind == "float" else "IntegerParameterRanges"
            ranges[key].append({"Name": p.name, "MinValue": str(p.low), "MaxValue": str(p.high),
                                "ScalingType": "Logarithmic" if p.log else "Linear"})
    return ranges


def command_line(values: Mapping[str, Any], fixed: Mapping[str, Any] = ()) -> str:
    """``python -m entrypoints.train --a 1 --b 2`` for options `fixed` then `values`."""
    parts = ["python -m entrypoints.train"]
    for name, value in {**dict(fixed), **dict(values)}.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:.6g}"
        parts.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(parts)
