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


def test_every_engine_module_an_import_names_exists():
    """A stale import after a move (fewshot.pipeline is fewshot.engine now, with no shim) fails here,
    not when a rarely run script or function-level import is reached."""
    modules = {module_name(f) for f in (LIB / "fewshot").rglob("*.py")}
    files = [*(LIB / "fewshot").rglob("*.py"), *(LIB.parent / "apps").rglob("*.py"),
             *(LIB.parent / "scripts").rglob("*.py"), *(LIB.parent / "tests").rglob("*.py")]
    missing = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            named = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            missing.update({n: str(f.relative_to(LIB.parent)) for n in named
                            if n and n.split(".")[0] == "fewshot" and n not in modules})
    assert len(modules) > 40 and missing == {}


# ------------------------------------------------------------------------ rooms small, arrows one way

APP = LIB.parent / "apps" / "fewshot"
MAX_LINES = 600  # issue 14: a file over this holds more than one idea; split it by concern


def project_modules() -> dict[str, Path]:
    """Module name -> file for the engine (``fewshot.*``, as lib/ is on the path) and the app
    (``main``, ``lib.*``, as MONAI Label puts apps/fewshot on the path)."""
    found = {module_name(f): f for f in (LIB / "fewshot").rglob("*.py")}
    for f in [APP / "main.py", *(APP / "lib").rglob("*.py")]:
        parts = list(f.relative_to(APP).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere (function-level imports included); a
    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_modules(path, name):
            parts = imported.split(".")
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in modules:
                    targets.add(".".join(parts[:i]))
                    break
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    assert {"fewshot.engine", "fewshot.bank", "main", "lib.dicomweb_datastore", "lib.pacs_sync"} <= set(modules)
    graph = import_graph(modules)
    assert "fewshot.files" in graph["fewshot.bank"] and "lib.dicomweb_datastore" in graph["lib.pacs_sync"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("from a import x\n")
    modules = {n: tmp_path / f"{n}.py" for n in "abc"}
    assert cycles(import_graph(modules)) == [["a", "b", "c"]]
    (tmp_path / "c.py").write_text("x = 1\n")
    assert cycles(import_graph(modules)) == []


def test_no_python_file_in_lib_or_apps_is_over_600_lines():
    files = [*(LIB / "fewshot").rglob("*.py"), *APP.rglob("*.py")]
    assert len(files) > 40
    long = {str(f.relative_to(LIB.parent)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_nothing_outside_the_tests_imports_them():
    """The engine, the app and the scripts stand without tests/ (scripts/bench_app.py once borrowed its server)."""
    test_modules = {p.stem for p in (LIB.parent / "tests").glob("*.py")}
    files = [*(LIB / "fewshot").rglob("*.py"), *APP.rglob("*.py"), *(LIB.parent / "scripts").rglob("*.py")]
    offenders = {str(f.relative_to(LIB.parent)): sorted(names) for f in files
                 if (names := {n.split(".")[0] for n in imported_modules(f, "x.y")} & (test_modules | {"tests"}))}
    assert offenders == {}


def test_the_engines_sections_are_typed_and_checked_at_load_with_no_default_of_their_own():
    import pytest

    from fewshot.config import ConfigError, available_presets, deep_merge, load_preset
    from fewshot.settings import EngineSettings

    for preset in available_presets():  # every preset inherits foundation.yaml's keys
        config = EngineSettings.from_settings(load_preset(preset))
        assert config.selection.keep >= 1 and isinstance(config.selection.distinct_sources, bool)
    assert EngineSettings.from_settings(load_preset("classic")).selection.keep == 8
    base = load_preset("random-tiny")
    with pytest.raises(ConfigError, match=r"selection.keep must be int, not '4'"):
        EngineSettings.from_settings(deep_merge(base, {"selection": {"keep": "4"}}))
    with pytest.raises(ConfigError, match=r"distinct_sources must be bool"):
        EngineSettings.from_settings(deep_merge(base, {"selection": {"distinct_sources": 1}}))
    with pytest.raises(ConfigError, match=r"retrieval.top_k must be at least 1"):
        EngineSettings.from_settings(deep_merge(base, {"retrieval": {"top_k": 0}}))
    del base["selection"]["candidates"]
    with pytest.raises(ConfigError, match=r"selection.candidates is not set \(configs/presets/foundation.yaml"):
        EngineSettings.from_settings(base)


def test_every_presets_step_sections_are_typed_and_a_typo_is_an_error():
    """embedder and matcher sections are read by their step type's dataclass (a key that is no setting is
    refused, not silently ignored for a default); the registration transfer's nested stages too."""
    import pytest

    from fewshot.config import ConfigError, available_presets, deep_merge, load_preset
    from fewshot.embed.descriptor import DescriptorSettings
    from fewshot.embed.dinov2 import Dinov2Settings
    from fewshot.match.lpips_match import LpipsSettings
    from fewshot.match.ncc import NccSettings
    from fewshot.transfer.registration import RegistrationSettings

    readers = {"dinov2": Dinov2Settings, "descriptor": DescriptorSettings, "lpips": LpipsSettings, "ncc": NccSettings}
    read = 0
    for preset in available_presets():
        settings = load_preset(preset)
        for section in ("embedder", "matcher"):
            kind = settings[section]["type"]
            if kind != "none":
                read += readers[kind].from_settings(settings[section]) is not None
    assert read >= 12
    tiny = load_preset("random-tiny")
    assert Dinov2Settings.from_settings(tiny["embedder"]).input_size == 56
    with pytest.raises(ConfigError, match=r"matcher has no setting sise"):
        LpipsSettings.from_settings(deep_merge(tiny["matcher"], {"sise": 96}))
    with pytest.raises(ConfigError, match=r"embedder.input_size must be int, not '56'"):
        Dinov2Settings.from_settings(deep_merge(tiny["embedder"], {"input_size": "56"}))
    transfer = load_preset("classic-slices")["transfer"]
    assert RegistrationSettings.from_settings(transfer).deformable.iterations == (60, 40, 20)
    with pytest.raises(ConfigError, match=r"transfer.affine.shrink_factors\[1\] must be int, not 'x'"):
        RegistrationSettings.from_settings(deep_merge(transfer, {"affine": {"shrink_factors": [16, "x"]}}))
    with pytest.raises(ConfigError, match=r"transfer.fusion is not set \(configs/presets/classic-slices.yaml"):
        RegistrationSettings.from_settings({k: v for k, v in transfer.items() if k != "fusion"})


def test_each_test_worker_picks_loopback_ports_of_its_own_below_the_ephemeral_range(monkeypatch):
    """Servers under test listen on ports no outgoing connection and no other pytest-xdist worker can take."""
    import socket

    import app_harness

    ports = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setattr(app_harness, "_candidates", app_harness._ports())
        ports[worker] = [app_harness.free_port() for _ in range(5)]
    ephemeral, block = app_harness._ephemeral_start(), app_harness.PORT_BLOCK
    assert len(set(ports["gw0"])) == 5 and all(ephemeral - block <= p < ephemeral for p in ports["gw0"])
    assert len(set(ports["gw1"])) == 5 and all(ephemeral - 2 * block <= p < ephemeral - block for p in ports["gw1"])
    # a port something already listens on is passed over
    monkeypatch.setattr(app_harness, "_candidates", app_harness._ports())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", app_harness.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        monkeypatch.setattr(app_harness, "_candidates", app_harness._ports())  # the same worker, the same start
        assert app_harness.free_port() != taken
