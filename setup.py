"""Build: `pip install --no-build-isolation -e .` (after torch is installed; see README).

get_extensions() builds the C++ CPU kernels of csrc/ as l2sm_kernels._C (CppExtension, optimized,
OpenMP where the compiler has it). No GPU detection and no downloads at install time.
Environment switches: DEBUG=1 builds with -O0 -g; L2SM_NO_EXT=1 skips the extension (the package
then runs with the eager and triton backends and says so once).
"""
import glob
import os

from setuptools import find_packages, setup


def get_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("L2SM_NO_EXT", "0") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # no -std: torch's BuildExtension adds the standard its headers need (c++17 or c++20)
    cxx += ["-fopenmp"]
    ext = CppExtension(
        "l2sm_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = get_extensions()

setup(
    name="l2sm_kernels",
    version="0.1.0",
    description="Fused L2-constrained softmax loss (normalize, class product, cross-entropy) for PyTorch",
    packages=find_packages(include=["l2sm_kernels", "l2sm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "numpy"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
