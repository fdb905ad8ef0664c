"""Map-sized buffers kept from one step to the next, so that UNETR's 96³ decoder maps do not cost page faults.

A CPU tensor of more than a few MiB comes from ``mmap`` and goes back to the system when freed, so every fresh
96³ map is zero-filled page by page by the kernel on its first write: ~20 ms per 16-channel 96³ map (56 MiB) on
one core, against ~4 ms to rewrite a buffer already resident, and a UNETR training step makes about thirty such
maps. ``MapPool`` keeps the decoder's maps once they are free and hands them out again: a buffer is free when
nothing but the pool holds its storage (no tensor, view, autograd-saved tensor or user reference), which the
storage's reference count tells, so a map still in use (an output the caller kept, a graph not yet
back-propagated) is never handed out twice. The pool holds at most as many maps of a shape as were alive at once,
and the buffers come back whole (the caller overwrites or zeroes them).
"""

from __future__ import annotations

import threading

import torch

_MIN_BYTES = 1 << 22  # below 4 MiB the heap recycles memory itself; the pool only pays for maps from mmap
_MAX_PER_KEY = 16  # bounds the pool if a caller keeps every output (then each request allocates anyway)

_Key = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]


_COUNTS_USERS = hasattr(torch._C, "_storage_Use_Count")  # private API: without it, no pooling (plain allocations)


def _storage_users(t: torch.Tensor) -> int:
    """References to ``t``'s storage other than ``t`` itself (views, aliases, autograd's saved copies)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 2  # ``t`` and the temporary storage object


class MapPool:
    """A free list of large CPU tensors per shape, stride and dtype (see the module docstring)."""

    def __init__(self) -> None:
        self._buffers: dict[_Key, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...] | torch.Size, like: torch.Tensor,
              memory_format: torch.memory_format = torch.channels_last_3d) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device in ``memory_format``: a free pooled
        buffer where one fits, else a new one (kept for later when large)."""
        if not _COUNTS_USERS or like.device.type != "cpu" or memory_format not in (torch.channels_last_3d, torch.contiguous_format) or (
            len(shape) != 5 and memory_format == torch.channels_last_3d
        ):
            return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
        numel = 1
        for s in shape:
            numel *= s
        if numel * like.element_size() < _MIN_BYTES:
            return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
        stride = _strides(shape, memory_format)
        key = (tuple(shape), stride, like.dtype, like.device)
        with self._lock:
            buffers = self._buffers.setdefault(key, [])
            for buffer in buffers:
                if _storage_users(buffer) == 0:
                    return buffer.detach()  # an alias: autograd history attaches to it, not to the pool's tensor
            with torch.inference_mode(False):  # a normal tensor: autograd may save it in a later training step
                buffer = torch.empty_strided(shape, stride, dtype=like.dtype, device=like.device)
            if len(buffers) < _MAX_PER_KEY:
                buffers.append(buffer)
            return buffer.detach()

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.empty_like(x)`` for a channels-last (or contiguous) 5-D ``x``, from the pool."""
        fmt = torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
            else torch.contiguous_format
        if not x.is_contiguous(memory_format=fmt):
            return torch.empty_like(x)
        return self.empty(x.shape, x, fmt)

    def clear(self) -> None:
        """Drop every pooled buffer (those in use stay with their users)."""
        with self._lock:
            self._buffers.clear()

    def __len__(self) -> int:
        return sum(len(b) for b in self._buffers.values())


def _strides(shape: tuple[int, ...] | torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` in ``memory_format`` (channels-last 3-D: ``[B, D, H, W, C]`` order)."""
    dims = list(range(len(shape)))
    order = [0, 2, 3, 4, 1] if memory_format == torch.channels_last_3d else dims  # outermost to innermost
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


MAPS = MapPool()  # the decoder's pool: one per process, as PyTorch's allocator is

__all__ = ["MAPS", "MapPool"]
