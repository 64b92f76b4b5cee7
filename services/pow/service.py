"""The ``pow`` process: Proof of Compute rounds on the local bus, results through a durable outbox.

Bus requests (the gateway maps the contract's routes onto them): ``init``, ``init_generate``,
``init_validate``, ``phase_generate``, ``phase_validate``, ``validate``, ``pow_status``, ``pow_stop``,
plus the common ``status`` and ``stop``; PoC v2 (``services.pow.v2``) adds ``v2.init_generate``,
``v2.generate``, ``v2.job``, ``v2.status`` and ``v2.stop``. Model building runs in a thread (status
``LOADING``); an identical InitDto reuses the loaded model and only flips the phase, any difference
reloads. Delivery of
results keeps running whatever the round does, so a stop never strands a result.

A stop answers at once, whatever the round is doing: it takes no lock that a start or a phase flip
holds, cancels the runner (see :mod:`services.pow.runner`) and forgets it; the old round's threads
unwind in the background and the next round's model build waits for them to let go of the device.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bus.rpc import Caller
from bus.service import Service
from contracts.checked import explain as explain_refusal
from contracts.pow import MAX_DEAD_LETTERS, InitDto, PowState, ProofBatch
from contracts.pow_v2 import Generate, InitGenerate, JobQuery
from node.errors import Conflict, InvalidRequest, Unavailable
from node.logging import get_logger
from node.process import bootstrap
from services.pow.callback_http import safe_url
from services.pow.callback_policy import CallbackPolicy, CallbackRefused
from services.pow.delivery import Delivery
from services.pow.journal import Journal
from services.pow.outbox import Outbox
from services.pow.round import RoundSpec, batch_for
from services.pow.runner import GENERATING, IDLE, VALIDATING, Runner
from services.pow.v2.rounds import PocRounds

log = get_logger(__name__)

#: What an operator sees of a dead letter besides its (credential-free) URL and body size.
_DEAD_FIELDS = ("id", "kind", "members", "attempts", "status", "reason", "created", "dead_at")
NOT_RUNNING = "PoW is not running"
FLUSH_BEFORE_FLIP_S = 10.0
#: How long the route's check of a callback URL may wait for the resolver (the sender checks again).
RESOLVE_AT_ROUTE_S = 3.0


class PowService(Service):
    name = "pow"
    mode = "POW"
    explain = staticmethod(explain_refusal)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        directory = self.settings.service_dir("pow")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal = Journal(directory)
        self.outbox = Outbox(directory / "outbox.db")
        self.callbacks = CallbackPolicy.from_settings(self.settings)
        self.delivery = Delivery(self.outbox, self.callbacks)
        self.runner: Runner | None = None
        self._retired: Runner | None = None  # the last stopped round, maybe still unwinding
        self._stops = 0  # counts stops, so that a start overtaken by a stop does not go on
        self.v2 = PocRounds(self.outbox, directory / "v2", self.bus.client("inference"),
                            max_queued_jobs=self.settings.pocv2_max_queued_jobs)
        self._lock = asyncio.Lock()
        self.route("init", self._init_idle, InitDto)
        self.route("init_generate", self._init_generate, InitDto)
        self.route("init_validate", self._init_validate, InitDto)
        self.route("phase_generate", self._phase_generate)
        self.route("phase_validate", self._phase_validate)
        self.route("validate", self._validate, ProofBatch)
        self.route("pow_status", self._pow_status)
        self.route("pow_stop", self._pow_stop)
        self.route("outbox.dead", self._dead_letters)
        v2 = self.v2
        self.route("v2.init_generate", self._v2_init_generate, InitGenerate)
        self.route("v2.generate", self._v2_generate, Generate)
        self.route("v2.job", lambda body, _caller: v2.job_status(body), JobQuery)
        self.route("v2.status", lambda _body, _caller: v2.status())
        self.route("v2.stop", lambda _body, _caller: v2.stop())

    # -- Service hooks ------------------------------------------------------------------------
    def is_active(self) -> bool:
        return self.runner is not None

    async def status(self) -> dict[str, Any]:
        return {**self.pow_status(), "state": self.pow_status()["status"],
                "ready": self.runner is not None and self.runner.loaded and not self.runner.error,
                "poc_v2": self.v2.summary()}

    async def stop(self) -> dict[str, Any]:
        self._stops += 1
        await self._drop_runner()
        await self.v2.stop_all()
        return {"status": "OK"}

    async def metrics(self) -> dict[str, Any]:
        return {"poc_v2": self.v2.metrics()}

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.delivery.start()
        await self.v2.resume(self.modes.read() == "INFERENCE")
        doc = self.journal.load_round()
        if doc is None:
            return
        if not self.claim_names_me():
            log.info("pow_round_discarded", reason="the node is no longer in POW mode")
            self.journal.clear_round()
            return
        try:
            spec = RoundSpec.from_body(doc.get("init"))
        except InvalidRequest as exc:
            log.error("pow_round_unrecoverable", reason=exc.message)
            self.journal.clear_round()
            return
        progress = doc.get("progress") if isinstance(doc.get("progress"), dict) else {}
        phase = doc.get("phase") if doc.get("phase") in (IDLE, GENERATING, VALIDATING) else IDLE
        log.info("pow_round_resumed", phase=phase, progress=progress, block_height=spec.block_height)
        self._start_runner(spec, str(phase), progress)

    async def shutdown(self) -> None:
        # Keep the journal: a supervisor restart resumes the round. Deliver what we can first.
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        await self.v2.close()
        await asyncio.to_thread(self.delivery.stop, 10.0)
        self.outbox.close()

    # -- helpers ------------------------------------------------------------------------------
    def pow_status(self) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            return {"status": PowState.NOT_LOADED, "is_model_initialized": False,
                    "outbox": self._outbox_stats()}
        c = runner.counters
        body: dict[str, Any] = {
            "status": runner.status(),
            "is_model_initialized": runner.loaded,
            "phase": runner.phase,
            "block_height": runner.spec.block_height,
            "node_id": runner.spec.node_id,
            "node_count": runner.spec.node_count,
            "compute_groups": len(runner.groups),
            "nonces_computed": c.nonces_computed,
            "valid_found": c.valid_found,
            "nonces_per_second": round(c.rate(), 3),
            "seconds_since_start": round(time.time() - c.started_at, 1),
            "batches_validated": c.batches_validated,
            "nonces_validated": c.nonces_validated,
            "fraud_detected": c.fraud_detected,
            "validation_queue": runner.queued(),
            "outbox": self._outbox_stats(),
        }
        if runner.error:
            body["error"] = runner.error
        if runner.storage_error:
            body["storage_error"] = runner.storage_error
        return body

    def _outbox_stats(self) -> dict[str, Any]:
        try:
            return self.delivery.stats()
        except Exception as exc:  # a broken disk must not break status
            return {"error": str(exc)}

    def _start_runner(self, spec: RoundSpec, phase: str, progress: dict[str, int] | None = None) -> None:
        self.runner = Runner(spec, phase, self.outbox, self.journal, self.settings.pow_device,
                             progress=progress, on_change=self._changed, after=self._retired)
        self._retired = None
        self.runner.start()
        self.publish_state()

    def _changed(self) -> None:
        """Called from compute threads: publish on the loop's thread (sockets are not thread-safe)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.publish_state)

    async def _drop_runner(self) -> None:
        """Cancel the round (its threads unwind in the background) and forget it; never raises."""
        runner, self.runner = self.runner, None
        if runner is not None:
            self._retired = runner
            await asyncio.to_thread(runner.cancel)
            log.info("pow_round_stopped", block_height=runner.spec.block_height,
                     nonces_computed=runner.counters.nonces_computed)
        try:
            self.journal.clear_round()
        except OSError as exc:  # unlinking works on a full disk; anything else must not fail a stop
            log.error("pow_journal_not_cleared", reason=str(exc))

    def _answer(self) -> dict[str, Any]:
        return {"status": "OK", "pow_status": self.pow_status()}

    def _check_fits(self, spec: RoundSpec) -> None:
        """Refuse a CPU round whose fp32 model cannot fit in memory, instead of dying of OOM (and then
        crash-looping on resume). GPU rounds are planned against free GPU memory by the compute layer."""
        import torch

        device = self.settings.pow_device
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            return
        need = spec.params.n_params_total * 4 + spec.params.pool_size * 2
        available = _available_memory()
        if available is not None and need > 0.85 * available:
            raise Unavailable(
                f"the PoC model needs {need / 2**30:.1f} GiB of memory on CPU but only "
                f"{available / 2**30:.1f} GiB is available on this host"
            )

    async def _check_callback(self, url: str) -> None:
        """The route's half of the callback policy: a refused ``url`` is a 400 before anything starts."""
        if not url:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.callbacks.check_url, url), RESOLVE_AT_ROUTE_S)
        except TimeoutError:
            log.warning("callback_unresolved_at_route", reason="the resolver did not answer in time; "
                        "the sender checks every connection")
        except CallbackRefused as exc:
            raise InvalidRequest(f"url is not an allowed callback: {exc}") from None

    async def _v2_init_generate(self, body: InitGenerate, _caller: Caller) -> dict[str, Any]:
        await self._check_callback(body.url)
        return await self.v2.init_generate(body)

    async def _v2_generate(self, body: Generate, _caller: Caller) -> dict[str, Any]:
        await self._check_callback(body.url)
        return await self.v2.generate(body)

    async def _init(self, init: InitDto, phase: str) -> dict[str, Any]:
        await self._check_callback(init.url)
        spec = RoundSpec.of(init)
        self._check_fits(spec)
        stops = self._stops
        async with self._lock:
            if self.runner is not None and self.runner.spec.init == init and not self.runner.error:
                await self._flip(phase)  # identical InitDto: keep the model, flip the phase
                return self._answer()
            await self._drop_runner()
            if self._stops != stops:
                raise Conflict("a stop arrived while this PoW round was starting; it was not started")
            self._start_runner(spec, phase)
        log.info("pow_round_started", phase=phase, block_height=spec.block_height, node_id=spec.node_id,
                 node_count=spec.node_count)
        return self._answer()

    async def _flip(self, phase: str) -> None:
        runner = self.runner
        if runner is None:
            raise InvalidRequest(NOT_RUNNING)
        if phase != runner.phase and self.delivery.running:
            # Results of the phase that ends reach the receiver before the next phase starts.
            await asyncio.to_thread(self.delivery.flush, FLUSH_BEFORE_FLIP_S)
        runner.set_phase(phase)
        self.publish_state()

    # -- handlers -----------------------------------------------------------------------------
    async def _init_idle(self, init: InitDto, _caller: Caller) -> dict[str, Any]:
        return await self._init(init, IDLE)

    async def _init_generate(self, init: InitDto, _caller: Caller) -> dict[str, Any]:
        return await self._init(init, GENERATING)

    async def _init_validate(self, init: InitDto, _caller: Caller) -> dict[str, Any]:
        return await self._init(init, VALIDATING)

    async def _phase_generate(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        async with self._lock:
            await self._flip(GENERATING)
        return self._answer()

    async def _phase_validate(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        async with self._lock:
            await self._flip(VALIDATING)
        return self._answer()

    async def _validate(self, body: ProofBatch, _caller: Caller) -> dict[str, Any]:
        runner = self.runner
        if runner is None:
            raise InvalidRequest(NOT_RUNNING)
        batch = batch_for(body, runner.spec)
        await asyncio.to_thread(runner.submit, batch, max_batches=self.settings.pow_max_queued_batches,
                                max_nonces=self.settings.pow_max_queued_nonces)
        return {"status": "OK", "queued": runner.queued(), "nonces": len(batch.nonces)}

    async def _pow_status(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        return self.pow_status()

    async def _pow_stop(self, _body: Any, _caller: Caller) -> dict[str, Any]:
        await self.stop()
        return self._answer()

    async def _dead_letters(self, body: Any, _caller: Caller) -> dict[str, Any]:
        raw = (body or {}).get("limit", "100")
        limit = int(raw) if str(raw).strip().isdigit() else 0
        if not 1 <= limit <= MAX_DEAD_LETTERS:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_DEAD_LETTERS}, got {raw!r}")
        rows = self.outbox.dead_letters(limit)
        letters = [{**{k: row[k] for k in _DEAD_FIELDS}, "url": safe_url(row["url"]),
                    "body_bytes": len(row["body"])} for row in rows]
        return {"total": self.outbox.dead_count(), "dead_letters": letters}

    _loop: asyncio.AbstractEventLoop | None = None


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where the kernel does not say)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def main() -> None:
    settings, keys = bootstrap("pow")
    asyncio.run(PowService(settings, keys).run())
