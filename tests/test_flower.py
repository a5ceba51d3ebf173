"""The Flower app (training/flower): wire format, strategy choice, one client in process, and
real Flower runs (simulation vs the accelerate runner, loopback deployment with a client
killed mid-round, SecAgg+) on the tiny model and the 20-user fixture.
"""

from __future__ import annotations

import grp
import importlib.util
import itertools
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from llmrec import federated as F
from llmrec.adapters import AdapterStore
from llmrec.config import ConfigError, load_config
from llmrec.data import dataset_from_config, leave_last_out
from llmrec.model import fingerprint_model_dir, load_model
from llmrec.prompts import PromptBuilder
from llmrec.recommend import Recommender, mean_metrics

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "training" / "flower"
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
sys.path.insert(0, str(APP))  # the Flower app dir, as Flower itself puts it on sys.path

from llmrec_flower import client_app, codec, strategy  # noqa: E402
from loopback import Account, Federation, kill_now  # noqa: E402


def _overrides(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"fed.output_dir={out}",
        f"fed.store_dir={out / 'adapters'}",
        "fed.n_users=4",
        "fed.clients_per_round=4",
        "fed.rounds=2",
        "fed.local_steps=1",
        "fed.val_users=2",
        *extra,
    ]


# --------------------------------------------------------------------------- no processes


def test_codec_round_trip_and_order():
    state = {"b": torch.ones(2, 3), "a": torch.arange(4.0).reshape(4, 1)}
    keys = sorted(state)
    arrays = codec.to_ndarrays(state, keys)
    assert [a.shape for a in arrays] == [(4, 1), (2, 3)]
    back = codec.from_ndarrays(arrays, keys)
    assert all(torch.equal(back[k], state[k]) for k in keys)
    with pytest.raises(ValueError, match="expected 2"):
        codec.from_ndarrays(arrays[:1], keys)


def test_a_node_may_only_relocate_its_data_and_model():
    cfg = load_config(TINY_YAML)
    mine = codec.node_config(cfg.model_dump_json(), "data.catalog=/x/c.csv model.name_or_path=/m")
    assert str(mine.data.catalog) == "/x/c.csv" and mine.model.name_or_path == "/m"
    assert mine.fed == cfg.fed  # the training recipe is the server's
    with pytest.raises(ConfigError, match="node-local"):
        codec.node_config(cfg.model_dump_json(), "fed.learning_rate=1.0")


def test_flower_strategies_follow_the_config():
    from flwr.server.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
        FedAvg,
        FedMedian,
        FedTrimmedAvg,
    )

    def build(*extra):
        return strategy.flower_strategy(load_config(TINY_YAML, list(extra)))

    assert type(build()) is FedAvg
    assert type(build("fed.aggregation=median")) is FedMedian
    trimmed = build("fed.aggregation=trimmed_mean", "fed.trim_ratio=0.25")  # 1 of 4 each end
    assert type(trimmed) is FedTrimmedAvg and trimmed.beta == 0.25
    dp = build("fed.dp.enabled=true")
    assert isinstance(dp, DifferentialPrivacyServerSideFixedClipping)
    both = build("fed.dp.enabled=true", "fed.flower.secagg=true")
    assert isinstance(both, DifferentialPrivacyClientSideFixedClipping)  # server cannot clip
    with pytest.raises(ConfigError, match="secagg needs aggregation=fedavg"):
        load_config(TINY_YAML, ["fed.flower.secagg=true", "fed.aggregation=median"])
    with pytest.raises(ConfigError, match="secagg_num_shares"):
        load_config(TINY_YAML, ["fed.flower.secagg=true", "fed.clients_per_round=2"])


