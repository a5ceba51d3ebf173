"""The gateway on an item-token base: one engine request ranks every unseen item.

In process (transformers + peft) and on the REAL vLLM server (slow): both must return the
library's one-pass ranking (``ItemScorer``) with the user's own adapter.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from llmrec.adapters import module_shapes_for
from llmrec.config import ConfigError
from llmrec.model import attach_adapter, load_model
from llmrec.model.item_vocab import ItemVocab
from llmrec.model.quantized import use_quantized_weights
from llmrec.prompts import PromptBuilder
from llmrec.recommend.item_scorer import ItemScorer
from llmrec_serving import releases
from llmrec_serving.app import create_app, serve_in_thread
from llmrec_serving.config import load_serving_config
from llmrec_serving.engines.cpu_lora_ops import INSTALLED_MESSAGE
from llmrec_serving.engines.launcher import cpu_has_4bit_gemm
from llmrec_serving.services import build_services


def library_items(world, catalog, user, history, k=5, quantized=False):
    """The library's one-pass ranking on the world's base with ``user``'s current adapter
    (``quantized``: every linear weight as its 4-bit version stands for it)."""
    model, tokenizer = load_model(str(world.model_dir))
    if quantized:
        assert use_quantized_weights(model) == len(module_shapes_for(world.model_dir)) - 1
    model = attach_adapter(model, world.store.current(user).path).eval()
    scorer = ItemScorer(model, ItemVocab.read(world.model_dir), catalog, PromptBuilder(tokenizer))
    return [(r.item_id, r.score) for r in scorer.recommend(history, k=k)]


class CountingBackend:
    """The real backend, counting the one-pass requests the gateway sends it."""

    def __init__(self, backend):
        self._backend, self.calls = backend, 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    async def top_tokens(self, *args, **kwargs):
        self.calls += 1
        return await self._backend.top_tokens(*args, **kwargs)


def post(client_or_url, world, body):
    headers = {"Authorization": f"Bearer {world.keys['1']}"}
    if isinstance(client_or_url, str):
        r = httpx.post(
            f"{client_or_url}/v1/recommendations", json=body, headers=headers, timeout=300
        )
    else:
        r = client_or_url.post("/v1/recommendations", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def check_ranking(reply, world, services, history, quantized=False):
    expected = library_items(world, services.catalog, "1", history, quantized=quantized)
    assert reply["adapter"] == "1@v1"
    assert [i["item_id"] for i in reply["items"]] == [i for i, _ in expected]
    assert [i["score"] for i in reply["items"]] == pytest.approx([s for _, s in expected], abs=2e-3)
    assert not {i["item_id"] for i in reply["items"]} & set(history)


def test_one_request_ranks_with_the_users_adapter_in_process(item_serving_world):
    world = item_serving_world
    cfg = load_serving_config(None, [*world.overrides, "serve.backend=inprocess"])
    services = build_services(cfg)
    assert services.ranker.items is not None
    engine = services.engines[0]
    counting = engine.backend = CountingBackend(engine.backend)
    with TestClient(create_app(services)) as client:
        history = list(services.profiles.base_histories["1"])
        reply = post(client, world, {"history": history})
        assert counting.calls == 1
        check_ranking(reply, world, services, history)
        excluded = [i["item_id"] for i in reply["items"][:2]]
        again = post(client, world, {"history": history, "exclude": excluded})
        assert not {i["item_id"] for i in again["items"]} & set(excluded)
        assert [i["item_id"] for i in again["items"][:3]] == [
            i["item_id"] for i in reply["items"][2:5]
        ]


@pytest.mark.slow
def test_one_vllm_request_ranks_with_the_users_adapter(item_serving_world, vllm_overrides):
    world = item_serving_world
    cfg = load_serving_config(None, [*world.overrides, *vllm_overrides])
    services = build_services(cfg)
    engine = services.engines[0]
    counting = engine.backend = CountingBackend(engine.backend)
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=600) as url:
        history = list(services.profiles.base_histories["1"])
        reply = post(url, world, {"history": history})
        assert counting.calls == 1
        check_ranking(reply, world, services, history)
    # ... through the CPU LoRA ops grouped by adapter (the plugin vLLM loaded).
    assert INSTALLED_MESSAGE in engine.backend.server.log_file.read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    not cpu_has_4bit_gemm(), reason="vLLM's CPU kernels here (no AVX-512) have no 4-bit matmul"
)
def test_the_4bit_version_serves_the_adapters_trained_on_the_model(
    item_serving_world, vllm_overrides
):
    """``serve.quantization=w4a16``: vLLM runs the 4-bit version with the user's adapter
    (trained on the unquantized model) on top, and ranks as the library does on the weights
    the 4-bit version stands for (the item rows and head are not quantized)."""
    world = item_serving_world
    overrides = [*world.overrides, *vllm_overrides, "serve.quantization=w4a16"]
    services = build_services(load_serving_config(None, [*overrides, "model.dtype=bfloat16"]))
    assert services.engines[0].backend.server.spec.model.endswith("+w4a16")
    with serve_in_thread(create_app(services), "127.0.0.1", startup_timeout_s=600) as url:
        history = list(services.profiles.base_histories["1"])
        reply = post(url, world, {"history": history})
    expected = library_items(world, services.catalog, "1", history, quantized=True)
    assert reply["adapter"] == "1@v1"
    assert [i["item_id"] for i in reply["items"]] == [i for i, _ in expected]
    # The engine computes in bfloat16, the library in float32.
    assert [i["score"] for i in reply["items"]] == pytest.approx([s for _, s in expected], abs=1e-2)


def test_4bit_serving_without_the_kernel_is_refused_by_name(
    item_serving_world, vllm_overrides, monkeypatch
):
    """A CPU whose vLLM kernels have no 4-bit matmul (the hardware: the one thing faked) gets
    a config error naming the field, not an engine that dies at its first forward."""
    monkeypatch.setattr(releases, "cpu_has_4bit_gemm", lambda: False)
    overrides = [*item_serving_world.overrides, *vllm_overrides, "serve.quantization=w4a16"]
    cfg = load_serving_config(None, [*overrides, "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="serve.quantization=w4a16: this CPU has no AVX-512"):
        build_services(cfg)


def test_quantized_serving_computes_in_16_bits():
    with pytest.raises(ConfigError, match="model.dtype=float32 with serve.quantization=w4a16"):
        load_serving_config(None, ["serve.quantization=w4a16", "model.dtype=float32"])


def test_quantized_serving_needs_the_vllm_backend():
    with pytest.raises(ConfigError, match="serve: .*quantization=w4a16 needs backend=vllm"):
        load_serving_config(None, ["serve.quantization=w4a16", "serve.backend=inprocess"])
