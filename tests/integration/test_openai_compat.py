"""The CPU engine answers the OpenAI table of tests/support/openai_cases.py as vLLM does (issue 12, case 1).

Every row goes through the real node's inference port (gateway proxy, then the engine), as JSON without a
Content-Type header, exactly as the network's client and its validators send it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.node import Node
from tests.support.openai_cases import CASES, Case, request_body, verify

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODEL = "Qwen/Qwen2.5-7B-Instruct"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("openai-compat")).start()
    resp = n.api("POST", "/api/v1/inference/up", {"model": MODEL, "dtype": "auto", "additional_args": []},
                 timeout=180)
    assert resp.status == 200, resp.body
    yield n
    n.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_cpu_engine_answers_as_vllm_does(node: Node, case: Case) -> None:
    resp = node.inference("POST", case.path, request_body(case, MODEL))
    verify(case, resp.status, resp.body)
