"""The federated run, measured: its training speed, and the personalization it buys.

``speed``: batched clients against the one-client loop, in one run. Trains the same seeded
sample of clients (their first round of ``training/configs/ml100k.yaml``) twice per
repetition, side by side: one client at a time (``client_update``, the loop every runner
had), then in groups of ``--group`` clients in one batched forward (``batched_client_updates``,
what ``fed.client_batch`` runs). Prints and writes client-steps/s, training tokens/s, and the
fraction of this CPU's measured matmul rate (a large square matmul in the model's dtype)
that the training's matmul FLOPs reach. Medians over repetitions.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/federated.py speed --clients 64 --group 16 --reps 2

Writes ``bench/reports/federated-speed.json`` and a PNG beside it.

``report``: a finished run of ``training/federated.py`` (schedule "after": one shared state,
then each client's personal part) scored on every user's validation and test item against
the whole catalog. Shared-only is the final shared state alone (plain FedAvg); ours is each
user's shared + personal adapter at the personal scale export picked on the user's own
held-out data. Paired over users: a bootstrap interval of the NDCG@10 difference, a sign-flip
p-value and McNemar's exact test on HR@10. Popularity, ItemKNN, SASRec and centralized are
the committed quality report's rows (the same users and protocol).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/federated.py report --run outputs/fed-all

Writes ``bench/reports/federated.json`` and a PNG beside it. Every run's per-user ranks are
also kept in ``--seeds`` (``bench/reports/federated-seeds.json``, one entry per ``fed.seed``
of one configuration; a run of another configuration is refused), so seeds run in different
sessions pair user by user: the report adds each arm's per-seed figures, the A/A check
(shared-only of two seeds against each other, the noise floor between runs) and ours
against shared-only on each user's mean over the seeds. A run of another configuration is
an ablation: its report is its own (a FedSA-LoRA run, ``fed.share=lora_a``, writes
``federated-fedsa.json`` and ``federated-fedsa-seeds.json``, where "ours" is FedSA-LoRA and
"shared-only" its shared A with B = 0; a personal-only run, ``fed.shared_rank=0``, writes
``federated-personal.json``, where "shared-only" is the base itself; a DP-FedAvg run,
``fed.dp.enabled=true``, writes ``federated-dp.json``, its epsilon beside), and the main report
takes it as a row, paired with ours on the same seed (validation and test):
``--ablation FedSA-LoRA=bench/reports/federated-fedsa-seeds.json``. ``--quantized``
evaluates the run with the base's linear weights as its 4-bit served version has them
(``serve.quantization=w4a16``; report ``federated-w4a16.json``), and
``--ablation bf16=bench/reports/federated-seeds.json`` pairs it with the run as trained.

``personal``: the personal fit's settings chosen on validation. For each (steps, decay) of
the grid, every user of a finished run fits its personal part on the run's final shared
part (as the runner's fit after the last round does), picks its scale on its own held-out
data, and is scored on its validation item; the test item is scored once, for the
configuration with the best validation NDCG@10 (and for shared-only beside it).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/federated.py personal --run outputs/fed-all \
        --steps 4 16 --decay 0 30

Writes ``bench/reports/personal-fit.json`` and a PNG beside it.

``vector``: the smallest personal part, one vector per user added to the last hidden state
(each item's logit moves by its row . u), fit on the user's whole training history over a
finished run's frozen final shared part; (decay, scale) chosen on every user's validation
item, the test item scored once, paired against shared-only.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/federated.py vector --run outputs/fed-all

Writes ``bench/reports/personal-vector.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmrec import federated as F
from llmrec.atomic import write_json_atomic, write_text_atomic
from llmrec.config import AppConfig, load_config
from llmrec.data import Dataset, Split, dataset_from_config, leave_last_out, user_sort_key
from llmrec.federated import VAL_K
from llmrec.federated.client import draw_batch, item_examples
from llmrec.finetune import sample_users
from llmrec.model.quantized import use_quantized_weights
from llmrec.plots import plot_metric_bars
from llmrec.quality import Task, per_user, summarize, target_ranks
from llmrec.recommend.item_scorer import left_pad
from llmrec.stats import paired_comparison

QUALITY_REPORT = Path("bench/reports/quality.json")


def matmul_rate(dtype: torch.dtype, size: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a ``size``-square matmul in ``dtype`` on this machine (median of ``reps``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def step_flops(model: torch.nn.Module, dual: F.DualLora, tokens: int, width: int) -> float:
    """Matmul FLOPs of one forward + backward over ``tokens`` tokens in sequences of about
    ``width``: the frozen base's Linear layers 2 + 2 per weight and token (forward, and the
    backward's input gradient: a frozen weight has no weight gradient), each LoRA factor 2 + 4
    (it has one), attention's two products 2 * width * hidden per layer and token (forward,
    causal half) times 3, and the item head 2 + 4 per row element."""
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in n and not n.endswith("lm_head")
    )
    lora = sum(p[0].numel() for p in dual.shared.values() if p.dim() == 2)
    lora += sum(p.numel() for k, p in dual.personal.items())
    cfg = model.config
    attention = 3 * 2 * width * cfg.hidden_size * cfg.num_hidden_layers
    rows = dual.items.item_rows.numel() if dual.items is not None else 0
    return tokens * (4 * linear + 6 * lora + attention + 6 * rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="batched clients against the one-client loop")
    p.add_argument("--config", type=Path, default=Path("training/configs/ml100k.yaml"))
    p.add_argument("--clients", type=int, default=64, help="seeded sample of the users")
    p.add_argument("--group", type=int, default=16, help="clients per batched forward")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--report", type=Path, default=Path("bench/reports/federated-speed.json"))
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    p = sub.add_parser("report", help="shared-only against ours on every user")
    p.add_argument("--run", type=Path, default=Path("outputs/federated"))
    p.add_argument("--quality", type=Path, default=QUALITY_REPORT)
    p.add_argument(
        "--report",
        type=Path,
        help="default bench/reports/federated.json (FedSA-LoRA: federated-fedsa.json, "
        "personal-only: federated-personal.json, DP: federated-dp.json)",
    )
    p.add_argument(
        "--seeds",
        type=Path,
        help="every seed's per-user ranks, this run's added (runs of one config only); "
        "default: the report's name + -seeds.json",
    )
    p.add_argument(
        "--ablation",
        type=_named_path,
        action="append",
        default=[],
        metavar="NAME=SEEDS",
        help="a row from another configuration's --seeds file (its 'ours'), paired with ours",
    )
    p.add_argument(
        "--quantized",
        action="store_true",
        help="the base's linear weights as its 4-bit served version (serve.quantization=w4a16) "
        "has them; default report federated-w4a16.json",
    )
    p = sub.add_parser("personal", help="the personal fit's settings, chosen on validation")
    p.add_argument("--run", type=Path, default=Path("outputs/federated"))
    p.add_argument("--steps", type=int, nargs="+", default=[4, 16])
    p.add_argument("--lr", type=float, nargs="+", help="personal rates (default: the run's)")
    p.add_argument("--decay", type=float, nargs="+", default=[0.0])
    p.add_argument("--out", type=Path, default=Path("outputs/personal-screen"))
    p.add_argument("--report", type=Path, default=Path("bench/reports/personal-fit.json"))
    p = sub.add_parser("vector", help="a personal user vector in item space, chosen on validation")
    p.add_argument("--run", type=Path, default=Path("outputs/federated"))
    p.add_argument("--decay", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--scale", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--steps", type=int, default=150, help="Adam steps of the (convex) fit")
    p.add_argument("--report", type=Path, default=Path("bench/reports/personal-vector.json"))
    args = parser.parse_args()
    commands = {"speed": speed, "report": report, "personal": personal, "vector": vector}
    commands[args.command](args)


def speed(args: argparse.Namespace) -> None:
    """Client-steps/s, tokens/s and FLOP fraction of the loop and of batched clients."""
    cfg = load_config(args.config, ["fed.n_users=0", *args.overrides])
    fed = cfg.fed
    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    loaded = F.load_federated_model(cfg, dataset.catalog)
    dual = loaded.dual
    users = sample_users(F.federated_cohort(split, fed), args.clients, fed.seed)
    jobs = [
        F.ClientJob(
            u,
            F.client_examples(split, dataset.catalog, loaded.prompts, fed, u, dual.vocab),
            F.init_personal_state(dual, fed.seed, u),
        )
        for u in users
    ]
    jobs.sort(key=lambda j: max(len(e.input_ids) for e in j.examples))  # as the runner groups
    shared = F.init_shared_state(dual, fed.seed)
    # A round's phases: the shared part, then (sequential) the personal part on top.
    both = fed.shared_rank and fed.personal_rank and fed.decoupling.schedule == "sequential"
    phases = 2 if both else 1
    tokens = sum(_drawn_tokens(fed, j, phases) for j in jobs)
    widths = [len(e.input_ids) for j in jobs for e in j.examples if not e.holdout]
    flops = step_flops(dual.model, dual, tokens, statistics.mean(widths))
    client_steps = phases * fed.local_steps * len(jobs)

    def loop() -> None:
        for j in jobs:
            F.client_update(dual, j.user_id, j.examples, shared, j.personal_state, 1)

    def batched() -> None:
        for i in range(0, len(jobs), args.group):
            F.batched_client_updates(dual, jobs[i : i + args.group], shared, 1)

    F.client_update(dual, jobs[0].user_id, jobs[0].examples, shared, jobs[0].personal_state, 1)
    F.batched_client_updates(dual, jobs[: args.group], shared, 1)  # warm-up, both paths
    seconds: dict[str, list[float]] = {"loop": [], "batched": []}
    for rep in range(args.reps):
        for name, fn in (("loop", loop), ("batched", batched)):
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
            print(f"rep {rep} {name}: {seconds[name][-1]:.1f} s", flush=True)
    dtype = next(dual.model.parameters()).dtype
    peak = matmul_rate(dtype)
    paths = {}
    for name, times in seconds.items():
        s = statistics.median(times)
        paths[name] = {
            "seconds": round(s, 2),
            "client_steps_s": round(client_steps / s, 3),
            "tokens_s": round(tokens / s, 1),
            "flop_fraction": round(flops / s / peak, 4),
        }
    report = {
        "command": "bench/federated.py "
        + " ".join(
            [f"--clients {args.clients}", f"--group {args.group}", f"--reps {args.reps}"]
            + args.overrides
        ),
        "model": cfg.model.name_or_path,
        "dtype": str(dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "clients": len(jobs),
        "group": args.group,
        "local_steps": fed.local_steps,
        "phases": phases,
        "client_steps": client_steps,
        "tokens": tokens,
        "train_gflop": round(flops / 1e9, 1),
        "matmul_gflop_s": round(peak / 1e9, 1),
        "loop": paths["loop"],
        "batched": paths["batched"],
        "speedup": round(paths["loop"]["seconds"] / paths["batched"]["seconds"], 2),
        "seconds_per_rep": seconds,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, report)
    plot_metric_bars(
        {n: {"client-steps/s": p["client_steps_s"]} for n, p in paths.items()},
        ["client-steps/s"],
        args.report.with_suffix(".png"),
        f"Federated local steps, {len(jobs)} clients (batched: {args.group} per forward)",
    )
    for name, p in paths.items():
        print(
            f"{name}: {p['client_steps_s']} client-steps/s, {p['tokens_s']} tokens/s, "
            f"{p['flop_fraction']:.1%} of {peak / 1e9:.0f} GFLOP/s"
        )
    print(f"speedup {report['speedup']}x -> {args.report}")


def _drawn_tokens(fed, job: F.ClientJob, phases: int) -> int:
    """Tokens ``job``'s local steps train on in round 1 (its draws, replayed)."""
    trained = [e for e in job.examples if not e.holdout]
    gen = torch.Generator().manual_seed(F.derive_seed(fed.seed, "client", 1, job.user_id))
    total = 0
    for _ in range(phases):
        order: list[int] = []
        for _ in range(fed.local_steps):
            ids, order = draw_batch(order, len(trained), fed.local_batch_size, gen)
            total += sum(len(trained[i].input_ids) for i in ids)
    return total


