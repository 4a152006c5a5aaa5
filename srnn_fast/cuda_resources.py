"""Resources of the compiled CUDA kernels, checked without a GPU.

    python -m srnn_fast.cuda_resources [--library PATH]

Reads registers, stack (register spills) and static shared memory of every kernel in the
built extension (srnn_fast._C, each architecture of its fat binary) with `cuobjdump
--dump-resource-usage`, and asks the extension's own launch planner (the op
srnn_fast::cuda_launch_plan, the code csrc/scan_cuda.cu dispatches with) what a persistent
kernel gets for every H it can be sent, at that architecture's per-block opt-in shared memory
limit. Prints a table and exits non-zero when a kernel spills registers, or a persistent
launch would need more shared memory than the limit, more than 1024 threads or more
registers than a block may have.

cuobjdump comes with the CUDA toolkit; triton's NVIDIA backend ships one too, used where the
toolkit's is not on the PATH. triton_kernels/compile_check.py reads Triton's cubins with the
same parser.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from typing import List, NamedTuple

# cudaDevAttrMaxSharedMemoryPerBlockOptin by compute capability (H100/H200; A100): the most
# static plus dynamic shared memory one block may have.
SMEM_OPTIN_LIMIT = {90: 232448, 80: 166912}
# Static shared memory every sm_90 cubin shows even without any __shared__ variable (ptxas
# makes the driver's 1 KB per-block reservation explicit there; sm_80 cubins do not). It lies
# outside the opt-in limit: per SM, 233472 = 232448 + 1024. Counting it would be 1 KB
# conservative, so the checks subtract it.
RESERVED_SHARED = {90: 1024, 80: 0}
# Multiprocessors to plan with (H100/H200 SXM; A100): rows per block depend on them.
SM_COUNTS = {90: 132, 80: 108}
REGISTERS_PER_BLOCK = 65536
MAX_THREADS_PER_BLOCK = 1024


class Usage(NamedTuple):
    arch: int  # compute capability of the cubin, e.g. 90; 0 when the dump names none
    function: str  # as the ELF names it (mangled for C++)
    regs: int
    stack: int  # bytes of stack frame per thread: where registers spill
    shared: int  # static shared memory, bytes
    local: int  # other local memory per thread, bytes

    @property
    def user_shared(self) -> int:
        """Static shared memory counted against the opt-in limit."""
        return max(0, self.shared - RESERVED_SHARED.get(self.arch, 0))


def cuobjdump() -> str:
    """Path of a cuobjdump: the CUDA toolkit's, else the one bundled with triton."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError, RuntimeError) as e:
        raise SystemExit(f"cuobjdump not found: put the CUDA toolkit's bin on the PATH or install triton "
                         f"(pip install triton) ({e})")


def parse_resource_usage(text: str) -> List[Usage]:
    """Parses `cuobjdump --dump-resource-usage` output (of a fat binary or a single cubin)."""
    out, arch, function = [], 0, None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"Function (\S+):$", line):
            function = m.group(1)
        elif function is not None and line.startswith("REG:"):
            f = dict(re.findall(r"(\w+):(\d+)", line))
            out.append(Usage(arch, function, int(f["REG"]), int(f["STACK"]), int(f["SHARED"]), int(f["LOCAL"])))
            function = None
    return out


