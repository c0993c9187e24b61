"""The thin sagemaker_* command lines, run as the user runs them (subprocesses against moto)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.aws.conftest import ROLE, have, queue_endpoint_results
from entrypoints import sagemaker_shadow, sagemaker_train

REPO = Path(__file__).resolve().parents[2]


def cli(module, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def aws_args(ctx):
    return ["--endpoint-url", ctx.cfg.endpoint_url, "--role", ROLE, "--bucket", ctx.cfg.bucket,
            "--project", ctx.cfg.project, "--region", "us-east-1"]


def test_train_options_and_job_options_share_one_command_line():
    cfg, job, aws, dry = sagemaker_train.parse_args(
        ["--max-epochs", "3", "--user-layers", "64,32", "--instance-count", "2", "--spot", "true",
         "--endpoint-url", "http://x", "--dry-run"])
    assert (cfg.optim.max_epochs, cfg.model.user_layers, job.instance_count, job.spot, aws.endpoint_url, dry) == \
        (3, [64, 32], 2, True, "http://x", True)


def test_train_dry_run_prints_the_job(ctx, tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    out = cli("entrypoints.sagemaker_train", *aws_args(ctx), "--data-dir", str(data), "--max-epochs", "2",
              "--instance-type", "ml.g5.12xlarge", "--checkpoint-s3-uri", "auto", "--dry-run").stdout
    plan = json.loads(out[out.index("{"):])
    assert plan["hyperparameters"] == {"max_epochs": "2", "resume": "auto"}
    assert plan["channels"] == {"data": f"s3://{ctx.cfg.bucket}/twotower/data/prepared"}
    assert plan["image_uri"].endswith("/huggingface-pytorch-training:2.11.0-transformers5.13.1-cu130-amzn2023")
    assert plan["image_torch"] == "2.11.0"
    assert plan["checkpoint_s3_uri"].startswith(f"s3://{ctx.cfg.bucket}/twotower/checkpoints/")
    assert ctx.s3.list_objects_v2(Bucket=ctx.cfg.bucket).get("KeyCount", 0) == 0  # a dry run uploads nothing


@pytest.mark.skipif(have("sagemaker"), reason="a SageMaker SDK is installed here")
def test_train_without_an_sdk_says_which_environment_before_uploading_anything(ctx, tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    proc = cli("entrypoints.sagemaker_train", *aws_args(ctx), "--data-dir", str(data), check=False)
    assert proc.returncode == 1 and ".venv-sagemaker-v2/bin/python" in proc.stderr
    assert "pip install -r requirements/aws.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert ctx.s3.list_objects_v2(Bucket=ctx.cfg.bucket).get("KeyCount", 0) == 0  # nothing uploaded


def test_train_limits_are_checked_before_anything_is_sent(ctx, request_log, tmp_path):
    from twotower_lit.aws.config import SageMakerTrainConfig
    from twotower_lit.aws.training import plan_training_job
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import replace_options

    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    before = len(request_log.requests)
    for job, message in ((SageMakerTrainConfig(max_run=29 * 24 * 3600), "SageMaker allows 1 to 2419200 seconds"),
                         (SageMakerTrainConfig(spot=True, max_run=7200, max_wait=3600), "shorter than --max-run"),
                         (SageMakerTrainConfig(processes_per_host=0), "at least 1")):
        with pytest.raises(ValueError, match=message):
            plan_training_job(ctx, replace_options(TrainConfig(), data_dir=str(data)), job, str(tmp_path / "work"))
    assert len(request_log.requests) == before  # nothing uploaded, nothing asked
    proc = cli("entrypoints.sagemaker_train", *aws_args(ctx), "--max-run", str(29 * 24 * 3600), "--dry-run",
               check=False)
    assert proc.returncode == 1 and "--max-run 2505600: SageMaker allows 1 to 2419200 seconds" in proc.stderr


def test_a_failed_aws_call_is_one_actionable_line_and_debug_shows_the_traceback(ctx):
    args = [*aws_args(ctx), "--model", "job:no-such-job", "--endpoint-name", f"{ctx.cfg.project}-ep"]
    proc = cli("entrypoints.sagemaker_deploy", *args, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "AWS DescribeTrainingJob failed (ValidationException)" in errors[0] and "no-such-job" in errors[0]
    assert "run with --debug for the traceback" in errors[0]
    assert len(proc.stderr.splitlines()) <= 3, proc.stderr  # the error line (plus at most a log line or two)
    debug = cli("entrypoints.sagemaker_deploy", *args, "--debug", check=False)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "botocore.exceptions.ClientError" in debug.stderr


def test_deploy_and_cleanup_commands(ctx, moto_server, tmp_path):
    from twotower_lit.serving.synthetic import random_export

    random_export(str(tmp_path / "model"), num_users=5, num_items=20, seed=0)
    queue_endpoint_results(moto_server, [{"Body": json.dumps({"predictions": [{"user_id": 1, "items": []}]}),
                                          "ContentType": "application/json"}])
    out = cli("entrypoints.sagemaker_deploy", *aws_args(ctx), "--model", str(tmp_path / "model"),
              "--endpoint-name", f"{ctx.cfg.project}-ep").stdout
    assert json.loads(out)["action"] == "created"
    kinds = ["--kinds", "endpoint,endpoint-config,model"]
    dry = cli("entrypoints.sagemaker_cleanup", *aws_args(ctx), *kinds, "--dry-run").stdout
    assert f"would remove 1 endpoint(s): {ctx.cfg.project}-ep" in dry
    assert "removed 1 model(s)" in cli("entrypoints.sagemaker_cleanup", *aws_args(ctx), *kinds, "--s3").stdout
    assert ctx.sagemaker.list_endpoints(NameContains=ctx.cfg.project)["Endpoints"] == []
    bad = cli("entrypoints.sagemaker_cleanup", "--kinds", "endpoints", check=False)
    assert bad.returncode == 2 and "unknown --kinds endpoints" in bad.stderr


@pytest.mark.parametrize("argv, expected", [
    (["start", "--production-model", "a", "--shadow-model", "b", "--route", "experiment", "--sampling-percent", "20"],
     {"shadow": {"production_model": "a", "shadow_model": "b", "route": "experiment", "sampling_percent": 20},
      "no_wait": False}),
    (["traffic", "--endpoint-name", "ep", "--data-dir", "/d", "--requests", "10", "--rate", "2"],
     {"shadow": {"endpoint_name": "ep"}, "extra": {"data_dir": "/d", "requests": 10, "rate": 2.0}}),
    (["report", "--capture-dir", "/c", "--min-requests", "5", "--metrics-period", "300"],
     {"shadow": {"metrics_period": 300}, "extra": {"capture_dir": "/c", "min_requests": 5}}),
    (["promote", "--production-model", "a", "--shadow-model", "b", "--no-wait"],
     {"shadow": {"production_model": "a", "shadow_model": "b"}, "no_wait": True}),
])
def test_shadow_subcommands_parse_into_the_configs_the_command_runs_with(argv, expected):
    """Each subcommand's options land, typed, in the config objects `main` hands to the AWS code."""
    from twotower_lit.aws.config import AwsConfig, ShadowTestConfig, split_namespace
    from twotower_lit.config import LoadConfig, ShadowReportConfig

    ns = sagemaker_shadow.build_parser().parse_args(argv)
    assert ns.command == argv[0]
    if "no_wait" in expected:
        assert ns.no_wait is expected["no_wait"]
    for extra in ("command", "no_wait"):
        if hasattr(ns, extra):
            delattr(ns, extra)
    classes = {"traffic": (LoadConfig,), "report": (ShadowReportConfig,)}.get(argv[0], ())
    cfg, aws, *rest = split_namespace(ns, ShadowTestConfig, AwsConfig, *classes)
    for name, value in expected["shadow"].items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), (name, got)
    assert cfg.production_variant == "production" and cfg.shadow_variant == "shadow"  # the defaults
    for name, value in expected.get("extra", {}).items():
        got = getattr(rest[0], name)
        assert got == value and type(got) is type(value), (name, got)
    untouched = {"traffic": ShadowReportConfig, "report": LoadConfig}.get(argv[0])
    if untouched is not None:  # another subcommand's options are not accepted here
        flag = "--min-requests" if untouched is ShadowReportConfig else "--concurrency"
        with pytest.raises(SystemExit):
            sagemaker_shadow.build_parser().parse_args([argv[0], flag, "3"])


def test_shadow_traffic_command(ctx, moto_server):
    queue_endpoint_results(moto_server, [{"Body": '{"predictions": []}', "ContentType": "application/json"}] * 8)
    out = cli("entrypoints.sagemaker_shadow", "traffic", *aws_args(ctx), "--endpoint-name", "ep",
              "--user-ids", "1,2", "--requests", "8", "--rate", "0").stdout
    assert json.loads(out[out.index("{\n"):])["ok"] == 8
