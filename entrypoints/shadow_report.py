"""Shadow-test report from the server's data capture: latency, errors, agreement, quality, verdict.

    python -m entrypoints.shadow_report --capture-dir D [--data-dir PREPARED] [--output-dir OUT]
"""
import argparse

from twotower_lit.config import ShadowReportConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace
from twotower_lit.serving.report import write_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.shadow_report", description=__doc__.split("\n\n")[0],
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, ShadowReportConfig)
    cfg = from_namespace(ShadowReportConfig, parser.parse_args(argv))
    if not cfg.capture_dir:
        parser.error("--capture-dir is required")
    try:
        report = write_report(cfg)
    except (OSError, ValueError) as e:
        parser.exit(2, f"shadow_report: {e}\n")
    print(f"verdict: {report['verdict']} ({'; '.join(report['reasons'])})")
    for path in report["files"]:
        print(path)


if __name__ == "__main__":
    main()
