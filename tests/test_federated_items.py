"""Federated training of the item-token head: the item rows are shared, every position of a
client's history is a target, what is served is exactly what the clients trained, and under
FedAdam a round is one Adam step on the clients' batch that --resume continues exactly.

The tiny 2-layer Llama extended with one token per item of the 20-user synthetic fixture;
the accelerate runner in-process.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmrec import federated as F
from llmrec.adapters import AdapterStore
from llmrec.config import ConfigError, load_config
from llmrec.data import dataset_from_config, leave_last_out
from llmrec.finetune import IGNORE_INDEX, collate
from llmrec.model import attach_adapter, fingerprint_model_dir, load_model
from llmrec.model.item_vocab import ItemVocab, history_reading, prepare_item_base
from llmrec.prompts import PromptBuilder
from llmrec.recommend.item_scorer import ItemScorer

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"
# FedAdam (llmrec.federated.server_optimizer): one local SGD step, one server Adam step.
FEDADAM = [
    "fed.local_optimizer=sgd",
    "fed.local_steps=1",
    "fed.server_optimizer=adam",
    "fed.server_learning_rate=0.01",
    "fed.learning_rate=0.5",
    "fed.personal_rank=0",
]


def _cfg(model_dir: Path, out: Path, *extra: str):
    return load_config(
        TINY_YAML,
        [
            f"model.name_or_path={model_dir}",
            f"data.interactions={FIXTURE / 'interactions.csv'}",
            f"data.catalog={FIXTURE / 'catalog.csv'}",
            f"fed.output_dir={out}",
            f"fed.store_dir={out / 'adapters'}",
            "model.dtype=float32",  # served and trained compared to float32 precision
            "fed.head=items",
            "fed.window=3",
            "fed.n_users=6",
            "fed.clients_per_round=4",
            "fed.rounds=2",
            "fed.val_users=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def item_dual(tiny_model_dir, tiny_dataset):
    """The dual LoRA over the tiny item-token base, as every federated process loads it."""
    cfg = _cfg(tiny_model_dir, Path("unused"))
    return cfg, F.load_federated_model(cfg, tiny_dataset.catalog)


def _runner():
    spec = importlib.util.spec_from_file_location("fed_items", ROOT / "training" / "federated.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    return runner


@pytest.fixture(scope="module")
def item_run(tiny_model_dir, tmp_path_factory):
    runner = _runner()
    out = tmp_path_factory.mktemp("fed-items") / "out"
    cfg = _cfg(tiny_model_dir, out)
    runner.run(cfg)
    return cfg, out


def test_item_examples_train_every_position_once_and_hold_out_the_tail(item_dual, tiny_dataset):
    cfg, loaded = item_dual
    split = leave_last_out(tiny_dataset.histories)
    vocab = loaded.dual.vocab
    user = max(split.train, key=lambda u: len(split.train[u]))  # 8 items: 3 windows
    examples = F.client_examples(split, tiny_dataset.catalog, loaded.prompts, cfg.fed, user, vocab)
    history = split.train[user]
    k = cfg.fed.decoupling.holdout_targets

    def targets(example):
        return [vocab.item_ids[label] for label in example.labels if label != IGNORE_INDEX]

    trained = [t for e in examples if not e.holdout for t in targets(e)]
    assert trained == list(history[: len(history) - k])  # every position, once, in order
    (held,) = F.holdout_examples(examples)
    assert targets(held) == list(history[-k:]) and held.targets == k
    assert [e.targets for e in examples if not e.holdout] == [
        len(targets(e)) for e in examples if not e.holdout
    ]
    with pytest.raises(ValueError, match="item vocabulary"):
        F.client_examples(split, tiny_dataset.catalog, loaded.prompts, cfg.fed, user)


def test_item_rows_are_shared_and_averaged(item_dual, tiny_dataset):
    cfg, loaded = item_dual
    dual = loaded.dual
    split = leave_last_out(tiny_dataset.histories)
    shared = F.init_shared_state(dual, cfg.fed.seed)
    assert torch.equal(shared[F.ITEM_ROWS_KEY], dual.initial_rows)
    assert not any(F.ITEM_ROWS_KEY in k for k in F.init_personal_state(dual, 0, "u1"))
    users = sorted(split.train)[:2]
    results = []
    for user in users:
        personal = F.init_personal_state(dual, cfg.fed.seed, user)
        examples = F.client_examples(
            split, tiny_dataset.catalog, loaded.prompts, cfg.fed, user, dual.vocab
        )
        results.append(F.client_update(dual, user, examples, shared, personal, 1))
    for r in results:
        assert r.shared_delta.keys() == shared.keys()
        assert r.shared_delta[F.ITEM_ROWS_KEY].abs().max() > 0  # the clients move the rows
        assert F.ITEM_ROWS_KEY not in r.personal_state
    outcome = F.server_update(shared, [r.upload() for r in results], cfg.fed)
    n = torch.tensor([float(r.n_examples) for r in results], dtype=torch.float64)
    deltas = [r.shared_delta[F.ITEM_ROWS_KEY].double() for r in results]
    mean = sum(w * d for w, d in zip(n, deltas, strict=True)) / n.sum()
    torch.testing.assert_close(
        outcome.shared_state[F.ITEM_ROWS_KEY],
        (shared[F.ITEM_ROWS_KEY].double() + mean).float(),
        atol=1e-6,
        rtol=0,
    )


def test_build_refuses_a_head_without_its_vocabulary(tiny_model_dir, tiny_dataset):
    cfg = _cfg(tiny_model_dir, Path("unused"))
    base = prepare_item_base(tiny_model_dir, tiny_dataset.catalog)
    model, tokenizer = load_model(str(base))
    with pytest.raises(ValueError, match="item vocabulary"):
        F.build_dual_lora(model, cfg.fed, tokenizer.pad_token_id)
    titles = load_config(TINY_YAML, [f"model.name_or_path={tiny_model_dir}"])
    with pytest.raises(ValueError, match="no item vocabulary"):
        F.build_dual_lora(model, titles.fed, tokenizer.pad_token_id, ItemVocab.read(base))


def test_run_checkpoints_the_rows_and_serves_what_was_trained(
    item_run, item_dual, tiny_model_dir, tiny_dataset
):
    cfg, out = item_run
    _, loaded = item_dual
    for r in (1, 2):
        assert (F.round_dir(out, r) / F.ITEM_ROWS_FILE).is_file()
    final = F.read_round_state(out, 2)
    rows1 = load_file(F.round_dir(out, 1) / F.ITEM_ROWS_FILE)[F.ITEM_ROWS_KEY]
    assert not torch.equal(rows1, final[F.ITEM_ROWS_KEY])
    assert not torch.equal(loaded.dual.initial_rows, rows1)
    record = json.loads((out / F.EXPORT_JSON).read_text())
    served = out / F.SERVED_BASE_DIR
    assert record["base"] == str(served)
    assert record["base_fingerprint"] == fingerprint_model_dir(served)
    assert history_reading(served) == ("items", cfg.fed.window)
    vocab = ItemVocab.read(served)
    assert vocab == loaded.dual.vocab

    # A user's published adapter over the served base ranks exactly as the client's own
    # dual LoRA (shared after the last round + its personal part at the picked scale).
    store = AdapterStore(out / "adapters", base_fingerprint=record["base_fingerprint"])
    split = leave_last_out(tiny_dataset.histories)
    user, scale = next(iter(record["personal_scale"].items()))
    ref = store.current(user)
    assert ref.manifest.base_fingerprint == record["base_fingerprint"]
    model, tokenizer = load_model(str(served))
    model = attach_adapter(model, ref.path).eval()
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    history = split.history_for_valid(user)
    got = ItemScorer(model, vocab, tiny_dataset.catalog, prompts, "items", cfg.fed.window)
    dual = loaded.dual
    personal = F.load_personal(out, user, before=3)
    dual.load(final, F.scale_personal(personal, scale))
    dual.model.eval()
    want = ItemScorer(dual.model, vocab, tiny_dataset.catalog, prompts, "items", cfg.fed.window)
    torch.testing.assert_close(
        got.log_probs([history]), want.log_probs([history]), atol=1e-5, rtol=0
    )
    rounds = json.loads((out / F.METRICS_JSON).read_text())["rounds"]
    assert rounds[-1]["val_HR@10"] is not None and rounds[-1]["accepted"]


def test_the_merged_export_ranks_as_the_stacked_one(
    item_run, tiny_model_dir, tiny_dataset, tmp_path
):
    """fed.merge_shared: the same run exported with the shared adapter merged into the
    served base ranks every user as the stacked export does; a user whose personal part is
    off, and a cold-start user, are served the merged base alone (no adapter at all)."""
    import shutil

    cfg, out = item_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("adapters"))
    shutil.copytree(out / "adapters", tmp_path / "stacked")
    merged_cfg = _cfg(tiny_model_dir, run, "fed.merge_shared=true")
    merged_cfg.fed.store_dir = tmp_path / "merged"
    _runner().run(merged_cfg, resume=True)
    record = json.loads((run / F.EXPORT_JSON).read_text())
    assert record["merge_shared"] and record["base"] == str(run / F.MERGED_BASE_DIR)
    assert "shared" not in record and not (tmp_path / "merged" / "_shared").exists()
    zero = {u for u, name in record["users"].items() if name is None}
    assert zero == {u for u, scale in record["personal_scale"].items() if scale == 0.0}
    assert zero and len(zero) < len(record["users"])  # both kinds are checked below

    split = leave_last_out(tiny_dataset.histories)
    cold = next(u for u in split.valid if u not in record["users"])
    stacked_store = AdapterStore(tmp_path / "stacked")
    merged_store = AdapterStore(tmp_path / "merged")

    def ranks(base: Path, store: AdapterStore, user: str) -> torch.Tensor:
        model, tokenizer = load_model(str(base))
        ref = F.adapter_for(store, user)
        if ref is not None:
            model = attach_adapter(model, ref.path)
        prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
        scorer = ItemScorer(
            model.eval(), ItemVocab.read(base), tiny_dataset.catalog, prompts, "items", 3
        )
        return scorer.log_probs([split.history_for_valid(user)])

    for user in [*record["users"], cold]:
        want = ranks(out / F.SERVED_BASE_DIR, stacked_store, user)
        got = ranks(run / F.MERGED_BASE_DIR, merged_store, user)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (F.adapter_for(merged_store, user) is None) == (user in zero or user == cold)

    # llmrec evaluate ranks a merged run's users the same way (the base alone where no
    # adapter is served).
    from llmrec import evaluate

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / evaluate.RUN_DIR).symlink_to(run)
    (folder / evaluate.STORE_DIR).symlink_to(tmp_path / "merged")
    users = [*record["users"], cold]
    rank, _ = evaluate._store_methods(cfg, tiny_dataset, folder, users)
    for user in users:
        history = split.history_for_valid(user)
        want = ranks(run / F.MERGED_BASE_DIR, merged_store, user)[0]
        top = sorted(range(len(want)), key=lambda i: -float(want[i]))
        ids = [i for i in (tiny_dataset.catalog.ids[j] for j in top) if i not in history]
        assert rank(user, history, 3) == ids[:3]


def test_a_local_refresh_trains_the_personal_part_over_the_served_base(item_run, tiny_dataset):
    cfg, out = item_run
    refresher = F.Personalizer(cfg, tiny_dataset.catalog)
    served = ItemVocab.read(out / F.SERVED_BASE_DIR)
    assert refresher.dual.vocab == served
    rows = load_file(F.round_dir(out, 2) / F.ITEM_ROWS_FILE)[F.ITEM_ROWS_KEY]
    torch.testing.assert_close(refresher.shared[F.ITEM_ROWS_KEY], rows, atol=1e-6, rtol=0)
    store = AdapterStore(out / "adapters")
    user = min(json.loads((out / F.EXPORT_JSON).read_text())["users"], key=int)
    before = store.current(user)
    history = leave_last_out(tiny_dataset.histories).train[user]
    result = refresher.refresh(user, history)
    after = store.current(user)
    assert result.adapter_name == after.adapter_name and after.version == before.version + 1
    assert after.manifest.base_fingerprint == fingerprint_model_dir(out / F.SERVED_BASE_DIR)
    old, new = store.load(before).state, store.load(after).state
    assert any(not torch.equal(old[k], new[k]) for k in old)  # the personal part moved
    with pytest.raises(F.RefreshError, match="at least 2 items"):
        refresher.refresh(user, history[:1])


def test_batched_clients_run_the_same_rounds(item_run, tiny_model_dir, tmp_path):
    """fed.client_batch: the runner trains groups of clients in one forward, and every
    round's shared state and every client's personal state match the one-at-a-time run."""
    _, out = item_run
    runner = _runner()
    batched = tmp_path / "batched"
    runner.run(_cfg(tiny_model_dir, batched, "fed.client_batch=3"))
    for r in (1, 2):
        one, many = F.read_round_state(out, r), F.read_round_state(batched, r)
        assert one.keys() == many.keys()
        for k in one:
            torch.testing.assert_close(many[k], one[k], rtol=1e-3, atol=1e-4)
    users = sorted(p.name for p in (out / F.CLIENTS_DIR).iterdir())
    assert users == sorted(p.name for p in (batched / F.CLIENTS_DIR).iterdir())
    for user in users:
        for path in sorted((out / F.CLIENTS_DIR / user).glob("personal-r*.safetensors")):
            one, many = load_file(path), load_file(batched / F.CLIENTS_DIR / user / path.name)
            for k in one:
                torch.testing.assert_close(many[k], one[k], rtol=1e-3, atol=1e-4)


def test_schedule_after_fits_every_personal_part_once_on_the_final_shared_part(
    item_run, tiny_model_dir, tmp_path
):
    """decoupling.schedule=after: the rounds are plain FedAvg's (the same shared states as
    the sequential run, which trains its shared part first), then every cohort client fits
    its personal part on the final shared part and is published with it."""
    cfg, out = item_run
    after = tmp_path / "after"
    runner = _runner()
    extra = ("fed.decoupling.schedule=after", "fed.decoupling.personal_steps=3")
    runner.run(_cfg(tiny_model_dir, after, *extra, "fed.client_batch=4"))
    for r in (1, 2):
        one, two = F.read_round_state(out, r), F.read_round_state(after, r)
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-4)
    run = json.loads((after / F.RUN_JSON).read_text())
    for user in run["cohort"]:
        versions = F.personal_versions(after, user)
        assert versions == [cfg.fed.rounds]  # the fit alone wrote one
    exported = json.loads((after / F.EXPORT_JSON).read_text())
    assert sorted(exported["users"]) == sorted(run["cohort"])


def test_personal_only_under_schedule_after_is_the_fit_alone(tiny_model_dir, tmp_path):
    """fed.shared_rank=0 with schedule "after": the rounds would train the shared part alone
    and there is none, so there are no rounds (nothing crosses the network); every cohort
    client fits its personal part once, on the base, and is published with it."""
    out = tmp_path / "personal"
    extra = ("fed.shared_rank=0", "fed.decoupling.schedule=after", "fed.client_batch=4")
    cfg = _cfg(tiny_model_dir, out, *extra)
    _runner().run(cfg)
    assert F.completed_rounds(out) == []
    assert json.loads((out / F.METRICS_JSON).read_text()) == {"rounds": []}
    run = json.loads((out / F.RUN_JSON).read_text())
    dual = F.load_federated_model(cfg, dataset_from_config(cfg).catalog).dual
    for user in run["cohort"]:
        assert F.personal_versions(out, user) == [cfg.fed.rounds]
        fitted = F.load_personal(out, user, before=cfg.fed.rounds + 1)
        start = F.init_personal_state(dual, cfg.fed.seed, user)
        assert any(not torch.equal(fitted[k], start[k]) for k in start)
    exported = json.loads((out / F.EXPORT_JSON).read_text())
    assert "shared" not in exported
    assert sorted(exported["users"]) == sorted(run["cohort"])


def test_a_fedadam_round_is_one_adam_step_on_the_clients_batch(tiny_model_dir, tiny_dataset):
    cfg = _cfg(tiny_model_dir, Path("unused"), *FEDADAM, "fed.local_batch_size=1")
    loaded = F.load_federated_model(cfg, tiny_dataset.catalog)
    dual, fed = loaded.dual, cfg.fed
    split = leave_last_out(tiny_dataset.histories)
    users = sorted(split.train)[:4]
    examples = {
        u: F.client_examples(split, tiny_dataset.catalog, loaded.prompts, fed, u, dual.vocab)
        for u in users
    }
    shared = F.init_shared_state(dual, 0)
    shared = {k: v + 0.01 * torch.randn_like(v) for k, v in shared.items()}
    results = [F.client_update(dual, u, examples[u], shared, {}, 1) for u in users]
    optimizer = F.server_optimizer(fed, shared)
    got = F.server_update(shared, [r.upload() for r in results], fed, None, optimizer).shared_state

    # Centralized: the same windows each client drew, the loss weighted as FedAvg weights the
    # clients, one torch Adam step at the server's learning rate.
    params = {k: torch.nn.Parameter(v.clone()) for k, v in shared.items()}
    adam = torch.optim.Adam(params.values(), lr=fed.server_learning_rate)
    weights = torch.tensor([float(r.n_examples) for r in results])
    dual.load(shared, {})
    total = 0.0
    for u, w in zip(users, weights / weights.sum(), strict=True):
        gen = torch.Generator().manual_seed(F.derive_seed(fed.seed, "client", 1, u))
        trained = [e for e in examples[u] if not e.holdout]
        drawn = torch.randperm(len(trained), generator=gen).tolist()[:1]
        loss = dual.loss(collate([trained[i] for i in drawn], dual.pad_id))
        total = total + w * loss
    grads = torch.autograd.grad(total, [dual.shared[k] for k in params])
    for p, g in zip(params.values(), grads, strict=True):
        p.grad = g
    adam.step()
    for k, p in params.items():
        # To float rounding: about 1% of one Adam step (lr 0.01) at most.
        torch.testing.assert_close(got[k], p.detach(), rtol=1e-3, atol=1e-4)
    assert any((got[k] - shared[k]).abs().max() > 1e-3 for k in shared)  # it moved


def test_resume_continues_the_server_moments(tiny_model_dir, tmp_path):
    runner = _runner()
    straight = tmp_path / "straight"
    runner.run(_cfg(tiny_model_dir, straight, *FEDADAM))
    cut = tmp_path / "cut"
    runner.run(_cfg(tiny_model_dir, cut, *FEDADAM, "fed.rounds=1"))
    assert F.server_optimizer_path(cut, 1).is_file()
    runner.run(_cfg(tiny_model_dir, cut, *FEDADAM), resume=True)
    a, b = F.read_round_state(straight, 2), F.read_round_state(cut, 2)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Only the latest round keeps the moments.
    assert (
        not F.server_optimizer_path(cut, 1).exists() and F.server_optimizer_path(cut, 2).is_file()
    )


def test_a_resume_without_the_moments_is_refused(tiny_model_dir, tmp_path):
    """Fresh moments would silently change every later round: refuse instead."""
    runner = _runner()
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    runner.run(_cfg(tiny_model_dir, straight, *FEDADAM))
    runner.run(_cfg(tiny_model_dir, cut, *FEDADAM, "fed.rounds=1"))
    F.server_optimizer_path(cut, 1).unlink()
    with pytest.raises(FileNotFoundError, match="server optimizer"):
        runner.run(_cfg(tiny_model_dir, cut, *FEDADAM), resume=True)


def test_fedsa_lora_federates_a_and_keeps_each_b_with_its_client(
    item_dual, tiny_model_dir, tiny_dataset, tmp_path
):
    """fed.share=lora_a (FedSA-LoRA): the server only ever holds A and the item rows, each
    client's B stays in its own personal state, and a user is served the shared A with its
    own B, ranking exactly as its client does; cold start gets B = 0."""
    out = tmp_path / "fedsa"
    fedsa = ("fed.share=lora_a", "fed.personal_rank=0", "fed.decoupling.schedule=joint")
    cfg = _cfg(tiny_model_dir, out, *fedsa, "fed.client_batch=2")
    _runner().run(cfg)
    loaded = F.load_federated_model(cfg, tiny_dataset.catalog)
    dual = loaded.dual
    assert dual.shared and not any("lora_B" in k for k in dual.shared)
    assert dual.personal and all(k.endswith(".lora_B.weight") for k in dual.personal)
    final = F.read_round_state(out, 2, dual.shared)
    assert final.keys() == dual.shared.keys()
    record = json.loads((out / F.EXPORT_JSON).read_text())
    store = AdapterStore(out / "adapters", base_fingerprint=record["base_fingerprint"])
    cold = store.load(store.shared()).state
    assert all(not v.any() for k, v in cold.items() if "lora_B" in k)
    user = min(record["users"], key=int)
    personal = F.load_personal(out, user, before=3)
    assert personal.keys() == dual.personal.keys() and any(v.any() for v in personal.values())
    half = F.scale_personal(personal, 0.5)
    assert all(torch.allclose(half[k], personal[k] / 2) for k in personal)
    served = out / F.SERVED_BASE_DIR
    model, tokenizer = load_model(str(served))
    model = attach_adapter(model, store.current(user).path).eval()
    prompts = PromptBuilder.from_config(tokenizer, cfg.prompts)
    vocab = ItemVocab.read(served)
    history = leave_last_out(tiny_dataset.histories).history_for_valid(user)
    got = ItemScorer(model, vocab, tiny_dataset.catalog, prompts, "items", cfg.fed.window)
    dual.load(final, personal)
    dual.model.eval()
    want = ItemScorer(dual.model, vocab, tiny_dataset.catalog, prompts, "items", cfg.fed.window)
    torch.testing.assert_close(
        got.log_probs([history]), want.log_probs([history]), atol=1e-5, rtol=0
    )
    # A local refresh trains the user's B alone, over the same A.
    before = store.current(user)
    F.Personalizer(cfg, tiny_dataset.catalog).refresh(user, history)
    after = store.current(user)
    assert after.version == before.version + 1
    old, new = store.load(before).state, store.load(after).state
    for k in old:
        assert torch.equal(old[k], new[k]) != k.endswith(".lora_B.weight")
    with pytest.raises(ConfigError, match="FedSA-LoRA"):
        _cfg(tiny_model_dir, out, "fed.share=lora_a")  # a personal adapter too


def test_merge_shared_needs_the_item_head_and_a_shared_adapter():
    for extra in (["fed.head=titles"], ["fed.shared_rank=0"]):
        with pytest.raises(ConfigError, match="merge_shared merges the shared adapter"):
            load_config(TINY_YAML, ["fed.merge_shared=true", *extra])
