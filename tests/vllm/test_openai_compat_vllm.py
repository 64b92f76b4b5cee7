"""Real vLLM answers the OpenAI table of tests/support/openai_cases.py (issue 12, case 1).

The same rows run against the CPU engine in tests/integration/test_openai_compat.py: together they pin the
CPU engine to vLLM's coercions and refusals. Bodies go through the node's inference port as JSON without
a Content-Type header, as the network's client sends them.
"""

from __future__ import annotations

import pytest

from tests.support.openai_cases import CASES, Case, request_body, verify
from tests.vllm.conftest import SERVED_NAME, Served


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vllm_answers_the_table(vllm_serving: Served, case: Case) -> None:
    resp = vllm_serving.node.inference("POST", case.path, request_body(case, SERVED_NAME), timeout=300)
    verify(case, resp.status, resp.body)
