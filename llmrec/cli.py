"""The `llmrec` command: one entry point for data, model, training, evaluation and demo.

Every subcommand takes ``--config FILE.yaml`` and trailing ``section.field=value``
overrides (``llmrec evaluate eval.n_users=50 lora.r=4``); ``llmrec config show``
prints the merged result.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from llmrec.config import AppConfig, ConfigError, load_config
from llmrec.launch import TRAINING_SCRIPT, train_command
from llmrec.pseudonyms import RedactFilter

app = typer.Typer(
    help="llmrec: a personal, federated, generative recommender (one LLM, one LoRA per user).",
    no_args_is_help=True,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect the interaction data and its split.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare and inspect base models.", no_args_is_help=True)
config_app = typer.Typer(help="Show the merged configuration.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools (tiny test models).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(dev_app, name="dev")

console = Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (sections as in `config show`)."),
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides like eval.n_users=50 (applied last).")
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False):
    handler = RichHandler(console=Console(stderr=True), show_path=False)
    handler.addFilter(RedactFilter())  # no line names a user (llmrec.pseudonyms)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler]
    )
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(path: Path | None, overrides: list[str] | None) -> AppConfig:
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="config") from err


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Print the configuration after defaults, YAML, environment and overrides."""
    cfg = _config(config, overrides)
    console.print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))


