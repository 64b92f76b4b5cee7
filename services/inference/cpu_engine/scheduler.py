"""Continuous batching on one model thread.

Every iteration advances each running sequence by one token (a prompt's prefill counts as its first
step); sequences that arrived meanwhile join between iterations, up to ``max_num_seqs`` -- the rest
wait in FIFO order. The HTTP event loop never touches the model: it submits and cancels here, and the
model thread hands each iteration's emissions back through ``deliver`` in one call.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable

import torch

from node.logging import get_logger

from .checkpoint import LoadedModel
from .sampling import Sampler, SamplingParams
from .sequence import Emission, Sequence

log = get_logger(__name__)

Deliver = Callable[[list[tuple[int, Emission]]], None]


class Scheduler:
    """Owns the model thread; thread-safe ``submit`` / ``cancel`` from anywhere."""

    def __init__(
        self, loaded: LoadedModel, deliver: Deliver, *, max_num_seqs: int = 64, seed: int = 0
    ) -> None:
        self.loaded = loaded
        self.deliver = deliver
        self.max_num_seqs = max_num_seqs
        self._rng = random.Random(seed)
        self._cond = threading.Condition()
        self._waiting: dict[int, Sequence] = {}
        self._running: list[Sequence] = []
        self._live: dict[int, Sequence] = {}
        self._stopped = False
        self.iterations = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # Keys exist up front so readers on the event loop never copy a dict that is growing.
        self.finished: Counter[str] = Counter({"stop": 0, "length": 0, "error": 0})
        self._thread = threading.Thread(target=self._run, name="cpu-engine-model", daemon=True)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def submit(
        self, seq_id: int, prompt: list[int], params: SamplingParams, forced: tuple[int, ...] | None = None
    ) -> None:
        tok = self.loaded.tokenizer
        with self._cond:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator()
            gen.manual_seed(seed % 2**64)
            stop_ids = frozenset(t for t in (tok.eos_token_id, *tok.extra_stop_ids, *params.stop_token_ids)
                                 if t is not None)
            sampler = Sampler(params, self.loaded.config.vocab_size, prompt, stop_ids, gen)
            seq = Sequence(seq_id, prompt, params, tok, sampler, self.loaded.max_model_len, forced)
            self._waiting[seq_id] = seq
            self._live[seq_id] = seq
            self._cond.notify()

    def cancel(self, seq_id: int) -> None:
        """Drop a sequence (client gone): its slot and KV cache are freed before the next iteration."""
        with self._cond:
            seq = self._live.pop(seq_id, None)
            if seq is not None:
                seq.cancelled = True
                self._waiting.pop(seq_id, None)

    def _admit(self) -> bool:
        """Wait for work and move waiting sequences into free slots; False when stopping."""
        with self._cond:
            while not (self._stopped or self._running or self._waiting):
                self._cond.wait()
            if self._stopped:
                return False
            while self._waiting and len(self._running) < self.max_num_seqs:
                seq_id = next(iter(self._waiting))
                self._running.append(self._waiting.pop(seq_id))
            return True

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while self._admit():
            batch: list[tuple[int, Emission]] = []
            for seq in self._running:
                if seq.cancelled:
                    continue
                emission = self._step(seq)
                if emission is not None:
                    batch.append((seq.seq_id, emission))
            self.iterations += 1
            with self._cond:
                keep: list[Sequence] = []
                for seq in self._running:
                    if seq.cancelled or seq.finish_reason is not None:
                        self._live.pop(seq.seq_id, None)
                    else:
                        keep.append(seq)
                self._running = keep
            if batch:
                try:
                    self.deliver(batch)
                except Exception as exc:  # a dead model thread would look like a hung engine
                    log.exception("deliver_failed", error=repr(exc))

    def _step(self, seq: Sequence) -> Emission | None:
        emission: Emission | None
        try:
            if seq.remaining <= 0:
                emission = seq.finish("stop")
            else:
                model = self.loaded.model
                if seq.cache is None:
                    seq.cache = model.new_cache()
                    self.prompt_tokens += len(seq.prompt)
                logits = model.forward(seq.next_input(), seq.cache)
                self.generation_tokens += 1
                emission = seq.accept(seq.sampler.step(logits, seq.forced_token()))
        except Exception as exc:
            log.exception("sequence_failed", seq_id=seq.seq_id, error=repr(exc))
            seq.finish_reason = "error"
            return Emission("", [], "error")
        if seq.finish_reason is not None:
            self.finished[seq.finish_reason] += 1
        return emission
