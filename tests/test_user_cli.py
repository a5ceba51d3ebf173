"""`llmrec user`: see and edit a history, export and re-import an adapter, delete a user
(profile, adapters, client-side personal state and keys all gone)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from llmrec.agent import ProfileStore
from llmrec.cli import app
from llmrec.federated import LOCAL_STATE, client_dir
from llmrec_serving.keys import KeyStore

runner = CliRunner()


def test_user_control(serving_world, tiny_dataset):
    tmp = serving_world.tmp
    overrides = [
        *serving_world.overrides,
        f"profile.url=sqlite:///{tmp / 'cli-profiles.db'}",
        f"fed.output_dir={tmp / 'fed'}",
    ]

    def user(*args):
        return runner.invoke(app, ["user", *args, *overrides])

    shown = user("history", "1")
    assert shown.exit_code == 0, shown.output
    assert len(shown.output.splitlines()) == len(tiny_dataset.histories["1"])
    new = next(i for i in tiny_dataset.catalog.ids if i not in tiny_dataset.histories["1"])
    edited = user("history", "1", "--add", new, "--remove", tiny_dataset.histories["1"][0])
    assert edited.exit_code == 0 and f"\t{new}\t" in edited.output
    assert "refresh is queued" in edited.output
    assert user("history", "1", "--add", "no-such-item").exit_code == 2
    assert user("history", "../x").exit_code == 2

    zip_path = tmp / "1.zip"
    assert user("export", "1", str(zip_path)).exit_code == 0 and zip_path.is_file()
    imported = user("import", "1-again", str(zip_path))
    assert imported.exit_code == 0 and "1-again@v1" in imported.output
    (tmp / "bad.zip").write_bytes(b"not a zip")
    assert user("import", "1-again", str(tmp / "bad.zip")).exit_code == 2
    assert user("export", "nobody", str(tmp / "x.zip")).exit_code == 2

    state = client_dir(tmp / "fed", "1") / LOCAL_STATE
    state.parent.mkdir(parents=True)
    state.write_bytes(b"personal state")
    assert user("delete", "1").exit_code == 2  # needs --yes
    deleted = user("delete", "1", "--yes")
    assert deleted.exit_code == 0, deleted.output
    report = json.loads(deleted.output)
    assert report["adapters"] and report["personal_state"] and report["keys"] == 1
    assert serving_world.store.current("1") is None and not state.parent.exists()
    assert KeyStore(tmp / "keys.json").authenticate(serving_world.keys["1"]) is None
    profiles = ProfileStore(f"sqlite:///{tmp / 'cli-profiles.db'}", tiny_dataset.catalog)
    assert profiles.history("1") == [] and profiles.queued() == []
