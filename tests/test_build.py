"""setup.py when the C++ extension does not compile: the install goes on without l2sm_kernels._C,
no older build of it is left to load in its place (in place or under build_lib, which is what gets
installed), the package says why its "cpu" backend is unavailable, and L2SM_REQUIRE_EXT=1 turns the
failure into an error. Runs setup.py on a copy of the package with a source that cannot compile
(a few seconds: no torch headers are compiled)."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler")


@pytest.fixture
def project(tmp_path):
    """A copy of setup.py and the package (no binaries), with csrc/ holding one file that does not compile."""
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copytree(ROOT / "l2sm_kernels", tmp_path / "l2sm_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.build_error.txt"))
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cpp").write_text("#error does not compile (test)\n")
    return tmp_path


def _setup(project, *args, **env):
    e = dict(os.environ, **env)
    for k in ("L2SM_REQUIRE_EXT", "L2SM_NO_EXT", "L2SM_REQUIRE_BACKENDS"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", *args], cwd=project, env=e,
                          capture_output=True, text=True, timeout=600)


# Imports the package from the copy: an editable install of the real package (CI's) puts a finder
# on sys.meta_path that would resolve l2sm_kernels (and l2sm_kernels._C) to the real one instead.
_IMPORT_COPY = """
import sys
sys.meta_path = [f for f in sys.meta_path
                 if "__editable__" not in (f if isinstance(f, type) else type(f)).__module__]
sys.path.insert(0, sys.argv[1])
import l2sm_kernels as L
assert L.__file__.startswith(sys.argv[1]), L.__file__
print(L.available_backends()["cpu"].reason)
"""


def _cpu_reason(project) -> str:
    e = dict(os.environ)
    e.pop("L2SM_REQUIRE_BACKENDS", None)
    r = subprocess.run([sys.executable, "-c", _IMPORT_COPY, str(project)],
                       cwd=project, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_failed_inplace_build_removes_the_stale_extension(project):
    stale = project / "l2sm_kernels" / ("_C" + SUFFIX)
    stale.write_bytes(b"an older build")
    r = _setup(project, "--inplace")
    assert r.returncode == 0, r.stderr
    assert "WARNING: l2sm_kernels: building the C++ CPU kernels (l2sm_kernels._C) failed" in r.stderr
    assert "#error does not compile" in r.stdout + r.stderr  # the compiler's message is in the log
    assert not stale.exists()
    note = project / "l2sm_kernels" / "_C.build_error.txt"
    assert note.exists()
    reason = _cpu_reason(project)
    assert "compiling l2sm_kernels._C failed when the package was built" in reason, reason
    assert "pip install -v" in reason

    # a build that compiles again removes the note (the module it builds is not a torch extension,
    # so the backend then says it cannot load it, not that the build failed)
    (project / "csrc" / "broken.cpp").write_text("int l2sm_test_symbol() { return 0; }\n")
    r = _setup(project, "--inplace")
    assert r.returncode == 0, r.stderr
    assert stale.exists() and not note.exists()
    assert "failed when the package was built" not in _cpu_reason(project)


def test_failed_build_installs_no_stale_extension(project):
    """Not in place: the build_lib copy (what `pip install` / a wheel installs) of an older build is
    removed and the note takes its place."""
    blib = project / "blib"
    (blib / "l2sm_kernels").mkdir(parents=True)
    stale = blib / "l2sm_kernels" / ("_C" + SUFFIX)
    stale.write_bytes(b"an older build")
    r = _setup(project, "--build-lib", str(blib))
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert (blib / "l2sm_kernels" / "_C.build_error.txt").exists()


def test_require_ext_fails_the_build(project):
    r = _setup(project, "--inplace", L2SM_REQUIRE_EXT="1")
    assert r.returncode != 0
    assert "#error does not compile" in r.stdout + r.stderr
