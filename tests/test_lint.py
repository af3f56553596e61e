"""The house rules a linter can check: ruff (pyproject's config), no import circles, every package installed."""
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_cycles  # noqa: E402

PACKAGE_DIRS = {"mos_lightning.callbacks": ROOT / "callbacks"}  # pyproject's package-dir


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def import_graph() -> dict[str, set[str]]:
    known = import_cycles.modules()
    return {name: import_cycles.imports(name, path, known) for name, path in known.items()}


def test_no_import_circles():
    assert import_cycles.cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    graph = import_graph()
    a, b = "mos_lightning.model.understanding", "mos_lightning.state_cache"
    graph[a], graph[b] = graph[a] | {b}, graph[b] | {a}
    assert any({a, b} <= set(component) for component in import_cycles.cycles(graph))


def test_every_package_is_installed():
    """pyproject lists the packages by hand (callbacks/ installs as mos_lightning.callbacks): none left out."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {name for name, path in import_cycles.modules().items() if path.name == "__init__.py"}
    assert set(config["packages"]) == packages
    assert config["package-dir"] == {k: str(v.relative_to(ROOT)) for k, v in PACKAGE_DIRS.items()}


OLD_AND_NEW_PATHS = """
import warnings
warnings.simplefilter("error", FutureWarning)
import mos_lightning.callbacks  # the installed path: must not warn
try:
    import callbacks  # the old top-level name, from the checkout on sys.path
except FutureWarning as warned:
    print(warned)
"""


def test_the_old_callbacks_path_still_resolves_in_a_checkout_with_a_warning():
    """One interpreter for both (each start imports torch and lightning: ~5 s)."""
    done = subprocess.run([sys.executable, "-c", OLD_AND_NEW_PATHS], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "use `mos_lightning.callbacks.X`" in done.stdout
