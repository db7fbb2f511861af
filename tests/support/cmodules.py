"""Building C VF modules for tests: `build_c_module(source, tmp_path)` compiles a module the
way its documentation says (cc -shared -fPIC -O2 -I cext) and returns the .so path. Tests
that need it are skipped on a machine without a C compiler."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INCLUDE = REPO / "cext"
MODULES = REPO / "tests" / "modules"


def build_c_module(source_path, tmp_path) -> Path:
    """Compiles source_path into tmp_path/<stem>.so; skips the test if there is no cc."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build a VF module")
    source = Path(source_path)
    target = Path(tmp_path) / f"{source.stem}.so"
    result = subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I", str(INCLUDE),
         "-o", str(target), str(source)],
        capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"cc failed on {source}:\n{result.stderr}")
    return target
