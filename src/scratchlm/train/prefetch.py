"""Batches drawn one step ahead and copied to the GPU while the current step computes.

A host-to-device copy from ordinary (pageable) memory blocks the host until it is done, so
the next step's kernels are queued late. Pinned (page-locked) memory lets the copy run
asynchronously (`non_blocking=True`) on the copy engine, overlapped with the running step;
`non_blocking` without pinned memory would be a silent synchronous copy, so the two go
together, and only on CUDA. On a CPU the batch is returned as drawn.

Drawing ahead moves the loader one step past what training has consumed, so the prefetcher
keeps the loader state from before the draw: checkpoints save that state, and a resumed run
draws the prefetched batches again, in the same order.
"""

from __future__ import annotations

from typing import Callable

import torch

Batch = tuple[torch.Tensor, ...]


class Prefetcher:
    """`next()` returns the batches of `draw()` in order, on `device`, one step drawn ahead.

    `draw` returns one step's micro-batches (CPU tensors); `loader_state` the loader's
    state_dict, read before each draw. The host batches come along too: what the host needs
    to know of a batch (how many targets it has) is read there without waiting on the GPU."""

    def __init__(self, draw: Callable[[], list[Batch]], loader_state: Callable[[], dict],
                 device: torch.device) -> None:
        self._draw, self._loader_state, self.device = draw, loader_state, device
        self._pin = device.type == "cuda"
        self._ahead: tuple[dict, tuple[list[Batch], list[Batch]]] | None = None

    def next(self) -> tuple[list[Batch], list[Batch]]:
        """This step's micro-batches, (on the host, on the device); the next step's start
        copying."""
        current = self._ahead[1] if self._ahead is not None else self._fetch()
        self._ahead = (self._loader_state(), self._fetch())
        return current

    def _fetch(self) -> tuple[list[Batch], list[Batch]]:
        host = self._draw()
        return host, [tuple(self._to_device(t) for t in batch) for batch in host]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self._pin:
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def state_dict(self) -> dict:
        """The loader state as of the first batch not yet returned by `next()`."""
        return self._ahead[0] if self._ahead is not None else self._loader_state()

    def reset(self) -> None:
        """Forget the batch drawn ahead (after the loader's state was replaced by a resume)."""
        self._ahead = None
