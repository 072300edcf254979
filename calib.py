"""Calibration: the input Hessian H = XᵀX / N of every linear, its damping and whitening root.

docs/method.md "Notation": for a linear layer y = x Wᵀ with calibration inputs X (N×n), H = XᵀX / N and a
whitening root R (RᵀR = H) turn the layer-output error of a weight error M into ‖M Rᵀ‖_F (the paper's eq. 6,
derived in App. C.1, eqs. 27–32). In reading order:

    hessian_reference(X)                  H = XᵀX / N of an explicit token matrix: the definition
    damp(H, λ), whitening_root(H)         H + λ·mean(diag H)·I, and R with RᵀR = H
    calibration_windows, window_batches   the calibration tokens
    collect_hessians, block_hessians      the streaming accumulation the pipeline runs, tested equal to
                                          hessian_reference of the captured inputs
    save_hessians, load_hessians, HessianWriter   Hessian files

`collect_hessians` runs a model over calibration batches and accumulates XᵀX in float64 (each batch's
product added to a running sum) from forward pre-hooks on the named linears (nn.Linear, QuantLinear,
WHALinear: anything whose first positional input is the (..., n) activation). No token matrix is kept.
Padded positions (attention_mask == 0) are excluded. Hooks are removed in a `finally` block, so an exception
leaves the model as it was.
Linears fed the very same input tensor (q/k/v, gate/up) share one XᵀX product per batch.

Two input regimes:
  - sequential=False (the paper): all Hessians from the full-precision model in one pass over the data.
  - sequential=True (GPTQ's sequential mode): the target linears are grouped into blocks
    ("...layers.<i>."), and block i is calibrated only after the caller's `on_block(block, hessians)` has
    quantized blocks < i (e.g. replaced their linears by QuantLinear via set_module), so block i sees the
    inputs produced by the already-quantized preceding layers. Each block costs one pass over the data,
    truncated right after the block's last target linear (an exception raised from the hook stops the
    forward), i.e. about L/2 full forwards for L blocks: simple and exact, not the fastest possible.
The memory bound: `offload=True` keeps every Hessian on the CPU (the activations of one batch are copied
there for the product), so an accelerator only holds the model and one batch.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "hessian_reference", "damp", "whitening_root", "calibration_windows", "window_batches",
    "collect_hessians", "block_hessians", "block_of", "save_hessians", "load_hessians", "HessianWriter",
]


# ----------------------------------------------------------------------------------------------------
# The math: the Hessian of a layer's output error, its damping and its whitening root


def hessian_reference(X: torch.Tensor) -> torch.Tensor:
    """H = XᵀX / N (n, n) float64 from the calibration inputs X (..., n) of one linear, every row one token: the
    Hessian of the layer's squared output error, ‖X Mᵀ‖²_F = N·‖M Rᵀ‖²_F with RᵀR = H (eq. 6; App. C.1)."""
    if X.dim() == 0:
        raise ValueError("hessian_reference: X must have a last dimension n (the layer's input width)")
    X = X.reshape(-1, X.shape[-1]).to(torch.float64)                  # (N, n)
    if X.shape[0] == 0:
        raise ValueError("hessian_reference: X has no token rows")
    return X.T @ X / X.shape[0]


def damp(H: torch.Tensor, lam: float) -> torch.Tensor:
    """H + λ·mean(diag H)·I (docs/method.md "Notation"); a zero diagonal (dead layer) is damped with λ·I. Pure."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"damp: H must be square (n, n), got {tuple(H.shape)}")
    if lam < 0:
        raise ValueError(f"damp: lam must be >= 0, got {lam}")
    mu = H.diagonal().mean()
    mu = torch.where(mu > 0, mu, torch.ones_like(mu))
    return H + (lam * mu) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def whitening_root(H: torch.Tensor) -> torch.Tensor:
    """R (n×n) with RᵀR = H: H = U Λ Uᵀ (eigh, float64), eigenvalues clamped at 0, R = Λ^{1/2} Uᵀ. Pure.

    Then ‖X Mᵀ‖²_F = N·‖M Rᵀ‖²_F for any M (m×n): the layer-output error of a weight error M is ‖M Rᵀ‖_F.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"whitening_root: H must be square (n, n), got {tuple(H.shape)}")
    Hd = H.to(torch.float64)
    evals, U = torch.linalg.eigh((Hd + Hd.T) / 2)
    return (evals.clamp_min(0).sqrt()[:, None] * U.T).to(H.dtype)



