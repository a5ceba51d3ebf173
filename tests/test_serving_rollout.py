"""Rolling out a new foundation-model version: the new release warms beside the served one,
the gateway switches, requests in flight finish on the old one, and none is dropped.

The gateway serves over HTTP (in-process engine, tiny model) while a client thread asks
for recommendations without pause; the rollout's config names a second base (the tiny
model with other weights) and a store whose adapters were published against it.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for
from llmrec.model import fingerprint_model_dir
from llmrec_serving.app import create_app, serve_in_thread
from llmrec_serving.config import load_serving_config
from llmrec_serving.services import build_services


@pytest.fixture(scope="module")
def next_run(serving_world, tmp_path_factory):
    """(config overrides of a newer run, its base folder): the tiny base with every weight
    moved a little, and user 1's adapter published twice against it (served as 1@v2)."""
    root = tmp_path_factory.mktemp("next-run")
    base = root / "base"
    shutil.copytree(serving_world.model_dir, base)
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    moved = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(moved, weights, metadata={"format": "pt"})
    shapes, fingerprint = module_shapes_for(base), fingerprint_model_dir(base)
    store = AdapterStore(root / "adapters", max_rank=16, module_shapes=shapes)
    for seed in (7, 8):
        lora = LoraWeights.random(shapes, ("q_proj", "v_proj"), 8, seed, str(base))
        store.publish("1", lora, base_fingerprint=fingerprint)
    shared = LoraWeights.random(shapes, ("q_proj", "v_proj"), 8, 9, str(base))
    store.publish_shared(shared, base_fingerprint=fingerprint)
    return [f"model.name_or_path={base}", f"serve.store_dir={store.root}"], base


def test_a_rollout_switches_releases_without_dropping_a_request(serving_world, next_run):
    world = serving_world
    first = [*world.overrides, "serve.backend=inprocess"]
    services = build_services(load_serving_config(None, first))
    services.reload = lambda: load_serving_config(None, [*first, *next_run[0]])
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    body = {"user": "1", "history": ["m1", "m2"], "k": 3, "explain": False}
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=120) as url:

        def ask_without_pause() -> None:
            with httpx.Client(base_url=url, headers=admin, timeout=60) as client:
                while not stop.is_set():
                    r = client.post("/v1/recommendations", json=body)
                    answers.append((r.status_code, r.json().get("adapter")))

        old = services.release
        asker = threading.Thread(target=ask_without_pause)
        asker.start()
        try:
            while len(answers) < 3:
                time.sleep(0.05)
            user = {"Authorization": f"Bearer {world.keys['1']}"}
            assert httpx.post(f"{url}/v1/admin/rollout", headers=user).status_code == 403
            r = httpx.post(f"{url}/v1/admin/rollout", headers=admin, timeout=120)
            assert r.status_code == 200, r.text
            served = len(answers)
            while len(answers) < served + 3:
                time.sleep(0.05)
        finally:
            stop.set()
            asker.join(timeout=60)
        rolled = r.json()
        assert rolled["release"] == 2 and rolled["changed"]
        assert rolled["model"] == services.release.fingerprint != old.fingerprint
        assert rolled["engines"] == ["r2-engine-0"]
        assert httpx.get(f"{url}/readyz").json()["release"] == 2
        # Again, with nothing new in the config: nothing happens.
        again = httpx.post(f"{url}/v1/admin/rollout", headers=admin, timeout=60).json()
        assert again == rolled | {"changed": False}

    assert {status for status, _ in answers} == {200}, answers
    adapters = [adapter for _, adapter in answers]
    switch = adapters.index("1@v2")  # the new store's current version
    assert set(adapters[:switch]) == {"1@v1"} and set(adapters[switch:]) == {"1@v2"}
    assert old.active == 0 and services.release.number == 2


def test_a_rollout_that_cannot_happen_leaves_the_release_serving(serving_world, tmp_path):
    world = serving_world
    first = [*world.overrides, "serve.backend=inprocess"]
    services = build_services(load_serving_config(None, first))
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=120) as url:
        refused = httpx.post(f"{url}/v1/admin/rollout", headers=admin)
        assert refused.status_code == 409 and "reread" in refused.json()["error"]["message"]
        missing = tmp_path / "no-such-base"
        services.reload = lambda: load_serving_config(
            None, [*first, f"model.name_or_path={missing}"]
        )
        refused = httpx.post(f"{url}/v1/admin/rollout", headers=admin, timeout=60)
        assert refused.status_code == 409, refused.text
        assert "cannot be served" in refused.json()["error"]["message"]
        body = {"user": "1", "history": ["m1"], "k": 2, "explain": False}
        served = httpx.post(f"{url}/v1/recommendations", json=body, headers=admin, timeout=60)
        assert served.status_code == 200 and served.json()["adapter"] == "1@v1"
    assert services.release.number == 1


@pytest.mark.slow
def test_a_rollout_on_vllm_starts_new_engines_and_stops_the_old(
    serving_world, next_run, vllm_overrides
):
    """The same on real vLLM engines: the new release's server listens on a port of its own
    while the old one still serves, and the old server is gone once the rollout answers."""
    world = serving_world
    first = [*world.overrides, *vllm_overrides]
    services = build_services(load_serving_config(None, first))
    services.reload = lambda: load_serving_config(None, [*first, *next_run[0]])
    admin = {"Authorization": f"Bearer {world.keys['admin']}"}
    body = {"user": "1", "history": ["m1", "m2"], "k": 3, "explain": False}
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=600) as url:
        before = httpx.post(f"{url}/v1/recommendations", json=body, headers=admin, timeout=120)
        old = services.engines[0].backend.server
        r = httpx.post(f"{url}/v1/admin/rollout", headers=admin, timeout=600)
        assert r.status_code == 200, r.text
        new = services.engines[0].backend.server
        after = httpx.post(f"{url}/v1/recommendations", json=body, headers=admin, timeout=120)
        assert new.spec.port != old.spec.port and new.pid is not None and old.pid is None
    assert (before.json()["adapter"], after.json()["adapter"]) == ("1@v1", "1@v2")
    assert new.pid is None, "vLLM outlived the gateway"