def resource_usage(path: str) -> List[Usage]:
    """Resource usage of every kernel in a cubin, or in the fat binary of a shared library."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cuobjdump failed on {path}: {out.stderr.strip()}")
    usages = parse_resource_usage(out.stdout)
    if not usages:
        raise SystemExit(f"cuobjdump found no kernels in {path}")
    return usages


def short_names(functions: List[str]) -> List[str]:
    """`fwd_persistent_kernel<float, c10::Half>` for each mangled name (c++filt where
    installed, else the mangled name)."""
    tool = shutil.which("c++filt")
    lines = subprocess.run([tool], input="\n".join(functions), capture_output=True,
                           text=True).stdout.splitlines() if tool else []
    if len(lines) != len(functions):
        return list(functions)
    return [m.group(1) if (m := re.search(r"(\w+<[^()]*>)\(", d)) else d for d in lines]


def persistent_kind(function: str):
    """("forward" | "backward", double precision?) of a persistent kernel, else None."""
    m = re.search(r"(fwd|bwd)_persistent_kernelI([fd])", function)  # first template argument: T
    return (("forward" if m.group(1) == "fwd" else "backward"), m.group(2) == "d") if m else None


def launch_plan(B: int, H: int, double: bool, forward: bool, max_smem: int, sms: int):
    """(rows, threads, dynamic shared bytes) per block the CUDA launcher uses; rows 0 means
    the stepwise path. Needs srnn_fast._C built with the CUDA kernels (no GPU)."""
    import torch

    return tuple(torch.ops.srnn_fast.cuda_launch_plan(B, H, double, forward, max_smem, sms))


class Persistent(NamedTuple):
    max_h: int  # largest H the launcher sends to this kernel
    max_shared: int  # most static + dynamic shared memory over all planned launches, bytes
    problems: list


def check_persistent(u: Usage, forward: bool, double: bool, batch_sizes=(1, 5, 200, 1000, 100000),
                     h_range=range(1, MAX_THREADS_PER_BLOCK + 1)) -> Persistent:
    """Every (B, H) the launcher would plan as persistent on u.arch: shared memory within
    the limit (the host subtracts the kernel's static shared memory first, as here), threads
    and registers within a block's."""
    limit = SMEM_OPTIN_LIMIT[u.arch]
    max_h, max_shared, problems = 0, 0, []
    for H in h_range:
        for B in batch_sizes:
            rows, threads, smem = launch_plan(B, H, double, forward, limit - u.user_shared, SM_COUNTS[u.arch])
            if rows == 0:
                continue
            max_h, max_shared = max(max_h, H), max(max_shared, u.user_shared + smem)
            if u.user_shared + smem > limit:
                problems.append(f"B = {B}, H = {H}: {rows} rows need {u.user_shared} + {smem} bytes of shared "
                                f"memory > {limit}")
            if threads > MAX_THREADS_PER_BLOCK or threads * u.regs > REGISTERS_PER_BLOCK:
                problems.append(f"B = {B}, H = {H}: {threads} threads x {u.regs} registers do not fit a block")
            if problems:
                return Persistent(max_h, max_shared, problems)
    return Persistent(max_h, max_shared, problems)


HEADER = ("| arch | kernel | regs | spill (B) | static shared (B) | persistent up to H | max shared (B) | limit (B) "
          "| ok |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", help="the built extension (default: srnn_fast._C's file)")
    args = parser.parse_args(argv)
    import srnn_fast._C as ext  # also registers srnn_fast::cuda_launch_plan

    path = args.library or ext.__file__
    usages = sorted(resource_usage(path), key=lambda u: (-u.arch, u.function))
    print(f"{path}; spill = stack + local bytes per thread; static shared counted against the limit "
          f"(sm_90 cubins' 1 KB reservation left out)")
    print(HEADER)
    failures = []
    for u, name in zip(usages, short_names([u.function for u in usages])):
        problems = [f"{u.stack + u.local} bytes of register spills"] if u.stack or u.local else []
        kind, cells = persistent_kind(u.function), "| - | - | -"
        if kind is not None and u.arch in SMEM_OPTIN_LIMIT:
            p = check_persistent(u, kind[0] == "forward", kind[1])
            problems += p.problems
            cells = f"| {p.max_h} | {p.max_shared} | {SMEM_OPTIN_LIMIT[u.arch]}"
        print(f"| sm_{u.arch} | {name} | {u.regs} | {u.stack + u.local} | {u.user_shared} {cells} | "
              f"{'; '.join(problems) or 'ok'} |")
        failures += [f"sm_{u.arch} {name}: {p}" for p in problems]
    print(f"{len(failures)} violations")
    if failures:
        raise SystemExit("\n".join(["CUDA kernel resource limits exceeded:"] + failures))


if __name__ == "__main__":
    main()
