"""Tests for llmrec.adapters: versioned per-user adapters, atomic publish, validation, zip I/O.

Adapters here are built directly as tensors against the tiny Llama's real module shapes
(``module_shapes_for``), so each test takes milliseconds; ``tests/test_lora.py`` covers that
such folders load in peft.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from llmrec.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CURRENT,
    MANIFEST,
    SHARED_ID,
    AdapterManifest,
    AdapterStore,
    AdapterValidationError,
    LoraWeights,
    module_shapes_for,
    state_equal,
    validate_adapter,
    validate_user_id,
)
from llmrec.model import fingerprint_model_dir

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def shapes(tiny_model_dir: Path) -> dict[str, tuple[int, int]]:
    return module_shapes_for(tiny_model_dir)


@pytest.fixture(scope="module")
def fingerprint(tiny_model_dir: Path) -> str:
    return fingerprint_model_dir(tiny_model_dir)


@pytest.fixture
def store(tmp_path: Path, shapes, fingerprint: str) -> AdapterStore:
    return AdapterStore(
        tmp_path / "adapters", max_rank=16, module_shapes=shapes, base_fingerprint=fingerprint
    )


def make_weights(
    shapes: dict[str, tuple[int, int]],
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    fill: float | None = None,
    targets: tuple[str, ...] = TARGETS,
) -> LoraWeights:
    """A LoRA on every ``targets`` module of the base; constant ``fill`` makes it recognizable."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in sorted(shapes.items()):
        if not module.endswith(tuple(f".{t}" for t in targets)):
            continue
        for part, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
            tensor = (
                torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=gen)
            )
            state[f"base_model.model.{module}.{part}.weight"] = tensor
    return LoraWeights(state, r, alpha, targets, "tiny-llama")


def _publish(store: AdapterStore, user_id: str, weights: LoraWeights, fp: str, **kw):
    return store.publish(user_id, weights, base_fingerprint=fp, **kw)


# --------------------------------------------------------------------------- shapes, ids


def test_module_shapes_match_the_real_model(tiny_model_dir: Path, shapes) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    real = {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert shapes == real
    assert shapes["model.layers.0.self_attn.q_proj"] == (128, 128)
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 128)  # 1 kv head x 64
    assert shapes["model.layers.0.mlp.down_proj"] == (128, 256)


