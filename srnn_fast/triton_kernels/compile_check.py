"""Compiles the Triton kernels for a GPU architecture without needing a GPU (triton ships
its own ptxas), so compile-only errors show up on CPU-only machines too: Triton's
interpreter, which the CPU tests use, accepts some code the compiler rejects.

    TRITON_INTERPRET=0 python -m srnn_fast.triton_kernels.compile_check [--arch 90]

Compiles one specialization per kernel variant that matters (state dtype, low-precision
input, binary/relu, saved or not, both surrogates, one- and multi-word spike rows).
"""
import argparse
import os
import time


def variants():
    """(kernel name, pointer dtypes by argument, state dtype, BLOCK_H, flags) to compile."""
    fwd = [("fp32", "fp32", True, True, 64), ("fp32", "bf16", True, False, 32), ("fp64", "fp64", False, True, 128)]
    for state, x, binary, save, block_h in fwd:
        yield "scan_fwd_kernel", {"x_ptr": x, "bits_ptr": "i32"}, state, block_h, dict(BINARY=binary, SAVE=save)
    bwd = [("fp32", True, 1, 64), ("fp64", True, 0, 32), ("fp64", False, 0, 128)]
    for state, binary, surrogate, block_h in bwd:
        yield "scan_bwd_kernel", {"spk_ptr": "i32" if binary else state}, state, block_h, dict(
            BINARY=binary, SURROGATE=surrogate)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 or 80")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check needs the real compiler: run it with TRITON_INTERPRET=0")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels
    from .ops import COMPILE_OPTIONS, _launch_options

    target = GPUTarget("cuda", args.arch, 32)
    for name, pointers, state, block_h, flags in variants():
        fn = getattr(kernels, name)
        launch = _launch_options(torch.float64 if state == "fp64" else torch.float32, block_h)
        options = {k: launch.pop(k) for k in COMPILE_OPTIONS}
        constexprs = dict(launch, **flags)
        signature = {a: "constexpr" if a in constexprs else
                     "*" + pointers.get(a, state) if a.endswith("_ptr") else "i32" for a in fn.arg_names}
        t0 = time.time()
        triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
        print(f"sm_{args.arch} {name} {state} x{pointers.get('x_ptr', state)} BLOCK_H={block_h} {flags}: "
              f"compiled in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
