"""Every private Lightning / TorchRec / torch internal the project uses is there in the installed
releases (twotower_lit.patches), and a missing one is named before a job builds anything."""
import pytest

from twotower_lit import patches


def test_every_upstream_internal_is_present():
    assert patches.check_upstream() == []


def test_a_missing_internal_is_named_with_its_user_and_the_versions(monkeypatch):
    monkeypatch.setattr(patches, "TARGETS", patches.TARGETS + (
        ("torchrec.distributed.dist_data", "_no_such_function", "cache_input_dist_permutations"),))
    assert patches.check_upstream() == ["torchrec.distributed.dist_data._no_such_function (used by "
                                        "twotower_lit.patches.cache_input_dist_permutations)"]
    with pytest.raises(RuntimeError, match=r"torchrec .*_no_such_function.*adapt twotower_lit/patches.py"):
        patches.require_upstream()


def test_every_private_name_used_in_the_package_is_a_checked_target():
    """A private attribute of torch / TorchRec / Lightning used outside patches.py would escape the
    upgrade check: the package's other modules reach such internals only through patches."""
    import pathlib
    import re

    root = pathlib.Path(patches.__file__).parent
    pattern = re.compile(r"\b(?:torch|dist|dist_data|DistributedModelParallel|LightningOptimizer)\._[a-z]\w*")
    found = {}
    for path in root.rglob("*.py"):
        if path.name == "patches.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.findall(line.split("#")[0]):
                if match not in ("torch._foreach_add_", "torch._foreach_mul"):  # public foreach ops (torch docs)
                    found[f"{path.relative_to(root)}:{n}"] = match
    assert found == {}
