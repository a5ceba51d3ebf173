"""Words benchmark: what the personal agent and the chat endpoint say, checked by rule.

Serves a finished federated run (its served base and adapter store) through the real
gateway on loopback, and for each of ``--users`` users of the run's cohort (drawn with
``--seed``) runs one scripted conversation with the agent (``POST /v1/agent/chat``):

1. plain: "What should I watch tonight?";
2. constraint: "Something funny, no horror." (Comedy in, Horror out);
3. follow-up: "Why the second one?" (same conversation);
4. feedback: "I watched the first one, loved it." (same conversation);

then asks the chat endpoint (``POST /v1/chat/completions``, the default model) "I have a
free evening. What should I watch, and why?". Every answer is checked against the catalog,
not against what the agent says it used:

- ``unsupported_claims``: reasons with a genre, year, decade or title claim the catalog
  does not support for the item (any of the user's history items may be cited), by
  ``llmrec.recommend.reasons.ClaimChecker``'s rules over catalog facts;
- ``named_items_in_catalog``: every "Title (Year)" an answer names (the picks and the
  titles their reasons cite) that is a catalog item;
- ``reasons_citing_history``: reasons that name at least one item of the user's history;
- ``repeated_4gram``: texts (each reason, and each answer's lines outside the reasons) in
  which a word 4-gram occurs twice;
- ``constraint_violations``: picks that break the request (a seen item, a Horror item, or
  one without Comedy after "something funny, no horror");
- ``median_latency_s``: per agent answer; ``median_chat_latency_s`` per chat answer.

With ``--raw N``, the first N users also ask the raw model (``llmrec-raw``, free
generation) the chat question with their own adapter and with the shared one (the same
messages), at each repetition penalty of ``--penalties``; with the in-process backend the
bare base (no adapter) answers the same messages too, once the stack has stopped. That is
whether the adapters degrade the base's free text, and what the penalty does to repeats.
All rates are over all answers; the report (bench/reports/text.json) keeps the counts beside
them.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/text.py --run outputs/fed-seed0 --users 200 \\
        --seed 0 --raw 40
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
# Run as a script, this file's folder is sys.path[0], and would shadow the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llmrec.adapters import AdapterStore  # noqa: E402
from llmrec.data import Catalog  # noqa: E402
from llmrec.federated.layout import RUN_JSON, exported_base  # noqa: E402
from llmrec.launch import free_port  # noqa: E402
from llmrec.recommend import Grounder, extract_title_mentions  # noqa: E402
from llmrec.recommend.reasons import (  # noqa: E402
    Asked,
    ClaimChecker,
    Facts,
    repeated_ngram_rate,
)
from llmrec_serving.app import create_app, serve_in_thread  # noqa: E402
from llmrec_serving.config import load_serving_config  # noqa: E402
from llmrec_serving.keys import KeyStore  # noqa: E402
from llmrec_serving.services import build_services  # noqa: E402

REPORT = Path("bench/reports/text.json")
PLAIN = "What should I watch tonight?"
CONSTRAINT = "Something funny, no horror."
CONSTRAINT_ASKED = Asked(genres_in=frozenset({"Comedy"}), genres_out=frozenset({"Horror"}))
WHY = "Why the second one?"
FEEDBACK = "I watched the first one, loved it."
CHAT = "I have a free evening. What should I watch, and why?"
CLAIM_KINDS = ("genre", "year", "decade", "title")
"""The checker's problems that are claims about the catalog (the rest is wording)."""
RAW_MAX_TOKENS = 64
_YEAR_MARK_RE = re.compile(r"\((?:18|19|20)\d\d\)")
_LINE_RE = re.compile(r"^\s*(\d+)\.\s+(.+?) — (.*)$")


def named_titles(text: str, catalog: Catalog) -> list[str | None]:
    """Each "Title (Year)" in ``text``: the catalog id it names, or None. The title is the
    longest run of words before the year that is a catalog display title."""
    found = []
    for m in _YEAR_MARK_RE.finditer(text):
        words = text[: m.start()].split()
        hit = None
        for n in range(min(len(words), 16), 0, -1):
            hit = catalog.by_display(" ".join(words[-n:]).lstrip("\"'“*(") + " " + m.group(0))
            if hit:
                break
        found.append(hit)
    return found


