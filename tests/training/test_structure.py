"""The training core's layering: the LightningModule knows nothing of how it is distributed."""
import ast
import pathlib

import twotower_lit

ROOT = pathlib.Path(twotower_lit.__file__).parent
DISTRIBUTION = ("twotower_lit.distributed", "torchrec.distributed", "torch.distributed", "lightning.pytorch.strategies",
                "lightning.fabric.strategies")


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_the_lightning_module_and_its_step_runners_import_nothing_of_distribution():
    for name in ("module.py", "steps.py"):
        found = [m for m in _imports(ROOT / "training" / name) if m.startswith(DISTRIBUTION)]
        assert found == [], f"training/{name} imports {found}"


def test_the_lightning_module_matches_no_parameter_names():
    """Which parameters are fused tables, replicated tables or towers comes from the strategy
    (`twotower_lit.sharded.ShardedParts`), not from the names DMP gives them."""
    text = (ROOT / "training" / "module.py").read_text()
    assert "embedding_bags" not in text and "named_parameters" not in text


def test_lower_layers_do_not_import_upper_ones():
    """data does not import metrics, training or serving; export does not import serving; serving
    does not import training or the distribution package."""
    rules = {"data": ("twotower_lit.metrics", "twotower_lit.training", "twotower_lit.serving",
                      "twotower_lit.distributed", "twotower_lit.export"),
             "export": ("twotower_lit.serving", "twotower_lit.training", "twotower_lit.distributed"),
             "serving": ("twotower_lit.training", "twotower_lit.distributed")}
    found = {}
    for package, banned in rules.items():
        for path in (ROOT / package).rglob("*.py"):
            bad = [m for m in _imports(path) if m.startswith(banned)]
            if bad:
                found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_no_file_of_the_package_is_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}
