"""imaml_fast: fast, batched implicit-gradient meta-learning (iMAML) for PyTorch.

The compiled part, imaml_fast._C (csrc/: CPU twins + CUDA kernels behind a C ABI, pybind11
bindings; no PyTorch C++ API), is built by CMake from build_ext. Environment switches, in the
style of flash-attention / xformers:

  IMAML_FAST_SKIP_CUDA=1          build the CPU twin only, even when nvcc is found
  IMAML_FAST_FORCE_CUDA=1         fail unless the CUDA kernels are built
  CUDA_ARCHS / IMAML_FAST_CUDA_ARCHS   e.g. "80;90" (default "80;90+PTX")
  IMAML_FAST_SKIP_EXT=1           do not build _C at all (pure-Python install)
  IMAML_FAST_BUILD_TYPE           CMake build type (default Release)
  MAX_JOBS                        parallel compile jobs (default 2)
  CUDACXX / CUDA_HOME             where nvcc is (else PATH, else /usr/local/cuda/bin/nvcc)

Without cmake (or pybind11) the install still succeeds, without _C; the cpp/cuda backends then
report "imaml_fast._C is not built". A compile error (C++ or CUDA) fails the build. cmake and
ninja are the first on PATH that run: a wrapper script left by a pip-installed cmake whose
Python package is not importable (as in pip's isolated build environments) is passed over.
"""
import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _warn(msg):
    print(f"WARNING: imaml_fast: {msg}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=None)
def _working_tool(name):
    """The first `name` on PATH that answers --version, else None."""
    seen = set()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=folder) if folder else None
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            if subprocess.run([path, "--version"], capture_output=True,
                              timeout=60).returncode == 0:
                return path
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def _find_nvcc():
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class CMakeExtension(Extension):
    """An extension built by the top-level CMakeLists.txt instead of setuptools' compiler."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        missing = None
        if _flag("IMAML_FAST_SKIP_EXT"):
            missing = "IMAML_FAST_SKIP_EXT=1"
        elif _working_tool("cmake") is None:
            missing = ("cmake was not found on PATH" if shutil.which("cmake") is None else
                       "no cmake on PATH runs (`cmake --version` failed)")
        else:
            try:
                import pybind11  # noqa: F401
            except ImportError:
                missing = "pybind11 is not installed (pip install pybind11)"
        if missing:
            _warn(f"not building imaml_fast._C ({missing}); the cpp and cuda backends will "
                  "report that the extension is not built. Everything else works.")
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        start = time.perf_counter()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        stage_dir = build_dir / "python"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('IMAML_FAST_BUILD_TYPE', 'Release')}",
            "-DIMAML_FAST_BUILD_PYTHON=ON",
            "-DIMAML_FAST_BUILD_EXAMPLES=OFF",
            f"-DIMAML_FAST_PYTHON_OUTPUT_DIR={stage_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        nvcc = _find_nvcc()
        if _flag("IMAML_FAST_SKIP_CUDA"):
            args.append("-DIMAML_FAST_CUDA=OFF")
        elif nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     "-DIMAML_FAST_CUDA=" + ("ON" if _flag("IMAML_FAST_FORCE_CUDA") else "AUTO")]
        elif _flag("IMAML_FAST_FORCE_CUDA"):
            raise RuntimeError("imaml_fast: IMAML_FAST_FORCE_CUDA=1 but nvcc was not found "
                               "(set CUDA_HOME or CUDACXX, or put nvcc on PATH)")
        else:
            args.append("-DIMAML_FAST_CUDA=AUTO")  # CMake looks once more, then says why not
        archs = os.environ.get("IMAML_FAST_CUDA_ARCHS") or os.environ.get("CUDA_ARCHS")
        args.append(f"-DIMAML_FAST_CUDA_ARCHS={archs or ''}")
        cmake, ninja = _working_tool("cmake"), _working_tool("ninja")
        if ninja and not os.environ.get("CMAKE_GENERATOR"):
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS", "2")

        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir)] + args
        try:
            subprocess.run(configure, check=True)
        except subprocess.CalledProcessError:
            # A cache from another generator or interpreter: start the configuration afresh
            # (object files stay and are reused where their commands did not change).
            cache = build_dir / "CMakeCache.txt"
            if not cache.exists():
                raise
            cache.unlink()
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
            subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "--parallel", jobs],
                       check=True)

        built = sorted(stage_dir.glob("_C*"))
        built = [p for p in built if p.suffix in (".so", ".pyd", ".dylib")]
        if not built:
            raise RuntimeError(f"imaml_fast: CMake did not produce _C in {stage_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)
        info = _cmake_cache(build_dir / "CMakeCache.txt")
        took = time.perf_counter() - start
        if info.get("IMAML_FAST_BUILT_WITH_CUDA") == "ON":
            print(f"imaml_fast: built {dest.name} in {took:.1f} s with the CUDA kernels "
                  f"(archs: {info.get('IMAML_FAST_BUILT_CUDA_ARCHS', '?')})", flush=True)
        else:
            _warn(f"built {dest.name} in {took:.1f} s with the CPU twin only, no CUDA kernels "
                  f"({info.get('IMAML_FAST_BUILT_NO_CUDA_REASON') or 'reason unknown'})")


def _cmake_cache(path):
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        if ":" in line and "=" in line and not line.startswith(("#", "//")):
            key, _, rest = line.partition(":")
            out[key] = rest.partition("=")[2]
    return out


setup(
    name="imaml_fast",
    version="0.1.0",
    description="Batched iMAML meta-gradients: many tasks at once, masked batched CG, kernel backends",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # kernels/ (Triton) sits at the top level beside csrc/ and installs as imaml_fast.kernels.
    packages=find_packages(include=["imaml_fast", "imaml_fast.*"]) + ["imaml_fast.kernels"],
    package_dir={"imaml_fast.kernels": "kernels"},
    package_data={"imaml_fast": ["data/*.json"]},
    # A range that the CPU build 2.13 satisfies; torch.func and materialize_grads need >= 2.1.
    # Pillow decodes the image data sets once; tqdm draws the training progress bar.
    install_requires=["torch>=2.1,<2.15", "numpy>=1.22", "pillow>=9", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0"],
                    "triton": ["triton>=3.0"],
                    "plot": ["matplotlib>=3.5"],
                    # peers for benchmarks/compare.py (betty-ml 0.1.1's metadata is rejected by
                    # new pips: install it by hand, see benchmarks/README.md)
                    "bench": ["torchopt==0.7.3", "higher==0.2.1", "matplotlib>=3.5"]},
    entry_points={"console_scripts": ["imaml-fast = imaml_fast.cli:main"]},
    # imaml_fast._C from csrc/ through CMake (see the module docstring for the switches).
    ext_modules=[CMakeExtension("imaml_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
