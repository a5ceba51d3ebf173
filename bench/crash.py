"""Crash consistency: kill -9 at random points of adapter publishes, profile writes and
federated rounds, then check what survived.

Three writers, each a child process killed with SIGKILL after a random delay (``--seed``):

- ``publish``: publishes versions of one user's adapter in a loop (``AdapterStore.publish``)
  and prints each version once publish returned (acknowledged), while this process reads the
  user's current adapter in a loop (``current`` + ``load``, which validates the files).
  After the kill every version on disk must load, the current one must be the last
  acknowledged one or a later one, and no read may have failed (a torn version).
- ``profile``: adds items to one user's history (``ProfileStore.add_history``, SQLite) one
  transaction at a time, printing each once committed. After the kill the database must
  pass ``PRAGMA integrity_check`` and hold every acknowledged item.
- ``federated``: ``training/federated.py`` on the tiny model and data set; after the kill,
  ``--resume`` finishes the run, whose every saved tensor (each round's shared state and
  server moments, the clients' personal states, the exported adapters) must equal an
  uninterrupted run's bit for bit.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/crash.py --kills 25 25 10 --seed 0

Writes ``bench/reports/crash.json`` (``kill_points``, ``torn``, ``lost_acked``,
``resume_identical``) and a PNG beside it. Goals (issue 17): 0 torn, 0 lost, identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for
from llmrec.atomic import write_json_atomic
from llmrec.data import load_generic
from llmrec.model import build_tiny_model, fingerprint_model_dir
from llmrec.plots import plot_metric_bars

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "fixtures" / "tiny"
TINY_YAML = ROOT / "training" / "configs" / "tiny.yaml"
SCRIPT = ROOT / "training" / "federated.py"
USER = "7"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="a writer to kill (run by the bench itself)")
    worker.add_argument("kind", choices=["publish", "profile"])
    worker.add_argument("--dir", type=Path, required=True)
    worker.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--kills", type=int, nargs=3, default=[25, 25, 10], help="publish, profile, federated"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=Path("bench/reports/crash.json"))
    args = parser.parse_args()
    if args.command == "worker":
        {"publish": publish_worker, "profile": profile_worker}[args.kind](args.dir, args.model)
        return
    rng = random.Random(args.seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "tiny", seed=0)
        results = {
            "publish": [publish_trial(root / f"p{i}", model, rng) for i in _bar(args.kills[0])],
            "profile": [profile_trial(root / f"d{i}", model, rng) for i in _bar(args.kills[1])],
        }
        reference, span = federated_reference(root / "ref", model)
        results["federated"] = [
            federated_trial(root / f"f{i}", model, reference, span, rng)
            for i in _bar(args.kills[2])
        ]
        synchronous = _synchronous(root / "probe")
    out = {
        "command": f"bench/crash.py --kills {' '.join(map(str, args.kills))} --seed {args.seed}",
        "kill_points": sum(len(r) for r in results.values()),
        "torn": sum(t["torn"] for t in results["publish"]),
        "lost_acked": sum(t["lost_acked"] for k in ("publish", "profile") for t in results[k]),
        "resume_identical": all(t["identical"] for t in results["federated"]),
        "sqlite_synchronous": synchronous,
        "by_writer": {
            kind: {
                "kills": len(trials),
                "acked": sum(t.get("acked", 0) for t in trials),
                "failed": sum(bool(t.get("problems")) for t in trials),
                "problems": [p for t in trials for p in t.get("problems", [])][:10],
            }
            for kind, trials in results.items()
        },
        "federated_killed_after": [t["killed_after"] for t in results["federated"]],
        "seconds": round(time.perf_counter() - began, 1),
    }
    write_json_atomic(args.report, out)
    plot_metric_bars(
        {k: {"kills": v["kills"], "failed": v["failed"]} for k, v in out["by_writer"].items()},
        ["kills", "failed"],
        args.report.with_suffix(".png"),
        f"kill -9 at {out['kill_points']} random points: torn {out['torn']}, "
        f"lost {out['lost_acked']}, resume identical {out['resume_identical']}",
    )
    print(
        json.dumps({k: out[k] for k in ("kill_points", "torn", "lost_acked", "resume_identical")})
    )
    print(f"-> {args.report}")


def _bar(n: int):
    return tqdm(range(n), leave=False)


def _store(folder: Path, model: Path) -> AdapterStore:
    return AdapterStore(
        folder, max_rank=16, module_shapes=module_shapes_for(model),
        base_fingerprint=fingerprint_model_dir(model),
    )  # fmt: skip


def _spawn(kind: str, folder: Path, model: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "worker", kind, "--dir", str(folder), "--model", str(model)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _kill_after_first_ack(proc: subprocess.Popen, rng: random.Random) -> list[str]:
    """Wait for the worker's first acknowledgement, kill it a random 0-1.5 s later, and
    return every acknowledgement it printed."""
    acks = [proc.stdout.readline().strip()]
    timer = threading.Timer(rng.uniform(0.0, 1.5), os.kill, (proc.pid, signal.SIGKILL))
    timer.start()
    acks += [line.strip() for line in proc.stdout]  # until the kill closes the pipe
    proc.wait()
    timer.cancel()
    return [a for a in acks if a]


# --------------------------------------------------------------------------- publish


def publish_worker(folder: Path, model: Path) -> None:
    store = _store(folder, model)
    shapes, fingerprint = module_shapes_for(model), fingerprint_model_dir(model)
    for i in range(10**6):
        weights = LoraWeights.random(shapes, ("q_proj", "v_proj"), 8, i, str(model))
        ref = store.publish(USER, weights, base_fingerprint=fingerprint)
        print(ref.version, flush=True)


def publish_trial(folder: Path, model: Path, rng: random.Random) -> dict:
    store = _store(folder, model)
    shapes, fingerprint = module_shapes_for(model), fingerprint_model_dir(model)
    store.publish(USER, LoraWeights.random(shapes, ("q_proj",), 8, -1, str(model)),
                  base_fingerprint=fingerprint)  # fmt: skip
    problems: list[str] = []
    stop = threading.Event()

    def read_loop() -> None:  # a server reading the current version all along
        while not stop.is_set():
            try:
                store.load(store.current(USER))
            except Exception as err:  # a torn or half-visible version
                problems.append(f"reader: {type(err).__name__}: {err}")

    reader = threading.Thread(target=read_loop)
    reader.start()
    proc = _spawn("publish", folder, model)
    acks = [int(a) for a in _kill_after_first_ack(proc, rng)]
    stop.set()
    reader.join()
    for version in store.versions(USER):
        try:
            store.load(store.get(USER, version))
        except Exception as err:
            problems.append(f"version {version}: {type(err).__name__}: {err}")
    current = store.current(USER)
    lost = int(current is None or current.version < max(acks))
    if lost:
        problems.append(f"acknowledged v{max(acks)}, current {current}")
    return {"acked": len(acks), "torn": len(problems) - lost, "lost_acked": lost,
            "problems": problems}  # fmt: skip


# --------------------------------------------------------------------------- profile


def _profiles(folder: Path):
    from llmrec.agent import ProfileStore

    catalog = load_generic(DATA / "interactions.csv", DATA / "catalog.csv").catalog
    return ProfileStore(f"sqlite:///{folder / 'profiles.db'}", catalog), catalog


def _synchronous(folder: Path) -> str:
    """The profile database's ``PRAGMA synchronous``, as its own connections set it."""
    folder.mkdir(parents=True)
    profiles, _ = _profiles(folder)
    with profiles.db.connect() as connection:
        level = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    profiles.close()
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[level]


