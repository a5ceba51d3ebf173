"""What the gateway's tests and benches build on: a tiny serving world, and the API fuzzer.

:func:`make_serving_world` is an adapter store, keys and the config overrides that serve
them on a tiny model and a small data set. :func:`fuzz_gateway` runs Schemathesis against
the gateway's own ``/openapi.json`` in process, the way ``tests/test_openapi_fuzz.py`` and
``bench/fuzz.py`` both need it (the test at 100 examples per operation, the bench at 1,000).
Schemathesis is a dev dependency, imported only here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrec.adapters import AdapterStore, LoraWeights, module_shapes_for
from llmrec.model import fingerprint_model_dir
from llmrec_serving.keys import KeyStore


@dataclass
class ServingWorld:
    """An adapter store with users 1 and 2 (own adapters) and a shared adapter, keys for
    users 1, 2, 3 (3 has no adapter: cold start) and an admin, and the config overrides that
    serve them. ``publish(user, seed)`` adds a version."""

    store: AdapterStore
    publish: Callable[..., Any]
    keys: dict[str, str]
    overrides: list[str]
    model_dir: Path
    tmp: Path


def make_serving_world(tmp_path: Path, model_dir: Path, data_dir: Path) -> ServingWorld:
    """The serving world in ``tmp_path``, over ``model_dir`` and the generic data set in
    ``data_dir`` (``interactions.csv``, ``catalog.csv``)."""
    targets = ("q_proj", "v_proj")
    shapes = module_shapes_for(model_dir)
    fingerprint = fingerprint_model_dir(model_dir)
    store = AdapterStore(
        tmp_path / "adapters", max_rank=16, module_shapes=shapes, base_fingerprint=fingerprint
    )

    def publish(user_id: str, seed: int, rank: int = 8):
        weights = LoraWeights.random(shapes, targets, rank, seed, str(model_dir))
        if user_id == "_shared":
            return store.publish_shared(weights, base_fingerprint=fingerprint)
        return store.publish(user_id, weights, base_fingerprint=fingerprint)

    publish("_shared", seed=100)
    publish("1", seed=1)
    publish("2", seed=2)
    keys = KeyStore(tmp_path / "keys.json")
    overrides = [
        f"model.name_or_path={model_dir}",
        "model.dtype=float32",
        "data.name=generic",
        f"data.interactions={data_dir / 'interactions.csv'}",
        f"data.catalog={data_dir / 'catalog.csv'}",
        "lora.target_modules=[q_proj, v_proj]",
        "prompts.max_history_items=5",
        "prompts.max_prompt_tokens=256",
        "recommend.k=5",
        "recommend.beam_width=8",
        f"serve.store_dir={store.root}",
        f"serve.keys_file={keys.path}",
        "serve.max_model_len=512",
        "serve.explain=false",
        "serve.explain_max_tokens=8",
        # Profiles and personal state of this world's own: never the repository's outputs/.
        f"profile.url=sqlite:///{tmp_path / 'profiles.db'}",
        f"fed.output_dir={tmp_path / 'fed'}",
    ]
    return ServingWorld(
        store=store,
        publish=publish,
        keys={u: keys.add(u) for u in ("1", "2", "3")} | {"admin": keys.add(None, admin=True)},
        overrides=overrides,
        model_dir=model_dir,
        tmp=tmp_path,
    )


# --------------------------------------------------------------------------- the fuzzer

ACCEPTED_STATUSES = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""What a schema-valid request may be answered (Schemathesis's positive-data check): its
defaults, plus 400, the gateway's "well formed, but cannot be served as asked" (the admin
key without the user it acts for, a conversation longer than the model's context; see
``schemas.ERROR_DESCRIPTIONS``). A 422 is only ever a schema violation. 5xx is listed
because another check, ``not_a_server_error``, fails every one of them."""


REJECTED_STATUSES = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]  # fmt: skip
"""What a schema-violating request may be answered (the negative-data check): its defaults,
plus 413, the body-size guard's refusal of a request over ``serve.limits.max_body_bytes``
before anything reads it."""

CALL_TIMEOUT_S = 120.0
"""Per request, in process: generous, since a busy 2-core machine is not a server fault."""


@dataclass
class FuzzReport:
    """One fuzzing run: what was sent, what came back, and every distinct failure."""

    operations: list[str]
    cases: int = 0
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    """Operation -> status code -> how many answers."""
    failures: dict[str, list[str]] = field(default_factory=dict)
    """"<operation> as <key name>" -> the distinct failures Schemathesis reported."""

    def summary(self) -> str:
        lines = [f"{len(self.failures)} operation(s) failed of {len(self.operations)}"]
        for where, found in self.failures.items():
            lines += [f"== {where}", *(f.strip()[:1500] for f in found[:3])]
        return "\n".join(lines)


def fuzz_gateway(app: Any, keys: Mapping[str, str], examples: int, seed: int = 0) -> FuzzReport:
    """Schemathesis against ``app``'s ``/openapi.json``, in process: every operation, with
    ``examples`` schema-valid and as many schema-violating requests, every built-in check
    (no server error; status codes, content types, headers and bodies as documented; valid
    data accepted, invalid data rejected; auth enforced), once per key of ``keys`` (name ->
    bearer key), in order. ``DELETE`` runs last under each key: it erases the key's user."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig

    def operations_as(key: str) -> list[Any]:
        """The operations, ``DELETE`` last, with ``key`` as the schema's bearer credentials
        (so the Authorization header is Schemathesis's auth, not a field it fuzzes)."""
        config = SchemathesisConfig.from_dict(
            {
                "auth": {"openapi": {"HTTPBearer": {"bearer": key}}},
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ACCEPTED_STATUSES},
                    "negative_data_rejection": {"expected-statuses": REJECTED_STATUSES},
                },
            }
        )
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
        found = [result.ok() for result in schema.get_all_operations()]
        return sorted(found, key=lambda op: op.method.upper() == "DELETE")

    report = FuzzReport([op.label for op in operations_as("")])
    for name, key in keys.items():
        for op in operations_as(key):
            cases, counts, found = _fuzz_operation(op, examples, seed)
            report.cases += cases
            report.statuses.setdefault(op.label, Counter()).update(counts)
            if found:
                report.failures[f"{op.label} as {name}"] = sorted(set(found))
    return report


def _fuzz_operation(op: Any, examples: int, seed: int) -> tuple[int, Counter[int], list[str]]:
    """One operation, schema-valid then schema-violating requests: (cases sent, answers by
    status, every failure). A failure is kept, not raised, so the run finds the others."""
    import hypothesis
    from hypothesis import HealthCheck, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    counts: Counter[int] = Counter()
    found: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @hypothesis.seed(seed)
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def one(case: Any) -> None:
            try:
                response = case.call(timeout=CALL_TIMEOUT_S)
            except Exception as err:  # in process, an app that raises: a client's 500;
                timeout = "Timeout" in type(err).__name__  # or no answer in time (status 0)
                counts[0 if timeout else 500] += 1
                what = "No answer" if timeout else "Server error"
                found.append(f"{what}: {type(err).__name__}: {err}\n{case.as_curl_command()}")
                return
            counts[response.status_code] += 1
            try:
                case.validate_response(response)
            except (Exception, BaseExceptionGroup) as err:
                found.append(str(err))

        try:
            one()
        except Unsatisfiable:  # no schema-violating request exists (no parameters)
            pass
    return sum(counts.values()), counts, found
