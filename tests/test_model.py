"""Tests for llmrec.model: GGUF preparation and reuse, fingerprints, the tiny model, bnb loads.

Fast tests run on a locally built tiny Llama (real SmolLM2 tokenizer) and on a fake GGUF whose
conversion is stubbed, so the cache logic (naming, reuse, atomic publish, races) is tested in
milliseconds. The real 135M conversion is checked once, in the ``slow`` tests at the bottom.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from llmrec.atomic import sha256_file
from llmrec.model import (
    BASE_MODEL_ALIAS,
    MARKER_FILE,
    build_tiny_model,
    default_cache_dir,
    fingerprint_model_dir,
    load_model,
    load_tokenizer,
    packaged_gguf_path,
    prepare_base_model,
    resolve_model_path,
)
from llmrec.model import gguf as G
from llmrec.model import load as M

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder built once per module (seed 0, tokenizer from the packaged GGUF)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    """A small file standing in for a GGUF: only its bytes matter to the cache logic."""
    path = tmp_path / "src" / "Fake-Model.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


class FakeConverter:
    """Stands in for the dequantization: copies the tiny folder and counts calls."""

    def __init__(self, src: Path, delay_s: float = 0.0, fail: bool = False) -> None:
        self.src, self.delay_s, self.fail = src, delay_s, fail
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, gguf_path: Path, dst: Path) -> None:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        shutil.copytree(
            self.src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER_FILE)
        )
        if self.fail:
            raise RuntimeError("conversion failed half way")


def _mtimes(folder: Path) -> dict[str, int]:
    """mtime_ns of a folder and of every file in it."""
    out = {".": folder.stat().st_mtime_ns}
    out.update({p.name: p.stat().st_mtime_ns for p in folder.iterdir()})
    return out


def _leftovers(cache: Path) -> list[str]:
    """Temp or trash folders left in a cache dir (there must be none)."""
    return [p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith(".")]


# --------------------------------------------------------------------------- locations


def test_packaged_gguf_is_found() -> None:
    path = packaged_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000  # the 98 MB Q4_1 file, not a pointer


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMREC_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMREC_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "llmrec"


# --------------------------------------------------------------------------- prepare (stubbed)


def test_prepare_builds_once_then_reuses_without_rewrite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, tiny_dir: Path
) -> None:
    convert = FakeConverter(tiny_dir)
    monkeypatch.setattr(G, "_convert_gguf", convert)
    cache = tmp_path / "cache"

    first = prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)
    sha = sha256_file(fake_gguf)
    assert first.parent == cache
    assert first.name == f"fake-model.q4_1-{sha[:16]}-tf{G._transformers_major()}"
    marker = G._read_json(first / MARKER_FILE)
    assert marker is not None and marker["source_sha256"] == sha
    assert marker["model_fingerprint"] == fingerprint_model_dir(first)
    assert convert.calls == 1
    before = _mtimes(first)

    # Second call: no conversion and no re-hash of the GGUF (the on-disk hash cache answers).
    def no_hash(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(G, "sha256_file", no_hash)
    second = prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)
    assert second == first
    assert convert.calls == 1
    assert _mtimes(second) == before
    assert _leftovers(cache) == []


def test_prepare_changed_gguf_gets_new_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, tiny_dir: Path
) -> None:
    monkeypatch.setattr(G, "_convert_gguf", FakeConverter(tiny_dir))
    cache = tmp_path / "cache"
    first = prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)
    fake_gguf.write_bytes(b"GGUF other weights")
    os.utime(fake_gguf, ns=(1, 1))  # a different mtime, as any real rewrite gives
    second = prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)
    assert second != first and first.is_dir() and second.is_dir()


def test_prepare_force_and_stale_folder_are_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, tiny_dir: Path
) -> None:
    convert = FakeConverter(tiny_dir)
    monkeypatch.setattr(G, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    path = prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)

    assert prepare_base_model(cache_dir=cache, gguf_path=fake_gguf, force=True) == path
    assert convert.calls == 2 and (path / MARKER_FILE).is_file()

    (path / MARKER_FILE).unlink()  # an incomplete folder: no marker, so not trusted
    assert prepare_base_model(cache_dir=cache, gguf_path=fake_gguf) == path
    assert convert.calls == 3 and (path / MARKER_FILE).is_file()
    assert _leftovers(cache) == []


def test_prepare_failure_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, tiny_dir: Path
) -> None:
    monkeypatch.setattr(G, "_convert_gguf", FakeConverter(tiny_dir, fail=True))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="half way"):
        prepare_base_model(cache_dir=cache, gguf_path=fake_gguf)
    assert [p for p in cache.iterdir() if p.is_dir()] == []


def test_prepare_concurrent_callers_convert_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_gguf: Path, tiny_dir: Path
) -> None:
    convert = FakeConverter(tiny_dir, delay_s=0.3)
    monkeypatch.setattr(G, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(prepare_base_model(cache_dir=cache, gguf_path=fake_gguf))
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and convert.calls == 1
    assert _leftovers(cache) == []


def test_prepare_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF"):
        prepare_base_model(cache_dir=tmp_path, gguf_path=tmp_path / "nope.gguf")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tiny_dir: Path, tmp_path: Path) -> None:
    fp = fingerprint_model_dir(tiny_dir)
    assert len(fp) == 64 and fp == fingerprint_model_dir(str(tiny_dir))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert fingerprint_model_dir(copy) == fp  # content-addressed, not path-addressed
    (copy / "tokenizer_config.json").write_text("{}")  # tokenizer files are not weights
    assert fingerprint_model_dir(copy) == fp
    config = copy / "config.json"
    config.write_text(
        config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    )
    assert fingerprint_model_dir(copy) != fp


def test_fingerprint_rejects_non_model_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        fingerprint_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="weight files"):
        fingerprint_model_dir(tmp_path)


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_layout_and_forward(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER_FILE,
    } <= names
    # Every file readable by all, weights included: an engine may run as another user.
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tiny_dir.iterdir() if p.is_file())
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = model.config
    assert cfg.num_hidden_layers == 2 and cfg.head_dim == 64 and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok) == 49152  # the real SmolLM2 vocabulary
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    assert cfg.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id

    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Recommend a movie."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tok.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


def test_tiny_model_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    # Taking the tokenizer from an existing folder keeps this test fast.
    again = build_tiny_model(tmp_path / "again", tokenizer_source=str(tiny_dir), seed=0)
    other = build_tiny_model(tmp_path / "other", tokenizer_source=str(tiny_dir), seed=1)
    same = (again / "model.safetensors").read_bytes() == (
        tiny_dir / "model.safetensors"
    ).read_bytes()
    assert same
    assert fingerprint_model_dir(again) == fingerprint_model_dir(tiny_dir)
    assert fingerprint_model_dir(other) != fingerprint_model_dir(tiny_dir)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_tiny_model_refuses_non_empty_out_dir(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder (what tmp_path_factory.mktemp gives) is fine
    assert build_tiny_model(empty, tokenizer_source=str(tiny_dir)) == empty
    with pytest.raises(FileExistsError):
        build_tiny_model(empty, tokenizer_source=str(tiny_dir))


# --------------------------------------------------------------------------- tokenizer, resolve


def test_load_tokenizer_pads_left_with_non_eos(tiny_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_dir))
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    batch = tok(["a", "a much longer prompt"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id  # padded on the left
    assert load_tokenizer(str(tiny_dir), padding_side="right").padding_side == "right"


def test_resolve_model_path(
    monkeypatch: pytest.MonkeyPatch, tiny_dir: Path, tmp_path: Path
) -> None:
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir.absolute())
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing"))

    seen: dict[str, object] = {}

    def fake_prepare(cache_dir=None, gguf_path=None, force=False):
        seen.update(cache_dir=cache_dir, gguf_path=gguf_path)
        return tmp_path / "prepared"

    monkeypatch.setattr(M, "prepare_base_model", fake_prepare)
    assert resolve_model_path(BASE_MODEL_ALIAS, cache_dir=tmp_path) == str(tmp_path / "prepared")
    assert seen == {"cache_dir": tmp_path, "gguf_path": None}


# --------------------------------------------------------------------------- load_model


def test_load_model_plain(tiny_dir: Path) -> None:
    model, tok = load_model(str(tiny_dir))
    assert model.dtype == torch.float32 and tok.padding_side == "left"
    model_bf16, _ = load_model(str(tiny_dir), dtype="bfloat16")
    assert model_bf16.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("quantization", "layer_cls"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_load_model_bnb_on_cpu(tiny_dir: Path, quantization: str, layer_cls: str) -> None:
    model, tok = load_model(str(tiny_dir), quantization=quantization)  # type: ignore[arg-type]
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_cls
    batch = tok(["Toy Story", "a longer prompt about movies"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 49152)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"quantization": "nf8"}, "quantization"),
        ({"quantization": "4bit"}, "quantization"),
        ({"dtype": "float64"}, "dtype"),
        ({"device": "gpu0"}, "device"),
    ],
)
def test_load_model_bad_values_name_the_field(tiny_dir: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        load_model(str(tiny_dir), **kwargs)


# --------------------------------------------------------------------------- real 135M (slow)


# --------------------------------------------------------------------------- 4-bit version


def test_quantized_version_rounds_each_linear_weight_to_its_group_grid(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Every linear weight is within half a step of its group's 4-bit grid; the rest of the
    folder is the source's; adapters of the source fit the version (its fingerprint)."""
    from safetensors.torch import load_file

    from llmrec.model.quantized import (
        GROUP_SIZE,
        adapter_fingerprint,
        dequantize_linear,
        prepare_quantized_version,
        quantized_version_dir,
    )

    src = tmp_path / "model"
    shutil.copytree(tiny_dir, src)
    version = prepare_quantized_version(src)
    assert version == quantized_version_dir(src) and (version / MARKER_FILE).is_file()
    assert adapter_fingerprint(version) == fingerprint_model_dir(src) == adapter_fingerprint(src)
    before = load_file(src / "model.safetensors")
    after = load_file(version / "model.safetensors")
    linear = [k for k in before if k.endswith("_proj.weight")]
    assert linear and all(f"{k}_packed" in after and k not in after for k in linear)
    for key in linear:
        prefix = key.removesuffix("weight")
        stored = {n: after[prefix + n] for n in ("weight_packed", "weight_scale", "weight_shape")}
        error = (dequantize_linear(stored).float() - before[key].float()).abs()
        step = stored["weight_scale"].float().repeat_interleave(GROUP_SIZE, dim=1)
        assert (error <= step / 2 + 1e-6).all(), key
    others = [k for k in before if k not in linear]
    assert all(torch.equal(before[k], after[k]) for k in others)
    assert load_tokenizer(str(version)).vocab_size == load_tokenizer(str(src)).vocab_size

    stamp = (version / "model.safetensors").stat().st_mtime_ns
    assert prepare_quantized_version(src) == version  # the same source: reused
    assert (version / "model.safetensors").stat().st_mtime_ns == stamp
    G.write_marker(src, {"kind": "changed"})  # a changed source is rebuilt
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    assert adapter_fingerprint(prepare_quantized_version(src)) == fingerprint_model_dir(src)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M GGUF converted once into a throwaway cache dir."""
    return prepare_base_model(cache_dir=tmp_path_factory.mktemp("llmrec-cache"))


@pytest.mark.slow
def test_gguf_round_trip_logits(prepared_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(prepared_dir)
    tok = load_tokenizer(str(prepared_dir))
    assert converted.config.num_hidden_layers == 30 and converted.config.hidden_size == 576
    assert getattr(converted.config, "quantization_config", None) is None
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "I loved Toy Story and Aladdin. What should I watch next?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected = reference(**ids).logits
        got = converted(**ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_prepare_real_reuses_without_loading(
    monkeypatch: pytest.MonkeyPatch, prepared_dir: Path
) -> None:
    def no_convert(gguf_path: Path, dst: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(G, "_convert_gguf", no_convert)
    before = _mtimes(prepared_dir)
    assert prepare_base_model(cache_dir=prepared_dir.parent) == prepared_dir
    assert resolve_model_path(BASE_MODEL_ALIAS, cache_dir=prepared_dir.parent) == str(prepared_dir)
    assert _mtimes(prepared_dir) == before
    marker = G._read_json(prepared_dir / MARKER_FILE)
    assert marker is not None and marker["model_fingerprint"] == fingerprint_model_dir(prepared_dir)


@pytest.mark.slow
def test_prepared_tokenizer_matches_gguf_tokenizer(prepared_dir: Path, tmp_path: Path) -> None:
    # build_tiny_model takes the tokenizer from whichever source is at hand; both must agree.
    a = build_tiny_model(tmp_path / "a", tokenizer_source=str(prepared_dir))
    b = build_tiny_model(tmp_path / "b", tokenizer_source=str(packaged_gguf_path()))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
