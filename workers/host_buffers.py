"""Host-memory copies of a state tree, the one cost a background save puts on the step.

Only torch here (bench/gpu_check.py imports this module on a GPU machine that has no
Ray and none of the control plane's packages).

Buffers are allocated once and reused from one save to the next. A CUDA tensor is
copied into pinned memory with `non_blocking=True` on the current stream: the
training thread returns as soon as the copies are queued, and the GPU runs them in
stream order, before any later kernel can change the tensors. The background writer
calls `wait()` before it reads the buffers.
"""

from __future__ import annotations

from typing import Any

import torch


class HostBuffers:
    def __init__(self) -> None:
        self._bufs: dict[tuple[Any, ...], torch.Tensor] = {}
        self._pending: list[torch.cuda.Event] = []

    def copy(self, obj: Any) -> Any:
        """Start copying `obj` into the buffers; returns the tree of host tensors."""
        devices: set[torch.device] = set()
        out = self._copy(obj, (), devices)
        # One event per device, recorded after all of that device's copies were queued.
        self._pending = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._pending.append(event)
        return out

    def wait(self) -> None:
        """Block until every copy started by the last `copy()` has landed in host memory."""
        for event in self._pending:
            event.synchronize()
        self._pending = []

    def _copy(self, obj: Any, path: tuple[Any, ...], devices: set[torch.device]) -> Any:
        if torch.is_tensor(obj):
            buf = self._bufs.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
                self._bufs[path] = buf
            if obj.is_cuda:
                buf.copy_(obj.detach(), non_blocking=True)
                devices.add(obj.device)
            else:
                buf.copy_(obj.detach())
            return buf
        if isinstance(obj, dict):
            return {k: self._copy(v, (*path, k), devices) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, (*path, i), devices) for i, v in enumerate(obj))
        return obj  # ints, floats, strings, None: immutable
