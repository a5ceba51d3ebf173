"""Batched clients (llmrec.federated.batched) give the updates of one client at a time.

The tiny 2-layer Llama over its item-token base, float64, six clients of the 20-user fixture
with different history lengths (so the group pads, and short clients get filler rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmrec import federated as F
from llmrec.config import ConfigError, load_config
from llmrec.data import leave_last_out
from llmrec.federated.batched import ClientJob, batched_client_updates, run_clients

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "tiny"


def _loaded(model_dir: Path, catalog, *extra: str):
    cfg = load_config(
        TINY_YAML,
        [
            f"model.name_or_path={model_dir}",
            f"data.interactions={FIXTURE / 'interactions.csv'}",
            f"data.catalog={FIXTURE / 'catalog.csv'}",
            "model.dtype=float32",
            "fed.head=items",
            "fed.window=3",
            "fed.local_steps=3",
            "fed.decoupling.prox_mu=0.5",
            *extra,
        ],
    )
    loaded = F.load_federated_model(cfg, catalog)
    # float64: in float32 a batched and a single matmul round differently, and where a
    # gradient is near zero Adam's step (lr * m / sqrt(v)) turns that into a good part of a
    # step, by how much depending on the CPU's kernels.
    loaded.dual.model.double()
    return cfg, loaded


def _jobs(loaded, cfg, dataset, n=6):
    split = leave_last_out(dataset.histories)
    users = sorted(split.train, key=lambda u: (len(split.train[u]), u))[-n:]
    jobs = []
    for u in users:
        examples = F.client_examples(
            split, dataset.catalog, loaded.prompts, cfg.fed, u, loaded.dual.vocab
        )
        start = F.init_personal_state(loaded.dual, 7, u)  # B != 0 below: the personal part acts
        start = {
            k: v + 0.01 * torch.randn_like(v) if "lora_B" in k else v for k, v in start.items()
        }
        jobs.append(ClientJob(u, examples, start))
    return jobs


def _assert_same(one, many):
    """Equal up to rounding, element by element. Adam divides by sqrt(v): where a gradient is
    near zero, rounding moves an element by a part of one step (lr 0.01 here), hence atol
    1e-4; in float64 (above) that part is 1e-6 or less."""
    assert [r.user_id for r in one] == [r.user_id for r in many]
    for a, b in zip(one, many, strict=True):
        assert a.n_examples == b.n_examples
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        for part in ("shared_delta", "personal_state"):
            x, y = getattr(a, part), getattr(b, part)
            assert x.keys() == y.keys()
            for k in x:
                torch.testing.assert_close(
                    y[k], x[k], rtol=1e-3, atol=1e-4, msg=lambda m, p=part, k=k: f"{p} {k}: {m}"
                )


@pytest.mark.parametrize(
    "extra",
    [
        [],  # sequential, module gates, local batch 2 (tiny.yaml)
        ["fed.decoupling.schedule=joint", "fed.decoupling.gate=adapter"],
        ["fed.personal_rank=0"],  # shared-only
        ["fed.shared_rank=0", "fed.decoupling.gate=none"],  # personal-only: frozen rows
        ["fed.local_optimizer=sgd", "fed.learning_rate=0.5", "fed.personal_rank=0"],  # FedAdam
        ["fed.decoupling.schedule=after"],  # a round: the shared part alone
        ["fed.decoupling.schedule=after", "fed.decoupling.personal_steps=2", "frozen"],  # fit
        # FedSA-LoRA: one LoRA, A shared, each client's B its own
        ["fed.share=lora_a", "fed.personal_rank=0", "fed.decoupling.schedule=joint"],
    ],
    ids=[
        "sequential",
        "joint",
        "shared-only",
        "personal-only",
        "sgd",
        "after-round",
        "after-fit",
        "fedsa",
    ],
)
def test_a_batched_group_updates_as_one_client_at_a_time(tiny_model_dir, tiny_dataset, extra):
    frozen = "frozen" in extra
    cfg, loaded = _loaded(tiny_model_dir, tiny_dataset.catalog, *[e for e in extra if "=" in e])
    dual = loaded.dual
    for param in dual.shared.values():
        param.requires_grad_(not frozen)
    shared = F.init_shared_state(dual, 0)
    shared = {k: v + 0.01 * torch.randn_like(v) for k, v in shared.items()}  # B_s != 0 too
    jobs = _jobs(loaded, cfg, tiny_dataset)
    one = [F.client_update(dual, j.user_id, j.examples, shared, j.personal_state, 2) for j in jobs]
    many = batched_client_updates(dual, jobs, shared, 2)
    _assert_same(one, many)
    # Not a vacuous match: the clients moved, and differently.
    b_shared = any("lora_B" in k for k in dual.shared)
    trained = "shared_delta" if (b_shared and not frozen) else "personal_state"
    first = next(k for k in getattr(one[0], trained) if "lora_B" in k)
    start = {j.user_id: j.personal_state if trained == "personal_state" else {} for j in jobs}
    moved = [getattr(r, trained)[first] - start[r.user_id].get(first, 0) for r in one]
    assert all(m.abs().max() > 0 for m in moved) and not torch.equal(moved[0], moved[1])
    if "fed.decoupling.schedule=after" in extra and not frozen:  # a round: personal untouched
        for r, j in zip(many, jobs, strict=True):
            assert all(torch.equal(r.personal_state[k], v) for k, v in j.personal_state.items())


def test_run_clients_keeps_each_personal_state_on_its_own_client(
    tiny_model_dir, tiny_dataset, tmp_path
):
    cfg, loaded = _loaded(tiny_model_dir, tiny_dataset.catalog)
    dual = loaded.dual
    shared = F.init_shared_state(dual, 0)
    jobs = [(j.user_id, j.examples) for j in _jobs(loaded, cfg, tiny_dataset, n=3)]
    together = run_clients(dual, tmp_path / "together", jobs, shared, 1)
    assert [r.user_id for r in together] == [u for u, _ in jobs]
    for (user, examples), result in zip(jobs, together, strict=True):
        saved = load_file(
            tmp_path / "together" / F.CLIENTS_DIR / user / "personal-r0001.safetensors"
        )
        alone = F.run_client(dual, tmp_path / "alone", user, examples, shared, 1)
        assert saved.keys() == alone.personal_state.keys()
        for k, v in alone.personal_state.items():
            torch.testing.assert_close(saved[k], v, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(result.personal_state[k], saved[k])


def test_batched_clients_are_for_the_item_head_only():
    with pytest.raises(ConfigError, match="client_batch > 1 needs head='items'"):
        load_config(overrides=["fed.head=titles", "fed.client_batch=4"])
    assert load_config(overrides=["fed.head=items", "fed.client_batch=4"]).fed.client_batch == 4


def test_batched_scale_picks_score_as_one_user_at_a_time(tiny_model_dir, tiny_dataset):
    cfg, loaded = _loaded(tiny_model_dir, tiny_dataset.catalog, "fed.client_batch=4")
    dual, split = loaded.dual, leave_last_out(tiny_dataset.histories)
    shared = F.init_shared_state(dual, 0)
    shared = {k: v + 0.01 * torch.randn_like(v) for k, v in shared.items()}
    states = {j.user_id: j.personal_state for j in _jobs(loaded, cfg, tiny_dataset)}
    many = F.pick_personal_scales(dual, loaded.ranker, split, shared, states)  # groups of 4, 2
    assert list(many) == list(states)
    for user, state in states.items():
        scale, losses = F.pick_personal_scale(dual, loaded.ranker, split, user, shared, state)
        assert many[user][0] == scale
        assert many[user][1] == pytest.approx(losses, rel=1e-5)
        assert len(set(losses.values())) > 1  # the scale does change the loss