# A run's own settings, which differ between seeds of one configuration.
_PER_RUN = ("seed", "output_dir", "store_dir")


def _run_config(config: dict) -> dict:
    """What makes runs seeds of one configuration: the sections training reads, through
    today's schema (a field added since a run was recorded takes its default), less the
    run's own settings."""
    cfg = AppConfig.model_validate(config)
    out = {s: getattr(cfg, s).model_dump(mode="json") for s in ("data", "model", "prompts")}
    fed = cfg.fed.model_dump(mode="json")
    out["fed"] = {k: v for k, v in fed.items() if k not in _PER_RUN}
    return out


def _read_seeds(path: Path, users: list) -> dict:
    """A seeds file (see :func:`_record_seed`), refused unless it was recorded for ``users``."""
    doc = json.loads(path.read_text())
    if doc["users"] != users:
        raise SystemExit(f"{path}: recorded for other users; pass another --seeds file")
    return doc


def _record_seed(
    path: Path, config: dict, users: list, seed: int, ranks: dict, run: Path
) -> dict[int, dict]:
    """Add this run's per-user 0-based target ranks (per method and split) to ``path`` and
    return every recorded seed's, as arrays. The run directories do not outlive a session;
    the ranks do, so seeds run in different sessions are still paired user by user."""
    config = _run_config(config)
    doc = {"users": users, "config": config, "runs": {}}
    if path.is_file():
        doc = _read_seeds(path, users)
        recorded = _run_config(doc["config"])
        for section in sorted(set(recorded) | set(config)):
            if recorded.get(section) != config.get(section):
                raise SystemExit(
                    f"{path}: recorded for another config (section {section!r} differs); "
                    "pass another --seeds file"
                )
    doc["runs"][str(seed)] = {
        "run": str(run),
        "ranks": {
            m: {s: [int(r) for r in v] for s, v in splits.items()} for m, splits in ranks.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc) + "\n")  # compact: 943 ranks per array
    return {
        int(s): {
            m: {sp: np.asarray(v) for sp, v in splits.items()} for m, splits in r["ranks"].items()
        }
        for s, r in doc["runs"].items()
    }


