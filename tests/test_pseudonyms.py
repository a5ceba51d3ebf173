"""Log pseudonyms: stable within a process, and every served name or store path redacted."""

from __future__ import annotations

import logging

from llmrec.pseudonyms import RedactFilter, pseudonym, redact, served_name


def test_a_pseudonym_is_stable_and_hides_the_id():
    assert pseudonym("42") == pseudonym("42") != pseudonym("43")
    assert "42" not in pseudonym("42")[2:] or pseudonym("42").startswith("u-")
    assert served_name("42@v3") == f"{pseudonym('42')}@v3"


def test_redact_replaces_served_names_and_store_paths():
    line = "Loaded new LoRA adapter: name 'ann.b-7@v12', path '/srv/adapters/ann.b-7/v0012'"
    out = redact(line)
    assert "ann.b-7" not in out
    assert out.count(pseudonym("ann.b-7")) == 2
    # Already pseudonymous names, the shared adapter and other text are left alone.
    kept = f"{served_name('42@v1')} _shared@v2 round 3 took 1.5 s, 99/v1/chat"
    assert redact(kept) == kept


def test_the_filter_rewrites_the_record():
    record = logging.LogRecord("vllm", logging.INFO, "x", 1, "loaded %s", ("7@v1",), None)
    assert RedactFilter().filter(record)
    assert record.getMessage() == f"loaded {pseudonym('7')}@v1"