class Tally:
    """Counts behind each rate of the report."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.checker = ClaimChecker(catalog.genres)
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def example(self, key: str, text: str) -> None:
        self.examples.setdefault(key, [])
        if len(self.examples[key]) < 5:
            self.examples[key].append(text)

    def reason(self, item_id: str, reason: str, history: list[str], asked: Asked) -> None:
        """One reason for ``item_id``, checked against the catalog and the user's history."""
        item = self.catalog[item_id]
        shown = [self.catalog.display(h) for h in history if h in self.catalog]
        facts = Facts(item_id, item.display, item.year, tuple(item.genres), tuple(shown),
                      "model", asked=asked)  # fmt: skip
        claims = [p for p in self.checker.problems(reason, facts) if p.split()[0] in CLAIM_KINDS]
        self.counts["reasons"] += 1
        if claims:
            self.counts["unsupported"] += 1
            self.example("unsupported_claims", f"{item.display}: {reason} -> {claims}")
        if any(title in reason for title in shown):
            self.counts["citing_history"] += 1
        else:
            self.example("reasons_not_citing_history", f"{item.display}: {reason}")
        self.text(reason)

    def text(self, text: str) -> None:
        """One text for the repeat and title counts."""
        self.counts["texts"] += 1
        if repeated_ngram_rate(text) > 0:
            self.counts["repeated"] += 1
            self.example("repeated_4gram", text)
        for hit in named_titles(text, self.catalog):
            self.counts["named"] += 1
            self.counts["named_in_catalog"] += hit is not None

    def free_text(self, text: str, grounder: Grounder) -> None:
        """One free-generated answer: its repeats, and how many of the titles it names
        (with or without a year) ground to catalog items."""
        self.text(text)
        mentions = extract_title_mentions(text)
        self.counts["mentions"] += len(mentions)
        self.counts["grounded"] += sum(grounder.ground_one(m) is not None for m in mentions)

    def picks(self, picks: list[str], history: list[str], asked: Asked | None) -> None:
        """Picks of one request: seen items, and (under ``asked``) genre constraints."""
        seen = set(history)
        for item_id in picks:
            genres = set(self.catalog[item_id].genres)
            bad = item_id in seen
            if asked is not None:
                bad |= bool(genres & asked.genres_out) or not genres & asked.genres_in
            self.counts["picks"] += 1
            self.counts["violations"] += bad
            if bad:
                self.example("constraint_violations", self.catalog.display(item_id))

    def rates(self) -> dict[str, float | None]:
        c = self.counts

        def rate(num: str, den: str) -> float | None:
            return round(c[num] / c[den], 4) if c[den] else None

        return {
            "unsupported_claims": rate("unsupported", "reasons"),
            "named_items_in_catalog": rate("named_in_catalog", "named"),
            "reasons_citing_history": rate("citing_history", "reasons"),
            "repeated_4gram": rate("repeated", "texts"),
            "constraint_violations": rate("violations", "picks"),
        }


