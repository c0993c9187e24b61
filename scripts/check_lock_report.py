"""Check a lane's `pip install --dry-run --report` against the lane: the torch and FBGEMM build it
names, and, where torchrec is installed with --no-deps, that the lock has everything else torchrec
asks for.

    python scripts/check_lock_report.py LANE REPORT.json [TORCHREC_REPORT.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[canonicalize_name(name.split("[")[0])] = version
    return out


def installed(report_path: str) -> dict:
    report = json.loads(Path(report_path).read_text())
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"] for item in report["install"]}


def main(lane: str, report_path: str, torchrec_report: str | None = None) -> list:
    got = installed(report_path)
    errors = []
    if lane == "cpu":
        want = {**pins(REPO / "requirements" / "base.txt"), **pins(REPO / "requirements" / "torchrec.txt")}
        fbgemm, other = "fbgemm-gpu-cpu", "fbgemm-gpu"
    else:
        want = pins(REPO / "requirements" / f"{lane}.txt")
        fbgemm, other = "fbgemm-gpu", "fbgemm-gpu-cpu"
    if other in got:
        errors.append(f"{lane}: {other} {got[other]['version']} would be installed; this lane uses {fbgemm}")
    if torchrec_report:
        got_torchrec = installed(torchrec_report)
        if "torchrec" not in got_torchrec:
            errors.append(f"{lane}: {torchrec_report} resolves no torchrec")
        else:
            for spec in got_torchrec["torchrec"].get("requires_dist") or []:
                req = Requirement(spec)
                name = canonicalize_name(req.name)
                if name == "fbgemm-gpu" or (req.marker and not req.marker.evaluate({"extra": ""})):
                    continue  # the lane's own FBGEMM build stands in for the CUDA one torchrec names
                if name not in got:
                    errors.append(f"{lane}: torchrec needs {spec}, which the lock does not install")
                elif not req.specifier.contains(Version(got[name]["version"]), prereleases=True):
                    errors.append(f"{lane}: torchrec needs {spec}, the lock has {got[name]['version']}")
            got = {**got, **got_torchrec}
    for name in ("torch", fbgemm, "torchrec"):
        if name not in got:
            errors.append(f"{lane}: {name} is not in the resolution")
        elif Version(got[name]["version"]).public != Version(want[name]).public:
            errors.append(f"{lane}: {name} resolved to {got[name]['version']}, the lane pins {want[name]}")
    return errors


if __name__ == "__main__":
    problems = main(*sys.argv[1:])
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)
