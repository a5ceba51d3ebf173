"""The item-token foundation model: the extended base, one-pass full ranking, its training."""

import math
from pathlib import Path

import pytest
import torch

from llmrec.config import LLMConfig, LoraConfig
from llmrec.data import leave_last_out
from llmrec.finetune import IGNORE_INDEX
from llmrec.foundation import (
    ADAPTER_DIR,
    BASE_DIR,
    history_sequences,
    history_windows,
    save_foundation,
    train_item_model,
)
from llmrec.model import attach_adapter, fingerprint_model_dir, load_model
from llmrec.model.item_vocab import (
    ITEM_TOKEN,
    ItemVocab,
    ItemVocabError,
    prepare_item_base,
    title_embedding_init,
)
from llmrec.prompts import PromptBuilder
from llmrec.recommend.item_scorer import ItemScorer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def item_base(tiny_model_dir, tiny_dataset):
    return prepare_item_base(tiny_model_dir, tiny_dataset.catalog)


@pytest.fixture(scope="module")
def loaded(item_base):
    model, tokenizer = load_model(str(item_base), dtype="float32")
    model.eval()
    return model, tokenizer, ItemVocab.read(item_base)


def scorer_for(model, tokenizer, vocab, catalog, render="items", window=50, batch_size=4):
    prompts = PromptBuilder(tokenizer)
    return ItemScorer(model, vocab, catalog, prompts, render, window, batch_size)


# --------------------------------------------------------------------------- the extended base


def test_one_special_token_per_item_initialised_from_its_title(
    tiny_model_dir, item_base, loaded, tiny_dataset
):
    model, tokenizer, vocab = loaded
    catalog = tiny_dataset.catalog
    assert vocab.item_ids == tuple(catalog.ids)
    for j in range(len(catalog)):
        token = ITEM_TOKEN.format(j)
        assert tokenizer.convert_tokens_to_ids(token) == vocab.first_token_id + j
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab.first_token_id + j]
    base, base_tokenizer = load_model(str(tiny_model_dir), dtype="float32")
    expected = title_embedding_init(
        base.get_input_embeddings().weight, base_tokenizer, [i.display for i in catalog]
    )
    rows = model.get_input_embeddings().weight[vocab.first_token_id :][: len(vocab)]
    torch.testing.assert_close(rows, expected)
    # Tied: the output head's rows are the same rows.
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    )


def test_the_extended_base_is_reproducible_and_cached(tiny_model_dir, item_base, tiny_dataset):
    fingerprint = fingerprint_model_dir(item_base)
    assert prepare_item_base(tiny_model_dir, tiny_dataset.catalog) == item_base
    rebuilt = prepare_item_base(tiny_model_dir, tiny_dataset.catalog, force=True)
    assert rebuilt == item_base and fingerprint_model_dir(rebuilt) == fingerprint


def test_a_vocabulary_for_another_catalog_is_refused(tiny_model_dir, loaded):
    from llmrec.data import Catalog, Item

    model, tokenizer, vocab = loaded
    other = Catalog([Item("x1", "Something Else", 1999)])
    with pytest.raises(ItemVocabError, match="another catalog"):
        scorer_for(model, tokenizer, vocab, other)
    with pytest.raises(ItemVocabError, match="not an item-token base"):
        ItemVocab.read(tiny_model_dir)


# --------------------------------------------------------------------------- one-pass ranking


