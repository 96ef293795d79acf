"""The package's layering, read from the source: the command line sits on top of the library and the
engine stands without MONAI Label. Both fail on one stray import, function-level ones included."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str | None = None) -> set[str]:
    """Every module an import statement anywhere in the file names (relative ones resolved against
    ``name``, the file's module name by default)."""
    package = (name or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from fewshot import cli`
    return names


def is_cli(name: str) -> bool:
    return name == "fewshot.cli" or name.startswith("fewshot.cli.")


def test_nothing_below_the_command_line_imports_it():
    files = sorted((LIB / "fewshot").rglob("*.py"))
    assert len(files) > 20
    offenders = {
        module_name(f): sorted(n for n in imported_modules(f) if is_cli(n))
        for f in files
        if not is_cli(module_name(f)) and module_name(f) != "fewshot.__main__"
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    # The rule above must be able to fail: function-level and relative imports of the CLI are found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..cli import common\n    import fewshot.cli.eval\n    from fewshot import cli\n")
    found = imported_modules(probe, "fewshot.eval.probe")
    assert {"fewshot.cli", "fewshot.cli.common", "fewshot.cli.eval"} <= found
    assert any(is_cli(n) for n in imported_modules(probe, "fewshot.eval.probe") - {"fewshot.cli.common", "fewshot.cli.eval"})


def test_importing_the_engine_and_its_command_line_never_imports_monailabel():
    code = ("import sys, fewshot.engine, fewshot.cli, fewshot.eval.runner, fewshot.bench.report; "
            "from fewshot.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monailabel'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_code_defaults_that_repeat_a_preset_agree_with_it():
    """The index settings' code defaults (used by a bank made without a preset) are foundation.yaml's,
    which every preset inherits; they once disagreed (hnsw_ef_search 128 in code, 256 in the preset)."""
    import pytest

    from fewshot.bank import SupportBank
    from fewshot.bank_index import IndexSettings, build_index
    from fewshot.config import ConfigError, load_preset

    for preset in ("foundation", "classic", "random-tiny"):
        assert IndexSettings.from_settings(load_preset(preset)["bank"]) == IndexSettings()
    bank = SupportBank(None, "fp")
    assert (bank.approximate_above, bank.hnsw_m, bank.hnsw_ef_search) == (20000, 32, 256)
    assert build_index.__defaults__[1:] == (20000, 32, 256)
    with pytest.raises(ConfigError, match="hnsw_ef_search"):
        IndexSettings.from_settings({"hnsw_ef_search": "many"})


def test_nothing_imports_the_engines_old_module_name():
    """fewshot/pipeline.py only re-exports fewshot.engine under its old name, for code written against it."""
    files = sorted((LIB / "fewshot").rglob("*.py")) + sorted((LIB.parent / "apps").rglob("*.py"))
    offenders = [str(f) for f in files if f.name != "pipeline.py" and "fewshot.pipeline" in imported_modules(f, "x.y")]
    assert offenders == []
