"""Builds the fused kernels as srnn_fast._C.

The C++ (CPU) part is always built. The CUDA part is built where torch has CUDA and nvcc
is found, or as SRNN_FAST_BUILD_CUDA says: "auto" (default), "0" (never), "1" (always;
fails loudly without nvcc). SRNN_FAST_CUDA_ARCHS sets the targets (default "9.0;8.0").
"""
import glob
import os
import shutil

from setuptools import setup

ext_modules, cmdclass = [], {}
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
if cpp_sources:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    mode = os.environ.get("SRNN_FAST_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SRNN_FAST_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    build_cuda = bool(cuda_sources) and (mode == "1" or (mode == "auto" and torch.version.cuda and have_nvcc))
    if mode == "1" and not (torch.version.cuda and have_nvcc):
        raise SystemExit("SRNN_FAST_BUILD_CUDA=1 needs a CUDA build of torch and nvcc on the PATH")
    # No FMA contraction: the kernels round like the reference's separate ops.
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
    # -fopenmp in compile and link flags, or at::parallel_for runs on one thread.
    kwargs = dict(extra_link_args=["-fopenmp"], py_limited_api=False)
    if build_cuda:
        archs = os.environ.get("SRNN_FAST_CUDA_ARCHS", "9.0;8.0")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        # torch's nvidia/cu13/include holds headers (cuBLAS, ...) a bare toolkit may lack.
        nvidia_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include"))
        ext = CUDAExtension("srnn_fast._C", cpp_sources + cuda_sources, include_dirs=nvidia_inc,
                            extra_compile_args={"cxx": cxx + ["-DSRNN_FAST_WITH_CUDA"],
                                                "nvcc": ["-O3", "-std=c++17", "-DSRNN_FAST_WITH_CUDA", "-lineinfo"]},
                            **kwargs)
    else:
        ext = CppExtension("srnn_fast._C", cpp_sources, extra_compile_args=cxx, **kwargs)
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
