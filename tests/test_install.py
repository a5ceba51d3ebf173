"""The lean install: the core library imports and its CLI answers without any extra's packages.

The extras' packages may well be installed in this venv, so a child process blocks them in
``sys.modules`` (an import of a blocked name fails as if it were not installed) before it
imports every module of ``llmrec``. ``llmrec.agent`` is the ``[agent]`` extra's package and
is the one left out.
"""

import json
import subprocess
import sys

# The [serve], [flower], [agent] and [dp] extras' packages, vLLM, and the serving application.
BLOCKED = (
    "ray",
    "flwr",
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "opacus",
    "vllm",
    "llmrec_serving",
)
EXTRA_PACKAGES = ("llmrec.agent",)

CHILD = """
import importlib, json, pkgutil, sys

for name in {blocked!r}:
    sys.modules[name] = None

import llmrec

def skip_extra(name):
    if name not in {extra!r}:
        raise  # a core package that does not import: the failure this test is for

imported = []
for module in pkgutil.walk_packages(llmrec.__path__, "llmrec.", onerror=skip_extra):
    if module.name.endswith(".__main__") or module.name.startswith({extra!r}):
        continue
    importlib.import_module(module.name)
    imported.append(module.name)

from typer.testing import CliRunner
from llmrec.cli import app

runner = CliRunner()
results = {{
    " ".join(args): [r.exit_code, r.output]
    for args in (["--help"], ["config", "show"])
    for r in [runner.invoke(app, args)]
}}
print(json.dumps({{"imported": imported, "cli": results}}))
"""


def test_core_imports_and_cli_run_without_the_extras():
    code = CHILD.format(blocked=BLOCKED, extra=EXTRA_PACKAGES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    imported = set(report["imported"])
    for module in ("llmrec.cli", "llmrec.evaluate", "llmrec.federated", "llmrec.recommend"):
        assert module in imported
    assert not any(m.startswith("llmrec.agent") for m in imported)
    help_code, help_text = report["cli"]["--help"]
    assert help_code == 0 and "evaluate" in help_text
    show_code, shown = report["cli"]["config show"]
    assert show_code == 0 and "lora:" in shown
