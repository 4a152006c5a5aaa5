"""Builds the fused kernels as srnn_fast._C.

The C++ (CPU) part is always built. The CUDA part is built where torch has CUDA and nvcc
is found, or as SRNN_FAST_BUILD_CUDA says: "auto" (default), "0" (never), "1" (always;
fails loudly without nvcc). SRNN_FAST_CUDA_ARCHS sets the targets (default "9.0;8.0").
SRNN_FAST_BUILD_SIM ("auto": on Linux; "0"; "1") builds srnn_fast._cuda_sim, the CUDA kernels run
by a CPU harness for the tests (backend "cuda_sim"); SRNN_FAST_SIM_SANITIZE=1 builds it with
AddressSanitizer and UBSan. Compiling prints one line saying what it builds. Packaging the sources (python -m build
--sdist, egg_info) needs no torch; compiling without torch stops with the command to run.
"""
import glob
import os
import platform
import re
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def nvcc_toolkit_root():
    """The CUDA toolkit folder, as nvcc itself reports it. torch would take the parent of
    the folder holding the `nvcc` on the PATH, which is wrong when that is a wrapper script
    (here /usr/local/bin/nvcc, so torch looks for libcudart in /usr/local/lib64)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return os.path.normpath(m.group(1).strip()) if m else None  # TOP is <root>/bin/..


NO_TORCH = (
    "srnn_fast compiles its kernels against the torch you have installed, and this build "
    "environment has no torch (pip builds in an isolated environment unless told not to). "
    "Install torch first, then build without isolation:\n"
    "    pip install torch\n"
    "    pip install srnn_fast-VERSION.tar.gz --no-build-isolation   (a release's sdist)\n"
    "    pip install -e . --no-build-isolation                       (a source tree)")


def x86_isas():
    """Whether the compiler targets x86-64, where csrc/cpu_isa.h builds the avx512 and avx2
    kernels beside the portable one (its SRNN_X86_ISAS: x86-64 with GCC or Clang, which is
    what torch's extension build uses on Linux and macOS)."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.name != "nt"


ext_modules, cmdclass = [], {}
torch = None  # stays None where torch cannot be imported
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
if cpp_sources:
    if os.environ.get("SRNN_FAST_BUILD_CUDA", "auto") != "0" and not (os.environ.get("CUDA_HOME")
                                                                      or os.environ.get("CUDA_PATH")):
        root = nvcc_toolkit_root()  # before torch.utils.cpp_extension reads CUDA_HOME
        if root:
            os.environ["CUDA_HOME"] = root
    try:
        import torch
    except ImportError:  # pip's isolated build environment: torch is deliberately not a build requirement
        pass

if cpp_sources and torch is None:
    # Commands that only package or describe the sources (sdist, egg_info, --name) need no
    # torch: the extension is declared with its sources (so the build is marked as platform
    # specific), and compiling it stops with the fix.
    class NoTorchBuildExt(build_ext):
        def run(self):
            raise SystemExit(NO_TORCH)

    ext_modules = [Extension("srnn_fast._C", cpp_sources)]
    cmdclass = {"build_ext": NoTorchBuildExt}
elif cpp_sources:
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("SRNN_FAST_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SRNN_FAST_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    build_cuda = bool(cuda_sources) and (mode == "1" or (mode == "auto" and torch.version.cuda and have_nvcc))
    if mode == "1" and not (torch.version.cuda and have_nvcc):
        raise SystemExit("SRNN_FAST_BUILD_CUDA=1 needs a CUDA build of torch and nvcc on the PATH")
    # No FMA contraction: the kernels round like the reference's separate ops. No -std:
    # torch's build adds the standard its headers need (C++20 from torch 2.14 on).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-Wno-psabi"]
    # -fopenmp in compile and link flags, or at::parallel_for runs on one thread.
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=False)
    if build_cuda:
        # Explicit targets: without them torch would probe a GPU, and CI has none.
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("SRNN_FAST_CUDA_ARCHS", "9.0;8.0")
        # torch's nvidia/cu13/include holds headers (cuBLAS, ...) a bare toolkit may lack.
        nvidia_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include"))
        # --fmad=false: nvcc would contract a*b+c into FMAs, which round differently from
        # the reference (float64 spikes must match it exactly).
        ext = CUDAExtension("srnn_fast._C", cpp_sources + cuda_sources, include_dirs=nvidia_inc,
                            extra_compile_args={"cxx": cxx + ["-DSRNN_FAST_WITH_CUDA"],
                                                "nvcc": ["-O3", "--fmad=false", "-DSRNN_FAST_WITH_CUDA", "-lineinfo"]},
                            **kwargs)
        cuda_note = f"yes (CUDA {torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})"
    elif mode == "0":
        cuda_note = "no (SRNN_FAST_BUILD_CUDA=0)"
    elif not cuda_sources:
        cuda_note = "no (no csrc/*.cu)"
    elif not torch.version.cuda:
        cuda_note = "no (torch has no CUDA)"
    else:
        cuda_note = f"no (nvcc not found; torch has CUDA {torch.version.cuda})"
    if not build_cuda:
        ext = CppExtension("srnn_fast._C", cpp_sources, extra_compile_args=cxx, **kwargs)
    ext_modules = [ext]
    # The CUDA path's harness (csrc/sim): fibers need <ucontext.h>, i.e. Linux/glibc. Its own
    # module, so that the package imports, and backend "cuda_sim" says why, where it is absent.
    sim_mode = os.environ.get("SRNN_FAST_BUILD_SIM", "auto")
    if sim_mode not in ("auto", "0", "1"):
        raise SystemExit(f"SRNN_FAST_BUILD_SIM must be auto, 0 or 1; got {sim_mode!r}")
    build_sim = sim_mode == "1" or (sim_mode == "auto" and platform.system() == "Linux")
    if build_sim:
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"] \
            if os.environ.get("SRNN_FAST_SIM_SANITIZE") == "1" else []
        ext_modules.append(CppExtension(
            "srnn_fast._cuda_sim", sorted(glob.glob("csrc/sim/*.cpp")),
            extra_compile_args=["-O2" if sanitize else "-O3", "-ffp-contract=off", "-Wno-psabi", "-Wno-unknown-pragmas"] + sanitize,
            extra_link_args=sanitize, py_limited_api=False))
    sim_note = ("yes" + (" (ASan + UBSan)" if os.environ.get("SRNN_FAST_SIM_SANITIZE") == "1" else "")
                if build_sim else f"no ({'SRNN_FAST_BUILD_SIM=0' if sim_mode == '0' else platform.system() + ': needs Linux'})")
    isas = ("avx512, avx2, default (x86-64)" if x86_isas()
            else f"default ({platform.machine()}: the portable build only)")
    # One line saying what is compiled, printed when it is (not by sdist or egg_info).
    summary = f"srnn_fast: building the CPU kernels for {isas}; CUDA kernels: {cuda_note}; CUDA harness (cuda_sim): {sim_note}; torch {torch.__version__}"

    class SummaryBuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
        def run(self):
            print(summary, flush=True)
            super().run()

    cmdclass = {"build_ext": SummaryBuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
