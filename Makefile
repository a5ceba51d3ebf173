# Two commands do all set-up on a fresh machine (each creates/refreshes .venv first):
#   make demo   the main job end to end on the embedded defaults
#   make test   the test suite (fast and slow tests; `make test-fast` skips the slow ones)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint

setup: $(VENV)/.setup-stamp

$(VENV)/.setup-stamp: scripts/setup.sh pyproject.toml
	bash scripts/setup.sh

# The main job ends by serving: the federated run's adapters over REST, then the stack stops.
demo: setup
	@start=$$(date +%s); \
	$(PY) -m llmrec demo && $(PY) -m llmrec serve-demo; rc=$$?; \
	echo "make demo: $$(( ($$(date +%s) - start) / 60 )) min $$(( ($$(date +%s) - start) % 60 )) s after set-up (exit $$rc)"; \
	exit $$rc

# pytest exits 5 when nothing was collected: not a failure of the project.
# One OpenMP thread per process: the tests start child processes (accelerate, servers), and
# oversubscribed OpenMP threads on 2 cores slowed torch here by an order of magnitude.
test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow"; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

LINTED := llmrec llmrec_serving training tests bench
lint: setup
	$(VENV)/bin/ruff check $(LINTED) && $(VENV)/bin/ruff format --check $(LINTED)
