"""One DiLoCo worker: H inner AdamW steps on its shard, then an outer Nesterov step on the average.

The worker knows nothing about the network. The service drives it step by step (so it can report
progress and stop between steps) and hands :meth:`DiLoCoWorker.outer_step` a ``reduce`` callable
that returns the average of every live rank's pseudo-gradient; over the network that average must be
:func:`fixed_order_mean` of the same tensors on every node, which makes the outer update, and so
the global weights, bit-identical on all ranks.

The global ("outer") weights live in their own tensors, separate from the model the inner loop
trains; a pseudo-gradient is outer - inner, and after the outer step the model restarts from the new
outer weights. Rejoining peers receive outer weights and momentum via :meth:`export_sync_state`; what
a peer sends may only be loaded in one of :meth:`DiLoCoWorker.sync_layouts` (this model's tensors).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from contracts.collective import TensorSpec
from node.errors import InvalidRequest, ProtocolError
from node.logging import get_logger
from services.train.compression import Codec, compressed_mean
from services.train.compression import fixed_order_mean as fixed_order_mean  # its old home
from services.train.config import TrainPlan
from services.train.data import ShardedSamples, load_tokens
from services.train.model import build_model
from services.train.optim import build_inner_optimizer, build_outer_optimizer, inner_lr, set_lr

log = get_logger(__name__)

STATE_VERSION = 1
_EMA_DECAY = 0.9
#: Name prefixes of the tensors of a sync state: outer weights, then outer momentum buffers.
WEIGHTS, MOMENTUM = "outer.", "momentum."


@dataclass
class Contributors:
    """What a reduce call is for; the reducer fills ``ranks`` with whose pseudo-gradients it averaged."""

    outer_step: int
    rank: int
    world_size: int
    ranks: list[int] = field(default_factory=list)


Reduce = Callable[[list[Tensor], Contributors], list[Tensor]]


@dataclass(frozen=True)
class SyncState:
    """What one rank gives another to rejoin: the round start it describes, and named tensors (the
    outer weights, then — after the first outer step — the momentum buffers)."""

    outer_step: int
    inner_step: int
    names: list[str]
    tensors: list[Tensor]


def solo_reduce(
    pseudo_grads: list[Tensor], contributors: Contributors, compression: str = "none"
) -> list[Tensor]:
    """The reduce of a one-node run: the average over this rank alone, through the run's wire format
    (so a one-node run equals its one-rank simulation)."""
    contributors.ranks = [contributors.rank]
    return compressed_mean({contributors.rank: pseudo_grads}, Codec(compression))


@dataclass(frozen=True)
class Progress:
    rank: int
    world_size: int
    outer_step: int
    outer_rounds: int
    inner_step: int
    total_steps: int
    loss_last: float | None
    loss_ema: float | None
    tokens_seen: int
    lr: float
    contributors: list[int]
    finished: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DiLoCoWorker:
    """The training state of one rank plus the explicit steps that advance it."""

    def __init__(self, plan: TrainPlan, *, tokens: Tensor | None = None, device: torch.device | str = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.model = build_model(plan.model, self.device)
        named = list(self.model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.outer_params = [param.detach().clone() for param in self.params]
        self.inner_opt = build_inner_optimizer(self.model, plan.optim)
        self.outer_opt = build_outer_optimizer(self.outer_params, plan.diloco)
        self.samples = ShardedSamples(
            tokens if tokens is not None else load_tokens(plan.data),
            plan.data.seq_length,
            plan.env.rank,
            plan.env.world_size,
            plan.data.seed,
        )
        self.inner_steps_done = 0
        self.outer_steps_done = 0
        self.tokens_seen = 0
        self.loss_last: float | None = None
        self.loss_ema: float | None = None
        self.last_contributors: list[int] = []

    # -- where we are -------------------------------------------------------------------------

    @property
    def steps_in_round(self) -> int:
        return self.inner_steps_done - self.outer_steps_done * self.plan.diloco.inner_steps

    @property
    def outer_due(self) -> bool:
        """H inner steps are done, or the last (shorter) round reached ``total_steps``."""
        steps = self.steps_in_round
        return steps >= self.plan.diloco.inner_steps or (
            steps > 0 and self.inner_steps_done >= self.plan.optim.total_steps
        )

    @property
    def finished(self) -> bool:
        return self.inner_steps_done >= self.plan.optim.total_steps and not self.outer_due

    def progress(self) -> Progress:
        return Progress(
            rank=self.plan.env.rank,
            world_size=self.plan.env.world_size,
            outer_step=self.outer_steps_done,
            outer_rounds=self.plan.outer_rounds,
            inner_step=self.inner_steps_done,
            total_steps=self.plan.optim.total_steps,
            loss_last=self.loss_last,
            loss_ema=self.loss_ema,
            tokens_seen=self.tokens_seen,
            lr=inner_lr(self.plan.optim, min(self.inner_steps_done, self.plan.optim.total_steps - 1)),
            contributors=list(self.last_contributors),
            finished=self.finished,
        )

    # -- inner loop ---------------------------------------------------------------------------

    def inner_step(self) -> float:
        """One AdamW step over ``batch_size`` windows in ``micro_bs`` slices; returns the mean loss."""
        if self.finished:
            raise InvalidRequest("training is finished: no inner step left")
        if self.outer_due:
            raise InvalidRequest(f"outer step {self.outer_steps_done} is due before another inner step")
        optim = self.plan.optim
        set_lr(self.inner_opt, inner_lr(optim, self.inner_steps_done))
        accum = optim.grad_accum_steps
        self.model.train()
        total = 0.0
        for _ in range(accum):
            batch = self.samples.next_batch(optim.micro_bs).to(self.device)
            loss = self.model.loss(batch)
            (loss / accum).backward()
            total += float(loss.item())
        self.inner_opt.step()
        self.inner_opt.zero_grad(set_to_none=True)
        mean = total / accum
        if not math.isfinite(mean):
            log.warning("inner_loss_not_finite", inner_step=self.inner_steps_done, loss=mean)
        self.inner_steps_done += 1
        self.tokens_seen += optim.batch_size * self.plan.data.seq_length
        self.loss_last = mean
        self.loss_ema = (
            mean if self.loss_ema is None else _EMA_DECAY * self.loss_ema + (1 - _EMA_DECAY) * mean
        )
        return mean

    def run_inner(
        self,
        *,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[Progress], None] | None = None,
    ) -> int:
        """Inner steps until the outer step is due (or training ends, or ``should_stop``); returns count."""
        done = 0
        while not self.outer_due and not self.finished:
            if should_stop is not None and should_stop():
                break
            self.inner_step()
            done += 1
            if on_step is not None:
                on_step(self.progress())
        return done

    # -- outer step ---------------------------------------------------------------------------

    def pseudo_gradients(self) -> list[Tensor]:
        """outer - inner per parameter, float32, fresh tensors safe to send or keep."""
        with torch.no_grad():
            return [
                (outer - inner).float() for outer, inner in zip(self.outer_params, self.params, strict=True)
            ]

    def outer_step(self, reduce: Reduce) -> None:
        """Average pseudo-gradients through ``reduce`` and apply the outer optimizer step."""
        if not self.outer_due:
            raise InvalidRequest(
                f"no outer step due: {self.steps_in_round} of {self.plan.diloco.inner_steps} inner steps done"
            )
        contributors = Contributors(self.outer_steps_done, self.plan.env.rank, self.plan.env.world_size)
        averaged = reduce(self.pseudo_gradients(), contributors)
        self.apply_outer(averaged, contributors.ranks)

    def apply_outer(self, averaged: Sequence[Tensor], ranks: Sequence[int] = ()) -> None:
        """Step the global weights with ``averaged`` as their gradient; the model restarts from them."""
        if not self.outer_due:
            raise InvalidRequest("no outer step due")
        self._check_like_params(averaged, "averaged pseudo-gradient", ProtocolError)
        for outer, grad in zip(self.outer_params, averaged, strict=True):
            outer.grad = grad.to(device=outer.device, dtype=torch.float32).clone()
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for inner, outer in zip(self.params, self.outer_params, strict=True):
                inner.copy_(outer)
        self.outer_steps_done += 1
        self.last_contributors = sorted(ranks)
        log.info(
            "outer_step_done",
            rank=self.plan.env.rank,
            outer_step=self.outer_steps_done,
            inner_step=self.inner_steps_done,
            loss_ema=self.loss_ema,
            contributors=self.last_contributors,
        )

    def run_round(self, reduce: Reduce, *, should_stop: Callable[[], bool] | None = None) -> bool:
        """Inner steps then the outer step; False when stopped before the outer step."""
        self.run_inner(should_stop=should_stop)
        if not self.outer_due:
            return False
        self.outer_step(reduce)
        return True

    def global_weights(self) -> list[Tensor]:
        """The current outer weights (what every rank agrees on), as copies."""
        return [outer.detach().clone() for outer in self.outer_params]

    # -- rejoin: what one peer sends another ---------------------------------------------------

    def export_sync_state(self) -> SyncState:
        """The outer weights and momentum buffers as of this round's start, named as :meth:`sync_layouts`."""
        buffers = [self.outer_opt.state.get(outer, {}).get("momentum_buffer") for outer in self.outer_params]
        has_momentum = all(buf is not None for buf in buffers)
        round_start = min(self.outer_steps_done * self.plan.diloco.inner_steps, self.plan.optim.total_steps)
        names = [WEIGHTS + name for name in self.names]
        tensors = [outer.detach().float().clone() for outer in self.outer_params]
        if has_momentum:
            names += [MOMENTUM + name for name in self.names]
            tensors += [buf.detach().float().clone() for buf in buffers if buf is not None]
        return SyncState(self.outer_steps_done, round_start, names, tensors)

    def sync_layouts(self) -> list[list[TensorSpec]]:
        """The tensors a sync state for this model holds: the weights alone (before the first outer
        step), or the weights and their momentum; float32, this model's names and shapes."""
        shapes = [(name, tuple(param.shape)) for name, param in zip(self.names, self.params, strict=True)]
        weights = [TensorSpec(WEIGHTS + name, "float32", shape) for name, shape in shapes]
        momentum = [TensorSpec(MOMENTUM + name, "float32", shape) for name, shape in shapes]
        return [weights, weights + momentum]

    def load_sync_state(self, state: SyncState) -> None:
        """Adopt a peer's global weights, momentum and step; the inner loop restarts from the round start."""
        layouts = [[spec.name for spec in layout] for layout in self.sync_layouts()]
        if state.names not in layouts or len(state.tensors) != len(state.names):
            raise ProtocolError("sync state tensors are not this model's outer weights (and momentum)")
        tensors = state.tensors
        n = len(self.outer_params)
        has_momentum = len(tensors) == 2 * n
        self._check_like_params(tensors[:n], "sync state weight", ProtocolError)
        outer_step, inner_step = state.outer_step, state.inner_step
        if outer_step < 0 or inner_step != min(
            outer_step * self.plan.diloco.inner_steps, self.plan.optim.total_steps
        ):
            raise ProtocolError(f"sync state steps are inconsistent: outer {outer_step}, inner {inner_step}")
        with torch.no_grad():
            for outer, inner, src in zip(self.outer_params, self.params, tensors[:n], strict=True):
                outer.copy_(src)
                inner.copy_(src)
        if has_momentum:
            self._check_like_params(tensors[n:], "sync state momentum", ProtocolError)
            for outer, buf in zip(self.outer_params, tensors[n:], strict=True):
                self.outer_opt.state[outer]["momentum_buffer"] = buf.to(outer.device, torch.float32).clone()
        else:
            for outer in self.outer_params:
                self.outer_opt.state.pop(outer, None)
        self.outer_steps_done = outer_step
        self.inner_steps_done = inner_step
        self.samples.seek(inner_step * self.plan.optim.batch_size)
        self.tokens_seen = inner_step * self.plan.optim.batch_size * self.plan.data.seq_length
        log.info("sync_state_loaded", rank=self.plan.env.rank, outer_step=outer_step, inner_step=inner_step)

    # -- full state: what a checkpoint holds ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; tensors are live references, so save before stepping."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "version": STATE_VERSION,
            "plan": self.plan.to_dict(),
            "model": self.model.state_dict(),
            "outer_params": list(self.outer_params),
            "outer_optimizer": self.outer_opt.state_dict(),
            "inner_optimizer": self.inner_opt.state_dict(),
            "inner_step": self.inner_steps_done,
            "outer_step": self.outer_steps_done,
            "data": self.samples.state_dict(),
            "tokens_seen": self.tokens_seen,
            "loss_last": self.loss_last,
            "loss_ema": self.loss_ema,
            "contributors": list(self.last_contributors),
            "rng": rng,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses state written for a different run shape."""
        if state.get("version") != STATE_VERSION:
            raise InvalidRequest(f"checkpoint version must be {STATE_VERSION}, got {state.get('version')!r}")
        check_resumable(TrainPlan.from_dict(dict(state["plan"])), self.plan)
        self.model.load_state_dict(state["model"])
        self._check_like_params(state["outer_params"], "checkpoint outer weight", InvalidRequest)
        with torch.no_grad():
            for outer, src in zip(self.outer_params, state["outer_params"], strict=True):
                outer.copy_(src)
        self.outer_opt.load_state_dict(state["outer_optimizer"])
        self.inner_opt.load_state_dict(state["inner_optimizer"])
        self.inner_steps_done = int(state["inner_step"])
        self.outer_steps_done = int(state["outer_step"])
        self.samples.load_state_dict(state["data"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loss_last = state["loss_last"]
        self.loss_ema = state["loss_ema"]
        self.last_contributors = list(state["contributors"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _check_like_params(self, tensors: Sequence[Tensor], what: str, error: type[Exception]) -> None:
        if len(tensors) != len(self.outer_params):
            raise error(f"{what}: got {len(tensors)} tensors, the model has {len(self.outer_params)}")
        for name, tensor, outer in zip(self.names, tensors, self.outer_params, strict=True):
            if tuple(tensor.shape) != tuple(outer.shape):
                raise error(f"{what} {name} has shape {tuple(tensor.shape)}, expected {tuple(outer.shape)}")


def check_resumable(stored: TrainPlan, plan: TrainPlan) -> None:
    """A checkpoint resumes a plan only if model, data stream and batch shape are the same."""
    pairs = {
        "train_config.model": (stored.model, plan.model),
        "train_config.data": (stored.data, plan.data),
        "train_config.diloco.inner_steps": (stored.diloco.inner_steps, plan.diloco.inner_steps),
        "train_config.optim.batch_size": (stored.optim.batch_size, plan.optim.batch_size),
        "train_config.train.micro_bs": (stored.optim.micro_bs, plan.optim.micro_bs),
        "train_env.GLOBAL_RANK": (stored.env.rank, plan.env.rank),
        "train_env.GLOBAL_WORLD_SIZE": (stored.env.world_size, plan.env.world_size),
    }
    for name, (old, new) in pairs.items():
        if old != new:
            raise InvalidRequest(f"{name} differs from the checkpoint's ({old!r} != {new!r}); cannot resume")