# ----------------------------------------------------------------------------------------------------
# Calibration tokens


def calibration_windows(token_ids, n_windows: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(n_windows, seq_len) long: random windows of a token stream (the TRAIN split), starts drawn with `generator`."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if n_windows < 1 or seq_len < 1:
        raise ValueError(f"calibration_windows: n_windows and seq_len must be >= 1, got {n_windows}, {seq_len}")
    if ids.numel() < seq_len:
        raise ValueError(f"calibration_windows: the token stream has {ids.numel()} tokens, "
                         f"fewer than seq_len={seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_windows,), generator=generator)
    return ids[starts[:, None] + torch.arange(seq_len)]          # (n_windows, seq_len)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split (W, T) windows into a list of {input_ids, attention_mask} batches for collect_hessians."""
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w)}
        for w in windows.split(batch_size)
    ]



# ----------------------------------------------------------------------------------------------------
# Streaming accumulation: hessian_reference of every named linear's inputs, summed batch by batch from hooks


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early once every hooked layer has seen its input."""


def block_of(name: str) -> str:
    """The block a linear belongs to: 'model.layers.3.mlp.up_proj' -> 'model.layers.3' (else the name itself)."""
    m = re.match(r"^(.*?\.layers\.\d+)\.", name)
    return m.group(1) if m else name


def _default_names(model: nn.Module) -> list[str]:
    """Every nn.Linear-like module except the output head (what GPTQ/QWHA quantize and adapt)."""
    out = []
    for name, mod in model.named_modules():
        if name.endswith("lm_head") or not name:
            continue
        if isinstance(mod, nn.Linear) or type(mod).__name__ in ("QuantLinear", "WHALinear"):
            # a WHALinear's own base is not a separate target
            if not any(name.startswith(p + ".") for p in out):
                out.append(name)
    return out


def _batch_tensors(batch, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"calibration batch has keys {sorted(batch)}; expected 'input_ids' (and 'attention_mask')")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        raise ValueError(f"calibration batch of type {type(batch).__name__}; expected a dict or a LongTensor")
    if ids.dim() == 1:
        ids = ids[None]
        mask = None if mask is None else mask[None]
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    return ids, mask


@torch.no_grad()
def _accumulate(model, batches, names, device, offload, progress, label="", product_dtype=torch.float64,
                run=None):
    """One pass: hooks on `names`, XᵀX accumulated in float64, returns ({name: sum XᵀX}, {name: N}).

    run: call run(batch) for each batch instead of model(input_ids, attention_mask) (e.g. one decoder block on
    its input activations); the pass then goes to the end of each batch's computation (no early stop)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in names}
    state = {"mask": None, "seen": set(), "last": None}
    handles = []

    def make_hook(name):
        def hook(module, args):
            x = args[0]                                            # (B, T, n) or (N, n)
            n = x.shape[-1]
            last = state["last"]
            if last is not None and last[0] is x:                  # q/k/v, gate/up: same input, one XᵀX
                xtx, rows = last[1], last[2]
            else:
                mask = state["mask"]
                xs = x
                if mask is not None and xs.dim() == 3 and mask.shape == xs.shape[:2]:
                    xs = xs[mask.bool()]                           # (N_b, n): non-padded positions only
                xs = xs.reshape(-1, n)
                if offload:
                    xs = xs.to("cpu")
                xs = xs.to(product_dtype)
                xtx, rows = (xs.T @ xs).to(torch.float64), xs.shape[0]   # (n, n) this batch's XᵀX
                state["last"] = (x, xtx, rows)
            if name not in sums:
                sums[name] = torch.zeros(n, n, dtype=torch.float64, device=xtx.device)
            sums[name].add_(xtx)
            counts[name] += rows
            state["seen"].add(name)
            if run is None and len(state["seen"]) == len(names):
                raise _StopForward
        return hook

    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"collect_hessians: no module named {missing[:3]} in the model")
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make_hook(name)))
        t0 = time.time()
        n_batches, total = 0, (len(batches) if hasattr(batches, "__len__") else None)
        for batch in batches:
            if run is None:
                ids, mask = _batch_tensors(batch, device)
            state["mask"], state["seen"], state["last"] = (mask if run is None else None), set(), None
            try:
                model(ids, attention_mask=mask) if run is None else run(batch)
            except _StopForward:
                pass
            finally:
                state["last"] = None
            n_batches += 1
            if progress:
                dt = time.time() - t0
                of = f"/{total} ({dt:.1f}s, ETA {dt / n_batches * (total - n_batches):.0f}s)" if total else \
                    f" ({dt:.1f}s)"
                print(f"\rcalib {label}batch {n_batches}{of}\033[K", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    finally:
        for h in handles:
            h.remove()
    return sums, counts


def collect_hessians(
    model: nn.Module,
    batches: Iterable,
    names: list[str] | None = None,
    *,
    device: torch.device | str | None = None,
    offload: bool = False,
    sequential: bool = False,
    on_block: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
    product_dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """H = XᵀX / N (n×n, float64) of the input of every named linear over the calibration batches.

    batches: dicts {input_ids (B,T) long, attention_mask (B,T) optional} (or bare id tensors); padded
    positions are excluded. names: target module names (default: every linear but lm_head). device: where
    the batches go (default: the model's first parameter's device). offload: keep the Hessians on the CPU.
    sequential: GPTQ's sequential mode (module docstring); needs a re-iterable `batches` (a list) and calls
    `on_block(block_name, {name: H})` after each block so the caller can quantize it before the next block.
    Without `sequential`, `on_block` (if given) is called once per block at the end, in order.
    product_dtype: dtype of each batch's XᵀX product (the running sum is always float64); float32 halves the
    CPU cost at a relative error of about √(tokens per batch)·6e-8 per batch.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    names = list(names) if names is not None else _default_names(model)
    if not names:
        raise ValueError("collect_hessians: no target linears (names is empty and the model has no nn.Linear)")
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)

    def finish(sums, counts):
        out = {}
        for name in sums:
            if counts[name] == 0:
                raise ValueError(f"collect_hessians: layer {name} saw no unmasked token")
            out[name] = sums[name].div_(counts[name])
        never = [name for name in counts if name not in sums]
        if never:
            raise ValueError(f"collect_hessians: layers {never[:3]} were never called by the model's forward")
        return out

    if not sequential:
        hessians = finish(*_accumulate(model, batches, names, device, offload, progress, "", product_dtype))
        if on_block is not None:
            for block, members in blocks.items():
                on_block(block, {name: hessians[name] for name in members})
        return hessians

    if iter(batches) is batches:
        raise ValueError("collect_hessians(sequential=True) needs a re-iterable `batches` (a list), not an iterator")
    hessians = {}
    for i, (block, members) in enumerate(blocks.items()):
        h_block = finish(*_accumulate(model, batches, members, device, offload, progress,
                                          f"{i + 1}/{len(blocks)} ", product_dtype))
        hessians.update(h_block)
        if on_block is not None:
            on_block(block, h_block)
    return hessians


def block_hessians(block: nn.Module, batches: Iterable, run: Callable, names: list[str],
                   shared: Mapping[str, str] | None = None, product_dtype: torch.dtype = torch.float32,
                   ) -> dict[str, torch.Tensor]:
    """H = XᵀX / N (float64) of the named linears of one decoder block, over `run(batch)` for every batch.

    names are relative to `block` ("self_attn.q_proj"); run(batch) runs the block on one batch of its input
    activations. shared {name: other}: linears that read the very same input as `other` (k/v as q, up as gate)
    are not hooked and get `other`'s Hessian, the same tensor object: one n×n matrix per distinct input.
    """
    shared = dict(shared or {})
    hooked = [n for n in names if n not in shared]
    sums, counts = _accumulate(block, batches, hooked, None, False, False, run=run, product_dtype=product_dtype)
    out = {}
    for name in hooked:
        if name not in sums or counts[name] == 0:
            raise ValueError(f"block_hessians: layer {name} saw no input")
        out[name] = sums[name].div_(counts[name])
    for name, other in shared.items():
        if name in names:
            out[name] = out[other]
    return {n: out[n] for n in names}



# ----------------------------------------------------------------------------------------------------
# Files


class HessianWriter:
    """Writes Hessians to one safetensors file as they are computed, block after block, so that no more than one
    block's Hessians are ever held: the header (every name, shape and offset) is known up front, the data follows
    in the announced order, and the file appears under its name only when complete (a temporary name before).

    entries: [(name, n)] of the distinct Hessians in write order; aliases {name: stored name} (k/v -> q, ...)
    are kept in the metadata and expanded by load_hessians."""

    def __init__(self, path: str | Path, entries: list[tuple[str, int]], aliases: Mapping[str, str] | None = None,
                 metadata: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header, offset = {}, 0
        for name, n in entries:
            header[name] = {"dtype": "F64", "shape": [n, n], "data_offsets": [offset, offset + 8 * n * n]}
            offset += 8 * n * n
        header["__metadata__"] = {"qwha": json.dumps(metadata or {}), "aliases": json.dumps(dict(aliases or {}))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                                  # data aligned to 8 bytes
        self.order = [name for name, _ in entries]
        self.shapes = dict(entries)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.next = 0

    def write(self, name: str, H: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise ValueError(f"HessianWriter: got {name}, expected {self.order[self.next:self.next + 1]}")
        n = self.shapes[name]
        if tuple(H.shape) != (n, n):
            raise ValueError(f"HessianWriter: {name} has shape {tuple(H.shape)}, expected ({n}, {n})")
        self.f.write(H.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        """Publish the file (all entries written) under its name; else remove the temporary file and raise."""
        self.f.close()
        if self.next != len(self.order):
            self.abort()
            raise ValueError(f"HessianWriter: {self.next} of {len(self.order)} Hessians written; {self.path} not made")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)



def save_hessians(path: str | Path, hessians: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Hessians to one safetensors file, keyed by module name; `metadata` (JSON-able) kept under 'qwha'."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in hessians.items()}, str(path),
              metadata={"qwha": json.dumps(metadata or {})})


def load_hessians(path: str | Path, names: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of save_hessians (and of HessianWriter): ({name: H}, metadata); only `names` if given. Names
    stored once for a shared input come back as one tensor object."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Hessian file {path} not found (make it with calib.save_hessians)")
    from checks import safetensors_header
    safetensors_header(path)            # ValueError naming the file if it is not a whole safetensors file
    out = {}
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        meta = json.loads(raw.get("qwha", "{}"))
        aliases = json.loads(raw.get("aliases", "{}"))
        keys = list(f.keys()) + [a for a in aliases if a not in f.keys()]
        for k in keys if names is None else names:
            src = aliases.get(k, k)
            if src not in out:
                if src not in f.keys():
                    raise ValueError(f"Hessian file {path} has no Hessian for {k}")
                out[src] = f.get_tensor(src)
            out[k] = out[src]
    wanted = keys if names is None else list(names)
    return {k: out[k] for k in wanted}, meta
