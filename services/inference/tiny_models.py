"""Stand-in models for the CPU engine when the client names a model this machine cannot have.

The Network Node asks for hub names ("Qwen/Qwen2.5-7B-Instruct"); a CPU host never downloads a model.
So a name that is not a local directory is served by a tiny deterministic Llama made with
``create_tiny``, seeded from the name (same name, same weights, on every machine) and cached under
``$MLNODE_STATE_DIR/inference/models/``. The engine serves it under the requested name
(``--served-model-name``), so ``/v1/models`` reports exactly what the client asked for. The model is
built in a child process: the ``inference`` process itself never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from node.errors import Unavailable
from node.logging import get_logger

log = get_logger(__name__)

MIN_POSITIONS = 2048
_BUILD = (
    "import sys; from pathlib import Path; "
    "from services.inference.cpu_engine.checkpoint import create_tiny; "
    "create_tiny(Path(sys.argv[1]), int(sys.argv[2]), max_position_embeddings=int(sys.argv[3]))"
)
_REPO = Path(__file__).resolve().parents[2]


def seed_for(name: str) -> int:
    """A stable 63-bit seed from the model name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") >> 1


def requested_positions(additional_args: tuple[str, ...] | list[str]) -> int:
    """Room for the client's ``--max-model-len`` (vLLM spellings: 4096, 4k = 4000, 4K = 4096)."""
    args = list(additional_args)
    wanted = 0
    for i, arg in enumerate(args):
        value: str | None = None
        if arg.startswith(("--max-model-len=", "--max_model_len=")):
            value = arg.split("=", 1)[1]
        elif arg in ("--max-model-len", "--max_model_len") and i + 1 < len(args):
            value = args[i + 1]
        if value:
            match = re.fullmatch(r"(\d+)([kKmM]?)", value.strip())
            if match:
                scale = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[match.group(2)]
                wanted = int(match.group(1)) * scale
    return max(MIN_POSITIONS, wanted)


def cache_dir(name: str, cache: Path, positions: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64] or "model"
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return cache / f"{slug}-{digest}-p{positions}"


async def tiny_model(name: str, cache: Path, positions: int = MIN_POSITIONS) -> Path:
    """The cached stand-in directory for ``name``, building it on first use."""
    target = cache_dir(name, cache, positions)
    if (target / "config.json").is_file():
        return target
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = cache / f".build-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BUILD, str(tmp), str(seed_for(name)), str(positions),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=_REPO,
    )
    try:
        output, _ = await proc.communicate()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = output.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise Unavailable(f"cannot build the stand-in model for {name!r}: {' | '.join(lines)}")
    try:
        os.rename(tmp, target)  # atomic: a reader sees the whole directory or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another start built it meanwhile
        if not (target / "config.json").is_file():
            raise
    log.info("tiny_model_built", model=name, path=str(target), seed=seed_for(name))
    return target
