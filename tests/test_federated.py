"""Federated shared + personal LoRA: client update, server step, stacking, runner, resume.

Everything runs on the tiny 2-layer Llama and the 20-user synthetic fixture. The runner
(``training/federated.py``) is exercised in-process for the fast tests and through
``accelerate launch`` / SIGKILL subprocesses for the slow ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmrec import federated as F
from llmrec.adapters import AdapterStore, lora_delta, read_adapter, write_adapter
from llmrec.adapters.constants import ADAPTER_WEIGHTS
from llmrec.config import ConfigError, load_config
from llmrec.data import leave_last_out
from llmrec.federated import add_forgotten, cut_back, fedavg, module_of, update_norm, write_round
from llmrec.finetune import IGNORE_INDEX, next_item_examples
from llmrec.model import load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Recommender

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "training" / "federated.py"
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"


def _overrides(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"data.interactions={FIXTURE / 'interactions.csv'}",
        f"data.catalog={FIXTURE / 'catalog.csv'}",
        f"fed.output_dir={out}",
        f"fed.store_dir={out / 'adapters'}",
        "fed.n_users=6",
        "fed.clients_per_round=4",
        "fed.rounds=2",
        "fed.local_steps=1",
        "fed.val_users=2",
        *extra,
    ]


def _cfg(model_dir: Path, out: Path, *extra: str):
    return load_config(TINY_YAML, _overrides(model_dir, out, *extra))


@pytest.fixture(scope="module")
def runner():
    """training/federated.py as a module (training/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("training_federated", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_dataset):
    """The dual LoRA on the tiny model plus each user's examples."""
    cfg = load_config(TINY_YAML, [f"model.name_or_path={tiny_model_dir}"])
    model, tokenizer = load_model(str(tiny_model_dir))
    dual = F.build_dual_lora(model, cfg.fed, tokenizer.pad_token_id)
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    split = leave_last_out(tiny_dataset.histories)

    def examples(user_id):
        return next_item_examples({user_id: split.train[user_id]}, tiny_dataset.catalog, prompts, 4)

    return cfg, dual, examples, tokenizer


# --------------------------------------------------------------------------- library


def test_saved_key_is_the_one_name_bridge():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.shared.weight"
    assert (
        F.saved_key(name, "shared")
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert F.saved_key(name, "personal") is None
    assert F.saved_key(name.replace("lora_A", "lora_B"), "shared").endswith("lora_B.weight")


def test_both_adapters_active_and_trainable_base_frozen(setup):
    cfg, dual, _, _ = setup
    peft_model = dual.model
    assert sorted(peft_model.base_model.active_adapter) == ["personal", "shared"]
    assert dual.shared and dual.personal and dual.gates
    lora = {id(p) for p in [*dual.shared.values(), *dual.personal.values()]}
    for name, param in peft_model.named_parameters():
        assert param.requires_grad == (id(param) in lora), name
    # ranks as configured, on the same modules
    a_s = next(v for k, v in dual.shared.items() if k.endswith("lora_A.weight"))
    a_p = next(v for k, v in dual.personal.items() if k.endswith("lora_A.weight"))
    assert (a_s.shape[0], a_p.shape[0]) == (cfg.fed.shared_rank, cfg.fed.personal_rank)
    assert {module_of(k) for k in dual.shared} == {module_of(k) for k in dual.personal}


def test_init_is_seeded(setup):
    _, dual, _, _ = setup
    a, b = F.init_shared_state(dual, 0), F.init_shared_state(dual, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    p1, p2 = F.init_personal_state(dual, 0, "1"), F.init_personal_state(dual, 0, "2")
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)
    assert all(not v.any() for k, v in p1.items() if "lora_B" in k)  # starts as the base


def test_one_round_shared_is_the_aggregate_and_personal_stays_home(setup):
    cfg, dual, examples, _ = setup
    shared = F.init_shared_state(dual, 0)
    users = ["1", "2", "4"]
    results = [
        F.client_update(dual, u, examples(u), shared, F.init_personal_state(dual, 0, u), 1)
        for u in users
    ]
    uploads = [r.upload() for r in results]
    outcome = F.server_update(shared, uploads, cfg.fed)
    assert outcome.accepted == users and not outcome.rejected

    # The float64 mean, added in float64 and rounded once (as the Flower server rounds).
    wide = [{k: v.double() for k, v in u.shared_delta.items()} for u in uploads]
    expected = fedavg(wide, [u.n_examples for u in uploads])
    for key in shared:
        exact = (shared[key].double() + expected[key]).float()
        assert torch.equal(outcome.shared_state[key], exact)

    # personal states differ per user and moved away from their init
    p = [r.personal_state for r in results]
    for key in p[0]:
        assert not torch.equal(p[0][key], p[1][key])
    assert any(v.abs().sum() > 0 for k, v in p[0].items() if "lora_B" in k)

    # the upload carries the shared delta and a count, nothing personal
    fields = {f.name for f in dataclasses.fields(F.ClientUpdate)}
    assert fields == {"user_id", "shared_delta", "n_examples", "loss", "seconds"}
    for upload in uploads:
        assert set(upload.shared_delta) == set(shared)
        for key, tensor in upload.shared_delta.items():
            assert tensor.shape == shared[key].shape
    # ... and (sequential schedule) it is not a function of the personal state at all: the
    # same client with a very different personal part uploads the very same bits.
    start = F.init_personal_state(dual, 0, "1")
    other = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
        for k, v in start.items()
    }
    again = F.client_update(dual, "1", examples("1"), shared, other, 1)
    for key in shared:
        assert torch.equal(again.shared_delta[key], uploads[0].shared_delta[key])
    assert any(not torch.equal(again.personal_state[k], p[0][k]) for k in p[0])


def test_client_update_is_a_function_of_seed_round_user(setup):
    _, dual, examples, _ = setup
    shared = F.init_shared_state(dual, 0)
    personal = F.init_personal_state(dual, 0, "3")
    a = F.client_update(dual, "3", examples("3"), shared, personal, 2)
    F.client_update(dual, "5", examples("5"), shared, F.init_personal_state(dual, 0, "5"), 2)
    b = F.client_update(dual, "3", examples("3"), shared, personal, 2)
    assert all(torch.equal(a.shared_delta[k], b.shared_delta[k]) for k in a.shared_delta)
    assert all(torch.equal(a.personal_state[k], b.personal_state[k]) for k in a.personal_state)
    # another round draws other batches (a user with 4 examples in batches of 2)
    assert len(examples("1")) == 4
    one = F.client_update(dual, "1", examples("1"), shared, personal, 2).shared_delta
    others = [
        F.client_update(dual, "1", examples("1"), shared, personal, r).shared_delta
        for r in (3, 4, 5)
    ]
    assert any(not torch.equal(one[k], other[k]) for other in others for k in one)


def _trained_states(dual, examples, seed: int):
    """User 2's shared and personal state after one round, every gate far from neutral."""
    shared = F.init_shared_state(dual, 0)
    result = F.client_update(
        dual, "2", examples("2"), shared, F.init_personal_state(dual, 0, "2"), 1
    )
    shared = {k: shared[k] + result.shared_delta[k] for k in shared}
    personal = dict(result.personal_state)
    gen = torch.Generator().manual_seed(seed)
    for key in personal:
        if key.endswith(F.GATE_SUFFIX):
            personal[key] = torch.randn(1, generator=gen)
    return shared, personal


def test_stacked_adapter_equals_both_adapters(setup, tiny_model_dir, tmp_path):
    cfg, dual, examples, tokenizer = setup
    from peft import PeftModel

    shared, personal = _trained_states(dual, examples, seed=1)
    ids = torch.tensor([tokenizer.encode("Recommend me a movie like The Hidden Lake")])

    dual.load(shared, personal)
    dual.model.eval()
    with torch.no_grad():
        both = dual.model(input_ids=ids).logits

    weights = F.user_weights(shared, personal, cfg.fed, dual.base_model)
    assert weights.r == cfg.fed.shared_rank + cfg.fed.personal_rank
    write_adapter(weights, tmp_path / "user")
    base, _ = load_model(str(tiny_model_dir))
    with torch.no_grad():
        plain = base(input_ids=ids).logits.clone()
        served = PeftModel.from_pretrained(base, str(tmp_path / "user"))(input_ids=ids).logits
    assert not torch.allclose(plain, both, atol=1e-4)  # the adapters do change the output
    torch.testing.assert_close(served, both, atol=1e-5, rtol=0)


def test_regularizers_shrink_what_they_target(setup):
    cfg, dual, examples, _ = setup
    shared = F.init_shared_state(dual, 0)
    personal = F.init_personal_state(dual, 0, "1")

    def run(**decoupling):
        dec = cfg.fed.decoupling.model_copy(update=decoupling)
        # enough steps for the weights to drift: the penalties act on the drift
        dual.cfg = cfg.fed.model_copy(update={"decoupling": dec, "local_steps": 6})
        try:
            return F.client_update(dual, "1", examples("1"), shared, personal, 1)
        finally:
            dual.cfg = cfg.fed

    def b_norm(state):
        return sum(float((v**2).sum()) for k, v in state.items() if "lora_B" in k) ** 0.5

    free = run()
    prox = run(prox_mu=1e6)
    assert update_norm(prox.shared_delta) < 0.5 * update_norm(free.shared_delta)
    decayed = run(personal_decay=50.0)  # lr 0.01: B shrinks by half each step
    assert b_norm(decayed.personal_state) < 0.5 * b_norm(free.personal_state)


def _fake_update(user_id, shared, fill=None, scale=1e-3, n=4):
    delta = {
        k: torch.full_like(v, scale) if fill is None else torch.full_like(v, fill)
        for k, v in shared.items()
    }
    return F.ClientUpdate(user_id, delta, n, loss=1.0, seconds=0.1)


def test_poisoned_updates_are_rejected_and_the_round_completes(setup):
    cfg, dual, _, _ = setup
    shared = F.init_shared_state(dual, 0)
    key = next(iter(shared))
    wrong_shape = dict(_fake_update("5", shared).shared_delta)
    wrong_shape[key] = torch.zeros(3, 3)
    updates = [
        _fake_update("1", shared, scale=1e-3),
        _fake_update("2", shared, fill=math.nan),
        _fake_update("3", shared, fill=1e6),  # norm far above fed.max_update_norm
        _fake_update("4", shared, scale=3e-3),
        F.ClientUpdate("5", wrong_shape, 4, 1.0, 0.1),
        _fake_update("6", shared, scale=1e-3, n=0),  # a lying example count
    ]
    outcome = F.server_update(shared, updates, cfg.fed)
    assert outcome.accepted == ["1", "4"]
    assert set(outcome.rejected) == {"2", "3", "5", "6"}
    assert "non-finite" in outcome.rejected["2"] and "oversized" in outcome.rejected["3"]
    for k in shared:
        torch.testing.assert_close(outcome.shared_state[k], shared[k] + 2e-3)
    assert all(torch.isfinite(v).all() for v in outcome.shared_state.values())


def test_dp_adds_calibrated_noise(setup):
    cfg, dual, _, _ = setup
    shared = F.init_shared_state(dual, 0)
    dp = cfg.fed.model_copy(
        update={
            "dp": cfg.fed.dp.model_copy(
                update={"enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0}
            )
        }
    )
    updates = [_fake_update(str(u), shared, scale=0.0) for u in range(1, 5)]
    with pytest.raises(ValueError, match="generator"):
        F.server_update(shared, updates, dp)
    outcome = F.server_update(shared, updates, dp, torch.Generator().manual_seed(0))
    assert outcome.noised
    noise = torch.cat([(outcome.shared_state[k] - shared[k]).flatten() for k in shared])
    # zero updates: what moved is pure noise, std = z * C / n = 0.25
    assert abs(noise.std().item() - 0.25) < 0.01
    plain = F.server_update(shared, updates, cfg.fed)
    assert not plain.noised and all(torch.equal(plain.shared_state[k], shared[k]) for k in shared)


def test_export_helpers_and_ablations(setup):
    cfg, dual, _, _ = setup
    shared = F.init_shared_state(dual, 0)
    personal = F.init_personal_state(dual, 0, "1")
    assert F.personal_weight_mean(personal) == pytest.approx(1.0)
    assert F.shared_weights(dual, shared).r == cfg.fed.shared_rank
    shared_only = cfg.fed.model_copy(update={"personal_rank": 0})
    with pytest.raises(ValueError, match="shared adapter"):
        F.user_weights(shared, personal, shared_only, "base")
    personal_only = cfg.fed.model_copy(update={"shared_rank": 0})
    assert F.user_weights({}, personal, personal_only, "base").r == cfg.fed.personal_rank


def test_personal_scale_interpolates_from_shared_to_as_trained(setup):
    cfg, dual, examples, _ = setup
    shared, personal = _trained_states(dual, examples, seed=2)
    plain = F.shared_weights(dual, shared)
    trained = F.user_weights(shared, personal, cfg.fed, "base")
    for scale in (0.0, 0.3, 1.0):
        scaled = F.user_weights(shared, F.scale_personal(personal, scale), cfg.fed, "base")
        for module in plain.modules:
            want = (1 - scale) * lora_delta(plain, module) + scale * lora_delta(trained, module)
            torch.testing.assert_close(lora_delta(scaled, module), want, atol=1e-6, rtol=1e-5)
    assert F.scale_personal(personal, 1.0) == personal


def test_pick_personal_scale_keeps_the_lowest_validation_loss(setup, tiny_dataset):
    cfg, dual, examples, tokenizer = setup
    split = leave_last_out(tiny_dataset.histories)
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    recommender = Recommender(dual.model, tokenizer, tiny_dataset.catalog, prompts)
    shared = F.init_shared_state(dual, 0)
    result = F.client_update(
        dual, "3", examples("3"), shared, F.init_personal_state(dual, 0, "3"), 1
    )
    scale, losses = F.pick_personal_scale(
        dual, recommender, split, "3", shared, result.personal_state
    )
    assert sorted(losses) == sorted(set(cfg.fed.decoupling.personal_scales))
    assert losses[scale] == min(losses.values())
    assert len(set(losses.values())) > 1  # the personal part does change the loss
    # without holdout targets, each loss is the validation loss of that scaled state
    no_holdout = cfg.fed.decoupling.model_copy(update={"holdout_targets": 0})
    dual.cfg = cfg.fed.model_copy(update={"decoupling": no_holdout})
    try:
        _, val_only = F.pick_personal_scale(
            dual, recommender, split, "3", shared, result.personal_state
        )
        dual.load(shared, F.scale_personal(result.personal_state, 0.5))
        assert F.validation_loss(dual, recommender, split, "3") == pytest.approx(val_only[0.5])
        assert val_only != losses  # the holdout targets are scored too
    finally:
        dual.cfg = cfg.fed


def test_client_examples_hold_out_the_last_targets(setup, tiny_dataset):
    cfg, _, _, tokenizer = setup
    split = leave_last_out(tiny_dataset.histories)
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    fed = cfg.fed.model_copy(update={"targets_per_user": 6, "targets_per_example": 2})
    fed.decoupling.holdout_targets = 3
    examples = F.client_examples(split, tiny_dataset.catalog, prompts, fed, "4")
    assert sum(e.targets for e in examples) == 6
    held = F.holdout_examples(examples)
    assert len(held) == 1 and held[0].targets == 3 and examples[-1] is held[0]
    # the held-out sequence scores exactly the last 3 training items
    titles = [tiny_dataset.catalog.display(i) for i in split.train["4"][-3:]]
    scored = [t for t in held[0].labels if t != IGNORE_INDEX]
    want = [tok for title in titles for tok in prompts.target_ids(title)]
    assert scored == want


def test_sequential_shared_update_is_plain_fedavgs(setup, tiny_model_dir, tiny_dataset):
    """With the personal part on (gates far from neutral), ours uploads shared-only's delta."""
    cfg, dual, _, tokenizer = setup
    split = leave_last_out(tiny_dataset.histories)
    prompts = PromptBuilder(tokenizer, max_history_items=5, max_prompt_tokens=256)
    examples = F.client_examples(split, tiny_dataset.catalog, prompts, cfg.fed, "5")
    shared = F.init_shared_state(dual, 0)
    first = F.client_update(dual, "5", examples, shared, F.init_personal_state(dual, 0, "5"), 1)
    personal = dict(first.personal_state)
    for key in personal:
        if key.endswith(F.GATE_SUFFIX):
            personal[key] = torch.full((1,), 1.5)
    ours = F.client_update(dual, "5", examples, shared, personal, 2)

    shared_only = cfg.fed.model_copy(update={"personal_rank": 0})
    model, _ = load_model(str(tiny_model_dir))
    plain_dual = F.build_dual_lora(model, shared_only, tokenizer.pad_token_id)
    plain = F.client_update(plain_dual, "5", examples, shared, {}, 2)
    for key, delta in plain.shared_delta.items():
        torch.testing.assert_close(ours.shared_delta[key], delta, atol=1e-6, rtol=0)
    assert any(  # while the personal part did train
        not torch.equal(ours.personal_state[k], personal[k]) for k in personal if "lora_B" in k
    )


def test_selection_and_sharding_are_deterministic():
    cohort = [str(u) for u in range(1, 21)]
    a = F.select_clients(cohort, 5, seed=0, server_round=1)
    assert a == F.select_clients(cohort, 5, seed=0, server_round=1) and len(set(a)) == 5
    assert a != F.select_clients(cohort, 5, seed=0, server_round=2)
    parts = [F.shard(a, i, 2) for i in range(2)]
    assert parts == [a[0::2], a[1::2]]
    assert F.derive_seed(0, "x", 1) == F.derive_seed(0, "x", 1) != F.derive_seed(0, "x", 2)


def test_fed_config_checks():
    with pytest.raises(ConfigError, match="both be 0"):
        load_config(overrides=["fed.shared_rank=0", "fed.personal_rank=0"])
    with pytest.raises(ConfigError, match="aggregation=fedavg"):
        load_config(overrides=["fed.dp.enabled=true", "fed.aggregation=median"])
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_config(overrides=["fed.n_users=4", "fed.clients_per_round=8"])
    with pytest.raises(ConfigError, match="trims nothing"):  # floor(0.1 * 8) = 0
        load_config(overrides=["fed.aggregation=trimmed_mean", "fed.trim_ratio=0.1"])
    load_config(overrides=["fed.aggregation=trimmed_mean", "fed.trim_ratio=0.125"])
    cfg = load_config(overrides=["lora.target_modules=[q_proj]"])
    assert cfg.fed.target_modules == ["q_proj"]


def test_train_command_launches_accelerate():
    from llmrec.launch import TRAINING_SCRIPT, train_command

    assert TRAINING_SCRIPT == SCRIPT
    one = train_command(Path("c.yaml"), ["fed.rounds=2"], 1, resume=True)
    assert one[1:3] == ["-m", "accelerate.commands.launch"] and "--cpu" in one
    assert one[-5:] == [str(SCRIPT), "--config", "c.yaml", "--resume", "fed.rounds=2"]
    two = train_command(None, [], 2)
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    gone = train_command(Path("c.yaml"), [], forget=["7", "9"])
    assert gone[-4:] == ["--forget", "7", "--forget", "9"]


# --------------------------------------------------------------------------- runner


def _final_states(out: Path) -> tuple[dict, dict]:
    """The last round's shared tensors and every client's latest personal tensors."""
    last = max(p for p in out.glob("round-*") if (p / "round.json").is_file())
    shared = read_adapter(last / "shared").state
    personal = {}
    for folder in sorted((out / "clients").iterdir()):
        latest = sorted(folder.glob("personal-r*.safetensors"))[-1]
        personal[folder.name] = (latest.name, load_file(latest))
    return shared, personal


def _assert_same_run(a: Path, b: Path, atol: float = 1e-6) -> None:
    shared_a, personal_a = _final_states(a)
    shared_b, personal_b = _final_states(b)
    assert shared_a.keys() == shared_b.keys()
    for key in shared_a:
        torch.testing.assert_close(shared_a[key], shared_b[key], atol=atol, rtol=0)
    assert personal_a.keys() == personal_b.keys()
    for user, (name, state) in personal_a.items():
        assert personal_b[user][0] == name
        for key in state:
            torch.testing.assert_close(state[key], personal_b[user][1][key], atol=atol, rtol=0)


def _sabotage(calls: list):
    """A client_fn that, in round 1, crashes the 1st client and poisons the 2nd and 3rd."""

    def client_fn(dual, user_id, examples, shared, personal, server_round):
        if server_round == 1:
            calls.append(user_id)
        nth = len(calls) if server_round == 1 else 0
        if nth == 1:
            raise RuntimeError("the phone went offline")
        result = F.client_update(dual, user_id, examples, shared, personal, server_round)
        if nth in (2, 3):
            bad = math.nan if nth == 2 else 1e6
            delta = {k: torch.full_like(v, bad) for k, v in result.shared_delta.items()}
            result = dataclasses.replace(result, shared_delta=delta)
        return result

    return client_fn


@pytest.fixture(scope="module")
def sabotaged_run(runner, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fed-run") / "out"
    calls: list[str] = []
    runner.run(_cfg(tiny_model_dir, out), client_fn=_sabotage(calls))
    return out, calls


def test_failures_and_poison_never_stop_a_round(sabotaged_run):
    out, calls = sabotaged_run
    r1 = json.loads((out / "round-0001" / "round.json").read_text())
    crashed, nan_user, huge_user, *fine = r1["selected"]
    assert calls[:3] == [crashed, nan_user, huge_user]
    assert "offline" in r1["failed"][crashed]
    assert set(r1["rejected"]) == {nan_user, huge_user}
    assert r1["accepted"] == fine
    assert not (out / "clients" / crashed).exists() or not list(
        (out / "clients" / crashed).glob("*r0001*")
    )
    shared = read_adapter(out / "round-0001" / "shared").state
    assert all(torch.isfinite(t).all() for t in shared.values())
    assert (out / "round-0002" / "round.json").is_file()


def test_metrics_checkpoints_and_export(sabotaged_run, tiny_model_dir):
    out, _ = sabotaged_run
    metrics = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["bytes_up_per_client"] == m["bytes_down_per_client"] > 0
        assert 0 < m["comm_ratio"] < 0.01
        assert m["train_loss"] > 0 and 0 <= m["val_HR@10"] <= 1 and m["seconds"] > 0
    assert (out / "loss.png").is_file() and (out / "val_hr.png").is_file()

    export = json.loads((out / "export.json").read_text())
    run = json.loads((out / "run.json").read_text())
    store = AdapterStore(out / "adapters")
    shared_ref = store.shared()
    assert (
        shared_ref.manifest.server_round == 2
        and shared_ref.manifest.base_fingerprint == export["base_fingerprint"]
    )
    trained = sorted(export["users"])
    assert trained and set(trained) <= set(run["cohort"])
    user = trained[0]
    ref = F.adapter_for(store, user)
    assert ref.user_id == user and ref.manifest.rank == 6  # 4 shared + 2 personal
    # each trained user's personal part was scaled as their validation item picked
    assert set(export["personal_scale"]) == set(trained)
    assert ref.manifest.metrics["personal_scale"] == export["personal_scale"][user]
    assert set(export["personal_scale"].values()) <= {0.0, 0.5, 1.0}
    assert store.load(ref).r == 6
    cold = next(u for u in map(str, range(1, 21)) if u not in trained)
    assert F.adapter_for(store, cold).adapter_name == shared_ref.adapter_name


def test_resume_after_a_midround_crash_equals_the_uninterrupted_run(
    sabotaged_run, runner, tiny_model_dir, tmp_path
):
    reference, _ = sabotaged_run
    crashed = tmp_path / "out"
    runner.run(_cfg(tiny_model_dir, crashed, "fed.rounds=1"), client_fn=_sabotage([]))
    # What a crash in the middle of round 2 leaves: some of round 2's clients wrote a
    # personal-r0002 file (here: garbage), the round folder is a hidden temp folder.
    (crashed / ".round-0002.tmp-dead").mkdir()
    selected = json.loads((reference / "round-0002" / "round.json").read_text())["selected"]
    for user_id in selected[:2]:
        junk = crashed / "clients" / user_id / "personal-r0002.safetensors"
        junk.parent.mkdir(parents=True, exist_ok=True)
        save_file({"garbage": torch.ones(2)}, junk)
    cfg = _cfg(tiny_model_dir, crashed)
    with pytest.raises(FileExistsError, match="--resume"):
        runner.run(cfg)
    runner.run(cfg, resume=True, client_fn=_sabotage([]))
    _assert_same_run(reference, crashed, atol=0)
    assert json.loads((crashed / "export.json").read_text())["round"] == 2


def _tensor_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def test_a_run_cut_off_while_pruning_or_exporting_resumes_to_the_same_files(
    sabotaged_run, runner, tiny_model_dir, tmp_path
):
    """What a kill -9 after the last round leaves (bench/crash.py found both): a personal
    version the round had still to prune, and an export without its export.json. The resumed
    run's tensor files are then the uninterrupted run's, byte for byte: no stale version
    left, no adapter published twice."""
    reference, _ = sabotaged_run
    crashed = tmp_path / "out"
    shutil.copytree(reference, crashed)
    selected = json.loads((reference / "round-0002" / "round.json").read_text())["selected"]
    user = next(
        u for u in selected if (crashed / "clients" / u / "personal-r0002.safetensors").is_file()
    )
    save_file({"stale": torch.ones(2)}, crashed / "clients" / user / "personal-r0001.safetensors")
    (crashed / "export.json").unlink()
    runner.run(_cfg(tiny_model_dir, crashed), resume=True, client_fn=_sabotage([]))
    assert _tensor_files(crashed) == _tensor_files(reference)
    assert not list((crashed / "adapters").glob("*/v0002"))
    assert json.loads((crashed / "export.json").read_text())["round"] == 2


def test_dp_run_reports_epsilon(runner, tiny_model_dir, tmp_path):
    out = tmp_path / "dp"
    cfg = _cfg(
        tiny_model_dir,
        out,
        "fed.val_users=0",
        "fed.clients_per_round=2",
        "fed.dp.enabled=true",
        "fed.dp.seed=0",
        "fed.dp.noise_multiplier=1.0",
    )
    runner.run(cfg)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    eps = [r["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] and [r["dp_steps"] for r in rounds] == [1, 2]
    assert rounds[0]["val_HR@10"] is None


# --------------------------------------------------------------------------- subprocess


def _env() -> dict:
    # Same thread count everywhere: the reduction order of a matmul depends on it.
    return os.environ | {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _launch(n: int, overrides: list[str], cwd: Path = ROOT) -> None:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd += (
        ["--multi_gpu", "--num_processes", str(n)] if n > 1 else ["--cpu", "--num_processes", "1"]
    )
    cmd += [str(SCRIPT), "--config", str(TINY_YAML), *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fed-1p") / "out"
    _launch(1, _overrides(tiny_model_dir, out, "fed.rounds=4"))
    return out


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_adapters(one_process_run, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _launch(2, _overrides(tiny_model_dir, out, "fed.rounds=4"))
    _assert_same_run(one_process_run, out, atol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(
    one_process_run, tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY_YAML)]
    cmd += _overrides(tiny_model_dir, out, "fed.rounds=4")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (out / "round-0002").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "round 2 never appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "round-0004").exists(), "the run finished before it could be killed"
    _launch(1, [*_overrides(tiny_model_dir, out, "fed.rounds=4"), "--resume"])
    _assert_same_run(one_process_run, out, atol=0)


def test_forgetting_a_user_gives_the_run_that_never_had_them(runner, tiny_model_dir, tmp_path):
    """``--forget``: back to the last checkpoint before the user's first round (the rounds
    before it stay as they are), then on without them. Every round, server-optimizer state,
    personal part and exported adapter is then, byte for byte, that of a run that never had
    them, and the user's client folder and adapters are gone."""
    extra = ("fed.rounds=4", "fed.decoupling.schedule=after", "fed.server_optimizer=adam",
             "fed.server_learning_rate=0.01", "fed.checkpoint_every=2")  # fmt: skip
    forgot, never = tmp_path / "forgot", tmp_path / "never"
    runner.run(_cfg(tiny_model_dir, forgot, *extra))
    records = [
        json.loads((forgot / f"round-{r:04d}" / "round.json").read_text()) for r in range(1, 5)
    ]
    first = {}
    for record in records:
        for u in record["selected"]:
            first.setdefault(u, record["round"])
    user = max(first, key=lambda u: (first[u], u))
    assert first[user] >= 3, first  # so that a checkpoint (round 2) comes before
    kept = {p: p.read_bytes() for p in sorted((forgot / "round-0002").rglob("*")) if p.is_file()}
    assert (forgot / "adapters" / user).is_dir() and (forgot / "clients" / user).is_dir()

    runner.main(["--config", str(TINY_YAML), "--forget", user,
                 *_overrides(tiny_model_dir, forgot, *extra)])  # fmt: skip
    add_forgotten(never, [user])
    runner.run(_cfg(tiny_model_dir, never, *extra))

    assert {p: p.read_bytes() for p in kept} == kept  # round 2 was not redone

    def run_files(out: Path) -> dict[str, bytes]:  # the store's versions are compared below
        return {n: d for n, d in _tensor_files(out).items() if not n.startswith("adapters/")}

    assert run_files(forgot) == run_files(never)
    store_a, store_b = AdapterStore(forgot / "adapters"), AdapterStore(never / "adapters")
    assert store_a.users() == store_b.users() and user not in store_a.users()
    for u in store_b.users():
        a, b = store_a.current(u), store_b.current(u)
        assert (a.path / ADAPTER_WEIGHTS).read_bytes() == (b.path / ADAPTER_WEIGHTS).read_bytes()
    assert not (forgot / "clients" / user).exists()
    assert user not in json.loads((forgot / "round-0004" / "round.json").read_text())["selected"]
    assert user not in _names_in(forgot)  # no file, folder or JSON string names them
    assert (
        json.loads((forgot / "run.json").read_text())["cohort"]
        == json.loads((never / "run.json").read_text())["cohort"]
    )


def _names_in(folder: Path) -> set[str]:
    """Every file and folder name under ``folder`` and every string (key or value) of its
    JSON files."""
    found: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            found.update(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in folder.rglob("*"):
        found.add(path.name)
        if path.suffix == ".json":
            walk(json.loads(path.read_text()))
    return found


def test_forgetting_a_validation_user_drops_their_records_from_the_rounds_kept(tmp_path):
    """A forgotten user validated in rounds that stay (they were never selected before the
    checkpoint): their per-user entries go, the means are taken again over the others, and
    metrics.json follows."""
    out = tmp_path / "run"
    per_user = {
        "4": {"hit": 1.0, "ndcg": 0.5, "loss": 2.0},
        "9": {"hit": 0.0, "ndcg": 0.0, "loss": 4.0},
        "12": {"hit": 1.0, "ndcg": 1.0, "loss": 3.0},
    }
    record = {"round": 1, "selected": ["4", "12"], "val_HR@10": 2 / 3, "val_NDCG@10": 0.5,
              "val_loss": 3.0, "val_per_user": per_user}  # fmt: skip
    write_round(out, 1, record, None)
    assert cut_back(out, 1, ["4", "9", "12"], ["9"]) == 0
    kept = json.loads((out / "round-0001" / "round.json").read_text())
    assert kept["val_per_user"] == {"4": per_user["4"], "12": per_user["12"]}
    assert (kept["val_HR@10"], kept["val_NDCG@10"], kept["val_loss"]) == (1.0, 0.75, 2.5)
    assert json.loads((out / "metrics.json").read_text())["rounds"] == [kept]
    assert "9" not in _names_in(out)


def test_forgetting_refuses_a_run_whose_personal_parts_train_in_the_rounds(
    runner, tiny_model_dir, tmp_path
):
    with pytest.raises(SystemExit):
        runner.main(["--config", str(TINY_YAML), "--forget", "1",
                     *_overrides(tiny_model_dir, tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out" / "forgotten.json").exists()