@data_app.command("stats")
def data_stats(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Load the data set, validate it, and print its size and split."""
    from llmrec.data import DataError, dataset_from_config, dataset_stats, leave_last_out

    cfg = _config(config, overrides)
    try:
        ds = dataset_from_config(cfg)
    except DataError as err:
        raise typer.BadParameter(str(err), param_hint="data") from err
    split = leave_last_out(ds.histories)
    stats = dataset_stats(ds) | {
        "train interactions": sum(map(len, split.train.values())),
        "users with a test item": len(split.test),
    }
    table = Table(title=f"data set {ds.name}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@data_app.command("partition")
def data_partition(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write one sub-folder per user into.")],
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    user: Annotated[
        list[str] | None, typer.Option("--user", "-u", help="A user to cut out (repeatable).")
    ] = None,
    cohort: Annotated[
        bool, typer.Option(help="Every user of the federated cohort (fed.n_users, fed.seed).")
    ] = False,
) -> None:
    """Cut the data set into per-device folders, OUT_DIR/<user>/ (mode 0700): each holds one
    user's interactions and the whole catalog (generic JSONL), nothing of anyone else; a
    Flower SuperNode of that user loads it through its node-config `overrides`."""
    from llmrec.data import DataError, dataset_from_config, leave_last_out
    from llmrec.federated import federated_cohort, write_partitions

    if not user and not cohort:
        raise typer.BadParameter("give --user USER (repeatable) or --cohort", param_hint="--user")
    cfg = _config(config, overrides)
    try:
        ds = dataset_from_config(cfg)
    except DataError as err:
        raise typer.BadParameter(str(err), param_hint="data") from err
    users = list(user or [])
    if cohort:
        users += [
            u for u in federated_cohort(leave_last_out(ds.histories), cfg.fed) if u not in users
        ]
    try:
        partitions = write_partitions(ds, users, out_dir)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--user") from err
    table = Table(title=f"{len(partitions)} partitions of {ds.name} in {out_dir}")
    for col in ("user", "interactions", "folder"):
        table.add_column(col)
    for p in partitions:
        table.add_row(p.user_id, str(p.rows), str(p.interactions.parent))
    console.print(table)
    first = partitions[0]
    console.print(
        f"SuperNode of user {first.user_id}: --node-config "
        f'\'user-id="{first.user_id}" overrides="{first.overrides()}"\'',
        markup=False,
        highlight=False,
        soft_wrap=True,  # one line, to copy
    )


@model_app.command("prepare")
def model_prepare(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a valid cache exists.")] = False,
) -> None:
    """Turn the packaged SmolLM2 GGUF into a cached HF folder once (reused after)."""
    from llmrec.model import BASE_MODEL_ALIAS, prepare_base_model, resolve_model_path

    cfg = _config(config, overrides)
    if cfg.model.name_or_path == BASE_MODEL_ALIAS:
        path = prepare_base_model(cfg.model.cache_dir, force=force)
    else:
        path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    console.print(f"base model ready: [bold]{path}[/bold]")


@app.command()
def finetune(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Train the centralized LoRA on the training split (upper bound without privacy)."""
    from llmrec.data import dataset_from_config, leave_last_out
    from llmrec.evaluate import train_centralized
    from llmrec.model import load_base

    cfg = _config(config, overrides)
    ds = dataset_from_config(cfg)
    model, tokenizer = load_base(cfg)
    adapter = train_centralized(cfg, ds, leave_last_out(ds.histories), model, tokenizer)
    console.print(f"adapter written to [bold]{adapter}[/bold]")


@app.command()
def train(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    num_processes: Annotated[
        int, typer.Option("--num-processes", "-n", min=1, help="Processes to spread clients over.")
    ] = 1,
    resume: Annotated[bool, typer.Option(help="Continue after the last complete round.")] = False,
    accelerate_config: Annotated[
        Path | None, typer.Option(help="An accelerate config YAML (e.g. training/accelerate/).")
    ] = None,
    forget: Annotated[
        list[str] | None,
        typer.Option(
            metavar="USER",
            help="Forget USER from the shared model: retrain the run from the last checkpoint "
            "before their first round, without them (repeatable; the run's fed.output_dir).",
        ),
    ] = None,
) -> None:
    """Federated shared + personal LoRA training: runs `accelerate launch training/federated.py`."""
    import torch

    _config(config, overrides)  # a bad config fails here, before any process starts
    if not TRAINING_SCRIPT.is_file():
        raise typer.BadParameter(
            f"{TRAINING_SCRIPT} not found: install the repository editable (pip install -e .)",
            param_hint="train",
        )
    cuda = torch.cuda.is_available()
    cmd = train_command(
        config, overrides or [], num_processes, resume, accelerate_config, cuda, forget
    )
    console.print(f"[dim]$ {shlex.join(cmd)}[/dim]")
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def recommend(
    user: Annotated[str, typer.Option("--user", "-u", help="User id in the data set.")],
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    foundation: Annotated[
        Path | None,
        typer.Option(
            help="A trained `llmrec foundation` folder: one forward pass ranks every item "
            "(default: llm.output_dir when it holds one)."
        ),
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="A title LoRA (trie decoding) instead of the foundation.")
    ] = None,
    context: Annotated[
        str | None, typer.Option(help='Free-text request, e.g. "something light".')
    ] = None,
) -> None:
    """Recommend the top-k unseen catalog items for one user's full history."""
    from llmrec.adapters import ADAPTER_CONFIG
    from llmrec.data import dataset_from_config
    from llmrec.foundation import BASE_DIR, load_foundation

    cfg = _config(config, overrides)
    ds = dataset_from_config(cfg)
    if user not in ds.histories:
        raise typer.BadParameter(
            f"unknown user {user!r} in data set {ds.name}", param_hint="--user"
        )
    if adapter is not None and not (adapter / ADAPTER_CONFIG).is_file():
        raise typer.BadParameter(f"{adapter} is not a PEFT adapter folder", param_hint="--adapter")
    if foundation is not None and not (foundation / BASE_DIR).is_dir():
        raise typer.BadParameter(
            f"{foundation} is not a trained foundation folder", param_hint="--foundation"
        )
    if foundation is None and adapter is None and (cfg.llm.output_dir / BASE_DIR).is_dir():
        foundation = cfg.llm.output_dir
    history = ds.histories[user]
    if foundation is not None:
        scorer = load_foundation(foundation, ds.catalog, cfg)
        rows = [
            (r.item_id, ds.catalog.display(r.item_id), r.score)
            for r in scorer.recommend(history, k=cfg.recommend.k, context=context)
        ]
        how = f"one pass over {len(ds.catalog)} item tokens ({foundation})"
    else:
        rows = _trie_recommend(cfg, ds, history, adapter, context)
        how = "trie beam search over titles" + (f" ({adapter})" if adapter else ", bare base")
    table = Table(
        title=f"user {user}: {len(history)} items seen, last: {ds.catalog.display(history[-1])}",
        caption=how,
    )
    for col in ("#", "item_id", "title", "log-prob"):
        table.add_column(col)
    for rank, (item_id, title, score) in enumerate(rows, 1):
        table.add_row(str(rank), item_id, title, f"{score:.2f}")
    console.print(table)