@pytest.mark.parametrize(
    "bad", ["", "../x", "..", ".", "_shared", "_x", ".hidden", "a/b", "a\\b", "x" * 65, "a b"]
)
def test_bad_user_ids_are_rejected(store: AdapterStore, shapes, fingerprint, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid user_id"):
        validate_user_id(bad)
    with pytest.raises(ValueError, match="invalid user_id"):
        _publish(store, bad, make_weights(shapes), fingerprint)
    with pytest.raises(ValueError, match="invalid user_id"):
        store.delete(bad)
    assert not store.root.exists()  # nothing was written anywhere


def test_good_user_ids() -> None:
    for ok in ("alice", "7", "user_42", "a.b-c", "A" * 64):
        assert validate_user_id(ok) == ok
    assert validate_user_id(SHARED_ID, allow_shared=True) == SHARED_ID


# --------------------------------------------------------------------------- publish and read


def test_publish_current_versions_users(store: AdapterStore, shapes, fingerprint) -> None:
    assert store.users() == [] and store.current("alice") is None and store.shared() is None
    a1 = _publish(store, "alice", make_weights(shapes, seed=1), fingerprint)
    a2 = _publish(store, "alice", make_weights(shapes, seed=2), fingerprint)
    b1 = _publish(store, "bob", make_weights(shapes, seed=3), fingerprint)
    s1 = store.publish_shared(
        make_weights(shapes, seed=4), base_fingerprint=fingerprint, server_round=3
    )

    assert (a1.version, a2.version, b1.version, s1.version) == (1, 2, 1, 1)
    assert a2.adapter_name == "alice@v2" and s1.adapter_name == "_shared@v1"
    assert store.current("alice") == a2
    assert store.get("alice", 1) == a1 and store.get("alice", 9) is None
    assert store.versions("alice") == [1, 2] and store.versions("carol") == []
    assert store.users() == ["alice", "bob"]  # the shared adapter is not a user
    assert store.shared() == s1 and s1.manifest.kind == "shared" and s1.manifest.server_round == 3

    user_dir = store.root / "alice"
    assert (user_dir / CURRENT).read_text() == "v0002\n"
    assert a2.path == user_dir / "v0002"
    assert sorted(p.name for p in a2.path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST]
    # No temp files left behind by a clean publish.
    assert [p.name for p in user_dir.iterdir() if p.name.startswith(".tmp")] == []
    # Each version folder is a plain PEFT folder with the right tensors.
    assert state_equal(store.load(a1).state, make_weights(shapes, seed=1).state)
    assert state_equal(store.load(a2).state, make_weights(shapes, seed=2).state)


def test_manifest_round_trip(store: AdapterStore, shapes, fingerprint) -> None:
    weights = make_weights(shapes, r=4, alpha=12.0)
    ref = _publish(store, "alice", weights, fingerprint, server_round=7, metrics={"hr@10": 0.25})
    m = ref.manifest
    assert (m.user_id, m.version, m.kind) == ("alice", 1, "user")
    assert (m.rank, m.alpha, m.target_modules) == (4, 12.0, ["q_proj", "v_proj"])
    assert (m.base_model, m.base_fingerprint) == ("tiny-llama", fingerprint)
    assert (m.server_round, m.metrics) == (7, {"hr@10": 0.25})
    assert set(m.files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    import hashlib

    for name, digest in m.files.items():
        assert hashlib.sha256((ref.path / name).read_bytes()).hexdigest() == digest
    on_disk = AdapterManifest.model_validate_json((ref.path / MANIFEST).read_text())
    assert on_disk == m
    assert AdapterManifest.model_validate_json(m.model_dump_json()) == m

    data = m.model_dump()
    with pytest.raises(ValidationError):
        AdapterManifest.model_validate({**data, "surprise": 1})  # unknown fields refused
    with pytest.raises(ValidationError):
        AdapterManifest.model_validate({**data, "kind": "shared"})  # kind must fit user_id
    with pytest.raises(ValidationError):
        AdapterManifest.model_validate({**data, "metrics": {"loss": float("nan")}})
    with pytest.raises(ValidationError):
        AdapterManifest.model_validate({**data, "created_at": "yesterday"})
    with pytest.raises(ValidationError):  # NaN metrics are refused before anything is written
        _publish(store, "alice", weights, fingerprint, metrics={"loss": float("nan")})
    assert store.versions("alice") == [1]


def test_concurrent_reader_never_sees_a_torn_adapter(
    store: AdapterStore, shapes, fingerprint
) -> None:
    """A reader racing 30 publishes sees whole, valid versions in non-decreasing order."""
    n = 30
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def writer() -> None:
        try:
            for i in range(1, n + 1):
                # Every tensor holds the version number, so a mix of two versions shows.
                _publish(store, "alice", make_weights(shapes, fill=float(i)), fingerprint)
                time.sleep(0.005)  # let the reader interleave even on a busy 2-core machine
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def reader() -> None:
        try:
            while True:
                finished = done.is_set()  # one more read after the writer is done
                ref = store.current("alice")
                if ref is None:
                    if finished:
                        break
                    continue
                weights = store.load(ref)
                values = {float(t.flatten()[0]) for t in weights.state.values()}
                assert values == {float(ref.version)}, (ref.version, values)
                assert all(bool((t == ref.version).all()) for t in weights.state.values())
                assert not seen or ref.version >= seen[-1]
                seen.append(ref.version)
                if finished:
                    break
        except BaseException as e:
            errors.append(e)
            done.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert seen and seen[-1] == n and len(set(seen)) > 1
    assert store.versions("alice") == list(range(1, n + 1))


def test_concurrent_publishers_get_distinct_versions(
    store: AdapterStore, shapes, fingerprint
) -> None:
    errors: list[BaseException] = []

    def publisher(offset: int) -> None:
        try:
            for i in range(8):
                w = make_weights(shapes, fill=float(offset + i))
                _publish(store, "alice", w, fingerprint, metrics={"i": offset + i})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert store.versions("alice") == list(range(1, 25))
    published = sorted(store.get("alice", v).manifest.metrics["i"] for v in range(1, 25))
    assert published == sorted(k * 100 + i for k in range(3) for i in range(8))
    assert store.current("alice").version == 24


def test_publishers_without_a_lock_still_never_clobber(
    store: AdapterStore, shapes, fingerprint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where flock is unavailable, a rename that collides moves on to the next number."""
    import contextlib

    from llmrec.adapters import store as store_module

    monkeypatch.setattr(store_module, "file_lock", lambda path: contextlib.nullcontext())
    errors: list[BaseException] = []

    def publisher(offset: int) -> None:
        try:
            for i in range(6):
                w = make_weights(shapes, fill=float(offset + i))
                _publish(store, "alice", w, fingerprint, metrics={"i": offset + i})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert store.versions("alice") == list(range(1, 19))
    for v in range(1, 19):  # every version is whole: its tensors match its own manifest
        ref = store.get("alice", v)
        values = {float(t.flatten()[0]) for t in store.load(ref).state.values()}
        assert values == {float(ref.manifest.metrics["i"])}


def test_leftover_temp_dirs_are_ignored_and_swept(store: AdapterStore, shapes, fingerprint) -> None:
    ref = _publish(store, "alice", make_weights(shapes, seed=1), fingerprint)
    user_dir = store.root / "alice"
    # A writer that crashed mid-way: a half-written version folder and a CURRENT temp file.
    crashed = user_dir / ".tmp-crashed"
    crashed.mkdir()
    (crashed / ADAPTER_CONFIG).write_text("{")
    (crashed / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    (user_dir / ".CURRENT.abc.tmp").write_text("v0099\n")
    fresh = user_dir / ".tmp-in-progress"  # a live writer's folder must survive the sweep
    fresh.mkdir()
    old = time.time() - 2 * 3600
    os.utime(crashed, (old, old))

    assert store.current("alice") == ref
    assert store.versions("alice") == [1] and store.users() == ["alice"]
    store.load(ref)

    ref2 = _publish(store, "alice", make_weights(shapes, seed=2), fingerprint)
    assert ref2.version == 2 and store.current("alice") == ref2
    assert not crashed.exists() and fresh.exists()


def test_set_current_and_prune(store: AdapterStore, shapes, fingerprint) -> None:
    for seed in range(5):
        _publish(store, "alice", make_weights(shapes, seed=seed), fingerprint)
    assert store.set_current("alice", 2).version == 2
    assert store.current("alice").version == 2
    assert store.prune("alice", keep=2) == [1, 3]  # v2 is current, so it stays
    assert store.versions("alice") == [2, 4, 5]
    assert store.current("alice").version == 2
    with pytest.raises(FileNotFoundError):
        store.set_current("alice", 1)


# --------------------------------------------------------------------------- validation


def _stored_copy(store: AdapterStore, shapes, fingerprint, user_id: str = "alice"):
    return _publish(store, user_id, make_weights(shapes), fingerprint)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"peft_type": "LOHA"}, "peft_type"),
    ],
)
def test_validation_rejects_unsupported_configs(
    tmp_path: Path, shapes, changes: dict, match: str
) -> None:
    from llmrec.adapters import write_adapter

    folder = write_adapter(make_weights(shapes), tmp_path / "a")
    validate_adapter(folder, shapes, max_rank=16)  # fine before the edit
    _edit_config(folder, **changes)
    with pytest.raises(AdapterValidationError, match=match):
        validate_adapter(folder, shapes, max_rank=16)


def test_validation_rejects_rank_too_big(store: AdapterStore, shapes, fingerprint) -> None:
    with pytest.raises(AdapterValidationError, match="exceeds max_rank 16"):
        _publish(store, "alice", make_weights(shapes, r=32), fingerprint)
    assert store.versions("alice") == [] and store.current("alice") is None
    ref = _stored_copy(store, shapes, fingerprint)
    with pytest.raises(AdapterValidationError, match="exceeds max_rank 2"):
        validate_adapter(ref.path, shapes, max_rank=2)


def test_validation_rejects_wrong_shapes(store: AdapterStore, shapes, fingerprint) -> None:
    # Shapes of a base with twice the hidden size: consistent in itself, wrong for this base.
    wide = {m: (o * 2, i * 2) for m, (o, i) in shapes.items()}
    with pytest.raises(AdapterValidationError, match="do not fit"):
        _publish(store, "alice", make_weights(wide), fingerprint)
    # Tensors for a module the base does not have.
    w = make_weights(shapes)
    extra = dict(w.state)
    extra["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 128)
    extra["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(128, 4)
    with pytest.raises(AdapterValidationError, match="not in base"):
        _publish(store, "alice", LoraWeights(extra, 4, 8.0, TARGETS, "x"), fingerprint)
    # A target that no tensor covers.
    with pytest.raises(AdapterValidationError, match="without tensors"):
        _publish(
            store, "alice", LoraWeights(w.state, 4, 8.0, (*TARGETS, "k_proj"), "x"), fingerprint
        )
    assert store.versions("alice") == []


def test_validation_rejects_non_finite(store: AdapterStore, shapes, fingerprint) -> None:
    with pytest.raises(AdapterValidationError, match="non-finite"):
        _publish(store, "alice", make_weights(shapes, fill=float("nan")), fingerprint)
    assert store.versions("alice") == []
    # Also on load, when the NaN got in with a manifest that matches it.
    ref = _stored_copy(store, shapes, fingerprint)
    state = load_file(ref.path / ADAPTER_WEIGHTS)
    key = next(iter(state))
    state[key][0, 0] = float("inf")
    save_file(state, ref.path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    manifest = json.loads((ref.path / MANIFEST).read_text())
    import hashlib

    manifest["files"][ADAPTER_WEIGHTS] = hashlib.sha256(
        (ref.path / ADAPTER_WEIGHTS).read_bytes()
    ).hexdigest()
    (ref.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AdapterValidationError, match="non-finite"):
        store.load(ref)


@pytest.mark.parametrize("name", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
def test_validation_rejects_tampered_files(store: AdapterStore, shapes, fingerprint, name) -> None:
    ref = _stored_copy(store, shapes, fingerprint)
    data = bytearray((ref.path / name).read_bytes())
    data[-2] ^= 0x01  # one bit, at the end of the tensor data / inside the JSON
    (ref.path / name).write_bytes(bytes(data))
    with pytest.raises(AdapterValidationError, match=f"sha256 mismatch for {name}"):
        store.load(ref)


def test_validation_rejects_pickle_files(store: AdapterStore, shapes, fingerprint) -> None:
    ref = _stored_copy(store, shapes, fingerprint)
    (ref.path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AdapterValidationError, match="pickle"):
        store.load(ref)


def test_validation_checks_manifest_and_fingerprint(
    store: AdapterStore, shapes, fingerprint
) -> None:
    ref = _stored_copy(store, shapes, fingerprint)
    validate_adapter(ref.path, shapes, 16, base_fingerprint=fingerprint)
    with pytest.raises(AdapterValidationError, match="served base"):
        validate_adapter(ref.path, shapes, 16, base_fingerprint="0" * 64)
    other = AdapterStore(store.root, max_rank=16, module_shapes=shapes, base_fingerprint="f" * 64)
    with pytest.raises(AdapterValidationError, match="served base"):
        other.load(ref)
    with pytest.raises(AdapterValidationError, match="served base"):
        other.publish("bob", make_weights(shapes), base_fingerprint=fingerprint)
    # A manifest that lies about the rank.
    manifest = json.loads((ref.path / MANIFEST).read_text())
    (ref.path / MANIFEST).write_text(json.dumps({**manifest, "rank": 8}))
    with pytest.raises(AdapterValidationError, match="disagrees"):
        store.load(ref)
    (ref.path / MANIFEST).unlink()
    with pytest.raises(AdapterValidationError, match="no manifest.json"):
        store.load(ref)
    validate_adapter(ref.path, shapes, 16)  # a bare PEFT folder is fine without a fingerprint


# --------------------------------------------------------------------------- delete


def test_delete_removes_everything(store: AdapterStore, shapes, fingerprint) -> None:
    _publish(store, "alice", make_weights(shapes, seed=1), fingerprint)
    _publish(store, "alice", make_weights(shapes, seed=2), fingerprint)
    _publish(store, "bob", make_weights(shapes, seed=3), fingerprint)
    store.publish_shared(make_weights(shapes, seed=4), base_fingerprint=fingerprint)

    assert store.delete("alice") is True
    assert not (store.root / "alice").exists()
    assert store.current("alice") is None and store.versions("alice") == []
    assert store.users() == ["bob"]
    assert store.shared() is not None and store.current("bob") is not None
    assert sorted(p.name for p in store.root.iterdir()) == ["_shared", "bob"]  # no tombstones
    assert store.delete("alice") is False
    with pytest.raises(ValueError):
        store.delete(SHARED_ID)
    # A later publish starts a fresh history.
    assert _publish(store, "alice", make_weights(shapes), fingerprint).version == 1


# --------------------------------------------------------------------------- export / import


def test_export_import_round_trip(store: AdapterStore, shapes, fingerprint, tmp_path) -> None:
    weights = make_weights(shapes, seed=5)
    ref = _publish(store, "alice", weights, fingerprint, server_round=2, metrics={"ndcg@10": 0.1})
    zip_path = store.export("alice", tmp_path / "out" / "alice.zip")
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])
    # Deterministic: exporting the same version twice gives the same bytes.
    assert store.export("alice", tmp_path / "again.zip").read_bytes() == zip_path.read_bytes()

    back = store.import_zip("alice", zip_path)
    assert back.version == 2 and store.current("alice") == back
    assert state_equal(store.load(back).state, store.load(ref).state)
    assert state_equal(store.load(back).state, weights.state)
    assert (back.manifest.server_round, back.manifest.metrics) == (2, {"ndcg@10": 0.1})
    assert back.manifest.base_fingerprint == fingerprint

    moved = store.import_zip("bob", zip_path)  # e.g. a user moving to a new id
    assert moved.adapter_name == "bob@v1" and moved.manifest.user_id == "bob"
    assert state_equal(store.load(moved).state, weights.state)
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def exported(store: AdapterStore, shapes, fingerprint, tmp_path: Path) -> dict[str, bytes]:
    _publish(store, "alice", make_weights(shapes), fingerprint)
    with zipfile.ZipFile(store.export("alice", tmp_path / "alice.zip")) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"../evil": b"x"}, "unsafe member name"),
        ({"../../evil.py": b"x"}, "unsafe member name"),
        ({"/tmp/evil": b"x"}, "unsafe member name"),
        ({"C:evil": b"x"}, "unsafe member name"),
        ({"sub/adapter_config.json": b"{}"}, "flat"),
        ({"adapter_model.bin": b"\x80\x04"}, "unexpected member"),
        ({"run.py": b"import os"}, "unexpected member"),
    ],
)
def test_import_rejects_unsafe_zips(
    store: AdapterStore, exported: dict[str, bytes], tmp_path: Path, extra: dict, match: str
) -> None:
    bad = _zip(tmp_path / "bad.zip", {**exported, **extra})
    with pytest.raises(AdapterValidationError, match=match):
        store.import_zip("mallory", bad)
    assert store.current("mallory") is None and store.versions("alice") == [1]
    assert not (tmp_path / "evil").exists() and not (store.root / "evil").exists()
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_import_rejects_links_and_zip_bombs(
    store: AdapterStore, exported: dict[str, bytes], tmp_path: Path
) -> None:
    link = zipfile.ZipInfo(ADAPTER_CONFIG)
    link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symlink to a file outside
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in exported.items():
            if name != ADAPTER_CONFIG:
                zf.writestr(name, data)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(AdapterValidationError, match="links are not accepted"):
        store.import_zip("mallory", path)

    # 64 MiB of zeros deflate to about 64 KiB: the inflated bytes are counted, not the header
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in exported.items():
            zf.writestr(name, b"\0" * (64 << 20) if name == ADAPTER_WEIGHTS else data)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(AdapterValidationError, match="more than"):
        store.import_zip("mallory", bomb, max_bytes=8 << 20)
    assert store.current("mallory") is None and store.versions("alice") == [1]
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_import_rejects_inconsistent_content(
    store: AdapterStore, exported: dict[str, bytes], tmp_path: Path
) -> None:
    no_manifest = {k: v for k, v in exported.items() if k != MANIFEST}
    with pytest.raises(AdapterValidationError, match="missing members"):
        store.import_zip("mallory", _zip(tmp_path / "a.zip", no_manifest))

    tampered = dict(exported)
    data = bytearray(tampered[ADAPTER_WEIGHTS])
    data[-1] ^= 0xFF
    tampered[ADAPTER_WEIGHTS] = bytes(data)
    with pytest.raises(AdapterValidationError, match="sha256 mismatch"):
        store.import_zip("mallory", _zip(tmp_path / "b.zip", tampered))

    with pytest.raises(AdapterValidationError, match="more than 100 bytes"):
        store.import_zip("mallory", _zip(tmp_path / "c.zip", exported), max_bytes=100)

    (tmp_path / "d.zip").write_bytes(b"not a zip")
    with pytest.raises(AdapterValidationError, match="not a readable zip"):
        store.import_zip("mallory", tmp_path / "d.zip")

    with pytest.raises(ValueError, match="invalid user_id"):
        store.import_zip("../x", _zip(tmp_path / "e.zip", exported))
    assert store.current("mallory") is None
