"""An error answers JSON even when the resource had already chosen another type (``/metrics`` sets
text before it gathers): it used to answer 415 with an empty body, hiding the reason."""

from __future__ import annotations

import falcon
import falcon.asgi
import falcon.testing

from node.errors import Unavailable
from services.gateway import errors


class TextThenFails:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def on_get(self, _req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        raise self.error


def client(error: Exception) -> falcon.testing.TestClient:
    app = falcon.asgi.App()
    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(Unavailable, errors.handle_mlnode_error)
    app.add_route("/x", TextThenFails(error))
    return falcon.testing.TestClient(app)


def test_a_service_error_after_a_text_content_type_answers_json() -> None:
    reason = "cannot write /s/x (state directory): No space left on device"
    result = client(Unavailable(reason)).simulate_get("/x")
    assert (result.status_code, result.json) == (503, {"detail": reason})


def test_a_crash_after_a_text_content_type_answers_json() -> None:
    result = client(KeyError("k")).simulate_get("/x")
    assert (result.status_code, result.json) == (500, {"detail": "internal error: KeyError"})
