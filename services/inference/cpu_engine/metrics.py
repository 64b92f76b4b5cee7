"""Prometheus text for ``GET /metrics``, under vLLM's metric names so one scraper reads both engines.

``mlnode_engine_iterations_total`` is ours: it moves on every model step, so the inference manager can
tell a busy engine (counter moving) from a hung one (requests running, counter frozen).
``mlnode_engine_poc_nonces_total`` counts PoC v2 nonces computed (it moves once per PoC batch).
"""

from __future__ import annotations

from collections.abc import Mapping


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(
    model_name: str,
    *,
    running: int,
    waiting: int,
    prompt_tokens: int,
    generation_tokens: int,
    finished: Mapping[str, int],
    iterations: int,
    poc_nonces: int = 0,
) -> str:
    """The exposition text (format 0.0.4) for the engine's current counters."""
    name = f'model_name="{_label(model_name)}"'
    lines: list[str] = []

    def metric(metric_name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {metric_name} {help_text}")
        lines.append(f"# TYPE {metric_name} {kind}")
        lines.extend(f"{metric_name}{{{labels}}} {float(value)}" for labels, value in samples)

    metric("vllm:num_requests_running", "gauge", "Requests in the running batch.", [(name, running)])
    metric("vllm:num_requests_waiting", "gauge", "Requests queued for a batch slot.", [(name, waiting)])
    metric("vllm:prompt_tokens_total", "counter", "Prefilled prompt tokens.", [(name, prompt_tokens)])
    metric("vllm:generation_tokens_total", "counter", "Generated tokens.", [(name, generation_tokens)])
    reasons = sorted({"stop", "length", *(r for r in finished if r != "error")})
    metric(
        "vllm:request_success_total",
        "counter",
        "Requests that finished generating.",
        [(f'finished_reason="{_label(r)}",{name}', finished.get(r, 0)) for r in reasons],
    )
    metric("mlnode_engine_iterations_total", "counter", "Model steps taken.", [(name, iterations)])
    metric("mlnode_engine_poc_nonces_total", "counter", "PoC v2 nonces computed.", [(name, poc_nonces)])
    return "\n".join(lines) + "\n"
