"""Float32 buffers an all-reduce reuses from one outer step to the next.

An outer step moves the whole model's pseudo-gradient (hundreds of MB) through a staging copy and a
result. Fresh buffers of that size come straight from ``mmap``, and the kernel faults in and zeroes
every page on first touch: measured on the 100 MB benchmark payload, that cost as much of the main
thread as the rest of the exchange. Reused buffers are already mapped.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Buffers:
    """Buffers handed out for one all-reduce and all taken back when the next one begins.

    Whatever :meth:`take` returned stays valid until :meth:`recycle`; the group recycles at the start
    of each all-reduce, so a result is valid until the group's next all-reduce (the caller copies what
    it keeps, as :meth:`~services.train.diloco.DiLoCoWorker.apply_outer` does).
    """

    def __init__(self) -> None:
        self._free: list[Tensor] = []
        self._taken: list[Tensor] = []

    def take(self, numel: int) -> Tensor:
        """A 1-D float32 CPU tensor of ``numel`` elements, contents undefined."""
        for i, buf in enumerate(self._free):
            if buf.numel() == numel:
                buf = self._free.pop(i)
                break
        else:
            buf = torch.empty(numel, dtype=torch.float32)
        self._taken.append(buf)
        return buf

    def recycle(self) -> None:
        """Take everything back; only buffers of the sizes last used are kept (the model may change)."""
        sizes = {buf.numel() for buf in self._taken}
        self._free = [buf for buf in self._free if buf.numel() in sizes] + self._taken
        self._taken = []
