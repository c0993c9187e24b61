"""Delete every SageMaker resource carrying the project's tag (and, with --s3, its S3 prefix).

    python -m entrypoints.sagemaker_cleanup [--dry-run] [--s3] [--kinds endpoint,endpoint-config,model]
        [--project twotower-lit] [--endpoint-url http://127.0.0.1:5000 for a moto server]
"""
from __future__ import annotations

import argparse
import logging
import sys

from twotower_lit.aws.cleanup import DEFAULT_KINDS, KINDS
from twotower_lit.aws.config import AwsConfig, split_namespace
from twotower_lit.options import OneLineHelpFormatter, add_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_cleanup", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                        help=f"resource kinds to remove, of: {', '.join(KINDS)} (default: %(default)s)")
    parser.add_argument("--s3", action="store_true", help="also empty s3://BUCKET/PREFIX/")
    parser.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    ns = parser.parse_args(argv)
    kinds = [k.strip() for k in ns.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown --kinds {', '.join(unknown)}; known: {', '.join(KINDS)}")
    s3, dry_run = ns.s3, ns.dry_run
    for extra in ("kinds", "s3", "dry_run"):
        delattr(ns, extra)
    (aws,) = split_namespace(ns, AwsConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.cleanup import cleanup, describe
    from twotower_lit.aws.session import AwsContext

    print(describe(cleanup(AwsContext(aws), kinds, s3=s3, dry_run=dry_run), dry_run))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
