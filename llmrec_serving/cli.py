"""``llmrec serve``, ``serve-demo`` and ``keys``: registered into the llmrec CLI as a plugin.

``pyproject.toml`` lists :func:`register` under the ``llmrec.commands`` entry-point group;
``llmrec.cli`` calls every such hook with its Typer app, so the library never imports this
package. Heavy imports (FastAPI, torch, vLLM) happen inside the commands, so the CLI stays
fast and works where they are missing.

    llmrec keys add alice                  # prints alice's key once
    llmrec keys add --admin                # an admin key
    llmrec serve -c training/configs/ml100k.yaml serve.port=8000
    llmrec serve serve.backend=inprocess   # without vLLM
    llmrec serve serve.vllm_urls=[http://127.0.0.1:8001]  # attach to a running vLLM
    llmrec serve-demo                      # after `llmrec demo`: one REST answer, one chat
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(help="Per-user API keys of the serving gateway.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (sections as in `config show`)."),
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides like serve.port=9000 (applied last).")
]
KeyUserArg = Annotated[str | None, typer.Argument(help="User id (omit with --admin).")]


def serving_config(config: Path | None, overrides: list[str] | None):
    """The serving config of a command's ``-c FILE`` and overrides (a bad one: exit 2)."""
    from llmrec.config import ConfigError
    from llmrec_serving.config import load_serving_config

    try:
        return load_serving_config(config, overrides or [])
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="config") from err


def serve(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Serve recommendations and chat: the vLLM server with per-user LoRA and the gateway."""
    import functools

    import uvicorn

    from llmrec_serving.app import create_app
    from llmrec_serving.config import load_serving_config
    from llmrec_serving.services import build_services

    cfg = serving_config(config, overrides)
    services = build_services(cfg)
    # POST /v1/admin/rollout reads the same file, overrides and environment again.
    services.reload = functools.partial(load_serving_config, config, overrides or [])
    app = create_app(services)
    typer.echo(f"llmrec gateway on http://{cfg.serve.host}:{cfg.serve.port} (docs at /docs)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info", access_log=False)


def serve_demo(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """After `llmrec demo`: serve its federated run's adapters, ask for recommendations over
    REST and for a chat answer as one of its users, print both, stop (same config)."""
    from rich.console import Console

    from llmrec_serving.app import GatewayStartError
    from llmrec_serving.demo import DemoError, run_demo, show

    try:
        result = run_demo(serving_config(config, overrides))
    except (DemoError, GatewayStartError) as err:
        typer.echo(f"serve-demo: {err}", err=True)
        raise typer.Exit(1) from err
    show(result, Console())


def _key_store(config: Path | None, overrides: list[str] | None):
    from llmrec_serving.keys import KeyStore

    return KeyStore(serving_config(config, overrides).serve.keys_file)


@keys_app.command("add")
def keys_add(
    user: KeyUserArg = None,
    admin: Annotated[bool, typer.Option(help="Make an admin key.")] = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Make a key and print it once (only its hash is stored)."""
    if (user is None) != admin:
        raise typer.BadParameter("give a user id, or --admin without one", param_hint="user")
    store = _key_store(config, overrides)
    try:
        typer.echo(store.add(user, admin=admin))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="user") from err


@keys_app.command("revoke")
def keys_revoke(
    user: KeyUserArg = None,
    admin: Annotated[bool, typer.Option(help="Revoke every admin key.")] = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Revoke every key of a user (or every admin key)."""
    store = _key_store(config, overrides)
    typer.echo(f"revoked {store.revoke(user, admin=admin)} key(s)")


@keys_app.command("ls")
def keys_ls(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """List who has keys (never the keys themselves)."""
    for record in _key_store(config, overrides).list():
        who = "admin" if record.admin else record.user_id
        typer.echo(f"{who}\t{record.created_at}")


def register(app: typer.Typer) -> None:
    """The ``llmrec.commands`` hook: add ``serve``, ``serve-demo`` and ``keys`` to the CLI."""
    app.command("serve")(serve)
    app.command("serve-demo")(serve_demo)
    app.add_typer(keys_app, name="keys")