def _trie_recommend(cfg, ds, history, adapter: Path | None, context: str | None):
    from llmrec.model import attach_adapter, load_base
    from llmrec.recommend import build_recommender

    model, tokenizer = load_base(cfg)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    rec = build_recommender(cfg, ds, model, tokenizer)
    return [(r.item_id, r.title, r.score) for r in rec.recommend(history, cfg.recommend.k, context)]


@app.command()
def personalize(
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Refresh this user's personal adapter.")
    ] = None,
    all_queued: Annotated[
        bool, typer.Option("--all-queued", help="Refresh every user queued by feedback.")
    ] = False,
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
) -> None:
    """Local personal-adapter refresh from the current history; publishes a new version."""
    from llmrec.agent import ProfileStore
    from llmrec.data import dataset_from_config
    from llmrec.federated import Personalizer, RefreshError

    if (user is None) == (not all_queued):
        raise typer.BadParameter("give --user USER or --all-queued", param_hint="--user")
    cfg = _config(config, overrides)
    ds = dataset_from_config(cfg)
    profiles = ProfileStore(cfg.profile.url, ds.catalog, ds.histories)
    users = profiles.queued() if all_queued else [user]
    if not users:
        console.print("nobody is queued for a refresh")
        return
    try:
        personalizer = Personalizer(cfg, ds.catalog)
    except RefreshError as err:
        raise typer.BadParameter(str(err), param_hint="config") from err
    failed = 0
    for user_id in users:
        queued_at = profiles.queued_at(user_id)
        try:
            result = personalizer.refresh(user_id, profiles.history(user_id))
        except (RefreshError, ValueError) as err:
            failed += 1
            console.print(f"[red]{user_id}[/red]: {err}")
            continue
        if queued_at is not None:
            profiles.dequeue(user_id, queued_before=queued_at)
        console.print(
            f"{user_id}: published [bold]{result.adapter_name}[/bold] "
            f"(loss {result.loss:.4f}, {result.n_examples} targets, {result.seconds:.1f} s)"
        )
    if failed:
        raise typer.Exit(1)


