"""``llmrec user``: a user's control over their own data, from the command line.

Registered into the llmrec CLI as a plugin (``llmrec.commands`` entry point), because
deleting a user also revokes their API keys, which belong to the serving application.
Every command takes the serving config (``-c FILE`` and ``a.b=c`` overrides) that names
the profile database, the adapter store and the key file.

    llmrec user history 42                      # the history, exclusions and feedback
    llmrec user history 42 --add 50 --remove 7  # edit it (queues an adapter refresh)
    llmrec user export 42 adapter-42.zip        # the current adapter: PEFT files + manifest
    llmrec user import 42 adapter-42.zip        # validated, published as a new version
    llmrec user delete 42 --yes                 # profile, adapters, personal state, keys
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmrec_serving.cli import ConfigOpt, serving_config

user_app = typer.Typer(help="A user's history, adapter export/import and deletion.")

OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides like profile.url=sqlite:///p.db.")
]
UserArg = Annotated[str, typer.Argument(help="The user id.")]


def _open(config: Path | None, overrides: list[str] | None, user: str):
    """(config, data set, profile store) after checking the user id."""
    from llmrec.adapters import validate_user_id
    from llmrec.agent import ProfileStore
    from llmrec.data import dataset_from_config

    try:
        validate_user_id(user)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="user") from err
    cfg = serving_config(config, overrides)
    ds = dataset_from_config(cfg)
    return cfg, ds, ProfileStore(cfg.profile.url, ds.catalog, ds.histories)


@user_app.command("history")
def history(
    user: UserArg,
    add: Annotated[list[str] | None, typer.Option(help="Item id to add (repeatable).")] = None,
    remove: Annotated[
        list[str] | None, typer.Option(help="Item id to remove (repeatable).")
    ] = None,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Show (and edit) a user's history; exclusions and feedback are listed after it."""
    from llmrec.agent import UnknownItemError

    _, ds, profiles = _open(config, overrides, user)
    try:
        profiles.remove_history(user, remove or [])
        profiles.add_history(user, add or [], "cli")
    except UnknownItemError as err:
        raise typer.BadParameter(str(err), param_hint="--add/--remove") from err
    for n, entry in enumerate(profiles.history_entries(user), 1):
        typer.echo(f"{n}\t{entry.item_id}\t{ds.catalog.display(entry.item_id)}\t{entry.source}")
    for item_id in profiles.exclusions(user):
        typer.echo(f"never\t{item_id}\t{ds.catalog.display(item_id)}")
    for fb in profiles.feedback(user):
        typer.echo(f"{fb.sentiment}\t{fb.item_id}\t{ds.catalog.display(fb.item_id)}\t{fb.source}")
    if profiles.queued_at(user) is not None:
        typer.echo("a personal-adapter refresh is queued (llmrec personalize --all-queued)")


def _store(cfg):
    from llmrec_serving.releases import base_model_dir, open_store

    return open_store(cfg, base_model_dir(cfg))


@user_app.command("export")
def export(
    user: UserArg,
    zip_path: Annotated[Path, typer.Argument(help="The zip to write.")],
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Write the user's current adapter (PEFT folder + manifest) to a zip."""
    cfg, _, _ = _open(config, overrides, user)
    try:
        path = _store(cfg).export(user, zip_path)
    except FileNotFoundError as err:
        raise typer.BadParameter(str(err), param_hint="user") from err
    typer.echo(f"exported {user}'s adapter to {path}")


@user_app.command("import")
def import_(
    user: UserArg,
    zip_path: Annotated[Path, typer.Argument(help="A zip written by `llmrec user export`.")],
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Validate an exported zip and publish it as the user's next adapter version."""
    from llmrec.adapters import AdapterValidationError

    cfg, _, _ = _open(config, overrides, user)
    try:
        ref = _store(cfg).import_zip(user, zip_path)
    except (AdapterValidationError, FileNotFoundError) as err:
        raise typer.BadParameter(str(err), param_hint="zip_path") from err
    typer.echo(f"imported as {ref.adapter_name}")


@user_app.command("delete")
def delete(
    user: UserArg,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Delete a user: history, feedback, conversations, personal adapters and state, keys."""
    from llmrec.agent import erase_user
    from llmrec_serving.keys import KeyStore

    if not yes:
        raise typer.BadParameter("deleting a user cannot be undone: add --yes", param_hint="--yes")
    cfg, _, profiles = _open(config, overrides, user)
    report = erase_user(user, profiles, _store(cfg), cfg.fed.output_dir)
    report = report.model_copy(update={"keys": KeyStore(cfg.serve.keys_file).revoke(user)})
    typer.echo(report.model_dump_json(indent=2))


def register(app: typer.Typer) -> None:
    """The ``llmrec.commands`` hook: add ``user`` to the llmrec CLI."""
    app.add_typer(user_app, name="user")
