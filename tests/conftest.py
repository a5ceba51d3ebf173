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
    from llmrec_serving.testing import make_serving_world

    return make_serving_world(tmp_path_factory.mktemp("serving"), tiny_model_dir, FIXTURES / "tiny")


@pytest.fixture(scope="module")
def item_serving_world(tmp_path_factory, tiny_model_dir, tiny_dataset):
    """The serving world on the tiny model extended with one token per tiny-catalog item."""
    from llmrec.model.item_vocab import prepare_item_base
    from llmrec_serving.testing import make_serving_world

    base = prepare_item_base(tiny_model_dir, tiny_dataset.catalog)
    return make_serving_world(tmp_path_factory.mktemp("item-serving"), base, FIXTURES / "tiny")


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


@pytest.fixture(scope="session")
def postgres(tmp_path_factory, free_port):
    """A real PostgreSQL server on loopback (Debian's binaries), for the session; a function
    ``postgres(name)`` that creates database ``name`` and returns its SQLAlchemy URL.

    ``initdb`` refuses to run as root, so under root the server runs as the ``postgres``
    system user, which owns its folder. Skipped where PostgreSQL is not installed, except in
    CI (``.ci/run`` installs it through ``scripts/setup.sh``), where that is a failure."""
    import glob
    import shutil
    import subprocess

    initdb = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    if initdb is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (scripts/setup.sh installs it)")
        pytest.skip("PostgreSQL is not installed")
    binaries = Path(os.path.realpath(initdb)).parent
    root = tmp_path_factory.mktemp("postgres")
    as_user = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        for folder in (root, *root.parents[:2]):  # pytest's temp folders are 0700
            os.chmod(folder, os.stat(folder).st_mode | 0o711)
        shutil.chown(root, "postgres")

    def run(*cmd):
        done = subprocess.run([*as_user, *cmd], capture_output=True, cwd=root, text=True)
        if done.returncode:  # say why, with the end of the server's own log
            log = (root / "log").read_text()[-2000:] if (root / "log").is_file() else ""
            raise RuntimeError(
                f"{Path(cmd[0]).name} exited {done.returncode}: {done.stdout}{done.stderr}\n{log}"
            )

    port = free_port()
    data = root / "data"
    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
        "-w", "start")  # fmt: skip
    server = f"postgresql+psycopg://postgres@127.0.0.1:{port}"

    def database(name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return f"{server}/{name}"

    yield database
    # A loaded machine may take more than pg_ctl's default minute to stop it.
    run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "300", "stop")
