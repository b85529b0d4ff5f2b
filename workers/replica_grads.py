"""failure.mode replicas: the gradients averaged over the quorum while backward runs, as DDP
overlaps them (workers/replicas.py runs it every step).

The parameters are cut into buckets of about BUCKET_BYTES in the reverse of their order
(backward reaches the last layers first). A hook on each parameter copies its gradient into
its bucket once backward has accumulated it; a full bucket's all-reduce starts at once, in
bucket order on every replica (collectives pair up by their order, so a bucket that fills
early waits for the ones before it), and the step waits for them all after backward. A
parameter backward did not reach sends zeros, so every replica sends the same sizes.

Every all-reduce goes through torchft's Manager.allreduce, whose work records a failure on
the manager instead of raising: a replica killed mid-step leaves the step uncommitted here
(`manager.errored()`), where torchft 0.2.0's own DDP wrapper asserts in its comm hook and
crashed the survivor.

A bucket also carries a few extra elements, a word (workers/replicas.py's word), so a step
that needs one sends it with the gradients instead of in an all-reduce of its own.
Manager.allreduce averages; the word comes back as sums (times the participants, rounded).
"""

from __future__ import annotations

from typing import Any

import torch

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's bucket_cap_mb: large enough that gloo's per-call cost stays small
WORD_DTYPES = (torch.float32, torch.float64)  # exact for the word's small integers after the average


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.flat = torch.zeros(self.offsets[-1], dtype=dtype, device=device)
        self.seen = [False] * len(params)
        self.left = len(params)
        self.work: Any = None

    def slot(self, j: int) -> torch.Tensor:
        return self.flat[self.offsets[j] : self.offsets[j + 1]]


class GradBuckets:
    """The model's gradients, bucketed, and a word of `word_len` floats riding on the last
    bucket launched that can hold it exactly (a bucket of its own when none can)."""

    def __init__(self, model: torch.nn.Module, manager: Any, word_len: int) -> None:
        self.manager, self.word_len = manager, word_len
        self.buckets: list[_Bucket] = []
        group: list[torch.nn.Parameter] = []
        for p in reversed([p for p in model.parameters() if p.requires_grad]):
            same = not group or (group[0].dtype, group[0].device) == (p.dtype, p.device)
            size = sum(q.numel() * q.element_size() for q in group)
            if group and (not same or size + p.numel() * p.element_size() > BUCKET_BYTES):
                self.buckets.append(_Bucket(group, group[0].dtype, group[0].device))
                group = []
            group.append(p)
        if group:
            self.buckets.append(_Bucket(group, group[0].dtype, group[0].device))
        held = [i for i, b in enumerate(self.buckets) if b.flat.dtype in WORD_DTYPES]
        if not held:  # no bucket holds the word's integers exactly (a half-precision model)
            self.buckets.append(_Bucket([], torch.float64, torch.device("cpu")))
            held = [len(self.buckets) - 1]
        self.word_bucket = self.buckets[held[-1]]
        self.word_at = self.word_bucket.offsets[-1]
        self.word_bucket.flat = torch.cat([self.word_bucket.flat, self.word_bucket.flat.new_zeros(word_len)])
        self.armed, self.next = False, 0
        for b in self.buckets:
            for j, p in enumerate(b.params):
                p.register_post_accumulate_grad_hook(self._hook(b, j))

    def reduce(self, loss: torch.Tensor, word: list[float] | None) -> list[float] | None:
        """Backward of `loss`, its gradients averaged over the quorum (in place, in each
        parameter's .grad). Returns the word's sums over the quorum (every replica's `word`;
        zeros where None), or None when an all-reduce failed: the step must not commit."""
        for b in self.buckets:
            b.seen, b.left, b.work = [False] * len(b.params), len(b.params), None
        word_flat = self.word_bucket.flat
        word_flat[self.word_at :] = torch.tensor(word or [0.0] * self.word_len, dtype=word_flat.dtype)
        self.next, self.armed = 0, True
        try:
            loss.backward()
        finally:
            self.armed = False  # a backward elsewhere (the task's own) never launches a bucket
        for b in self.buckets[self.next :]:  # what backward did not reach: zeros, then launched
            for j in range(len(b.params)):
                if not b.seen[j]:
                    b.slot(j).zero_()
                    b.seen[j] = True
            b.left = 0
        self._launch()
        ok = [b.work.wait() for b in self.buckets]  # every one waited, a failed one included
        if not all(ok) or self.manager.errored():
            return None
        for b in self.buckets:
            for j, p in enumerate(b.params):
                grad = b.slot(j).view_as(p)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
        n = self.manager.num_participants()
        return (self.word_bucket.flat[self.word_at :].double() * n).round().tolist()

    def _hook(self, b: _Bucket, j: int) -> Any:
        def ready(p: torch.Tensor) -> None:
            if not self.armed or b.seen[j] or p.grad is None:
                return
            b.slot(j).copy_(p.grad.reshape(-1))
            b.seen[j] = True
            b.left -= 1
            if b.left == 0:
                self._launch()

        return ready

    def _launch(self) -> None:
        """Start the all-reduce of every full bucket whose predecessors have started."""
        while self.next < len(self.buckets) and self.buckets[self.next].left == 0:
            b = self.buckets[self.next]
            b.work = self.manager.allreduce(b.flat)
            self.next += 1
