"""Build: `pip install --no-build-isolation -e .` (after torch is installed; see README).

get_extensions() builds the C++ CPU kernels of csrc/ as l2sm_kernels._C (CppExtension, optimized,
OpenMP where the compiler has it). No GPU detection and no downloads at install time.
Environment switches: DEBUG=1 builds with -O0 -g; L2SM_NO_EXT=1 skips the extension (the package
then runs with the eager and triton backends and says so once). A failed compilation does not fail
the install: the package installs without l2sm_kernels._C (any older build of it is removed, in
place too), and l2sm_kernels.available_backends() says the "cpu" backend's build failed (from the
note l2sm_kernels/_C.build_error.txt; `pip install -v ...` shows the compiler's error);
L2SM_REQUIRE_EXT=1 makes it fail the install instead.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# next to the package's modules after a failed build of l2sm_kernels._C: <module name> + this suffix
# (l2sm_kernels/backends/cpu.py reads it)
BUILD_ERROR_SUFFIX = ".build_error.txt"


def get_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("L2SM_NO_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # no a * b + c -> fma contraction (GCC's default for C++ is -ffp-contract=fast): the AVX2 /
    # AVX-512 clones of the hot loops then round like the baseline one, and the float32 exp keeps its
    # < 1 ulp bound (contracted: 1.023 ulp). The epilogues are a small part of the time (GEMMs in BLAS).
    cxx += ["-ffp-contract=off"]
    # no -std: torch's BuildExtension adds the standard its headers need (c++17 or c++20).
    # OpenMP: at::parallel_for is inline in torch's headers, so the extension must be compiled with
    # it to run threaded; it links the libgomp torch already loaded (same soname).
    link = []
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    elif sys.platform == "win32":
        cxx = ["/O2", "/openmp"] if not debug else ["/Od", "/Zi", "/openmp"]
    ext = CppExtension(
        "l2sm_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        py_limited_api=False,
    )

    class BuildExt(BuildExtension):
        """A compiler error leaves the package installable without the extension (unless L2SM_REQUIRE_EXT=1),
        and without any older build of it: a stale binary must not load in its place."""

        def run(self):
            self._l2sm_inplace = bool(self.inplace)  # setuptools clears .inplace while it builds
            super().run()

        def _artifacts(self, extension):
            """The places a build of `extension` lands: under build_lib (what gets installed) and, for
            in-place / editable builds, in the source package (what gets imported), as
            [(folder, module name)]."""
            fullname = self.get_ext_fullname(extension.name)
            package, _, name = fullname.rpartition(".")
            regular = os.path.dirname(os.path.join(self.build_lib, self.get_ext_filename(fullname)))
            out = [(regular, name)]
            if getattr(self, "_l2sm_inplace", False):
                out.append((self.get_finalized_command("build_py").get_package_dir(package), name))
            return out

        def build_extension(self, extension):
            import importlib.machinery

            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001  (compiler / ninja errors come as several types)
                if os.environ.get("L2SM_REQUIRE_EXT", "0") == "1":
                    raise
                # remove every older build (any suffix Python would import), and leave a note that
                # l2sm_kernels.backends.cpu puts in the backend's "unavailable" reason: pip shows this build's
                # output only with -v, so the note is how the failure becomes visible
                for folder, name in self._artifacts(extension):
                    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                        path = os.path.join(folder, name + suffix)
                        if os.path.exists(path):
                            os.remove(path)
                            print(f"l2sm_kernels: removed the stale {path}", file=sys.stderr)
                    if os.path.isdir(folder):
                        with open(os.path.join(folder, name + BUILD_ERROR_SUFFIX), "w") as f:
                            f.write(f"{type(e).__name__}: {e}\n")
                bar = "=" * 100
                print(f"\n{bar}\nWARNING: l2sm_kernels: building the C++ CPU kernels ({extension.name}) failed: "
                      f"{type(e).__name__}: {e}\n"
                      "The package installs without them: its 'cpu' backend reports itself unavailable "
                      "(l2sm_kernels.available_backends()). Set L2SM_REQUIRE_EXT=1 to make this an error; "
                      f"`pip install -v ...` shows the compiler's output.\n{bar}\n", file=sys.stderr)
                # a new list (the loop building the extensions holds the old one): later steps
                # (copying in place, listing the wheel's files) skip the extension that failed
                self.extensions = [x for x in self.extensions if x is not extension]
            else:
                for folder, name in self._artifacts(extension):
                    path = os.path.join(folder, name + BUILD_ERROR_SUFFIX)
                    if os.path.exists(path):
                        os.remove(path)

    return [ext], {"build_ext": BuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = get_extensions()

setup(
    name="l2sm_kernels",
    version="0.1.0",
    description="Fused L2-constrained softmax loss (normalize, class product, cross-entropy) for PyTorch",
    packages=find_packages(include=["l2sm_kernels", "l2sm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],  # numpy: l2sm_kernels.metrics
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
        # l2sm_kernels.verification.read_bin decodes the .bin files' images with Pillow
        "verification": ["pillow"],
        # benchmarks/sweep_cosine_topk.py's optional anchors (faiss-cpu is a 30 MB wheel: not in requirements.txt)
        "bench": ["faiss-cpu", "scikit-learn"],
        # the manual and its API reference: `mkdocs build --strict` (mkdocs.yml; CI builds it)
        "docs": ["mkdocs==1.6.1", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