def brute_force_ranking(model, tokenizer, vocab, catalog, history, render="items"):
    """Every item scored by the full-vocabulary softmax, one unpadded sequence at a time,
    seen items dropped, sorted best first."""
    scorer = scorer_for(model, tokenizer, vocab, catalog, render)
    ids = torch.tensor([scorer.sequence(history)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    full = torch.log_softmax(logits.double(), dim=-1)
    scores = {i: float(full[vocab.token_id(i)]) for i in catalog.ids if i not in history}
    return sorted(scores, key=lambda i: -scores[i])


@pytest.mark.parametrize("render", ["items", "titles", "both"])
def test_one_pass_ranking_equals_brute_force_full_softmax(loaded, tiny_dataset, render):
    model, tokenizer, vocab = loaded
    catalog = tiny_dataset.catalog
    histories = [h for _, h in sorted(tiny_dataset.histories.items())][:6]
    # Different lengths in one batch: left padding must not change any score.
    histories = [h[: 2 + 3 * n] for n, h in enumerate(histories)]
    scorer = scorer_for(model, tokenizer, vocab, catalog, render)
    ranked = scorer.rank(histories, k=len(catalog))
    for history, row in zip(histories, ranked, strict=True):
        expected = brute_force_ranking(model, tokenizer, vocab, catalog, history, render)
        assert [r.item_id for r in row] == expected


def test_seen_and_excluded_items_are_never_returned(loaded, tiny_dataset):
    model, tokenizer, vocab = loaded
    catalog = tiny_dataset.catalog
    scorer = scorer_for(model, tokenizer, vocab, catalog)
    history = list(tiny_dataset.histories["1"])
    exclude = [i for i in catalog.ids if i not in history][:3]
    got = scorer.recommend(history, k=len(catalog), exclude=exclude)
    returned = [r.item_id for r in got]
    assert not set(returned) & (set(history) | set(exclude))
    assert len(returned) == len(catalog) - len(set(history) | set(exclude))
    assert [r.score for r in got] == sorted((r.score for r in got), reverse=True)
    # The scores are log-probabilities over the items that could be returned.
    assert sum(math.exp(r.score) for r in got) == pytest.approx(1.0, abs=1e-5)
    assert scorer.recommend(history, k=5, exclude=catalog.ids) == []


def test_evaluation_ranks_and_scores_from_one_pass_per_user(loaded, tiny_dataset, monkeypatch):
    from llmrec.evaluate import _item_methods

    model, tokenizer, vocab = loaded
    scorer = scorer_for(model, tokenizer, vocab, tiny_dataset.catalog)
    history = list(tiny_dataset.histories["1"])[:-1]
    target = tiny_dataset.histories["1"][-1]
    want_rank = [r.item_id for r in scorer.recommend(history, k=5)]
    want_score = float(scorer.log_probs([history])[0, vocab.index(target)])
    passes = []
    forward = scorer.log_probs
    monkeypatch.setattr(scorer, "log_probs", lambda h, *a: passes.append(1) or forward(h, *a))
    rank, score = _item_methods(scorer)
    assert rank("1", history, 5) == want_rank
    assert score("1", history, target) == want_score
    assert rank("1", history, 5) == want_rank  # the cached scores are not masked away
    assert len(passes) == 1


def test_the_window_keeps_the_most_recent_items(loaded, tiny_dataset):
    model, tokenizer, vocab = loaded
    scorer = scorer_for(model, tokenizer, vocab, tiny_dataset.catalog, window=3)
    history = list(tiny_dataset.histories["1"])
    assert scorer.sequence(history) == scorer.sequence(history[-3:])


# --------------------------------------------------------------------------- training


def test_windows_make_every_history_item_a_target_exactly_once():
    for n in range(0, 30):
        for window in (1, 3, 7, 50):
            targets = []
            for start, stop, first_is_target in history_windows(n, window):
                assert stop - start <= window + 1
                targets += list(range(start if first_is_target else start + 1, stop))
            assert targets == list(range(n))


def test_each_position_is_labelled_with_the_next_item(loaded, tiny_dataset):
    _, tokenizer, vocab = loaded
    catalog = tiny_dataset.catalog
    prompts = PromptBuilder(tokenizer)
    history = list(tiny_dataset.histories["1"])
    seqs = history_sequences({"1": history}, catalog, vocab, prompts, "items", window=4)
    labelled = [label for s in seqs for label in s.labels if label != IGNORE_INDEX]
    assert labelled == [catalog.index(i) for i in history]
    for s in seqs:  # causal: a label sits just before its own token
        for pos, label in enumerate(s.labels):
            if label != IGNORE_INDEX and pos + 1 < len(s.input_ids):
                assert s.input_ids[pos + 1] == vocab.first_token_id + label


def test_training_learns_and_the_saved_version_ranks_the_same(
    tiny_model_dir, item_base, tiny_dataset, tmp_path
):
    catalog = tiny_dataset.catalog
    split = leave_last_out(tiny_dataset.histories)
    model, tokenizer = load_model(str(item_base), dtype="float32")
    vocab = ItemVocab.read(item_base)
    prompts = PromptBuilder(tokenizer)
    cfg = LLMConfig(
        epochs=4,
        patience=4,
        batch_size=4,
        learning_rate=5e-3,
        item_learning_rate=5e-3,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    peft_model, rows, result = train_item_model(
        model, vocab, catalog, prompts, split.train, split.valid, cfg
    )
    assert result.train_loss[-1] < result.train_loss[0]
    assert result.best_valid == result.valid[result.best_epoch - 1]
    save_foundation(peft_model, rows, item_base, result, tmp_path, {"kind": "test"})
    trained = ItemVocab.read(tmp_path / BASE_DIR)
    assert trained == vocab
    reloaded, tok = load_model(str(tmp_path / BASE_DIR), dtype="float32")
    reloaded = attach_adapter(reloaded, tmp_path / ADAPTER_DIR)
    histories = [list(split.train[u]) for u in sorted(split.train)][:5]
    ours = ItemScorer(peft_model.eval(), vocab, catalog, prompts).log_probs(histories)
    again = ItemScorer(reloaded.eval(), trained, catalog, PromptBuilder(tok)).log_probs(histories)
    torch.testing.assert_close(again, ours, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the commands


def test_foundation_recommend_and_quality_commands(tiny_model_dir, tmp_path):
    """`llmrec foundation` trains a version, `llmrec recommend` ranks with it in one pass,
    `llmrec quality` tunes and tests every method with it and writes the report."""
    import json

    from typer.testing import CliRunner

    from llmrec.cli import app

    tiny = FIXTURES / "tiny"
    overrides = [
        "data.name=generic",
        f"data.interactions={tiny / 'interactions.csv'}",
        f"data.catalog={tiny / 'catalog.csv'}",
        f"model.name_or_path={tiny_model_dir}",
        "model.dtype=float32",
        "llm.epochs=2",
        "llm.batch_size=4",
        "llm.lora.r=4",
        "llm.lora.target_modules=[q_proj, v_proj]",
        f"llm.output_dir={tmp_path / 'llm'}",
    ]
    runner = CliRunner()
    done = runner.invoke(app, ["foundation", *overrides])
    assert done.exit_code == 0, done.output
    assert "kept epoch" in done.output and (tmp_path / "llm" / BASE_DIR).is_dir()
    done = runner.invoke(app, ["recommend", "--user", "1", *overrides])
    assert done.exit_code == 0, done.output
    assert "one pass over 30 item tokens" in done.output
    report = tmp_path / "quality.json"
    done = runner.invoke(
        app,
        [
            "quality",
            "--llm-run",
            str(tmp_path / "llm"),
            "--method",
            "popularity",
            "--method",
            "llm",
            "--report",
            str(report),
            *overrides,
        ],
    )
    assert done.exit_code == 0, done.output
    written = json.loads(report.read_text())
    assert set(written["methods"]) == {"popularity", "llm"}
    assert written["methods"]["llm"]["config"]["run"] == str(tmp_path / "llm")
    done = runner.invoke(
        app, ["quality", "--llm-run", str(tmp_path), *overrides], env={"COLUMNS": "300"}
    )
    assert done.exit_code == 2 and "not a trained foundation folder" in done.output