def test_hostile_client_results_are_refused_with_their_reason_and_the_round_goes_on(tmp_path):
    """What a broken or hostile node may send back: the wrong number of arrays, a wrong
    shape, NaN, an oversized update, an example count of 0 or -1 or NaN, and metrics that
    are not numbers. Each bad update is rejected with its reason, the good ones are
    averaged, and bad metrics are left out of the round's record."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.client_proxy import ClientProxy

    class Node(ClientProxy):  # only its id is read by the strategy
        def get_properties(self, *a, **k): ...
        def get_parameters(self, *a, **k): ...
        def fit(self, *a, **k): ...
        def evaluate(self, *a, **k): ...
        def reconnect(self, *a, **k): ...

    cfg = load_config(TINY_YAML, ["fed.max_update_norm=10"])
    keys = ["a", "b"]
    current = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]
    records = []
    rounds = strategy.Rounds(
        strategy.flower_strategy(cfg), cfg, keys, ndarrays_to_parameters(current),
        lambda r, state, record: records.append((state, record)), tmp_path, lambda s: "",
    )  # fmt: skip

    def reply(arrays, n=3, **metrics):
        ok = Status(code=Code.OK, message="")
        return FitRes(ok, ndarrays_to_parameters(arrays), n, metrics)

    good = [np.ones((2, 3), np.float32), np.ones(4, np.float32)]
    nan = [np.full((2, 3), np.nan, np.float32), np.ones(4, np.float32)]
    huge = [np.full((2, 3), 100, np.float32), np.ones(4, np.float32)]
    results = {
        "good": reply(good, loss=2.0, seconds=1.0),
        "good-bad-metrics": reply(good, loss="abc", seconds=float("nan")),
        "few": reply(good[:1]),
        "shape": reply([np.ones((3, 2), np.float32), good[1]]),
        "nan": reply(nan),
        "huge": reply(huge),
        "zero": reply(good, n=0),
        "negative": reply(good, n=-1),
    }
    _, _ = rounds.aggregate_fit(1, [(Node(cid), res) for cid, res in results.items()], [])
    state, record = records[-1]
    assert set(record["rejected"]) == {"few", "shape", "nan", "huge", "zero", "negative"}
    assert "1 arrays, expected 2" in record["rejected"]["few"]
    assert "shape (3, 2), expected (2, 3)" in record["rejected"]["shape"]
    assert "non-finite" in record["rejected"]["nan"]
    assert "oversized" in record["rejected"]["huge"]
    assert "example count" in record["rejected"]["zero"] and record["accepted"] == 2
    assert record["train_loss"] == 2.0 and record["client_seconds_mean"] == 1.0
    torch.testing.assert_close(state["a"], torch.ones(2, 3))


def test_client_fit_is_the_library_round_and_uploads_only_shared(tiny_model_dir, tmp_path):
    """The ClientApp's fit == llmrec.federated.run_client; the personal state stays home."""
    cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, tmp_path / "flower"))
    client = client_app.UserClient({"partition-id": 1})
    rt = client_app.runtime(cfg.model_dump_json(), "")
    user_id = rt.cohort[1]
    shared = F.init_shared_state(rt.dual, cfg.fed.seed)
    config = {codec.ROUND_KEY: 1, codec.CONFIG_KEY: cfg.model_dump_json()}
    arrays, weight, metrics = client.fit(codec.to_ndarrays(shared, rt.keys), config)

    # The same round through the library, in another folder: identical upload.
    expected = F.run_client(rt.dual, tmp_path / "lib", user_id, rt.examples(user_id), shared, 1)
    got = codec.from_ndarrays(arrays, rt.keys)
    for k in rt.keys:
        torch.testing.assert_close(got[k] - shared[k], expected.shared_delta[k])
    assert weight == expected.n_examples and metrics["loss"] == pytest.approx(expected.loss)
    # The reply holds the shared adapter (rank 4) and nothing else; the personal one (rank 2,
    # plus gates) is in the client's own folder.
    assert [a.shape for a in arrays] == [tuple(shared[k].shape) for k in rt.keys]
    personal = F.load_personal(tmp_path / "flower", user_id, before=2)
    ranks = {v.shape[0] for k, v in personal.items() if k.endswith("lora_A.weight")}
    assert ranks == {cfg.fed.personal_rank} and any(k.endswith(".gate") for k in personal)


