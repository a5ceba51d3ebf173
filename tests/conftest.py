"""Shared fixtures: offline hub, a tiny Llama with the real SmolLM2 tokenizer, the fixture data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def free_port():
    """``llmrec.launch.free_port`` itself: call it (``free_port()``) for a loopback TCP port
    that is free right now, as many times as a test or fixture needs ports."""
    from llmrec.launch import free_port

    return free_port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama built locally from a config, with the real SmolLM2 tokenizer."""
    from llmrec.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_dataset():
    """The committed synthetic 20-user, 30-item data set."""
    from llmrec.data import load_generic

    return load_generic(FIXTURES / "tiny" / "interactions.csv", FIXTURES / "tiny" / "catalog.csv")


@pytest.fixture(scope="module")
def serving_world(tmp_path_factory, tiny_model_dir):
    """An adapter store with users 1 and 2 (own adapters) and a shared adapter, keys for
    users 1, 2, 3 (3 has no adapter: cold start) and an admin, and the config overrides
    that serve them on the tiny model and the tiny data set. ``publish(user, seed)`` adds a
    version. One per test module: tests that publish use users of their own."""
    return make_serving_world(tmp_path_factory.mktemp("serving"), tiny_model_dir)


@pytest.fixture(scope="module")
def item_serving_world(tmp_path_factory, tiny_model_dir, tiny_dataset):
    """The serving world on the tiny model extended with one token per tiny-catalog item."""
    from llmrec.model.item_vocab import prepare_item_base

    base = prepare_item_base(tiny_model_dir, tiny_dataset.catalog)
    return make_serving_world(tmp_path_factory.mktemp("item-serving"), base)


def make_serving_world(tmp_path: Path, tiny_model_dir: Path):
    """The serving world (see ``serving_world``) in ``tmp_path``, over ``tiny_model_dir``."""
    from types import SimpleNamespace

    from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for
    from llmrec.model import fingerprint_model_dir
    from llmrec_serving.keys import KeyStore

    targets = ("q_proj", "v_proj")
    shapes = module_shapes_for(tiny_model_dir)
    fingerprint = fingerprint_model_dir(tiny_model_dir)
    store = AdapterStore(
        tmp_path / "adapters", max_rank=16, module_shapes=shapes, base_fingerprint=fingerprint
    )

    def publish(user_id: str, seed: int, rank: int = 8):
        weights = LoraWeights.random(shapes, targets, rank, seed, str(tiny_model_dir))
        if user_id == "_shared":
            return store.publish_shared(weights, base_fingerprint=fingerprint)
        return store.publish(user_id, weights, base_fingerprint=fingerprint)

    publish("_shared", seed=100)
    publish("1", seed=1)
    publish("2", seed=2)
    keys = KeyStore(tmp_path / "keys.json")
    tiny = FIXTURES / "tiny"
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        "model.dtype=float32",
        "data.name=generic",
        f"data.interactions={tiny / 'interactions.csv'}",
        f"data.catalog={tiny / 'catalog.csv'}",
        "lora.target_modules=[q_proj, v_proj]",
        "prompts.max_history_items=5",
        "prompts.max_prompt_tokens=256",
        "recommend.k=5",
        "recommend.beam_width=8",
        f"serve.store_dir={store.root}",
        f"serve.keys_file={keys.path}",
        "serve.max_model_len=512",
        "serve.explain=false",
        "serve.explain_max_tokens=8",
        # Profiles and personal state of this module's own: never the repository's outputs/.
        f"profile.url=sqlite:///{tmp_path / 'profiles.db'}",
        f"fed.output_dir={tmp_path / 'fed'}",
    ]
    return SimpleNamespace(
        store=store,
        publish=publish,
        keys={u: keys.add(u) for u in ("1", "2", "3")} | {"admin": keys.add(None, admin=True)},
        overrides=overrides,
        model_dir=tiny_model_dir,
        tmp=tmp_path,
    )


@pytest.fixture(scope="module")
def library_ranking(serving_world):
    """``rank(catalog, adapter_dir, history, k=5)``: llmrec's own Recommender (transformers +
    peft) on the serving world's base, plus the adapter when given: the reference ranking
    that every serving backend must reproduce, as ``[(item_id, score), ...]``."""
    from llmrec.model import attach_adapter, load_model
    from llmrec.prompts import PromptBuilder
    from llmrec.recommend import Recommender

    def rank(catalog, adapter_dir, history, k=5):
        model, tokenizer = load_model(str(serving_world.model_dir))
        if adapter_dir is not None:
            model = attach_adapter(model, adapter_dir)
        prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
        rec = Recommender(model, tokenizer, catalog, prompts, beam_width=8)
        return [(r.item_id, r.score) for r in rec.recommend(history, k=k)]

    return rank


@pytest.fixture(scope="module")
def vllm_overrides(free_port):
    """Config overrides for a managed vLLM CPU server small enough for this machine's tests."""
    return [
        "serve.backend=vllm",
        f"serve.vllm_port={free_port()}",
        "serve.cpu_threads=nobind",
        "serve.kv_cache_gib=1",
        "serve.max_cpu_loras=4",
        "serve.max_loras=2",
    ]
