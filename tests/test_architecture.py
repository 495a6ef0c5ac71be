"""The package's shape, checked: layers, no import circles, no borrowed private names, an instant CLI.

docs/architecture.md describes the layers; pyproject.toml states them as an import-linter
contract, which `make test` runs (`lint-imports`) and which these tests show can fail.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import shutil
import subprocess
import sys
import tokenize
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vdvae_latents"
SUBPACKAGES = ("core", "data", "model", "train", "latents", "stores", "downstream", "interop", "report", "cli")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_UNIT_LINES = 120  # lines of code in a function or class body (docstrings, comments, blank lines excluded)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# ----------------------------------------------------------------------------- layers
def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e .[test])")
def test_the_layer_contract_holds():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (pip install -e .[test])")
def test_an_upward_import_breaks_the_contract(tmp_path):
    # A copy of the package in which the model (a low layer) imports the stores (a higher one),
    # inside a function as lazy imports are written: the contract must catch it all the same.
    shutil.copytree(PACKAGE, tmp_path / "vdvae_latents", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    vae = tmp_path / "vdvae_latents" / "model" / "vae.py"
    vae.write_text(vae.read_text() + "\n\ndef _upward():\n    from ..stores import writer\n\n    return writer\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and "vdvae_latents.model.vae -> vdvae_latents.stores.writer" in proc.stdout


def test_pyproject_names_every_subpackage_in_the_layers():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    named = {name.strip().removeprefix("vdvae_latents.") for layer in contract["layers"] for name in layer.split("|")}
    on_disk = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert named == on_disk == set(SUBPACKAGES)


# ----------------------------------------------------------------------------- imports
def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every import statement in a library file, resolved to absolute
    names; imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.append((module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in library_files()}
    for path in library_files():
        edges = set()
        for module, names, _ in imports_of(path):
            # `from .pkg import mod` imports the module pkg.mod
            edges |= {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            if module in modules:
                edges.add(module)
        graph[module_name(path)] = edges - {module_name(path)}
    # A package's __init__ listing its submodules is its API, not a circle of the code.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in library_files():
        aliases = {}
        for module, names, line in imports_of(path):
            if not module.startswith("vdvae_latents"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    offences.append(f"{module_name(path)}:{line} imports {module}.{name}")
                aliases[name] = module
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offences.append(f"{module_name(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not offences, "\n".join(offences)


# ----------------------------------------------------------------------------- package APIs
@pytest.mark.parametrize("package", ["vdvae_latents"] + [f"vdvae_latents.{s}" for s in SUBPACKAGES if s != "cli"])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert set(module.__all__) <= set(dir(module))


def test_the_top_level_exports_stay():
    # Everything `from vdvae_latents import ...` gave before the package was layered.
    import vdvae_latents

    for name in ("ModelConfig", "VAE", "VAEOutput", "count_parameters", "PRESETS", "get_preset", "preset_names",
                 "ImageSet", "ImageDataset", "LazyImages", "load_images", "open_images", "UserError", "ConfigError",
                 "DataError", "CheckpointError", "open_encodings", "ActiveLatents", "EncodingsDataset", "__version__"):
        assert getattr(vdvae_latents, name) is not None, name


def test_the_wheel_installs_one_top_level_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["vdvae_latents*"]
    assert config["project"]["scripts"]["vdvl"] == "vdvae_latents.cli:main"
    assert not (ROOT / "cli").exists()


# ----------------------------------------------------------------------------- an instant CLI
HEAVY = ("torch", "sklearn", "zarr", "h5py", "numpy")
COMMANDS = ("presets", "model", "train", "eval", "sample", "reconstruct", "first-k", "info", "analyze-kl", "encode",
            "pack", "decode", "verify", "probe", "report", "import efficient-vdvae", "import openai-vdvae")


def test_help_and_usage_errors_import_none_of_torch_sklearn_zarr_h5py_numpy():
    # One fresh interpreter runs every help and a few usage errors in-process, then lists what got imported.
    argvs = [["--help"], []] + [[*c.split(), "--help"] for c in COMMANDS] + [
        ["train", "--bogus"], ["encode"], ["analyze-kl", "run", "--data", "digits", "--out", "a.json",
                                           "--batch-size", "0"],
        ["model", "--preset", "nope"], ["model", "--set", "variates=x"]]
    script = f"""
import json, sys
from vdvae_latents.cli import main
codes = [main(argv) for argv in {json.dumps(argvs)}]
print(json.dumps({{"codes": codes, "heavy": sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)}))}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["codes"][:len(COMMANDS) + 2] == [0] * (len(COMMANDS) + 2)
    assert report["codes"][len(COMMANDS) + 2:] == [2, 2, 2, 2, 2]


def test_python_dash_m_vdvae_latents_is_the_cli():
    ok = subprocess.run([sys.executable, "-m", "vdvae_latents", "--help"], capture_output=True, text=True,
                        timeout=60, cwd="/")
    assert ok.returncode == 0 and "analyze-kl" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "vdvae_latents", "train", "--bogus"], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("vdvl train: no such option: --bogus")
    assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- readable units
def code_lines(path: Path) -> set[int]:
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                            tokenize.ENDMARKER):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def docstring_lines(node: ast.AST) -> set[int]:
    out = set()
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            out.update(range(body[0].lineno, body[0].end_lineno + 1))
    return out


def test_no_function_or_class_body_is_longer_than_a_reader_can_hold():
    long = []
    for path in library_files():
        code = code_lines(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                body = (set(range(node.lineno + 1, node.end_lineno + 1)) & code) - docstring_lines(node)
                if len(body) > MAX_UNIT_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {len(body)} lines")
    assert not long, "\n".join(long)
