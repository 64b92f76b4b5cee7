"""Byte-tokenised text cut into fixed windows, sharded by rank, read from a resumable position.

Sharding is static: one seeded permutation of all windows is dealt round-robin to the ranks, so rank
r of w owns a disjoint set for the whole run. Each epoch reshuffles a rank's own windows with a seed
derived from (seed, epoch, rank). The only cursor is a count of windows consumed, so a checkpoint or a
rejoining peer restores the stream from one integer (every inner step consumes ``batch_size`` windows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from node.errors import InvalidRequest
from services.train.config import DataConfig
from services.train.corpus import builtin_documents
from services.train.vocab import BOS, EOS

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def encode_documents(docs: Iterable[bytes]) -> Tensor:
    """One int16 stream: BOS + bytes + EOS for each document, in order."""
    parts: list[np.ndarray] = []
    for doc in docs:
        part = np.empty(len(doc) + 2, dtype=np.int16)
        part[0], part[-1] = BOS, EOS
        part[1:-1] = np.frombuffer(doc, dtype=np.uint8)
        parts.append(part)
    if not parts:
        return torch.empty(0, dtype=torch.int16)
    return torch.from_numpy(np.concatenate(parts))


def read_documents(paths: Sequence[str]) -> list[bytes]:
    """Each file is a document; directories contribute their non-hidden files in sorted order."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = (p for p in sorted(path.rglob("*")) if p.is_file())
            files.extend(
                p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidRequest(f"train_config.data.path {raw!r} does not exist on this node")
    if not files:
        raise InvalidRequest("train_config.data.path holds no files")
    return [p.read_bytes() for p in files]


def load_tokens(cfg: DataConfig) -> Tensor:
    """The token stream a plan trains on: local files when given, else the built-in corpus."""
    docs = read_documents(cfg.paths) if cfg.paths else builtin_documents()
    return encode_documents(docs)


def _mixed_seed(*values: int) -> int:
    acc = 0
    for value, mult in zip(values, _MIX, strict=False):
        acc = (acc + value * mult) % (1 << 63)
    return acc


class ShardedSamples:
    """Rank ``rank``'s windows of ``seq_length + 1`` tokens (inputs plus the shifted targets)."""

    def __init__(self, tokens: Tensor, seq_length: int, rank: int, world_size: int, seed: int) -> None:
        if not 0 <= rank < world_size:
            raise InvalidRequest(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = tokens
        self.seq_length = seq_length
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        # Consecutive windows share one token so every target is predicted exactly once.
        self.n_windows = max(0, (tokens.numel() - 1) // seq_length)
        shard_size = self.n_windows // world_size
        if shard_size == 0:
            raise InvalidRequest(
                f"train_config.data: the corpus gives {self.n_windows} windows of seq_length {seq_length}, "
                f"fewer than the {world_size} ranks"
            )
        order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(_mixed_seed(seed)))
        self.shard: Tensor = order[rank::world_size][:shard_size].clone()
        self.position = 0
        self._epoch = -1
        self._epoch_order = self.shard

    @property
    def shard_size(self) -> int:
        return int(self.shard.numel())

    @property
    def epoch(self) -> int:
        return self.position // self.shard_size

    def _order(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(_mixed_seed(self.seed, epoch + 1, self.rank + 1))
            self._epoch_order = self.shard[torch.randperm(self.shard_size, generator=gen)]
            self._epoch = epoch
        return self._epoch_order

    def window_ids(self, start: int, count: int) -> Tensor:
        """Global window ids at stream positions ``start .. start + count`` (crossing epochs)."""
        ids = []
        for pos in range(start, start + count):
            epoch, index = divmod(pos, self.shard_size)
            ids.append(self._order(epoch)[index])
        return torch.stack(ids) if ids else torch.empty(0, dtype=torch.long)

    def window(self, window_id: int) -> Tensor:
        start = window_id * self.seq_length
        return self.tokens[start : start + self.seq_length + 1]

    def next_batch(self, count: int) -> Tensor:
        """[count, seq_length + 1] int64 tokens; advances the cursor."""
        ids = self.window_ids(self.position, count)
        self.position += count
        return torch.stack([self.window(int(i)) for i in ids]).long()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seek(int(state["position"]))

    def seek(self, position: int) -> None:
        if position < 0:
            raise InvalidRequest(f"data position must be >= 0, got {position}")
        self.position = position
