"""Build and call the optional fused CUDA WHT kernel (kernels/wht_cuda.cu) with torch.utils.cpp_extension.

`load()` returns `fn(x2d, core, inverse) -> y | None`, or None where there is no CUDA device; it raises (and wht.py
warns once and keeps its pure-torch path) when the build is impossible: a CPU-only torch, no CUDA toolkit (nvcc),
or a compiler error. The build is cached per user in $QWHA_KERNEL_CACHE, else ~/.cache/qwha/, one folder per torch
and CUDA version, so only the first use compiles (about a minute). wht.py calls it for CUDA inputs unless
QWHA_DISABLE_CUDA_WHT=1. `fn` returns None for a width the kernel does not take (P = n/K > 32768, or a row that
does not fit in one block's shared memory: n > about 58,000 on an H100), and wht.py then uses the torch path.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().with_name("wht_cuda.cu")
MAX_P = 16 * 32 * 64   # R·L·2^kMaxLogP2 in wht_cuda.cu
TILE_A = 8             # kTileA in wht_cuda.cu


def shared_bytes(n: int, K: int) -> int:
    """Dynamic shared memory of one block (shmem_bytes in wht_cuda.cu): the row in fp32, and the core table."""
    Kp = -(-K // TILE_A) * TILE_A
    return 4 * (n + (K * Kp if K > 1 else 0))


def cache_dir() -> Path:
    root = Path(os.environ.get("QWHA_KERNEL_CACHE") or Path.home() / ".cache" / "qwha")
    tag = f"wht_cuda-torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda}"
    return root / tag


def build():
    """Compile (or load the cached build of) the extension module; raises RuntimeError saying why it cannot."""
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build: it cannot build CUDA extensions")
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (nvcc; set CUDA_HOME)")
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name="qwha_wht_cuda", sources=[str(SOURCE)], build_directory=str(path),
                                  extra_cuda_cflags=["-O3", "-lineinfo"], verbose=False)
    except Exception as e:  # the compiler's log is in the exception; keep its tail
        raise RuntimeError(f"building {SOURCE.name} in {path} failed: {str(e)[-2000:]}") from e


def load():
    """The kernel's entry point for wht.py, or None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    mod = build()
    cores: dict = {}
    smem_limit: dict = {}

    def fn(x2d: torch.Tensor, core: torch.Tensor, inverse: bool):
        """x2d (rows, n) contiguous CUDA fp32/fp16/bf16; core the (K, K) ±1 matrix H_K (any device/dtype)."""
        K = core.shape[0]
        n = x2d.shape[1]
        if n // K > MAX_P:
            return None
        dev = x2d.device
        if dev not in smem_limit:
            props = torch.cuda.get_device_properties(dev)
            smem_limit[dev] = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        if shared_bytes(n, K) > smem_limit[dev]:
            return None
        key = (K, x2d.device)
        if key not in cores:
            cores[key] = core.to(device=x2d.device, dtype=torch.int8).contiguous()
        return mod.wht_forward(x2d, cores[key], n // K, bool(inverse))

    return fn
