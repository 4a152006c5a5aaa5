"""The build (setup.py, MANIFEST.in): what a user sees when torch is missing from the build
environment, the line saying what is compiled, and what the sdist carries."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_no_torch_env(tmp_path):
    """An environment in which `import torch` fails, as in pip's isolated build."""
    (tmp_path / "torch.py").write_text("raise ImportError('no torch in this environment')\n")
    return dict(os.environ, PYTHONPATH=str(tmp_path))


def test_build_without_torch_says_what_to_run(tmp_path):
    """pip's default isolated build has no torch: compiling stops with one clear message,
    not a traceback."""
    p = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b"),
                        "--build-lib", str(tmp_path / "b")], cwd=ROOT, env=fake_no_torch_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    assert "pip install -e . --no-build-isolation" in p.stderr and "Install torch first" in p.stderr, p.stderr
    assert not list((tmp_path / "b").rglob("*.so"))


def test_metadata_needs_no_torch(tmp_path):
    """Packaging and describing the sources (sdist, egg_info, --name) must work without
    torch: `python -m build --sdist` runs setup.py in an isolated environment."""
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=fake_no_torch_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "srnn_fast"
    # egg_info: what pip and build run first, and what lists the sdist's files.
    p = subprocess.run([sys.executable, "setup.py", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT,
                       env=fake_no_torch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    sources = (tmp_path / "srnn_fast.egg-info" / "SOURCES.txt").read_text().split()
    assert "csrc/scan_cuda.cu" in sources and "csrc/cpu_isa.h" in sources, sources


def test_the_build_says_what_it_compiles(tmp_path):
    """One line before compiling: the CPU builds and whether CUDA kernels are compiled, and
    why not. CC/CXX=false make the compile itself fail at once, after the line."""
    import platform

    import torch

    env = dict(os.environ, CC="false", CXX="false", SRNN_FAST_BUILD_CUDA="0")
    p = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b"),
                        "--build-lib", str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0, "the compile with CC=false succeeded?"
    lines = [line for line in p.stdout.splitlines() if line.startswith("srnn_fast: building")]
    assert len(lines) == 1, p.stdout + p.stderr
    isas = "avx512, avx2, default (x86-64)" if platform.machine() in ("x86_64", "AMD64") else "default ("
    assert lines[0].startswith(f"srnn_fast: building the CPU kernels for {isas}"), lines[0]
    sim = "yes" if platform.system() == "Linux" else f"no ({platform.system()}: needs Linux)"
    assert lines[0].endswith(f"; CUDA kernels: no (SRNN_FAST_BUILD_CUDA=0); CUDA harness (cuda_sim): {sim}; "
                             f"torch {torch.__version__}"), lines[0]
    if torch.version.cuda is None:  # "auto" on a CPU torch says why there are no CUDA kernels
        env["SRNN_FAST_BUILD_CUDA"] = "auto"
        p = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "b"),
                            "--build-lib", str(tmp_path / "b")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert "; CUDA kernels: no (torch has no CUDA); " in p.stdout, p.stdout + p.stderr


# origin: the package's __init__.py; a setup.py build/ folder in the working directory is found
# as a namespace package (origin None), which is not pypa's build.
@pytest.mark.skipif(getattr(importlib.util.find_spec("build"), "origin", None) is None,
                    reason="needs the 'build' package (pip install build; it is in the test extra)")
def test_sdist_carries_what_a_build_needs(tmp_path):
    """The sdist holds every source the compile reads (headers and the CUDA source too, built
    or not here), the packages with their subpackages, README and the build files; and no
    results, tests, benchmarks, CI files or built objects."""
    # A copy of the tree with its junk (built extension, results, caches) but without
    # srnn_fast.egg-info, whose SOURCES.txt setuptools would re-read: a stale one could put
    # a file into the sdist that MANIFEST.in does not name, and hide its absence here.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", ".venv*", ".ci-venv*", "build",
                                                             "dist", ".pytest_cache"))
    p = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)],
                       cwd=src, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (sdist,) = tmp_path.glob("srnn_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        # "srnn_fast-0.1.0/csrc/x.h" -> "csrc/x.h"
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{sdist.name.removesuffix('.tar.gz')}/PKG-INFO").read().decode()
    assert "\nLicense-Expression: MIT\n" in pkg_info and "\nLicense-File: LICENSE\n" in pkg_info, pkg_info
    wanted = ["README.md", "pyproject.toml", "setup.py", "MANIFEST.in"]
    for pattern in ("csrc/*.cpp", "csrc/*.h", "csrc/*.cu", "csrc/*.cuh", "csrc/sim/*", "srnn_fast/**/*.py", "LICENSE"):
        wanted += [os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    assert "LICENSE" in wanted and "srnn_fast/train/loop.py" in wanted and "csrc/sim/harness.cpp" in wanted
    assert any(w.endswith(".cu") for w in wanted) and any(w.endswith(".h") for w in wanted)
    missing = sorted(set(wanted) - names)
    assert not missing, f"missing from the sdist: {missing}"
    unwanted = sorted(n for n in names if re.match(r"(results|tests|bench|\.ci|build|runs)(/|$)", n)
                      or re.search(r"\.(so|pyd|o|pyc|png|pt)$|__pycache__", n))
    assert not unwanted, f"in the sdist but not needed: {unwanted}"
