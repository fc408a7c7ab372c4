"""moelocal's compiled CPU kernels (csrc/cpu_kernels.cpp): built on first use, cached, optional.

The extension is compiled once by torch.utils.cpp_extension into torch's extensions directory
($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), under a name that holds the torch
version and a hash of torch's location, the compiler, Python and the source, so a new torch,
compiler or kernel source builds anew and never loads a stale binary. The instruction set path
is chosen at run time (AVX-512 VNNI, AVX2, portable C++); MOELOCAL_CPU_KERNEL=avx512|avx2|
portable|torch forces one (tests force AVX2 on an AVX-512 machine). Without a compiler, or if
the build fails, `path()` is "torch" and quant.py multiplies with torch ops over the same
layout: slower, never wrong. This module knows nothing of formats beyond handing bytes over.
"""

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
NAME = "moelocal_cpu_kernels"  # the module, and its file in the build directory: NAME.so
PATHS = {"avx512": 2, "avx2": 1, "portable": 0}


def compiler() -> str | None:
    """The C++ compiler torch will use, with its version, or None without one."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return None
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def build_dir(cxx: str) -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    # torch's location too: its include paths are in the build file, so one build per install
    where_torch = Path(torch.__file__).parent
    key = hashlib.sha256(f"{torch.__version__}|{where_torch}|{cxx}|{sys.version}".encode())
    key.update(SOURCE.read_bytes())
    name = f"moelocal-torch{torch.__version__}-{key.hexdigest()[:12]}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def import_built(path: Path):
    """The built module, imported directly: torch's loader would first run ninja and a compiler
    check in child processes (~0.1 s, and their memory, which under a tight cap was the one
    allocation too many)."""
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def build_lock(where: Path):
    """Held while the extension is loaded or built. torch's own lock is a file that a process
    killed while holding it (by the OOM killer, kill -9) leaves behind, and every later load then
    waits for it forever. This flock is released by the kernel when its holder dies, and whoever
    holds it knows that a torch lock file still there is such a leftover, and removes it."""
    fd = os.open(where / "moelocal.flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        (where / "lock").unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


_extension_lock = threading.Lock()


def extension():
    """The compiled module, or None where it cannot be built (said once, on stderr). Safe to
    call from several threads at once: a GPU's I/O threads quantizing at load each ask for it
    first, and a second build beside the first failed on the source's copy."""
    with _extension_lock:
        return _extension()


@functools.cache
def _extension():
    if os.environ.get("MOELOCAL_CPU_KERNEL") == "torch":
        return None
    cxx = compiler()
    if cxx is None:
        print("moelocal: no C++ compiler found; using the slower torch kernels", file=sys.stderr)
        return None
    from torch.utils import cpp_extension

    where = build_dir(cxx)
    # at::parallel_for runs its threads only where the code is compiled with OpenMP; the
    # extension then binds to the libgomp.so.1 torch has loaded: one thread pool, not two
    openmp = ["-fopenmp"] if sys.platform == "linux" else []
    try:  # a build directory that cannot be written falls back too
        where.mkdir(parents=True, exist_ok=True)
        # compiled from a copy inside the build directory (named by its content): ninja's record
        # of the source path then stays the same for every checkout and install of this source
        source = where / SOURCE.name
        if not source.is_file():
            tmp = where / f".{SOURCE.name}.{os.getpid()}"
            tmp.write_bytes(SOURCE.read_bytes())
            tmp.replace(source)
        with build_lock(where):
            built = where / f"{NAME}.so"
            if built.is_file():  # the directory's name says it is this source's build
                try:
                    return import_built(built)
                except ImportError:  # a link cut short: built again below
                    built.unlink()
            print("moelocal: compiling the CPU kernels (once for this torch and compiler, ~30 s)",
                  file=sys.stderr)  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cpp_extension.load(
                    name=NAME, sources=[str(source)], build_directory=str(where),
                    extra_cflags=["-O3", "-ffp-contract=off", *openmp], extra_ldflags=openmp,
                    verbose=False,
                )  # fmt: skip
    except Exception as e:  # a broken toolchain must not stop the engine
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moelocal: building the CPU kernels failed ({first}); using the slower torch "
              f"kernels (MOELOCAL_DEBUG=1 for the log)", file=sys.stderr)  # fmt: skip
        if os.environ.get("MOELOCAL_DEBUG"):
            print(e, file=sys.stderr)
        return None


@functools.cache
def isa() -> int | None:
    """The kernels' instruction set path number, or None for the torch fallback."""
    ext = extension()
    if ext is None:
        return None
    forced = os.environ.get("MOELOCAL_CPU_KERNEL")
    if forced:
        from .errors import MoelocalError

        if forced not in PATHS:
            raise MoelocalError(
                f"MOELOCAL_CPU_KERNEL={forced}: choose one of {', '.join([*PATHS, 'torch'])}"
            )
        if PATHS[forced] > ext.best_isa():
            raise MoelocalError(f"MOELOCAL_CPU_KERNEL={forced}: this CPU cannot run it")
        return PATHS[forced]
    return ext.best_isa()


def path() -> str:
    """The kernel path in use: avx512, avx2, portable or torch."""
    n = isa()
    return "torch" if n is None else next(name for name, v in PATHS.items() if v == n)


def set_threads(threads: int | None):
    """Threads for torch and the kernels (one pool): `threads`, else the physical cores."""
    import psutil

    from .errors import MoelocalError

    most = 4 * (os.cpu_count() or 1)  # beyond that, only more threads to start, none faster
    if threads is not None and not 1 <= threads <= most:
        raise MoelocalError(f"--threads {threads}: from 1 to {most} ({os.cpu_count()} CPUs here)")
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def gemv(x: torch.Tensor, w: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) in x's dtype, W a q8/q4 stream (quant.py). Needs `isa()`."""
    return extension().gemv(x.contiguous(), w, bits, N, isa())


def swiglu(x, gate_up, down, bits: int, I: int, weight: torch.Tensor | None) -> torch.Tensor:  # noqa: E741
    """down(silu(gate) * up) [* weight (M, 1)] for x (M, D), in x's dtype: one SwiGLU expert
    whose gate_up (2I, D) and down (D, I) are q8/q4 streams. Needs `isa()`."""
    return extension().swiglu(x.contiguous(), gate_up, down, bits, I, weight, isa())


def attention(
    q, k, v, scale: float, window: int | None, sinks: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of q (B, H, T, dk), the last T of the S positions of k (B, KV, S, dk) and
    v (B, KV, S, dv), causal and within `window`: each query row's sums in one order of its own
    (see csrc). Needs `isa()`."""
    return extension().attention(q, k, v, scale, window or 0, sinks, isa())


def linear_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T in float32, each row's sums in an order of its own. Needs `isa()`."""
    return extension().linear_rows(x, w, isa())
