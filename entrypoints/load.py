"""Traffic generator: replay a prepared split's users (or given user ids) against an endpoint.

    python -m entrypoints.load --url http://127.0.0.1:8080/invocations --data-dir PREPARED --rate 50
"""
import argparse
import json

from twotower_lit.config import LoadConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace
from twotower_lit.serving.load import format_summary, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.load", description=__doc__.split("\n\n")[0],
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, LoadConfig)
    cfg = from_namespace(LoadConfig, parser.parse_args(argv))
    try:
        summary = run(cfg)
    except (OSError, ValueError) as e:
        parser.exit(2, f"load: {e}\n")
    print(format_summary(summary))
    print(json.dumps(summary))
    if summary["requests"] and not summary["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
