"""Shadow test on SageMaker: start it, send traffic, report, then stop or promote.

    python -m entrypoints.sagemaker_shadow start   --production-model M1 --shadow-model M2 [--route experiment]
    python -m entrypoints.sagemaker_shadow traffic --data-dir PREPARED --requests 500 --rate 10
    python -m entrypoints.sagemaker_shadow report  --capture-dir shadow-capture [--data-dir PREPARED]
    python -m entrypoints.sagemaker_shadow stop    --production-model M1 --shadow-model M2 [--route experiment]
    python -m entrypoints.sagemaker_shadow promote --production-model M1 --shadow-model M2 [--route experiment]

Every subcommand takes the AWS options (--endpoint-url for a moto server, --role, --bucket ...);
--debug shows the traceback of a failure.
Routes: endpoint-config (ShadowProductionVariants + DataCaptureConfig) or experiment (an inference
experiment, Type=ShadowMode). Traffic goes through sagemaker-runtime with an inference id per
request; the report is the local stack's shadow report computed from SageMaker's data capture,
plus CloudWatch's per-variant metrics (cloudwatch.json, cloudwatch.png).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from twotower_lit.aws.config import AwsConfig, ShadowTestConfig, split_namespace
from twotower_lit.config import LoadConfig, ShadowReportConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, option_names

TRAFFIC_OPTIONS = {"data_dir", "split", "user_ids", "rate", "concurrency", "requests", "duration", "batch", "k",
                   "timeout", "seed", "output"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_shadow", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop", "promote", "traffic", "report"):
        p = sub.add_parser(name, formatter_class=OneLineHelpFormatter)
        add_arguments(p, ShadowTestConfig)
        add_arguments(p, AwsConfig)
        if name == "traffic":
            add_arguments(p, LoadConfig, only=TRAFFIC_OPTIONS)
        if name == "report":
            add_arguments(p, ShadowReportConfig,
                          only=option_names(ShadowReportConfig) - {"endpoint_name"})
        if name in ("start", "stop", "promote"):
            p.add_argument("--no-wait", action="store_true", help="return without waiting for SageMaker")
    return parser


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    command = ns.command
    wait = not getattr(ns, "no_wait", False)
    for extra in ("command", "no_wait"):
        if hasattr(ns, extra):
            delattr(ns, extra)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws import results, shadow
    from twotower_lit.aws.session import AwsContext

    classes = {"traffic": (LoadConfig,), "report": (ShadowReportConfig,)}.get(command, ())
    cfg, aws, *rest = split_namespace(ns, ShadowTestConfig, AwsConfig, *classes)
    ctx = AwsContext(aws)
    experiment = cfg.route == "experiment"
    if command == "start":
        if experiment:
            out = shadow.start_experiment(ctx, cfg, wait)
        else:
            out = shadow.start_shadow_endpoint(ctx, cfg, wait)
    elif command == "stop":
        out = shadow.stop_experiment(ctx, cfg, False, wait=wait) if experiment else \
            shadow.stop_shadow_endpoint(ctx, cfg, wait)
    elif command == "promote":
        out = shadow.stop_experiment(ctx, cfg, True, wait=wait) if experiment else \
            shadow.promote_shadow_endpoint(ctx, cfg, wait)
    elif command == "traffic":
        from twotower_lit.serving.load import format_summary, run

        out = run(rest[0], send=results.runtime_sender(ctx, cfg.endpoint_name))
        print(format_summary(out))
    else:
        report_cfg = rest[0]
        if not report_cfg.capture_dir:
            raise SystemExit("report: --capture-dir (where the capture is downloaded to) is required")
        roles = {cfg.production_variant: "production", cfg.shadow_variant: "shadow"}
        out = results.shadow_report(ctx, cfg.endpoint_name, shadow.capture_destination(ctx, cfg), roles, report_cfg,
                                    cfg.metrics_period)
        print(f"verdict: {out['verdict']} ({'; '.join(out['reasons'])})")
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
