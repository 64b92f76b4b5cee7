"""The ``train`` process: DiLoCo training across MLNodes, served on the local bus.

Bus requests (the gateway maps the contract's routes onto them): ``train_start``, ``train_stop``,
``train_status``, ``train.peers.register|remove|list``, plus the common ``status`` and ``stop``.

- ``train_start`` takes the client's ``{"train_config", "train_env"}`` as sent; fields we cannot
  honour come back as ``notes``. Two extras, read here so the plan stays the trainer's own:
  ``train_config.diloco.peer_timeout_s`` (or ``train_env.PEER_TIMEOUT_S``, a string like every env
  value), the seconds after which a silent peer is dropped from an outer step (default 30).
- A run with ``GLOBAL_WORLD_SIZE > 1`` needs the task's peers registered first (``TASK_ID`` names
  the task); the listener admits exactly their keys, and a removal takes effect at once.
- Peer listener: host ``MLNODE_PEER_HOST``; port ``MLNODE_PEER_PORT`` when set (explicit local
  config wins, e.g. behind a port mapping), else the port of this node's own registry entry (what
  its peers dial), else ``GLOBAL_PORT`` on rank 0 and ``BASE_PORT`` on the other ranks.
- The request is journaled (``run.json``) and the registry persisted (``peers.json``) under
  ``$MLNODE_STATE_DIR/train``: a process killed and restarted by supervisord resumes from its newest
  checkpoint while the node mode still says TRAIN, then rejoins the peers with their current state.
- After a run finishes, its peer group stays open (late peers can still fetch the final state) until
  the next ``train_start`` or a stop.
- A stop answers at once: the run is told to stop and no longer counts as active (the node reads
  STOPPED; ``train_status`` says ``STOPPING`` until the thread, which may be finishing a step or writing
  its last checkpoint, has ended). The thread and the peer group wind down in the background; the next
  start is validated at once, then waits up to START_WAIT_S for them (503 "still stopping" after that).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

from bus.rpc import Caller
from bus.service import Service
from contracts.checked import convert
from contracts.checked import explain as explain_refusal
from contracts.train import RANK_0_REGISTERED, TrainPeerRemove, TrainPeers, TrainStart
from node.errors import InvalidRequest, MLNodeError, Unavailable
from node.logging import get_logger
from node.process import bootstrap
from services.train.collective.group import PeerGroup
from services.train.config import TrainPlan
from services.train.journal import PeerStore, RunJournal
from services.train.peers import PeerInfo, PeerRegistry, bind_endpoint, follow, open_group
from services.train.runner import FAILED, FINISHED, Runner

log = get_logger(__name__)

DEFAULT_PEER_TIMEOUT_S = 30.0
#: How long a start waits for a stopped run to wind down (inside the gateway's 10 s bus deadline).
START_WAIT_S = 7.0
ALREADY_RUNNING = "Training is already running"
NOT_RUNNING = "Training is not running"


def split_run_options(body: Any) -> tuple[dict[str, Any], float]:
    """The body without our extra keys, plus the peer timeout they set (see the module docstring).

    The body is checked against the :class:`~contracts.train.TrainStart` contract first; the one rule
    a string cannot state in the schema (``PEER_TIMEOUT_S`` between 0.05 and 3600) is its description's.
    """
    start = convert({} if body is None else body, TrainStart)
    assert isinstance(body, dict) or body is None  # the contract is an object
    clean: dict[str, Any] = copy.deepcopy(body) if body is not None else {}
    timeout = DEFAULT_PEER_TIMEOUT_S
    config, env = start.train_config, start.train_env
    if config is not None and config.diloco is not None and config.diloco.peer_timeout_s is not None:
        timeout = float(config.diloco.peer_timeout_s)
        clean["train_config"]["diloco"].pop("peer_timeout_s")
    if env is not None and env.peer_timeout_s is not None:
        timeout = _seconds(float(env.peer_timeout_s), "train_env.PEER_TIMEOUT_S")
        clean["train_env"].pop("PEER_TIMEOUT_S")
    return clean, timeout


def _seconds(value: float, field: str) -> float:
    if not 0.05 <= value <= 3600:
        raise InvalidRequest(f"{field} must be between 0.05 and 3600 seconds, got {value}")
    return value


class TrainService(Service):
    name = "train"
    mode = "TRAIN"
    explain = staticmethod(explain_refusal)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dir = self.settings.service_dir("train")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal = RunJournal(self.dir)
        self.peer_store = PeerStore(self.dir)
        self.registry = PeerRegistry()
        self._restore_peers()
        self.runner: Runner | None = None
        self.group: PeerGroup | None = None
        self._unfollow: Callable[[], None] | None = None
        self.notes: list[str] = []
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._winding_down: asyncio.Task[None] | None = None
        self._stopped: Runner | None = None  # released by a stop, maybe still winding down
        handlers = {
            "train_start": self._train_start,
            "train_stop": self._train_stop,
            "train_status": self._train_status,
            "train.peers.list": self._peers_list,
        }
        for kind, handler in handlers.items():
            self.route(kind, handler)
        self.route("train.peers.register", self._peers_register, TrainPeers)
        self.route("train.peers.remove", self._peers_remove, TrainPeerRemove)

    # -- Service hooks ------------------------------------------------------------------------
    def is_active(self) -> bool:
        return self.runner is not None and self.runner is not self._stopped and self.runner.running

    async def status(self) -> dict[str, Any]:
        return {"state": self.runner.state if self.runner is not None else "STOPPED", **self.train_status()}

    async def stop(self) -> dict[str, Any]:
        self._release(forget=True)
        return {"status": "OK"}

    async def metrics(self) -> dict[str, Any]:
        status = self.train_status()
        keys = ("outer_step", "inner_step", "loss", "bytes_sent", "bytes_received", "waiting_for_quorum")
        values = {k: status.get(k) for k in keys}
        values["running"] = int(bool(status["status"]))
        values["waiting_for_quorum"] = int(bool(status.get("waiting_for_quorum")))
        return {k: v for k, v in values.items() if isinstance(v, int | float)}

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        body = self.journal.load()
        if body is None:
            return
        if not self.claim_names_me():
            log.info("train_run_discarded", reason="the node is no longer in TRAIN mode")
            self.journal.clear()
            return
        try:
            async with self._lock:
                await self._launch(body, resume=True)
            log.info("train_run_resumed")
        except MLNodeError as exc:
            log.error("train_run_unrecoverable", reason=exc.message)
            self.journal.clear()

    async def shutdown(self) -> None:
        # Keep the journal: a supervisor restart resumes the run (and rejoins the peers).
        await self._halt(forget=False)

    # -- status ---------------------------------------------------------------------------------
    def train_status(self) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            return {"status": False, "state": "STOPPED"}
        body: dict[str, Any] = {"status": runner.running, **runner.status(), "notes": list(self.notes)}
        if runner is self._stopped:
            body["status"] = False
            if runner.running:
                body["state"] = "STOPPING"
        task = runner.plan.env.task_id
        body["peers"] = [p.to_dict() for p in self.registry.peers(task)]
        group = self.group
        if group is not None:
            body["listen"] = group.endpoint
            body["bytes_sent"] = group.link.bytes_sent
            body["bytes_received"] = group.link.bytes_received
        else:
            body["bytes_sent"] = body["bytes_received"] = 0
        body["bytes_exchanged"] = body["bytes_sent"] + body["bytes_received"]
        return body

    # -- start / stop ---------------------------------------------------------------------------
    async def _train_start(self, body: Any, _caller: Caller) -> dict[str, Any]:
        async with self._lock:
            if self.is_active():
                raise InvalidRequest(ALREADY_RUNNING)
            await self._launch(body, resume=None)
        return {**self.train_status(), "status": "Training started"}

    async def _train_stop(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        if not self.is_active():
            raise InvalidRequest(NOT_RUNNING)
        self._release(forget=True)
        return {**self.train_status(), "status": "Training stopped"}

    async def _train_status(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        return self.train_status()

    async def _launch(self, body: Any, *, resume: bool | None) -> None:
        """Validate, open the peer group, journal the request and start the run thread."""
        clean, peer_timeout = split_run_options(body)
        plan, notes = TrainPlan.from_request(clean, state_dir=self.dir)
        if plan.env.world_size > 1:
            self._registered_peers(plan)  # a 400 now, not after waiting for the previous run
        self._release(forget=False)
        try:
            await asyncio.wait_for(self._wound_down(), START_WAIT_S)
        except TimeoutError:
            raise Unavailable("the previous training run is still stopping (finishing its step or "
                              "checkpoint); retry in a few seconds") from None
        group = self._open_group(plan, peer_timeout) if plan.env.world_size > 1 else None
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(self._run_changed)

        self.runner = Runner(
            plan,
            loop=loop,
            group=group,
            resume=plan.ckpt.resume if resume is None else resume,
            on_change=changed,
        )
        self.group = group
        self.notes = notes
        try:
            self.journal.save(body)
        except MLNodeError:
            await self._halt(forget=True)
            raise
        self.runner.start()
        self.publish_state()
        log.info("train_started", task_id=plan.env.task_id, rank=plan.env.rank,
                 world_size=plan.env.world_size, total_steps=plan.optim.total_steps,
                 inner_steps=plan.diloco.inner_steps, peer_timeout_s=peer_timeout,
                 compression=plan.diloco.compression,
                 listen=group.endpoint if group else None, notes=len(notes))

    def _open_group(self, plan: TrainPlan, peer_timeout: float) -> PeerGroup:
        env = plan.env
        peers = self._registered_peers(plan)
        bind = bind_endpoint(
            self.settings.peer_host, self.settings.peer_port, env, peers, self.keys.identity.public
        )
        try:
            group = open_group(self.bus.context, self.bus.auth, self.keys.identity, bind, rank=env.rank,
                               world_size=env.world_size, timeout=peer_timeout,
                               compression=plan.diloco.compression)
        except MLNodeError:
            raise
        except Exception as exc:  # the socket layer's own errors (port in use, bad address)
            raise Unavailable(f"cannot listen for training peers on {bind}: {exc}") from None
        try:
            self._unfollow = follow(group, self.registry, env.task_id)
            group.start()
        except BaseException:
            self._stop_following()
            group.link.close()
            raise
        return group

    def _stop_following(self) -> None:
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()

    def _registered_peers(self, plan: TrainPlan) -> list[PeerInfo]:
        env = plan.env
        peers = self.registry.peers(env.task_id)
        me = self.keys.identity.public
        others = [p for p in peers if p.public_key != me]
        if not others:
            raise InvalidRequest(
                f"train_env.GLOBAL_WORLD_SIZE is {env.world_size} but no peers are registered for "
                f"task {env.task_id!r}: register them with POST /api/v1/train/peers first"
            )
        if env.rank != 0 and not any(p.rank == 0 for p in others):
            raise InvalidRequest(
                f"no peer of task {env.task_id!r} is registered as rank 0: {RANK_0_REGISTERED}"
            )
        return peers

    async def _halt(self, *, forget: bool) -> None:
        """Stop the run and wait until its thread and peer group are gone."""
        self._release(forget=forget)
        await self._wound_down()

    def _release(self, *, forget: bool) -> None:
        """Stop the run without waiting: it stops counting as active at once (``forget`` also drops the
        journal), its thread and peer group wind down in the background."""
        runner, group = self.runner, self.group
        self.group = None
        if runner is self._stopped:
            runner = None  # already released; only the journal may still need forgetting
        self._stopped = self.runner
        self._stop_following()
        if forget:
            try:
                self.journal.clear()
            except (OSError, MLNodeError) as exc:  # a stop must not fail; log and go on
                log.error("train_journal_not_cleared", reason=str(exc))
        if runner is None and group is None:
            return
        if runner is not None:
            runner.request_stop()
        previous = self._winding_down

        async def wind_down() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            if runner is not None:
                await asyncio.to_thread(runner.join, 120)
            if group is not None:
                await group.aclose()
            log.info("train_run_wound_down")

        self._winding_down = asyncio.get_running_loop().create_task(wind_down())
        self.publish_state()

    async def _wound_down(self) -> None:
        while self._winding_down is not None and not self._winding_down.done():
            await asyncio.shield(self._winding_down)

    def _run_changed(self) -> None:
        """On the loop: a run changed state (from its thread); a run that ended is not resumed."""
        runner = self.runner
        if runner is not None and runner.state in (FINISHED, FAILED):
            self.journal.clear()
        self.publish_state()

    # -- peers ----------------------------------------------------------------------------------
    def _restore_peers(self) -> None:
        for task in self.peer_store.load():
            if not task.get("peers"):
                continue
            try:
                self.registry.register({"task_id": task.get("task_id"), "peers": task["peers"],
                                        "replace": True})
            except MLNodeError as exc:
                log.error("train_peers_not_restored", task_id=str(task.get("task_id"))[:64],
                          reason=exc.message)

    async def _peers_register(self, payload: TrainPeers, _caller: Caller) -> dict[str, Any]:
        result = self.registry.register(payload)
        self.peer_store.save(self.registry.list_peers(None))
        return result

    async def _peers_remove(self, payload: TrainPeerRemove, _caller: Caller) -> dict[str, Any]:
        result = self.registry.remove(payload)
        self.peer_store.save(self.registry.list_peers(None))
        return result

    async def _peers_list(self, payload: Any, _caller: Caller) -> dict[str, Any]:
        return self.registry.list_peers(payload)


def main() -> None:
    settings, keys = bootstrap("train")
    asyncio.run(TrainService(settings, keys).run())