def _over_seeds(seeds: dict[int, dict], k: int, path: Path) -> dict[str, object]:
    """Each arm's test figures per seed (mean and sd over seeds), the A/A check (shared-only
    of the first two seeds against each other: the noise floor between runs), and ours
    against shared-only on each user's mean over seeds."""
    order = sorted(seeds)
    test = {s: {m: per_user(seeds[s][m]["test"], k) for m in seeds[s]} for s in order}
    arms: dict[str, object] = {}
    for method in ("shared-only", "ours"):
        arms[method] = {}
        for name in (f"HR@{k}", f"NDCG@{k}"):
            values = [round(float(test[s][method][name].mean()), 4) for s in order]
            arms[method][name] = {
                "per_seed": values,
                "mean": round(statistics.fmean(values), 4),
                "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            }
    summary = {"file": str(path), "runs": order, **arms}
    if len(order) < 2:
        return {"seeds": summary, "aa": None}
    mean = {
        m: {name: np.mean([test[s][m][name] for s in order], axis=0) for name in test[order[0]][m]}
        for m in ("shared-only", "ours")
    }
    return {
        "seeds": summary,
        "aa": {
            "arm": "shared-only",
            "seeds": order[:2],
            **paired_comparison(test[order[1]]["shared-only"], test[order[0]]["shared-only"], k),
        },
        "paired_over_seeds": paired_comparison(mean["ours"], mean["shared-only"], k),
    }


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, Path(path)


def _ablation(path: Path, users: list, seed: int, k: int) -> tuple[int, dict[str, dict]]:
    """Another configuration's per-user metrics by split (the "ours" arm of its seeds file,
    see :func:`_record_seed`): of ``seed`` if it was run, else of its lowest seed."""
    runs = _read_seeds(path, users)["runs"]
    chosen = str(seed) if str(seed) in runs else min(runs, key=int)
    ranks = runs[chosen]["ranks"]["ours"]
    return int(chosen), {s: per_user(np.asarray(ranks[s]), k) for s in ("valid", "test")}


def shared_only_ranks(dual, shared, scorer, tasks: dict[str, Task], catalog) -> dict:
    """Every user's target rank per task with the shared part alone: one batched pass."""
    dual.load(shared, F.scale_personal(F.init_personal_state(dual, 0, "0"), 0.0))
    return {
        name: target_ranks(scorer.log_probs(task.histories).numpy(), task, catalog)
        for name, task in tasks.items()
    }


def personal_ranks(
    dual, shared, scorer, tasks: dict[str, Task], catalog, base: dict, personal_of, desc: str
) -> dict:
    """Each user's target rank per task with ``personal_of(row)`` loaded (the personal state
    at its picked scale), every task of a user in one forward. A row whose state is None is
    served exactly the shared adapter (scale 0, or never trained: ``scale_personal``), so it
    keeps its rank in ``base`` (:func:`shared_only_ranks`) and is not scored again."""
    ranks = {name: r.copy() for name, r in base.items()}
    n = len(next(iter(tasks.values())).histories)
    for row in tqdm(range(n), desc=desc, leave=False):
        state = personal_of(row)
        if state is None:
            continue
        dual.load(shared, state)
        scores = scorer.log_probs([task.histories[row] for task in tasks.values()]).numpy()
        for (name, task), row_scores in zip(tasks.items(), scores, strict=True):
            one = Task([task.histories[row]], [task.targets[row]])
            ranks[name][row] = target_ranks(row_scores[None], one, catalog)[0]
    return ranks


@dataclass(frozen=True)
class FinishedRun:
    """A finished federated run, loaded for scoring."""

    config: dict
    """The config as ``run.json`` records it (what the seeds file compares)."""
    cfg: AppConfig
    dataset: Dataset
    split: Split
    loaded: F.FederatedModel
    shared: dict[str, torch.Tensor]
    """The final round's shared state."""
    users: list[str]
    """Every user with a test item, in user order."""
    tasks: dict[str, Task]
    """Their ``valid`` and ``test`` tasks."""


def open_run(run: Path) -> FinishedRun:
    """``run``'s config, data, split, model and final shared state."""
    config = json.loads((run / F.RUN_JSON).read_text())["config"]
    cfg = AppConfig.model_validate(config)
    dataset = dataset_from_config(cfg)
    split = leave_last_out(dataset.histories)
    loaded = F.load_federated_model(cfg, dataset.catalog)
    shared = F.read_round_state(run, cfg.fed.rounds, loaded.dual.shared)
    users = sorted(split.test, key=user_sort_key)
    tasks = {"valid": Task.valid(split, users), "test": Task.test(split, users)}
    return FinishedRun(config, cfg, dataset, split, loaded, shared, users, tasks)


def report(args: argparse.Namespace) -> None:
    """bench/reports/federated.json: every user, shared-only against ours, paired."""
    run = args.run
    finished = open_run(run)
    cfg, dataset, loaded, shared = finished.cfg, finished.dataset, finished.loaded, finished.shared
    users, tasks = finished.users, finished.tasks
    fed, k = cfg.fed, VAL_K
    exported = json.loads((run / F.EXPORT_JSON).read_text())
    # the command as given, before defaults are filled in
    command = f"bench/federated.py report --run {run}" + "".join(
        f" --{flag} {value}"
        for flag, value in (("report", args.report), ("seeds", args.seeds))
        if value is not None
    )
    if args.quality != QUALITY_REPORT:
        command += f" --quality {args.quality}"
    command += "".join(f" --ablation {n}={path}" for n, path in args.ablation)
    if args.quantized:
        command += " --quantized"
    if args.report is None:
        name = "federated"
        if fed.share == "lora_a":
            name = "federated-fedsa"
        elif not fed.shared_rank:
            name = "federated-personal"
        elif fed.dp.enabled:
            name = "federated-dp"
        name += "-w4a16" * args.quantized
        args.report = Path("bench/reports") / f"{name}.json"
    if args.seeds is None:
        args.seeds = args.report.with_name(f"{args.report.stem}-seeds.json")
    dual, scorer = loaded.dual, loaded.ranker
    if args.quantized:  # the base's linear weights as its 4-bit served version has them
        print(f"4-bit base weights: {use_quantized_weights(dual.model)} linear layers")
    scales = exported.get("personal_scale", {})
    start = time.perf_counter()

    def personal_of(row: int) -> dict | None:
        scale = scales.get(users[row], 1.0)
        personal = F.load_personal(run, users[row], before=fed.rounds + 1) if scale else None
        return None if personal is None else F.scale_personal(personal, scale)

    shared_only = shared_only_ranks(dual, shared, scorer, tasks, dataset.catalog)
    ours = personal_ranks(
        dual, shared, scorer, tasks, dataset.catalog, shared_only, personal_of, "ours"
    )
    ranks = {"shared-only": shared_only, "ours": ours}
    seconds = time.perf_counter() - start
    seeds = _record_seed(args.seeds, finished.config, users, fed.seed, ranks, run)
    metrics = {
        method: {name: per_user(r, k) for name, r in splits.items()}
        for method, splits in ranks.items()
    }
    shared_only, ours = metrics["shared-only"], metrics["ours"]
    quality = json.loads(args.quality.read_text()) if args.quality.is_file() else {}
    methods = {
        name: {"valid": summarize(r["valid"], fed.seed), "test": summarize(r["test"], fed.seed)}
        for name, r in metrics.items()
    }
    baselines = ("popularity", "itemknn", "sasrec")
    for name, ref in (*((b, b) for b in baselines), ("centralized", "llm")):
        if ref in quality.get("methods", {}):
            methods[name] = {"test": quality["methods"][ref]["test"], "from": str(args.quality)}
    paired = {
        "ours_vs_shared-only": paired_comparison(
            ours["test"], shared_only["test"], k, seed=fed.seed
        )
    }
    for name, path in args.ablation:
        seed, theirs = _ablation(path, users, fed.seed, k)
        methods[name] = {
            "valid": summarize(theirs["valid"], fed.seed),
            "test": summarize(theirs["test"], fed.seed),
            "from": str(path),
            "seed": seed,
        }
        if seed in seeds:  # the same seed's ours, user by user
            mine = {s: per_user(seeds[seed]["ours"][s], k) for s in ("valid", "test")}
            paired[f"ours_vs_{name}"] = {
                "seed": seed,
                **paired_comparison(mine["test"], theirs["test"], k, seed=fed.seed),
                "valid": paired_comparison(mine["valid"], theirs["valid"], k, seed=fed.seed),
            }
    ndcg = f"NDCG@{k}"
    records = json.loads((run / F.METRICS_JSON).read_text())["rounds"]
    # personal-only (schedule "after") has no rounds: nothing crosses the network
    last = records[-1] if records else {"comm_ratio": 0.0, "bytes_up_per_client": 0}
    picked = list(scales.values())
    out = {
        "command": command,
        "users": len(users),
        "rounds": fed.rounds,
        "clients_per_round": fed.clients_per_round,
        "client_batch": fed.client_batch,
        "schedule": fed.decoupling.schedule,
        "wall_s": round((run / F.EXPORT_JSON).stat().st_mtime - (run / F.RUN_JSON).stat().st_mtime),
        "rounds_s": round(sum(r["seconds"] for r in records)),
        "comm_ratio": last["comm_ratio"],
        "bytes_up_per_client": last["bytes_up_per_client"],
        "full_model_bytes": loaded.base_bytes,
        "epsilon": last.get("epsilon"),
        "personal_scale_counts": {str(s): picked.count(s) for s in sorted(set(picked))},
        "methods": methods,
        "seed": fed.seed,
        "paired": paired,
        **_over_seeds(seeds, k, args.seeds),
        "eval_seconds": round(seconds, 1),
    }
    if "centralized" in methods:
        out["ours_vs_centralized_ratio"] = round(
            methods["ours"]["test"][ndcg] / methods["centralized"]["test"][ndcg], 3
        )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, out)
    plot_metric_bars(
        {n: {f"HR@{k}": m["test"][f"HR@{k}"], ndcg: m["test"][ndcg]} for n, m in methods.items()},
        [f"HR@{k}", ndcg],
        args.report.with_suffix(".png"),
        f"Federated, all {len(users)} users (test)",
        intervals={
            n: {f"HR@{k}": m["test"][f"HR@{k}_ci95"], ndcg: m["test"][f"{ndcg}_ci95"]}
            for n, m in methods.items()
        },
    )
    print(json.dumps({n: m["test"] for n, m in methods.items()}, indent=1))
    print(json.dumps(out["paired"], indent=1), f"-> {args.report}")


