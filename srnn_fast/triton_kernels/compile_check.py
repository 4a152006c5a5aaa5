"""Compiles every Triton kernel variant the launchers can run, for each GPU architecture,
without a GPU (triton ships its own ptxas), and checks what each needs: shared memory within
the architecture's per-block opt-in limit, and no register spills. Triton itself checks shared
memory only at launch, and the interpreter the CPU tests use ignores both.

    TRITON_INTERPRET=0 python -m srnn_fast.triton_kernels.compile_check [--arch 90 --arch 80]
        [--quick]

Prints one table row per variant (the table of bench/journal.md) and exits non-zero on a
violation. Variants: state dtype x x_proj dtype (forward) x every BLOCK_H up to the dtype's
H limit (ops.MAX_H) x spiking/relu x saved or not (forward) x surrogate (backward, spiking
only: relu ignores it), each with the launcher's options and 16-byte aligned pointers (as
torch allocates them). --quick compiles one variant per kernel and dtype, the heaviest at
the largest BLOCK_H (for the tests; CI runs them all).

Shared memory is Triton's (dynamic) plus any static shared memory in the cubin beyond sm_90's
1 KB reservation (cuda_resources.RESERVED_SHARED); spill is the cubin's stack frame per
thread (ptxas puts spilled registers there; Triton's runtime n_spills is this / 4).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Iterator, NamedTuple

from ..cuda_resources import SMEM_OPTIN_LIMIT, resource_usage

DTYPE_NAMES = {"fp32": "float32", "fp64": "float64"}


class Variant(NamedTuple):
    kernel: str  # "scan_fwd_kernel" or "scan_bwd_kernel"
    state: str  # "fp32" or "fp64"
    x: str  # x_proj's dtype (forward); the state dtype for backward
    block_h: int
    flags: tuple  # ((name, value), ...) of the constexpr flags

    def label(self) -> str:
        flags = " ".join(f"{k}={int(v)}" for k, v in self.flags)
        return f"{self.kernel[5:8]} {self.state} x{self.x} BLOCK_H={self.block_h} {flags}"


class Result(NamedTuple):
    variant: Variant
    arch: int
    num_warps: int
    num_stages: int
    shared: int  # bytes per block counted against the opt-in limit
    regs: int
    spill: int  # bytes of stack and local memory per thread
    seconds: float

    @property
    def limit(self) -> int:
        return SMEM_OPTIN_LIMIT[self.arch]

    def problems(self) -> list:
        out = []
        if self.shared > self.limit:
            out.append(f"shared memory {self.shared} > {self.limit}")
        if self.spill:
            out.append(f"{self.spill} bytes of register spills")
        return out


def variants(quick: bool = False) -> Iterator[Variant]:
    import torch

    from . import ops

    for state, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        sizes = ops.block_sizes(dtype)
        if quick:  # spiking with saved bits / the multi-Gaussian surrogate: the most registers
            yield Variant("scan_fwd_kernel", state, state, sizes[-1], (("BINARY", True), ("SAVE", True)))
            yield Variant("scan_bwd_kernel", state, state, sizes[-1], (("BINARY", True), ("SURROGATE", 1)))
            continue
        for block_h in sizes:
            for x in ("fp32", "fp16", "bf16") if state == "fp32" else ("fp64",):
                for binary in (True, False):
                    for save in (True, False):
                        yield Variant("scan_fwd_kernel", state, x, block_h, (("BINARY", binary), ("SAVE", save)))
            for binary, surrogate in ((True, 0), (True, 1), (False, 0)):
                yield Variant("scan_bwd_kernel", state, state, block_h, (("BINARY", binary), ("SURROGATE", surrogate)))


def compile_variant(v: Variant, arch: int):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels
    from .ops import COMPILE_OPTIONS, _launch_options

    fn = getattr(kernels, v.kernel)
    launch = _launch_options(v.kernel, getattr(torch, DTYPE_NAMES[v.state]), v.block_h)
    options = {k: launch.pop(k) for k in COMPILE_OPTIONS}
    constexprs = dict(launch, **dict(v.flags))
    binary = dict(v.flags)["BINARY"]
    pointers = {"x_ptr": v.x, "bits_ptr": "i32", "spk_ptr": "i32" if binary else v.state}
    signature = {a: "constexpr" if a in constexprs else
                 "*" + pointers.get(a, v.state) if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a.endswith("_ptr")}
    return triton.compile(ASTSource(fn, signature, constexprs, aligned), target=GPUTarget("cuda", arch, 32),
                          options=options)


def measure(v: Variant, arch: int) -> Result:
    t0 = time.time()
    compiled = compile_variant(v, arch)
    seconds = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        (usage,) = resource_usage(path)
    usage = usage._replace(arch=arch)  # a lone cubin's dump names no architecture
    md = compiled.metadata
    return Result(v, arch, md.num_warps, md.num_stages, md.shared + usage.user_shared, usage.regs,
                  usage.stack + usage.local, seconds)


HEADER = ("| arch | kernel | state | x_proj | BLOCK_H | flags | warps | stages | shared (B) | limit (B) | regs "
          "| spill (B) | ok |\n| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")


def row(r: Result) -> str:
    v = r.variant
    flags = " ".join(f"{k}={int(val)}" for k, val in v.flags)
    status = "; ".join(r.problems()) or "ok"
    return (f"| sm_{r.arch} | {v.kernel[5:8]} | {v.state} | {v.x} | {v.block_h} | {flags} | {r.num_warps} | "
            f"{r.num_stages} | {r.shared} | {r.limit} | {r.regs} | {r.spill} | {status} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_OPTIN_LIMIT),
                        help="compute capability, repeatable (default: 90 and 80)")
    parser.add_argument("--quick", action="store_true", help="only the heaviest variant per kernel and dtype")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check needs the real compiler: run it with TRITON_INTERPRET=0")
    import triton

    print(f"triton {triton.__version__}; shared: bytes per block against the opt-in limit; spill: bytes per thread")
    print(HEADER, flush=True)
    failures = []
    t0 = time.time()
    for arch in args.arch or (90, 80):
        for v in variants(args.quick):
            r = measure(v, arch)
            print(row(r), flush=True)
            failures += [f"sm_{arch} {v.label()}: {p}" for p in r.problems()]
    print(f"{len(failures)} violations; compiled in {time.time() - t0:.0f} s")
    if failures:
        raise SystemExit("\n".join(["resource limits exceeded:"] + failures))


if __name__ == "__main__":
    main()
