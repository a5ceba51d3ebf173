"""The gateway fuzzed against its own OpenAPI schema at scale: Schemathesis, all checks.

The same run as ``tests/test_openapi_fuzz.py`` (``llmrec_serving.testing.fuzz_gateway``:
every operation, schema-valid and schema-violating requests, every built-in check, once
with a user's key and once with the admin key) at ``--examples`` per operation and mode,
on the in-process backend over the tiny item-token model and the fixture data set.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fuzz.py --examples 1000

Writes ``bench/reports/fuzz.json`` (``examples``, ``operations``, ``failures``, and the
answers by operation and status) and a PNG of the answers beside it. Goal (issue 17): no
failure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmrec.atomic import write_json_atomic  # noqa: E402
from llmrec.data import load_generic  # noqa: E402
from llmrec.model import build_tiny_model  # noqa: E402
from llmrec.model.item_vocab import prepare_item_base  # noqa: E402
from llmrec_serving.app import create_app  # noqa: E402
from llmrec_serving.config import load_serving_config  # noqa: E402
from llmrec_serving.services import build_services  # noqa: E402
from llmrec_serving.testing import fuzz_gateway, make_serving_world  # noqa: E402

DATA = Path("tests/fixtures/tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=Path("bench/reports/fuzz.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalog = load_generic(DATA / "interactions.csv", DATA / "catalog.csv").catalog
        base = prepare_item_base(build_tiny_model(root / "tiny", seed=0), catalog)
        world = make_serving_world(root / "world", base, DATA)
        overrides = [*world.overrides, "serve.backend=inprocess", "serve.store_poll_s=0.1"]
        app = create_app(build_services(load_serving_config(None, overrides)))
        keys = {"user 1": world.keys["1"], "admin": world.keys["admin"]}
        began = time.perf_counter()
        report = fuzz_gateway(app, keys, args.examples, args.seed)
        seconds = time.perf_counter() - began
    out = {
        "command": f"bench/fuzz.py --examples {args.examples} --seed {args.seed}",
        "examples": args.examples,
        "operations": len(report.operations),
        "keys": list(keys),
        "cases": report.cases,
        "failures": sum(len(found) for found in report.failures.values()),
        "failed": {where: found[:3] for where, found in report.failures.items()},
        "statuses": {
            op: {str(code): n for code, n in sorted(counts.items())}
            for op, counts in report.statuses.items()
        },
        "seconds": round(seconds, 1),
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.report, out)
    _plot(out, args.report.with_suffix(".png"))
    print(json.dumps({k: out[k] for k in ("examples", "operations", "cases", "failures")}))
    print(f"-> {args.report}")


def _plot(out: dict, path: Path) -> None:
    """Answers per operation, stacked by status class."""
    ops = list(out["statuses"])
    classes = ("2xx", "4xx", "5xx")
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(ops) + 1.5))
    left = [0] * len(ops)
    for cls in classes:
        widths = [
            sum(n for code, n in out["statuses"][op].items() if code[0] == cls[0]) for op in ops
        ]
        ax.barh(ops, widths, left=left, label=cls)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set(
        xlabel="answers",
        title=f"Schemathesis, {out['examples']} examples per operation and mode: "
        f"{out['failures']} failures",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