@app.command()
def evaluate(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """HR@k / NDCG@k of every method on one seeded user sample; writes JSON and a PNG chart."""
    from llmrec.evaluate import REPORT_JSON, REPORT_PNG
    from llmrec.evaluate import evaluate as run_eval

    cfg = _config(config, overrides)
    report = run_eval(cfg)
    print_report(report)
    console.print(
        f"written: {cfg.eval.results_dir / REPORT_JSON}, {cfg.eval.results_dir / REPORT_PNG}"
    )


@app.command()
def foundation(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Train the item-token recommender (method llm): the base with one token per item,
    trained with a LoRA on every position of every training history; the epoch is chosen on
    validation. Writes base/ and adapter/ into llm.output_dir."""
    from llmrec.data import dataset_from_config, leave_last_out
    from llmrec.foundation import CURVES_JSON, train_foundation

    cfg = _config(config, overrides)
    ds = dataset_from_config(cfg)
    out = train_foundation(cfg, ds, leave_last_out(ds.histories))
    curves = json.loads((out / CURVES_JSON).read_text())
    console.print(
        f"kept epoch {curves['best_epoch']} (validation {curves['best_valid']}), "
        f"{curves['seconds']} s; written to [bold]{out}[/bold]"
    )


@app.command()
def quality(
    config: ConfigOpt = None,
    overrides: OverridesArg = None,
    llm_run: Annotated[
        list[Path] | None,
        typer.Option(help="A trained `llmrec foundation` folder: an llm candidate (repeatable)."),
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="Methods to run (repeatable; default all).")
    ] = None,
    report: Annotated[
        Path, typer.Option(help="Where the JSON report goes (the PNG beside it).")
    ] = Path("bench/reports/quality.json"),
) -> None:
    """Every method tuned on the validation item and scored once on test, on all users, with
    95% bootstrap intervals and paired tests against SASRec; writes the JSON and PNG."""
    from llmrec.foundation import BASE_DIR
    from llmrec.quality import METHODS, run_quality

    cfg = _config(config, overrides)
    methods = method or list(METHODS)
    for run in llm_run or []:
        if not (run / BASE_DIR).is_dir():
            raise typer.BadParameter(
                f"{run} is not a trained foundation folder", param_hint="--llm-run"
            )
    try:
        result = run_quality(cfg, llm_run or [], report, methods)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--method") from err
    k = result["k"]
    table = Table(title=f"{result['users']} users, chosen on validation, test once (95% CI)")
    for col in ("method", f"valid NDCG@{k}", f"test HR@{k}", f"test NDCG@{k}", "vs SASRec", "s"):
        table.add_column(col)
    for name, row in result["methods"].items():
        test, pair = row["test"], result["paired"].get(f"{name}_vs_sasrec")
        table.add_row(
            name,
            f"{row['valid'][f'NDCG@{k}']:.4f}",
            f"{test[f'HR@{k}']:.4f} {test[f'HR@{k}_ci95']}",
            f"{test[f'NDCG@{k}']:.4f} {test[f'NDCG@{k}_ci95']}",
            f"{pair['delta']:+.4f} p={pair['p']:.4f}" if pair else "-",
            str(row["seconds"]),
        )
    console.print(table)
    console.print(f"written: {report}, {report.with_suffix('.png')}")


def print_report(report) -> None:
    """The metric table as a rich table."""
    k = report.k
    table = Table(
        title=f"{report.dataset}: {report.users} users (seed {report.seed}), "
        "leave-last-out, full ranking"
    )
    for col in ("method", f"HR@{k}", f"NDCG@{k}", "test NLL", "seconds"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, row in report.results.items():
        table.add_row(
            name,
            f"{row[f'HR@{k}']:.4f}",
            f"{row[f'NDCG@{k}']:.4f}",
            f"{row['NLL']:.3f}" if "NLL" in row else "-",  # LLM methods only
            str(report.seconds.get(name, "")),
        )
    console.print(table)
    for key, value in report.meta.items():
        if key.startswith("ours_beats_"):
            other = key.removeprefix("ours_beats_")
            console.print(f"ours gives the test item a lower NLL than {other} for {value}")


@app.command()
def demo(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """The main job end to end on the embedded defaults: data, base model, the item-token
    foundation model and a federated cohort's personal adapters, evaluated against the
    baselines."""
    start = time.perf_counter()
    cfg = _config(config, overrides)
    console.rule("1/3 data")
    data_stats(config, overrides)
    console.rule("2/3 base model")
    model_prepare(config, overrides, force=False)
    console.rule("3/3 foundation model + federated shared/personal adapters + evaluation")
    evaluate(config, overrides)
    minutes, seconds = divmod(round(time.perf_counter() - start), 60)
    console.print(
        f"[green]demo done[/green] in {minutes} min {seconds:02d} s: see {cfg.eval.results_dir}"
    )


@dev_app.command("make-tiny-model")
def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the tiny model into.")],
    seed: Annotated[int, typer.Option(help="Initialization seed.")] = 0,
) -> None:
    """Build a 2-layer Llama with the real SmolLM2 tokenizer, for fast tests and servers."""
    from llmrec.model import build_tiny_model

    console.print(f"tiny model: {build_tiny_model(out_dir, seed=seed)}")


PLUGIN_GROUP = "llmrec.commands"
"""Entry-point group of CLI plugins: each entry is a function called with the Typer app."""


def _load_plugins() -> None:
    """Add the commands of installed plugins (e.g. ``serve`` from the serving application).

    The library never imports them: a plugin registers itself through its package's entry
    points. One that fails to load is reported and skipped, so the rest of the CLI works.
    """
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()(app)
        except Exception as err:  # a broken plugin must not take the whole CLI down
            logging.getLogger(__name__).warning("llmrec plugin %r not loaded: %s", entry.name, err)


_load_plugins()


if __name__ == "__main__":
    app()