@pytest.mark.parametrize("head", ["titles", "items"])
def test_a_partition_trains_what_the_full_data_set_does(tiny_model_dir, tmp_path, head):
    """Each cohort user's partition (its own 0700 folder) holds that user's rows and the whole
    catalog; a ClientApp on it has the same catalog, split and training examples as on the
    full data set, and refuses a user-id of another partition."""
    extra = ["fed.head=items", "fed.window=3"] if head == "items" else []
    cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, tmp_path / "flower", *extra))
    dataset = dataset_from_config(cfg)
    full = client_app.runtime(cfg.model_dump_json(), "")
    expected = {
        u: (full.split.train[u], full.split.valid[u], full.examples(u)) for u in full.cohort
    }
    parts = F.write_partitions(dataset, full.cohort, tmp_path / "parts")
    assert [p.user_id for p in parts] == full.cohort
    for part in parts:
        user = part.user_id
        assert stat.S_IMODE(part.interactions.parent.stat().st_mode) == F.PARTITION_MODE
        rt = client_app.runtime(cfg.model_dump_json(), part.overrides())
        assert rt.recommender.catalog == dataset.catalog and rt.split.train.keys() == {user}
        assert (rt.split.train[user], rt.split.valid[user], rt.examples(user)) == expected[user]
        assert rt.split.test[user] == full.split.test[user]
    stranger = client_app.UserClient(
        {"user-id": parts[0].user_id, "overrides": parts[1].overrides()}
    )
    config = {codec.ROUND_KEY: 1, codec.CONFIG_KEY: cfg.model_dump_json()}
    with pytest.raises(ValueError, match="is not in this node's data"):
        stranger.fit([], config)


# --------------------------------------------------------------------------- Flower runs


def _shared_hr(model_dir: Path, cfg, shared: F.State, cohort: list[str]) -> dict[str, float]:
    """Validation HR@10 / NDCG@10 / NLL of a shared adapter alone over ``cohort``."""
    from llmrec.data import dataset_from_config

    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    model, tokenizer = load_model(str(model_dir))
    dual = F.build_dual_lora(model, cfg.fed, tokenizer.pad_token_id)
    prompts = PromptBuilder(
        tokenizer,
        max_history_items=cfg.prompts.max_history_items,
        max_prompt_tokens=cfg.prompts.max_prompt_tokens,
    )
    rec = Recommender(dual.model, tokenizer, dataset.catalog, prompts, cfg.recommend.beam_width)
    empty = Path("/nonexistent-client-dir")  # no personal state: the shared adapter alone
    rows = [F.validate_user(dual, rec, split, empty, u, shared, cfg.fed.rounds) for u in cohort]
    out = mean_metrics([(ranked, target) for ranked, target, _ in rows], F.VAL_K)
    out["loss"] = float(np.mean([loss for *_, loss in rows]))
    return out


def _shared_after(out: Path, r: int) -> F.State:
    return F.read_round_state(out, r)


def _accelerate_run(cfg) -> None:
    """training/federated.py's run on ``cfg`` in this process (one thread: see below)."""
    spec = importlib.util.spec_from_file_location(
        "training_federated", ROOT / "training" / "federated.py"
    )
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    # Numerically identical runs: one thread on both sides (a thread count changes the
    # summation order of a matmul), and both servers average in float64 (see strategy.py).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner.run(cfg)
    finally:
        torch.set_num_threads(threads)


def _max_shared_diff(acc: Path, flw: Path, rounds: int) -> float:
    """The largest difference between the two runs' shared states over ``rounds`` rounds;
    fails at once on a round past the tolerance: FedAvg of weights (Flower) == weights +
    FedAvg of deltas (the accelerate runner), up to rounding. The two formulations round
    differently in float32 (below 1e-6 after round 1), and each later round's local steps
    start from those weights: on a CPU with AVX2 alone round 2 differed by up to 3.5e-6, in
    a fresh clone as in a long-lived venv. A wrong average or a missing client moves the
    weights by orders of magnitude more."""
    worst = 0.0
    for r in range(1, rounds + 1):
        a, b = _shared_after(acc, r), _shared_after(flw, r)
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff < 1e-5, (r, diff)
        worst = max(worst, diff)
    return worst


