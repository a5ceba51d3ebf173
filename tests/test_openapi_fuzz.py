"""The gateway against its own published schema: Schemathesis, every operation, all checks.

The in-process backend on the tiny item-token model (the same app, routes and limits as with
vLLM). 100 schema-valid and 100 schema-violating requests per operation, once with user 1's
key and once with the admin key; the result must be no failure at all. ``bench/fuzz.py``
runs the same at 1,000 examples per operation.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from llmrec_serving.app import create_app
from llmrec_serving.config import load_serving_config
from llmrec_serving.services import build_services
from llmrec_serving.testing import fuzz_gateway

pytestmark = pytest.mark.slow  # about two minutes: 2 keys x 2 modes x 100 x 14 operations


@pytest.fixture(scope="module")
def app(item_serving_world):
    cfg = load_serving_config(
        None, [*item_serving_world.overrides, "serve.backend=inprocess", "serve.store_poll_s=0.1"]
    )
    return create_app(build_services(cfg))


def test_every_operation_answers_as_its_schema_says(app, item_serving_world):
    keys = item_serving_world.keys
    report = fuzz_gateway(app, {"user 1": keys["1"], "admin": keys["admin"]}, examples=100)
    assert len(report.operations) >= 14
    assert report.cases >= 2 * 100 * len(report.operations)
    assert not report.failures, report.summary()
    answered = {code for counts in report.statuses.values() for code in counts}
    assert {200, 401, 403, 404, 422} <= answered  # the fuzz reached past the front door
    assert not any(code >= 500 for code in answered)


def test_the_fuzzer_reports_what_a_schema_does_not_say():
    """The harness itself: an undocumented status and a server error are failures."""
    toy = FastAPI()

    @toy.get("/teapot")
    def teapot(n: int = 0) -> dict[str, int]:
        if n > 5:
            raise RuntimeError("boom")  # a 500
        return {"n": n}

    report = fuzz_gateway(toy, {"anyone": "key"}, examples=50)
    (found,) = report.failures.values()
    assert any("Server error" in f for f in found), report.summary()
