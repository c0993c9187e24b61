"""`TrainConfig` <-> SageMaker hyperparameters: the one place the mapping is defined.

The job receives only the values that differ from `TrainConfig`'s defaults (the container runs
the same code, so the defaults live in one place), as strings that `from_dict` parses back:
booleans ``true``/``false``, integer lists ``128,64``. Options that describe the machine the job
runs on (``CONTAINER_FIELDS``: where data, outputs and checkpoints are, how many processes)
are not sent: inside the job they come from SageMaker's environment
(`twotower_lit.aws.environment`).

Both SDKs deliver the hyperparameters to the entry script as ``--name value`` with the field's
underscore name; SDK v2 JSON-encodes values on the way, v3 passes JSON-decodable values through
``json.loads``/``json.dumps``. `container_argv` reproduces both so the tests can check that what
arrives parses back to the same `TrainConfig`.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from twotower_lit.config import TrainConfig
from twotower_lit.options import from_dict, to_flat_dict

# decided by the container, never sent: data comes from a channel, outputs go to /opt/ml/...,
# processes and nodes come from torchrun / SM_HOSTS
CONTAINER_FIELDS = frozenset({"data_dir", "output_dir", "checkpoint_dir", "devices", "num_nodes", "progress"})
# SageMaker's own limits on hyperparameters
MAX_HYPERPARAMETERS, MAX_KEY_LEN, MAX_VALUE_LEN = 100, 256, 2500


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def to_hyperparameters(cfg: TrainConfig) -> Dict[str, str]:
    """The job's hyperparameters for `cfg`: non-default, non-container options as strings."""
    defaults = to_flat_dict(TrainConfig())
    out: Dict[str, str] = {}
    for name, value in to_flat_dict(cfg).items():
        if name in CONTAINER_FIELDS or value == defaults[name]:
            continue
        if value is None:
            raise ValueError(f"--{name.replace('_', '-')}: cannot send 'unset' to a SageMaker job when the default "
                             f"is {defaults[name]!r}")
        out[name] = _encode(value)
    if len(out) > MAX_HYPERPARAMETERS:
        raise ValueError(f"{len(out)} hyperparameters; SageMaker accepts at most {MAX_HYPERPARAMETERS}")
    for name, value in out.items():
        if len(value) > MAX_VALUE_LEN:
            raise ValueError(f"hyperparameter {name} is {len(value)} characters; SageMaker accepts {MAX_VALUE_LEN}")
    return out


def from_hyperparameters(hps: Dict[str, Any]) -> TrainConfig:
    """The inverse of `to_hyperparameters` (values may also be JSON-encoded, as SDK v2 stores them)."""
    return from_dict(TrainConfig, {k: _json_or_text(v) for k, v in hps.items()})


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, (str, bool, int, float, list)) else value


def container_argv(hps: Dict[str, str], sdk: str) -> List[str]:
    """The ``--name value`` arguments the entry script receives in the container, as each SDK's
    container side builds them from the stored hyperparameters (v2: the sagemaker-training toolkit
    JSON-decodes what the SDK JSON-encoded; v3: its torchrun driver's safe (de)serialise)."""
    argv: List[str] = []
    for name, value in hps.items():
        if sdk == "v2":
            decoded = json.loads(json.dumps(value))  # SDK: json.dumps; toolkit: json.loads, then str()
            argv += [f"--{name}", str(decoded)]
        elif sdk == "v3":
            decoded = _json_or_text(value)  # driver: safe_deserialize, then safe_serialize
            argv += [f"--{name}", decoded if isinstance(decoded, str) else json.dumps(decoded)]
        else:
            raise ValueError(f"sdk must be v2 or v3, not {sdk!r}")
    return argv


def metric_definitions(eval_k: int = 10) -> List[Dict[str, str]]:
    """Regexes over the job's log that SageMaker turns into job metrics: the final summary table
    `twotower_lit.training` prints (``<metric> <two-tower> <popularity>``: ``test:*``), and the line
    rank 0 prints after each validation (``val:recall@10=0.1234 val:auc=0.7890 epoch=3``: ``val:*``,
    one value per epoch, then the exported epoch's again, last)."""
    # (the retrieval names of twotower_lit.metrics.retrieval_names, which imports torch: this module does not)
    names = ("auc", "logloss", "accuracy", *(f"{n}@{eval_k}" for n in ("recall", "ndcg", "mrr", "hit_rate", "coverage",
                                                                      "popularity_rank")))
    test = [{"Name": f"test:{n}", "Regex": rf"^{n.replace('.', '[.]')}\s+(-?[0-9.]+)\s+-?[0-9.]+\s*$"} for n in names]
    val = [{"Name": f"val:{n}", "Regex": rf"val:{n}=([0-9.]+)"} for n in (f"recall@{eval_k}", "auc")]
    return test + val
