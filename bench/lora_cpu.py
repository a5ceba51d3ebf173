"""vLLM's CPU LoRA paths in one process: llmrec's plugins against vLLM's own code, side by side.

One vLLM engine in this process (``LLM``, no server: what the engine itself costs), over the
item-token SmolLM2-135M with ``--adapters`` random rank-``--rank`` LoRAs (as the serving
bench's own), served at ``--max-lora-rank`` with ``--max-loras`` slots:

- ``validate_ms``: the adapter store's check of one stored adapter (what the gateway runs
  before each cold load);
- ``vllm_load_ms``: vLLM reading the same adapter into its CPU cache (``_load_adapter``);
- ``activate_ms``: writing a cached adapter into a slot (``activate_adapter``), cycling
  through more adapters than slots, with vLLM's own slot writes and with
  :mod:`llmrec_serving.engines.cpu_lora_slots`, in alternating blocks;
- ``batch``: ``--batch`` prompts of ``--tokens`` random tokens, one token each: the base,
  then one adapter with vLLM's own CPU LoRA ops and with
  :mod:`llmrec_serving.engines.cpu_lora_ops`, in alternating order, and the ratios to the
  base (what ``lora_vs_base`` in ``bench/serving.py`` measures through the whole stack).

Medians over ``--reps``. Writes a JSON report and a PNG beside it.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_cpu.py \\
        --out bench/reports/lora-cpu.json
"""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine's worker in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for  # noqa: E402
from llmrec.atomic import write_json_atomic  # noqa: E402
from llmrec.data import load_dataset  # noqa: E402
from llmrec.model import auto_dtype, fingerprint_model_dir, prepare_base_model  # noqa: E402
from llmrec.model.item_vocab import prepare_item_base  # noqa: E402
from llmrec_serving.engines import cpu_lora_ops, cpu_lora_slots  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Switch:
    """One plugin's methods, swapped between llmrec's and vLLM's own."""

    def __init__(self, own: dict[tuple[object, str], object]):
        self.own = dict(own)
        self.ours = {key: getattr(key[0], key[1]) for key in own}

    def use(self, ours: bool) -> None:
        for (cls, name), fn in (self.ours if ours else self.own).items():
            setattr(cls, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--rank", type=int, default=12)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=110)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/reports/lora-cpu.json"))
    args = p.parse_args()
    if args.adapters <= args.max_loras:
        p.error("--adapters must exceed --max-loras: every activation must swap one in")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    dataset = load_dataset("ml-100k")
    model_dir = prepare_item_base(prepare_base_model(), dataset.catalog)
    shapes, fp = module_shapes_for(model_dir), fingerprint_model_dir(model_dir)
    store = AdapterStore(
        Path(tempfile.mkdtemp(prefix="bench-lora-cpu-")),
        max_rank=64, module_shapes=shapes, base_fingerprint=fp,
    )  # fmt: skip
    refs = [
        store.publish(
            f"u{i}",
            LoraWeights.random(
                shapes, TARGETS, args.rank, i, str(model_dir), std=0.02, alpha=args.rank
            ),
            base_fingerprint=fp,
        )  # fmt: skip
        for i in range(args.adapters)
    ]
    dtype = auto_dtype("cpu")
    llm = LLM(
        model=str(model_dir), enable_lora=True, max_loras=args.max_loras,
        max_cpu_loras=args.adapters + 1, max_lora_rank=args.max_lora_rank, max_model_len=1024,
        dtype=dtype, enforce_eager=True, enable_prefix_caching=False, seed=args.seed,
    )  # fmt: skip
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    loras = worker.model_runner.lora_manager
    manager = loras._adapter_manager
    requests = [LoRARequest(f"u{i}", i + 1, str(ref.path)) for i, ref in enumerate(refs)]
    slots, ops = Switch(cpu_lora_slots.VLLM_OWN), Switch(cpu_lora_ops.VLLM_OWN)
    if not (slots.own and ops.own):
        sys.exit("llmrec's vLLM plugins did not load in this process (VLLM_PLUGINS?)")

    validate = [timed(lambda r=r: store.load(r)) for r in refs]
    vllm_load = [timed(lambda q=q: loras._load_adapter(q)) for q in requests]
    for request in requests:
        loras.add_adapter(request)  # every adapter in vLLM's CPU cache

    activate: dict[str, list[float]] = {"vllm": [], "ours": []}
    ids = [q.lora_int_id for q in requests]
    step = 0
    for rep in tqdm(range(args.reps), desc="slot writes"):
        for name in ("vllm", "ours") if rep % 2 else ("ours", "vllm"):
            slots.use(name == "ours")
            for _ in range(args.adapters):
                lora_id, step = ids[step % len(ids)], step + 1
                activate[name].append(timed(lambda i=lora_id: manager.activate_adapter(i)))
    slots.use(True)

    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=1, logprobs=20)

    def batch(lora: LoRARequest | None) -> float:
        prompts = [
            TokensPrompt(prompt_token_ids=[rng.randrange(100, 49_000) for _ in range(args.tokens)])
            for _ in range(args.batch)
        ]
        return timed(lambda: llm.generate(prompts, params, lora_request=lora, use_tqdm=False))

    batch(None), batch(requests[0])  # warm
    runs: dict[str, list[float]] = {"base": [], "vllm": [], "ours": []}
    for rep in tqdm(range(args.reps), desc="batches"):
        for name in ("base", "vllm", "ours") if rep % 2 else ("ours", "vllm", "base"):
            ops.use(name == "ours")
            runs[name].append(batch(None if name == "base" else requests[0]))
    ops.use(True)
    batch_s = {name: statistics.median(times) for name, times in runs.items()}

    report = {
        "command": "bench/lora_cpu.py " + " ".join(sys.argv[1:]),
        "model": str(model_dir),
        "dtype": dtype,
        "adapters": f"{args.adapters} random rank-{args.rank} LoRAs on {', '.join(TARGETS)}",
        "max_lora_rank": args.max_lora_rank,
        "max_loras": args.max_loras,
        "seed": args.seed,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "validate_ms": median_ms(validate),
        "vllm_load_ms": median_ms(vllm_load),
        "activate_ms": {name: median_ms(times) for name, times in activate.items()},
        "batch": {
            "prompts": args.batch,
            "tokens": args.tokens,
            "seconds": batch_s,
            "lora_vs_base": {name: batch_s["base"] / batch_s[name] for name in ("vllm", "ours")},
        },
        "reps": args.reps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=2))
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["validate", "vLLM load", "activate\n(vLLM)", "activate\n(ours)"]
    values = [
        report["validate_ms"],
        report["vllm_load_ms"],
        report["activate_ms"]["vllm"],
        report["activate_ms"]["ours"],
    ]
    left.bar(names, values, color=["0.6", "0.6", "tab:gray", "tab:blue"])
    left.set_ylabel("ms (median)")
    left.set_title("one adapter: check, load, swap into a slot")
    ratios = report["batch"]["lora_vs_base"]
    right.bar(
        ["vLLM's ops", "ours"], [ratios["vllm"], ratios["ours"]], color=["tab:gray", "tab:blue"]
    )
    right.axhline(1.0, color="k", lw=0.8)
    right.set_ylim(0, 1.1)
    right.set_ylabel("base time / LoRA time")
    batch = report["batch"]
    right.set_title(f"{batch['prompts']} prompts x {batch['tokens']} tokens, one adapter")
    fig.suptitle(f"vLLM CPU LoRA in process ({report['dtype']}, {report['host']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