def _write_grid(path: Path, out: dict, title: str) -> None:
    """A validation screen's report (``out`` with its ``grid``) and the PNG of its grid."""
    ndcg = f"NDCG@{VAL_K}"
    write_json_atomic(path, out)
    table = {name: {ndcg: g["valid"][ndcg]} for name, g in out["grid"].items()}
    table["shared-only"] = {ndcg: out["shared-only"]["valid"][ndcg]}
    plot_metric_bars(table, [ndcg], path.with_suffix(".png"), title)
    print(json.dumps(out["paired"], indent=1), f"chosen {out['chosen']} -> {path}")


def personal(args: argparse.Namespace) -> None:
    """bench/reports/personal-fit.json: the personal fit's grid on validation, the best tested."""
    run = args.run
    finished = open_run(run)
    cfg, dataset, split, loaded = finished.cfg, finished.dataset, finished.split, finished.loaded
    shared, users, tasks = finished.shared, finished.users, finished.tasks
    fed, k, ndcg = cfg.fed, VAL_K, f"NDCG@{VAL_K}"
    dual, scorer = loaded.dual, loaded.ranker
    for param in dual.shared.values():  # the fit trains the personal part alone
        param.requires_grad_(False)
    examples = {
        u: F.client_examples(split, dataset.catalog, loaded.prompts, fed, u, dual.vocab)
        for u in users
    }
    order = sorted(users, key=lambda u: max(len(e.input_ids) for e in examples[u]))
    size = max(fed.client_batch, 1)

    base = shared_only_ranks(dual, shared, scorer, tasks, dataset.catalog)
    valid_task = {"valid": tasks["valid"]}
    grid, picked_states = {}, {}
    rates = args.lr or [fed.personal_learning_rate]
    own_dec = fed.decoupling
    run_setting = (own_dec.personal_steps, fed.personal_learning_rate, own_dec.personal_decay)
    exported = json.loads((run / F.EXPORT_JSON).read_text()).get("personal_scale") or {}
    for steps, lr, decay in product(args.steps, rates, args.decay):
        name = f"steps {steps}, lr {lr:g}, decay {decay:g}"
        dec = fed.decoupling.model_copy(
            update={"personal_steps": steps, "personal_learning_rate": lr, "personal_decay": decay}
        )
        dual.cfg = fed.model_copy(update={"decoupling": dec})
        # The run's own setting is the run's fit and its export's picks, not redone.
        own = (steps, lr, decay) == run_setting and bool(exported)
        folder = run if own else args.out / f"steps{steps}-lr{lr:g}-decay{decay:g}"
        start = time.perf_counter()
        todo = [u for u in order if F.load_personal(folder, u, before=fed.rounds + 1) is None]
        for i in tqdm(range(0, len(todo), size), desc=f"fit {name}"):
            jobs = [(u, examples[u]) for u in todo[i : i + size]]
            F.run_clients(dual, folder, jobs, shared, fed.rounds)
        fit_s = time.perf_counter() - start
        states, scales = [], []
        for i in tqdm(range(0, len(users), size), desc=f"pick {name}", leave=False):
            group = users[i : i + size]
            if own:  # a user outside the run's cohort is served the shared part
                picks = {u: exported.get(u, 0.0) for u in group}
                group = [u for u in group if picks[u]]  # scale 0 never reads its state
            fitted = {u: F.load_personal(folder, u, before=fed.rounds + 1) for u in group}
            if not own:
                picked = F.pick_personal_scales(dual, scorer, split, shared, fitted)
                picks = {u: scale for u, (scale, _) in picked.items()}
            for user, scale in picks.items():  # scale 0 is exactly the shared adapter
                states.append(F.scale_personal(fitted[user], scale) if scale else None)
                scales.append(scale)
        ranks = personal_ranks(
            dual, shared, scorer, valid_task, dataset.catalog, base, states.__getitem__, name
        )
        valid = per_user(ranks["valid"], k)
        picked_states[name] = states
        grid[name] = {
            "personal_steps": steps,
            "personal_learning_rate": lr,
            "personal_decay": decay,
            "from_run": own,
            "valid": summarize(valid, fed.seed),
            "personal_scale_counts": {str(v): scales.count(v) for v in sorted(set(scales))},
            "fit_s": round(fit_s, 1),
        }
        print(name, grid[name]["valid"], grid[name]["personal_scale_counts"], flush=True)
    dual.cfg = fed
    best = max(grid, key=lambda n: grid[n]["valid"][ndcg])
    shared_valid, shared_test = (per_user(base[task], k) for task in ("valid", "test"))
    best_ranks = personal_ranks(
        dual, shared, scorer, {"test": tasks["test"]}, dataset.catalog, base,
        picked_states[best].__getitem__, f"test {best}",
    )  # fmt: skip
    best_test = per_user(best_ranks["test"], k)
    out = {
        "command": "bench/federated.py personal --run {} --steps {} --lr {} --decay {}".format(
            run, *(" ".join(f"{v:g}" for v in vs) for vs in (args.steps, rates, args.decay))
        ),
        "users": len(users),
        "selected_on": "validation (the scale pick reads each user's validation item too)",
        "grid": grid,
        "chosen": best,
        "shared-only": {
            "valid": summarize(shared_valid, fed.seed),
            "test": summarize(shared_test, fed.seed),
        },
        "ours_test": summarize(best_test, fed.seed),
        "paired": {
            "ours_vs_shared-only": paired_comparison(best_test, shared_test, k, seed=fed.seed)
        },
    }
    _write_grid(args.report, out, "Personal fit, validation, every user")


