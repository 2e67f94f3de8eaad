"""Issue 15: the supported Python range is one fact, said by setup.py and checked by the Makefile (3.11+: the
pins in constraints.txt need it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python_requires() -> tuple[int, ...]:
    found = re.search(r'python_requires=">=([0-9.]+)"', (REPO_ROOT / "setup.py").read_text())
    assert found, "setup.py has no python_requires"
    return tuple(int(part) for part in found.group(1).split("."))


def _fake_python(tmp_path: Path, version: tuple[int, int, int]) -> Path:
    """A `python` that runs `-c CODE` with the real interpreter but reports `version`."""
    fake = tmp_path / f"python{version[0]}.{version[1]}"
    dotted = ".".join(map(str, version))
    fake.write_text(
        "#!/bin/bash\n"
        '[ "$1" = -c ] || exit 99\n'
        f'exec {sys.executable} -c "import sys; sys.version_info = {version!r}; sys.version = \'{dotted} (fake)\'; '
        'exec(sys.argv[1])" "$2"\n'
    )
    fake.chmod(0o755)
    return fake


def _check(python: Path | str, venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), "check-python", f"PYTHON={python}",
                           f"VENV={venv}"], capture_output=True, text=True, timeout=60)


def test_setup_and_makefile_agree():
    assert _python_requires() == (3, 11)
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"^PYTHON_MIN := 3\.11$", makefile, re.M), "the Makefile's PYTHON_MIN differs from setup.py"
    assert re.search(r"^\$\(STAMP\):.*\| check-python$", makefile, re.M), "venv creation does not check Python first"


def test_makefile_refuses_an_older_python_before_creating_the_venv(tmp_path):
    venv = tmp_path / "venv"
    old = _check(_fake_python(tmp_path, (3, 10, 14)), venv)
    assert old.returncode != 0
    assert "ctld needs Python 3.11 or newer" in old.stderr and "3.10.14" in old.stderr, old.stderr
    assert "Traceback" not in old.stderr and not venv.exists()
    assert _check(_fake_python(tmp_path, (3, 11, 0)), venv).returncode == 0
    assert _check(sys.executable, venv).returncode == 0  # the interpreter running the tests is supported