def _parity_runs(tiny_model_dir: Path, tmp_path: Path, extra: list[str]):
    """The accelerate runner and a Flower simulation on the same config; their folders."""
    acc_cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, tmp_path / "acc", *extra))
    _accelerate_run(acc_cfg)
    flw = tmp_path / "flower"
    overrides = " ".join(_overrides(tiny_model_dir, flw, *extra))
    home = tmp_path / "flwr-home"
    with Federation(home, cwd=ROOT, simulation_nodes=4, env={"OMP_NUM_THREADS": "1"}) as fed:
        res = fed.run(APP, {"config": str(TINY_YAML), "overrides": overrides}, timeout_s=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    diff = _max_shared_diff(tmp_path / "acc", flw, acc_cfg.fed.rounds)
    return acc_cfg, tmp_path / "acc", flw, diff


@pytest.mark.slow
@pytest.mark.flower
def test_simulation_matches_the_accelerate_runner(tiny_model_dir, tmp_path):
    """Same seed, cohort, full participation: Flower's FedAvg lands on the same shared adapter."""
    acc_cfg, acc, flw, diff = _parity_runs(tiny_model_dir, tmp_path, ["fed.val_users=4"])
    a, b = _shared_after(acc, 2), _shared_after(flw, 2)
    cohort = json.loads((acc / "run.json").read_text())["cohort"]
    hr_a = _shared_hr(tiny_model_dir, acc_cfg, a, cohort)
    hr_b = _shared_hr(tiny_model_dir, acc_cfg, b, cohort)
    print(
        f"\nparity (tiny, {len(cohort)} users): shared-adapter val HR@10 accelerate "
        f"{hr_a['HR@10']:.3f} vs Flower {hr_b['HR@10']:.3f}; NLL {hr_a['loss']:.4f} vs "
        f"{hr_b['loss']:.4f}; max |diff| {diff:.2e}"
    )
    assert hr_a["HR@10"] == hr_b["HR@10"] and hr_a["loss"] == pytest.approx(hr_b["loss"], abs=1e-4)
    # every client published its own stacked adapter; the server, the shared one
    export = json.loads((flw / "export.json").read_text())
    assert export["users_published_on_clients"] == 4 and export["shared"] == "_shared@v1"


@pytest.mark.slow
@pytest.mark.flower
def test_item_head_simulation_matches_the_accelerate_runner(tiny_model_dir, tmp_path):
    """The item-token head under Flower: the same shared adapter AND item rows as the
    accelerate runner; the server serves its own item base and every client published for it."""
    extra = ["fed.val_users=4", "fed.head=items", "fed.window=3"]
    _, acc, flw, _ = _parity_runs(tiny_model_dir, tmp_path, extra)
    assert F.ITEM_ROWS_KEY in _shared_after(flw, 2)
    export = json.loads((flw / "export.json").read_text())
    served = flw / F.SERVED_BASE_DIR
    assert export["base"] == str(served)
    assert export["base_fingerprint"] == fingerprint_model_dir(served)
    assert export["users_published_on_clients"] == 4
    store = AdapterStore(flw / "adapters", base_fingerprint=export["base_fingerprint"])
    for user in store.users():  # every adapter is checked against the served base
        assert store.current(user).manifest.base_fingerprint == export["base_fingerprint"]
    assert len(store.users()) == 4


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.mark.slow
@pytest.mark.flower
def test_loopback_deployment_survives_a_client_killed_mid_round(tiny_model_dir, tmp_path):
    """SuperLink + 3 SuperNodes as processes; the first node handed a round is SIGKILLed."""
    out = tmp_path / "server"
    cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, out))
    from llmrec.data import dataset_from_config

    cohort = F.federated_cohort(leave_last_out(dataset_from_config(cfg).histories), cfg.fed)
    overrides = " ".join(
        _overrides(
            tiny_model_dir,
            out,
            "fed.clients_per_round=2",
            "fed.flower.min_available_clients=2",
            "fed.client_timeout_s=180",
        )
    )
    with Federation(tmp_path / "flwr-home", cwd=ROOT) as fed:
        for name, user_id in zip("abc", cohort, strict=False):
            fed.start_supernode(
                name, {"user-id": user_id, "client-dir": str(tmp_path / f"device-{name}")}
            )
        run = fed.start_run(APP, {"config": str(TINY_YAML), "overrides": overrides})
        logs = {n: fed.logs / f"supernode-{n}.log" for n in fed.nodes}

        def handed_a_round() -> str | None:
            for name, path in logs.items():
                if path.is_file() and "Start `flwr-clientapp` process" in path.read_text():
                    return name
            return None

        _wait_for(lambda: handed_a_round() is not None, 600, "no node got a training round")
        victim = handed_a_round()
        kill_now(fed.nodes.pop(victim))
        run.wait(timeout=1200)
    assert run.returncode == 0, (fed.logs / "flwr-run.log").read_text()[-3000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["accepted"] == 1 and len(rounds[0]["failed"]) == 1  # the others went on
    assert rounds[0]["applied"] and rounds[1]["accepted"] == 2
    shared = _shared_after(out, 2)
    assert all(torch.isfinite(t).all() for t in shared.values())
    # personal states live on the devices only, never in the server's folder
    assert not (out / F.CLIENTS_DIR).exists()
    survivors = [n for n in "abc" if n != victim]
    assert all(any((tmp_path / f"device-{n}").rglob("personal-r*.safetensors")) for n in survivors)


FIRST_DEVICE_ID = 1_900_000_000
"""The uid (and gid) of the first test device: far above what any system allocates, so no
account has it and nothing on the machine belongs to it but the test's own files."""
PROBE = """
import json, sys
outcome = {}
for path in json.loads(sys.argv[1]):
    try:
        open(path, "rb").close()
        outcome[path] = "read"
    except PermissionError:
        outcome[path] = "denied"
print(json.dumps(outcome))
"""


def _id_taken(i: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(i)
            return True
        except KeyError:
            pass
    return False


@pytest.fixture
def device_accounts(tmp_path_factory):
    """``accounts(homes)``: one Unix identity per folder of ``homes`` (a uid and gid of its
    own, without an account, no other group), owning that folder, mode 0700, and all in it.
    Its processes can run this checkout's Python and reach their home: every folder on the
    way is made traversable (o+x) for the test, and put back after, except pytest's own temp
    folders (0700; the postgres fixture opens them alike).

    Needs root, as the postgres fixture: skipped elsewhere, a failure in CI (root there)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("SuperNodes as their own Unix users need root (CI runs the tests as root)")
        pytest.skip("SuperNodes as their own Unix users need root")
    temp_root = tmp_path_factory.getbasetemp().parent
    opened: list[tuple[Path, int]] = []

    def accounts(homes: Sequence[Path]) -> list[Account]:
        python = Path(sys.executable).resolve()
        needed = [python.parent, Path(sys.base_prefix), Path(sys.prefix), ROOT]
        for path in [*needed, *(h.parent for h in homes)]:
            for folder in reversed([path, *path.parents]):
                mode = stat.S_IMODE(folder.stat().st_mode)
                if not mode & stat.S_IXOTH:
                    folder.chmod(mode | stat.S_IXOTH)
                    opened.append((folder, mode))
        ids = list(
            itertools.islice(
                (i for i in itertools.count(FIRST_DEVICE_ID) if not _id_taken(i)), len(homes)
            )
        )
        for i, home in zip(ids, homes, strict=True):
            for path in [home, *home.rglob("*")]:
                os.chown(path, i, i)
            home.chmod(0o700)
        return [Account(i, i, home) for i, home in zip(ids, homes, strict=True)]

    yield accounts
    for folder, mode in reversed(opened):
        if not folder.is_relative_to(temp_root):
            folder.chmod(mode)


def _open_as(account: Account, paths: Sequence[Path]) -> dict[str, str]:
    """Try to open each of ``paths`` as ``account``: ``{path: "read" | "denied"}``."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(p) for p in paths])],
        user=account.uid,
        group=account.gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"the probe did not run as uid {account.uid}: {done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.flower
def test_partitioned_supernodes_as_their_own_users_match_the_accelerate_runner(
    tiny_model_dir, tmp_path, device_accounts
):
    """Federation across hosts, on one host: a SuperLink and one SuperNode per cohort user,
    separate processes, each running as its own Unix user and holding only its user's
    partition (``llmrec data partition``'s folder: 0700, its own), where it also keeps its
    personal states and its adapter store. Every node trains every round (full
    participation, as the accelerate runner's 4 of 4). No node can open another's partition
    or personal state, each partition holds its user's rows only, and the shared state
    after every round equals the accelerate runner's on the full data set (item-token head:
    adapter and item rows; the simulation parity's tolerance)."""
    extra = ["fed.head=items", "fed.window=3"]
    acc_cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, tmp_path / "acc", *extra))
    _accelerate_run(acc_cfg)
    dataset = dataset_from_config(acc_cfg)
    cohort = json.loads((tmp_path / "acc" / "run.json").read_text())["cohort"]
    parts = F.write_partitions(dataset, cohort, tmp_path / "devices")
    for part in parts:  # only the user's own rows, all of them
        rows = [json.loads(line) for line in part.interactions.read_text().splitlines()]
        assert {r["user_id"] for r in rows} == {part.user_id}
        assert [r["item_id"] for r in rows] == dataset.histories[part.user_id]
    for part in parts:  # each device has its own copy of the base model (node-local model.*)
        shutil.copytree(tiny_model_dir, part.interactions.parent / "model")
    accounts = device_accounts([p.interactions.parent for p in parts])

    out = tmp_path / "server"
    overrides = " ".join(_overrides(tiny_model_dir, out, *extra))
    with Federation(tmp_path / "flwr-home", cwd=ROOT, env={"OMP_NUM_THREADS": "1"}) as fed:
        for part, account in zip(parts, accounts, strict=True):
            node = {
                "user-id": part.user_id,
                "client-dir": str(account.home / "client"),
                "store-dir": str(account.home / "store"),
                "overrides": f"{part.overrides()} model.name_or_path={account.home / 'model'}",
            }
            process = fed.start_supernode(part.user_id, node, account)
            assert psutil.Process(process.pid).uids().real == account.uid
        res = fed.run(APP, {"config": str(TINY_YAML), "overrides": overrides}, timeout_s=1200)
        logs = {n: (fed.logs / f"supernode-{n}.log").read_text()[-2000:] for n in fed.nodes}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + str(logs)

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [(r["accepted"], r["failed"]) for r in rounds] == [(4, [])] * 2
    diff = _max_shared_diff(tmp_path / "acc", out, acc_cfg.fed.rounds)
    assert F.ITEM_ROWS_KEY in _shared_after(out, 2)
    print(f"\npartitioned loopback vs accelerate (tiny, 4 users): max |diff| {diff:.2e}")
    assert not (out / F.CLIENTS_DIR).exists()  # personal states live on the devices only
    export = json.loads((out / "export.json").read_text())
    assert export["users_published_on_clients"] == 4

    for part, account in zip(parts, accounts, strict=True):
        home, user = account.home, part.user_id
        assert AdapterStore(
            home / "store", base_fingerprint=export["base_fingerprint"]
        ).users() == [user]
        assert [p.name for p in (home / "client" / F.CLIENTS_DIR).iterdir()] == [user]
        others = [a.home for a in accounts if a != account]
        theirs = [f for h in others for f in h.rglob("*") if f.is_file()]
        assert any(f.name.startswith("personal-r") for f in theirs)
        outcome = _open_as(account, [part.interactions, part.catalog, *theirs])
        assert outcome.pop(str(part.interactions)) == outcome.pop(str(part.catalog)) == "read"
        assert set(outcome.values()) == {"denied"}, user