@dataclass
class TrainLogits:
    """The shared model's item logits at every training position of every user."""

    logits: torch.Tensor
    """(positions, n_items) float16."""
    targets: torch.Tensor
    """(positions,) catalog index of each position's next item."""
    rows: torch.Tensor
    """(positions,) the user's row in ``users``."""
    seen: list[list[int]]
    """Each position's items seen before its target (masked, as the evaluation masks them)."""


def train_logits(dual, split, catalog, prompts, fed, users: list[str]) -> TrainLogits:
    """Every training position's item logits under the loaded (shared) state: one batched
    forward per user over all windows of its training history."""
    first, n = dual.vocab.first_token_id, len(dual.vocab)
    logits, targets, rows, seen = [], [], [], []
    for row, user in enumerate(tqdm(users, desc="shared logits")):
        items = [i for i in split.train[user] if i in catalog]
        examples = item_examples(items, catalog, prompts, fed, dual.vocab)
        if not examples:
            continue
        ids, mask, positions = left_pad([e.input_ids for e in examples], dual.pad_id)
        with torch.no_grad():
            out = dual.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        order = {catalog.index(i): j for j, i in enumerate(items)}
        for b, example in enumerate(examples):
            offset = ids.shape[1] - len(example.input_ids)
            for p, label in enumerate(example.labels):
                if label >= 0:
                    logits.append(out[b, offset + p, first : first + n].half())
                    targets.append(label)
                    rows.append(row)
                    seen.append([catalog.index(i) for i in items[: order[label]]])
    return TrainLogits(torch.stack(logits), torch.tensor(targets), torch.tensor(rows), seen)


