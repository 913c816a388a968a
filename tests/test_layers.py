"""The package layers (docs/architecture.md, "Layers"): a module may import only from its own unit or from a
lower layer, lazily or not, and every error class lives in errors.py with an exit code of its own."""

import ast
import inspect
from pathlib import Path

from p2pcompute import errors

PACKAGE = Path(__file__).resolve().parents[1] / "p2pcompute"

# unit (a subpackage or a top-level module of p2pcompute) -> layer; lower layers never import higher ones,
# and units of one layer do not import each other
LAYERS = {
    "errors": 0,
    "crypto": 1, "canonical": 1, "retry": 1, "logs": 1,
    "identity": 2, "config": 2, "protocol": 2,
    "credits": 3, "runs": 3,  # records: claims, policy, manifests
    "ledger": 4, "swarm": 4,  # the ledger (entries, store, replica); swarm records and the DHT
    "services": 5,  # our protocols on the host: ledger sync, credits
    "training": 6,
    "node": 7,
    "cli": 8, "devtools": 8,
}


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "p2pcompute" else None


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("p2pcompute"):
            if node.module == "p2pcompute":  # from p2pcompute import crypto, canonical
                found += [(node.lineno, f"p2pcompute.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("p2pcompute.")]
    return found


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units - set(LAYERS) == set(), "give each new unit a layer in LAYERS and in docs/architecture.md"


def test_no_import_goes_up_or_sideways():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if me is None or me == "__init__":
            continue
        for line, module in imports_of(path):
            other = unit_of(module)
            if other is None or other == me or other == "__version__" or other == "__init__":
                continue
            if LAYERS[other] >= LAYERS[me]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({me}, layer {LAYERS[me]}) imports "
                                  f"{module} ({other}, layer {LAYERS[other]})")
    assert violations == []


def test_error_classes_live_in_errors_py_with_one_exit_code_each():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.P2PCError)]
    codes = {}
    for cls in classes:
        assert "exit_code" in vars(cls), f"{cls.__name__} inherits its exit code"
        assert cls.exit_code not in codes, f"{cls.__name__} and {codes.get(cls.exit_code)} share {cls.exit_code}"
        codes[cls.exit_code] = cls.__name__
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                assert not bases & {c.__name__ for c in classes}, f"{path.name}: {node.name} belongs in errors.py"
