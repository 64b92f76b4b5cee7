"""Byte tokens, rank shards that never overlap, and a stream that resumes from one integer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.errors import InvalidRequest
from services.train.config import DataConfig
from services.train.corpus import ESSAYS, builtin_documents, generated_documents
from services.train.data import ShardedSamples, encode_documents, load_tokens, read_documents
from services.train.vocab import BOS, EOS

TOKENS = encode_documents(builtin_documents())


def test_documents_are_bytes_between_bos_and_eos() -> None:
    tokens = encode_documents([b"hi", "é".encode()])
    assert tokens.tolist() == [BOS, 104, 105, EOS, BOS, 0xC3, 0xA9, EOS]
    assert tokens.dtype == torch.int16


def test_builtin_corpus_is_large_deterministic_and_starts_with_the_essays() -> None:
    docs = builtin_documents()
    assert sum(len(d) for d in docs) > 100_000
    assert docs[0] == ESSAYS[0].encode()
    generated_documents.cache_clear()
    assert builtin_documents() == docs


@pytest.mark.parametrize("world", [1, 3, 7])
def test_rank_shards_are_disjoint_and_equal_sized(world: int) -> None:
    shards = [ShardedSamples(TOKENS, 64, r, world, seed=5) for r in range(world)]
    n = shards[0].n_windows
    assert n == (TOKENS.numel() - 1) // 64
    sets = [set(s.shard.tolist()) for s in shards]
    assert all(len(s) == n // world for s in sets)
    assert len(set().union(*sets)) == world * (n // world)
    assert all(0 <= i < n for s in sets for i in s)


def test_each_epoch_visits_the_whole_shard_once_in_a_new_order() -> None:
    stream = ShardedSamples(TOKENS, 64, 1, 3, seed=5)
    size = stream.shard_size
    first = stream.window_ids(0, size).tolist()
    second = stream.window_ids(size, size).tolist()
    assert sorted(first) == sorted(second) == sorted(stream.shard.tolist())
    assert first != second


def test_batches_are_windows_of_the_token_stream() -> None:
    stream = ShardedSamples(TOKENS, 32, 0, 2, seed=1)
    ids = stream.window_ids(0, 4)
    batch = stream.next_batch(4)
    assert batch.shape == (4, 33) and batch.dtype == torch.long
    for row, window_id in zip(batch, ids.tolist(), strict=True):
        assert torch.equal(row, TOKENS[window_id * 32 : window_id * 32 + 33].long())
    # Neighbouring windows share one token: every target is predicted exactly once.
    assert torch.equal(stream.window(3)[-1:], stream.window(4)[:1])
    assert stream.position == 4


def test_the_stream_resumes_from_its_position() -> None:
    straight = ShardedSamples(TOKENS, 48, 2, 3, seed=9)
    batches = [straight.next_batch(5) for _ in range(300)]  # crosses several epochs
    resumed = ShardedSamples(TOKENS, 48, 2, 3, seed=9)
    resumed.load_state_dict({"position": 5 * 150})
    for expected in batches[150:]:
        assert torch.equal(resumed.next_batch(5), expected)
    assert resumed.state_dict() == straight.state_dict()


def test_seeds_change_the_split() -> None:
    a = ShardedSamples(TOKENS, 64, 0, 2, seed=1).shard
    b = ShardedSamples(TOKENS, 64, 0, 2, seed=2).shard
    assert not torch.equal(a, b)


def test_corpus_too_small_for_the_world_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="fewer than the 4 ranks"):
        ShardedSamples(encode_documents([b"x" * 100]), 32, 0, 4, seed=0)


def test_local_files_sorted_hidden_skipped(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"two")
    (tmp_path / "a.txt").write_bytes(b"one")
    (tmp_path / ".hidden").write_bytes(b"secret")
    (tmp_path / "b" / ".git").mkdir()
    (tmp_path / "b" / ".git" / "x").write_bytes(b"git")
    extra = tmp_path / "extra.md"
    extra.write_bytes(b"three")
    assert read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b"), str(extra)]) == [
        b"one",
        b"two",
        b"three",
    ]
    assert read_documents([str(tmp_path)]) == [b"one", b"two", b"three"]
    tokens = load_tokens(DataConfig(paths=(str(tmp_path / "a.txt"),)))
    assert tokens.tolist() == [BOS, *b"one", EOS]


def test_missing_or_empty_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        read_documents([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="holds no files"):
        read_documents([str(tmp_path / "empty")])