def fit_user_vectors(
    data: TrainLogits, rows: torch.Tensor, n_users: int, decay: float, steps: int
) -> tuple[torch.Tensor, float]:
    """Each user's vector ``u`` minimising the mean cross-entropy of its own positions under
    logits + rows @ u, plus ``decay * |u|^2``; all users at once (the problems are separate
    and convex). Returns (users x width, final mean loss)."""
    z = data.logits.float()
    flat = [(i, c) for i, cols in enumerate(data.seen) for c in cols]
    if flat:
        at = torch.tensor(flat, dtype=torch.long)
        z[at[:, 0], at[:, 1]] = -1e4
    u = torch.zeros(n_users, rows.shape[1], requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.05)
    counts = torch.bincount(data.rows, minlength=n_users).clamp(min=1).float()
    for _ in tqdm(range(steps), desc=f"fit decay {decay:g}", leave=False):
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(
            z + (u @ rows.T)[data.rows], data.targets, reduction="none"
        )
        per_user_loss = torch.zeros(n_users).index_add_(0, data.rows, ce) / counts
        (per_user_loss.sum() + decay * (u * u).sum()).backward()
        opt.step()
    return u.detach(), float(per_user_loss.mean())


def vector(args: argparse.Namespace) -> None:
    """bench/reports/personal-vector.json: a user vector as the personal part, on validation.

    The smallest personal parameterisation the item head allows: one vector ``u`` per user
    (the model's width) added to the last hidden state, so every item's logit moves by its
    row . u. It is fit to the user's whole training history over the run's final shared
    part, which stays frozen; (decay, scale) are chosen on every user's validation item, and
    the test item is scored once."""
    run = args.run
    finished = open_run(run)
    cfg, dataset, split, loaded = finished.cfg, finished.dataset, finished.split, finished.loaded
    shared, users, tasks = finished.shared, finished.users, finished.tasks
    fed, k, ndcg = cfg.fed, VAL_K, f"NDCG@{VAL_K}"
    dual, scorer = loaded.dual, loaded.ranker
    dual.load(shared, F.scale_personal(F.init_personal_state(dual, 0, "0"), 0.0))
    first, n = dual.vocab.first_token_id, len(dual.vocab)
    rows = dual.model.get_input_embeddings().weight[first : first + n].detach().float()
    scores = {name: scorer.log_probs(task.histories) for name, task in tasks.items()}
    base = {name: per_user(target_ranks(s.numpy(), tasks[name], dataset.catalog), k)
            for name, s in scores.items()}  # fmt: skip
    data = train_logits(dual, split, dataset.catalog, loaded.prompts, fed, users)

    def scored(u: torch.Tensor, scale: float, task: str) -> dict[str, np.ndarray]:
        moved = scores[task] + scale * (u @ rows.T)
        return per_user(target_ranks(moved.numpy(), tasks[task], dataset.catalog), k)

    grid, vectors = {}, {}
    for decay in args.decay:
        start = time.perf_counter()
        u, loss = fit_user_vectors(data, rows, len(users), decay, args.steps)
        vectors[decay] = u
        for scale in args.scale:
            name = f"decay {decay:g}, scale {scale:g}"
            valid = scored(u, scale, "valid")
            grid[name] = {
                "decay": decay,
                "scale": scale,
                "train_loss": round(loss, 4),
                "mean_norm": round(float(u.norm(dim=1).mean()), 3),
                "valid": summarize(valid, fed.seed),
                "valid_vs_shared-only": paired_comparison(valid, base["valid"], k, seed=fed.seed),
                "fit_s": round(time.perf_counter() - start, 1),
            }
            print(name, grid[name]["valid"][ndcg], grid[name]["valid_vs_shared-only"], flush=True)
    best = max(grid, key=lambda g: grid[g]["valid"][ndcg])
    test = scored(vectors[grid[best]["decay"]], grid[best]["scale"], "test")
    out = {
        "command": "bench/federated.py vector --run {} --decay {} --scale {} --steps {}".format(
            run, *(" ".join(f"{v:g}" for v in vs) for vs in (args.decay, args.scale)), args.steps
        ),
        "users": len(users),
        "train_positions": len(data.targets),
        "selected_on": "validation",
        "grid": grid,
        "chosen": best,
        "shared-only": {name: summarize(m, fed.seed) for name, m in base.items()},
        "ours_test": summarize(test, fed.seed),
        "paired": {
            "vector_vs_shared-only": paired_comparison(test, base["test"], k, seed=fed.seed)
        },
    }
    _write_grid(args.report, out, "Personal user vector, validation, every user")


if __name__ == "__main__":
    main()