@pytest.mark.slow
@pytest.mark.flower
def test_secagg_plus_run_completes(tiny_model_dir, tmp_path):
    """SecAgg+ on: the round completes and the unmasked sum moved the shared adapter."""
    out = tmp_path / "server"
    overrides = " ".join(
        _overrides(
            tiny_model_dir,
            out,
            "fed.clients_per_round=3",
            "fed.rounds=1",
            "fed.flower.secagg=true",
            "fed.val_users=0",
        )
    )
    with Federation(tmp_path / "flwr-home", cwd=ROOT, simulation_nodes=3) as fed:
        res = fed.run(APP, {"config": str(TINY_YAML), "overrides": overrides}, timeout_s=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Secure aggregation completed" in res.stdout + res.stderr
    record = json.loads((out / "round-0001" / "round.json").read_text())
    assert record["applied"] and record["accepted"] == 3 and not record["failed"]
    cfg = load_config(TINY_YAML, overrides.split())
    model, tokenizer = load_model(str(tiny_model_dir))
    init = F.init_shared_state(F.build_dual_lora(model, cfg.fed, tokenizer.pad_token_id), 0)
    shared = _shared_after(out, 1)
    moved = max(float((shared[k] - init[k]).abs().max()) for k in init)
    assert 0 < moved < 1 and all(torch.isfinite(t).all() for t in shared.values())


@pytest.mark.parametrize("head", ["titles", "items"])
def test_the_wire_from_client_to_server_holds_only_the_shared_part(tiny_model_dir, tmp_path, head):
    """The privacy boundary, decoded from the bytes Flower sends. The ClientApp answers a
    train message as a SuperNode does; its reply is serialized with Flower's own protobuf
    serde and parsed back. It must hold the shared tensors only (their count and shapes,
    in the codec's order) and scalar metrics; no personal tensor (its float32 bytes appear
    nowhere in the wire bytes) and no item id or title of the user's history."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common import FitIns, MessageType, ndarrays_to_parameters, serde
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    extra = ["fed.head=items", "fed.window=3"] if head == "items" else []
    cfg = load_config(TINY_YAML, _overrides(tiny_model_dir, tmp_path / "flower", *extra))
    rt = client_app.runtime(cfg.model_dump_json(), "")
    user = rt.cohort[1]
    shared = F.init_shared_state(rt.dual, cfg.fed.seed)
    # A personal part that is surely not zero (B = 0 would be easy to miss): the user's round
    # starts from it, and its trained version is what must not leave.
    start = F.init_personal_state(rt.dual, cfg.fed.seed, user)
    start = {k: v + 0.05 * torch.randn_like(v) for k, v in start.items()}
    F.save_personal(tmp_path / "flower", user, 0, start)
    fitins = FitIns(
        ndarrays_to_parameters(codec.to_ndarrays(shared, rt.keys)),
        {codec.ROUND_KEY: 1, codec.CONFIG_KEY: cfg.model_dump_json()},
    )
    message = Message(
        content=fitins_to_recorddict(fitins, keep_input=True),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={}
    )
    reply = client_app.app(message, context)
    wire = serde.message_to_proto(reply).SerializeToString()
    decoded = serde.message_from_proto(type(serde.message_to_proto(reply)).FromString(wire))

    content = decoded.content
    arrays = [a.numpy() for record in content.array_records.values() for a in record.values()]
    assert [a.shape for a in arrays] == [tuple(shared[k].shape) for k in rt.keys]
    # Both parts use the same saved key names: what tells them apart is the rank (and below,
    # the bits). Each uploaded LoRA factor has the shared rank, none the personal one.
    ranks = {min(a.shape) for k, a in zip(rt.keys, arrays, strict=True) if "lora_" in k}
    assert ranks == {cfg.fed.shared_rank} != {cfg.fed.personal_rank}
    scalars = {
        key: value
        for records in (content.metric_records, content.config_records)
        for record in records.values()
        for key, value in record.items()
    }
    # Flower's own fit-result fields (the weight and the status) and our three metrics.
    assert set(scalars) == {"num_examples", "code", "message", "loss", "seconds", "targets"}
    assert scalars["message"] == "Success" and scalars["num_examples"] == scalars["targets"]

    personal = F.load_personal(tmp_path / "flower", user, before=2)
    assert personal is not None and personal.keys() == start.keys()
    for key, tensor in personal.items():
        raw = tensor.float().numpy().tobytes()
        assert not torch.equal(tensor, start[key]) or "gate" in key  # it trained
        # Any 32 consecutive bytes of the personal tensor would reveal it.
        for at in range(0, len(raw) - 32, max(1, len(raw) // 8)):
            assert raw[at : at + 32] not in wire, key
    history = rt.split.train[user]
    titles = [rt.recommender.catalog[i].title for i in history if i in rt.recommender.catalog]
    for text in titles:
        assert text.encode() not in wire, text
    texts = [str(v) for v in scalars.values() if isinstance(v, str)] + list(scalars)
    for item in history:
        assert all(item != t for t in texts), item
