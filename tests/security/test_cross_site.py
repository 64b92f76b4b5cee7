"""A web page in an operator's browser cannot drive the management port (cross-site request forgery).

The API takes bodies without a Content-Type, so a page could POST ``inference/up`` with ``fetch(...,
{mode: "no-cors"})``. Browsers mark such a request with ``Origin`` (and ``Sec-Fetch-Site``), and can
send it without asking first only as a form or plain text: each of these is refused, while the Network
Node's own requests (no Origin, no or a JSON Content-Type) pass.
"""

from __future__ import annotations

import pytest

from tests.support.node import Node

pytestmark = pytest.mark.timeout(300)

UP = {"model": "org/csrf-model", "dtype": "auto", "additional_args": []}
#: What Chrome sends for ``fetch("http://node:8080/api/v1/inference/up", {method: "POST", mode: "no-cors",
#: body: JSON.stringify(UP)})`` from https://evil.example.
BROWSER_NO_CORS = {"Origin": "https://evil.example", "Content-Type": "text/plain;charset=UTF-8",
                   "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty"}


@pytest.mark.parametrize(("headers", "status"), [
    (BROWSER_NO_CORS, 403),
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),  # a sandboxed frame or a file:// page
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Sec-Fetch-Site": "same-site"}, 403),
    ({"Content-Type": "text/plain"}, 415),  # an old browser without Origin on a form post
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ({"Content-Type": "multipart/form-data; boundary=----x"}, 415),
])
def test_browser_requests_are_refused_and_start_nothing(stopped: Node, headers: dict[str, str],
                                                        status: int) -> None:
    for method, path, body in (("POST", "/api/v1/inference/up/async", UP), ("POST", "/api/v1/stop", None),
                               ("GET", "/api/v1/state", None), ("POST", "/v1/completions", {"prompt": "x"})):
        resp = stopped.api(method, path, body, headers=headers)
        assert resp.status == status, (path, resp.status, resp.body)
        assert "detail" in resp.json()
    assert stopped.api("GET", "/api/v1/state").json()["state"] == "STOPPED"
    assert stopped.engine_pids() == []


def test_the_network_nodes_requests_pass(stopped: Node) -> None:
    assert stopped.api("GET", "/api/v1/state").status == 200
    assert stopped.api("POST", "/api/v1/stop").status == 200
    json_typed = stopped.api("POST", "/api/v1/stop", headers={"Content-Type": "application/json"})
    assert json_typed.status == 200
    resp = stopped.api("POST", "/api/v1/inference/up/async", {"model": "/etc"},
                       headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 400  # it reached the route (and the engine policy)


def test_the_inference_port_serves_browsers_of_the_network(stopped: Node) -> None:
    """Users the Network Node forwards may use a browser: the inference port has no such rule."""
    resp = stopped.inference("GET", "/v1/models", headers={"Origin": "https://chat.example"})
    assert resp.status == 503 and resp.json() == {"detail": "No inference backend available"}