def profile_worker(folder: Path, model: Path) -> None:
    """Per step: an item out of and back into the history, then one chat message, each its
    own transaction; the message's text is printed once it is committed."""
    profiles, catalog = _profiles(folder)
    (conversation,) = profiles.conversations(USER)
    for i in range(10**6):
        item = catalog.ids[i % len(catalog.ids)]
        profiles.remove_history(USER, [item])
        profiles.add_history(USER, [item])
        profiles.add_message(USER, conversation.id, "user", f"message {i}")
        print(f"message {i}", flush=True)


def profile_trial(folder: Path, model: Path, rng: random.Random) -> dict:
    folder.mkdir(parents=True)
    profiles, _ = _profiles(folder)
    profiles.new_conversation(USER)
    profiles.close()
    proc = _spawn("profile", folder, model)
    acks = _kill_after_first_ack(proc, rng)
    with sqlite3.connect(folder / "profiles.db") as db:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
    profiles, _ = _profiles(folder)
    (conversation,) = profiles.conversations(USER)
    stored = {m.content for m in profiles.messages(USER, conversation.id)}
    missing = [a for a in acks if a not in stored]
    problems = [f"integrity_check: {check}"] if check != "ok" else []
    problems += [f"acknowledged {m!r} missing" for m in missing[:3]]
    return {"acked": len(acks), "lost_acked": len(missing), "problems": problems}


# --------------------------------------------------------------------------- federated


def _train(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY_YAML),
           f"model.name_or_path={model}", f"fed.output_dir={out}",
           f"fed.store_dir={out / 'adapters'}", "fed.rounds=5", *extra]  # fmt: skip
    # One thread: a matmul's reduction order, hence its bits, depends on the thread count.
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=900)
    if proc.returncode:
        raise RuntimeError(f"federated run failed: {err.decode()[-2000:]}")


def _tensors(out: Path) -> dict[str, str]:
    """sha256 of every saved tensor file of a run, by relative path."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.safetensors"))
    }


def _started(proc: subprocess.Popen, out: Path) -> float:
    """Wait until the run is past its set-up (run.json written); returns that moment."""
    deadline = time.monotonic() + 600
    while not (out / "run.json").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the federated run ended before its rounds")
        time.sleep(0.01)
    return time.monotonic()


def federated_reference(out: Path, model: Path) -> tuple[dict[str, str], float]:
    """The uninterrupted run's tensors, and how long its rounds, fit and export took."""
    proc = _train(model, out)
    started = _started(proc, out)
    _finish(proc)
    return _tensors(out), time.monotonic() - started


def federated_trial(
    out: Path, model: Path, reference: dict, span: float, rng: random.Random
) -> dict:
    proc = _train(model, out)
    _started(proc, out)
    time.sleep(rng.uniform(0.0, 0.95 * span))  # anywhere in the rounds, the fit or the export
    if proc.poll() is not None:
        raise RuntimeError("the federated run finished before the kill: a kill point lost")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    rounds = sorted(p.name for p in out.glob("round-*"))
    _finish(_train(model, out, "--resume"))
    tensors = _tensors(out)
    differ = sorted(
        k for k in reference.keys() | tensors.keys() if reference.get(k) != tensors.get(k)
    )
    return {"killed_after": rounds[-1] if rounds else "set-up", "identical": not differ,
            "problems": [f"differs: {k}" for k in differ[:5]]}  # fmt: skip


if __name__ == "__main__":
    main()