def agent_turn(client: httpx.Client, user: str, message: str, conversation: str | None):
    """(conversation id, answer text, cards, seconds) of one agent turn."""
    body = {"message": message} | ({"conversation_id": conversation} if conversation else {})
    t0 = time.perf_counter()
    events = []
    with client.stream("POST", "/v1/agent/chat", params={"user": user}, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"agent chat of {user}: {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    seconds = time.perf_counter() - t0
    errors = [e for e in events if e["type"] == "error"]
    if errors:
        raise RuntimeError(f"agent chat of {user}: {errors[0]}")
    done = next(e for e in events if e["type"] == "done")
    cards = [c for e in events if e["type"] == "cards" for c in e["cards"]]
    return done["conversation_id"], done["text"], cards, seconds


def history_of(client: httpx.Client, user: str) -> list[str]:
    r = client.get("/v1/me/history", params={"user": user})
    r.raise_for_status()
    return [i["item_id"] for i in r.json()["history"]]


def chat(client: httpx.Client, user: str, messages: list[dict], model: str, **extra) -> tuple:
    body = {"model": model, "messages": messages, "user": user} | extra
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"chat of {user}: {r.status_code} {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t0


def converse(client: httpx.Client, user: str, tally: Tally, latencies: dict) -> None:
    """The scripted conversation of one user, tallied."""
    catalog = tally.catalog
    history = history_of(client, user)
    for message, asked in ((PLAIN, None), (CONSTRAINT, CONSTRAINT_ASKED)):
        conversation, text, cards, seconds = agent_turn(client, user, message, None)
        latencies["agent"].append(seconds)
        tally.picks([c["item_id"] for c in cards], history, asked)
        for card in cards:
            tally.reason(card["item_id"], card["reason"], history, asked or Asked())
        tally.text(text.splitlines()[0] if text else "")  # the intro line
    # follow-up and feedback on the constraint answer
    _, text, cards, seconds = agent_turn(client, user, WHY, conversation)
    latencies["agent"].append(seconds)
    for card in cards:
        tally.reason(card["item_id"], card["reason"], history, CONSTRAINT_ASKED)
    _, text, _, seconds = agent_turn(client, user, FEEDBACK, conversation)
    latencies["agent"].append(seconds)
    tally.text(text)
    history = history_of(client, user)
    answer, seconds = chat(client, user, [{"role": "user", "content": CHAT}], "llmrec")
    latencies["chat"].append(seconds)
    picks = []
    for line in answer.splitlines():
        m = _LINE_RE.match(line)
        if m is None:
            tally.text(line)
            continue
        item_id = catalog.by_display(m.group(2))
        tally.counts["named"] += 1
        tally.counts["named_in_catalog"] += item_id is not None
        if item_id is not None:
            picks.append(item_id)
            tally.reason(item_id, m.group(3), history, Asked())
    tally.counts["chat_answers"] += 1
    tally.counts["chat_answers_naming_items"] += bool(picks)
    tally.picks(picks, history, None)


def base_answer(services, user: str, penalty: float) -> str:
    """The bare base's raw answer to the chat question over ``raw_answers``'s messages (the
    in-process engine, called directly: no adapter is what the gateway never serves)."""
    import asyncio

    from llmrec_serving.engines import GenerationParams

    params = GenerationParams(RAW_MAX_TOKENS, 0.0, repetition_penalty=penalty)

    async def run() -> str:
        chat = services.engines[0].backend.chat(None, chat_messages(services, user), params)
        return "".join([d.text async for d in chat])

    return asyncio.run(run())


def chat_messages(services, user: str) -> list[dict[str, str]]:
    """The raw chat question with the agent's system prompt over ``user``'s history."""
    titles = services.catalog.displays(services.profiles.history(user))
    return [
        {"role": "system", "content": services.prompts.chat_system(titles)},
        {"role": "user", "content": CHAT},
    ]


def raw_answers(
    client: httpx.Client, user: str, services, cold: str, penalty: float
) -> dict[str, str]:
    """The raw model's answer to the chat question with ``user``'s adapter and with the
    shared one (``cold`` has no adapter of its own), over the same messages."""
    messages = chat_messages(services, user)
    extra = {"max_tokens": RAW_MAX_TOKENS, "temperature": 0, "repetition_penalty": penalty}
    return {
        who: chat(client, name, messages, "llmrec-raw", **extra)[0]
        for who, name in (("personal", user), ("shared", cold))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished federated run")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", type=int, default=0, help="users who also ask the raw model")
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.3])
    parser.add_argument("--backend", choices=["inprocess", "vllm"], default="inprocess")
    parser.add_argument("--reasons", choices=["facts", "model"], default="facts")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()

    record = json.loads((args.run / RUN_JSON).read_text())
    store_dir = Path(record["config"]["fed"]["store_dir"])
    base = exported_base(args.run)
    if base is None:
        sys.exit(f"{args.run}: no export.json with a served base (is the run finished?)")
    cohort = sorted(AdapterStore(store_dir).users())
    users = random.Random(args.seed).sample(cohort, min(args.users, len(cohort)))
    work = Path(tempfile.mkdtemp(prefix="bench-text-"))
    keys = KeyStore(work / "keys.json")
    admin = keys.add(None, admin=True)
    cfg = load_serving_config(None, [
        f"model.name_or_path={base}",
        *(f"data.{k}={v}" for k, v in record["config"]["data"].items() if v is not None),
        f"fed.target_modules={json.dumps(record['config']['fed']['target_modules'])}",
        f"serve.store_dir={store_dir}", f"serve.keys_file={keys.path}",
        f"serve.backend={args.backend}", f"serve.reasons={args.reasons}",
        f"profile.url=sqlite:///{work / 'profiles.db'}", f"serve.vllm_port={free_port()}",
        "serve.limits.request_timeout_s=600",
    ])  # fmt: skip
    services = build_services(cfg)
    tally = Tally(services.catalog)
    grounder = Grounder(services.catalog, threshold=cfg.recommend.grounding_threshold)
    arms = ("personal", "shared") + (("base",) if services.engines.kind == "inprocess" else ())
    raw_tallies = {(p, who): Tally(services.catalog) for p in args.penalties for who in arms}
    latencies: dict[str, list[float]] = {"agent": [], "chat": []}
    headers = {"Authorization": f"Bearer {admin}"}
    with serve_in_thread(
        create_app(services), "127.0.0.1", cfg.serve.vllm_startup_timeout_s + 60
    ) as url:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
            for i, user in enumerate(tqdm(users, desc="users")):
                converse(client, user, tally, latencies)
                for penalty in args.penalties if i < args.raw else ():
                    raw = raw_answers(client, user, services, "bench-cold", penalty)
                    for who, text in raw.items():
                        raw_tallies[penalty, who].free_text(text, grounder)
                        raw_tallies[penalty, who].example("answers", f"user {user}: {text}")
    for user in users[: args.raw] if "base" in arms else ():
        for penalty in args.penalties:
            text = base_answer(services, user, penalty)
            raw_tallies[penalty, "base"].free_text(text, grounder)
            raw_tallies[penalty, "base"].example("answers", f"user {user}: {text}")
    report = {
        "command": " ".join(["bench/text.py", *sys.argv[1:]]),
        "run": str(args.run),
        "base": str(base),
        "backend": services.engines.kind,
        "reasons": args.reasons,
        "users": len(users),
        "seed": args.seed,
        **tally.rates(),
        "chat_answers_naming_items": round(
            tally.counts["chat_answers_naming_items"] / max(1, tally.counts["chat_answers"]), 4
        ),
        "median_latency_s": round(statistics.median(latencies["agent"]), 3),
        "median_chat_latency_s": round(statistics.median(latencies["chat"]), 3),
        "p90_latency_s": round(statistics.quantiles(latencies["agent"], n=10)[-1], 3),
        "counts": dict(tally.counts),
        "examples": tally.examples,
        "raw": {
            f"{who}@{penalty}": {
                **{k: t.rates()[k] for k in ("named_items_in_catalog", "repeated_4gram")},
                "named": t.counts["named"],
                "mentions": t.counts["mentions"],
                "mentions_grounded": round(t.counts["grounded"] / t.counts["mentions"], 4)
                if t.counts["mentions"]
                else None,
                "texts": t.counts["texts"],
                "examples": t.examples,
            }
            for (penalty, who), t in raw_tallies.items()
        }
        if args.raw
        else None,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.report.with_suffix(".png"))
    shown = {k: v for k, v in report.items() if k not in ("counts", "examples", "raw")}
    print(json.dumps(shown, indent=1))
    print(f"written: {args.report}, {args.report.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    keys = ["unsupported_claims", "named_items_in_catalog", "reasons_citing_history",
            "repeated_4gram", "constraint_violations"]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[3, 1])
    values = [report[k] or 0 for k in keys]
    bars = left.bar(keys, values, color="tab:blue")
    left.bar_label(bars, labels=[f"{v:.3f}" for v in values])
    left.set_ylim(0, 1.1)
    left.set_title(f"rates over all answers, {report['users']} users (seed {report['seed']})")
    left.tick_params(axis="x", rotation=15)
    lat = [report["median_latency_s"], report["median_chat_latency_s"]]
    bars = right.bar(["agent", "chat"], lat, color="tab:orange")
    right.bar_label(bars, labels=[f"{v:.2f}" for v in lat])
    right.set_title("median latency (s)")
    fig.suptitle(f"llmrec words: reasons from {report['reasons']}, {report['backend']} backend")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
