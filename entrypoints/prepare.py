"""Prepare MovieLens for training: `python -m entrypoints.prepare --data-dir RAW --output-dir OUT`.

Also `--download ml-1m` (GroupLens, checksum-verified, cached) or `--synthetic 1000000`
(generated into OUT/raw first). Output may be a local directory or s3://bucket/prefix.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from twotower_lit.config import PrepareConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.prepare", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, PrepareConfig)
    cfg = from_namespace(PrepareConfig, parser.parse_args(argv))
    if not cfg.output_dir:
        parser.error("--output-dir is required (a local directory or s3://bucket/prefix)")

    from twotower_lit.data.download import DownloadError
    from twotower_lit.data.prepare import prepare_dataset
    try:
        prepare_dataset(cfg, cfg.output_dir)
    except (ValueError, DownloadError, OSError) as e:  # DataValidationError is a ValueError
        # Input problems get one actionable line, not a traceback.
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
