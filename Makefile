# Two commands do everything on a fresh clone:
#   make quickstart   set up .venv, fetch the assets, run notebooks/00_quickstart.ipynb at the README's size
#                     -> reports/00_quickstart.html (records in results/quickstart/local/, PNGs in figures/quick/)
#   make test         set up if needed, run the unit tests and nbval over notebooks/
# Neither rewrites a tracked file nor leaves an untracked one: both compare `git status` before and after.
SHELL := bash
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Notebook kernels draw figures inline: never hand them a non-interactive matplotlib backend.
unexport MPLBACKEND

.PHONY: setup assets quickstart reproduce-quickstart test test-long unit report lab lock gpu
PROFILE ?= quick

# $(call unchanged,COMMAND): run COMMAND, then fail if `git status` differs from before it
# (a tracked file rewritten, an untracked file left behind). Runs write only to ignored places.
unchanged = before="$$(git status --porcelain 2>/dev/null)"; $(1) || exit $$?; \
	after="$$(git status --porcelain 2>/dev/null)"; \
	if [ "$$before" != "$$after" ]; then \
		echo "error: this run changed the clone (git status before < > after):"; \
		diff <(echo "$$before") <(echo "$$after"); exit 1; fi

setup:
	@bash scripts/setup.sh

assets: setup
	$(PY) -m chainfed_core.assets

quickstart: assets
	@$(call unchanged,$(PY) scripts/run_batch.py --quickstart)

# Rewrites the committed quickstart artefacts (results/quickstart/full/, figures/00_quickstart_*.png)
# that the README quotes: run on purpose, from a clean checkout, and commit what it writes.
reproduce-quickstart: assets
	$(PY) scripts/run_batch.py --quickstart full

# Every result notebook of a profile (quick | cpu-full | gpu-full) through papermill, then one
# HTML report: make report PROFILE=cpu-full  ->  reports/report_cpu-full.html
report: assets
	$(PY) scripts/run_batch.py --profile $(PROFILE)

# The gpu profile on one GPU (scripts/gpu_profile.py): every Table 1, 2, 4, Figure 8, 9 run and the
# instruction-tuning notebooks' (Table 3, Figures 10, 11, App. F.2) by 12
# worker processes within 600 s in all, then the notebooks on the records (reports/report_gpu-full.html);
# what the budget leaves undone is resumable: the same command continues. GPU_ARGS=--dry-run: the plan
# and its time estimate; GPU_ARGS="--tiny --workers 2": the same pipeline on the quick profile (CPU).
GPU_ARGS ?=
gpu: assets
	$(PY) scripts/gpu_profile.py $(GPU_ARGS)

unit: setup
	$(PY) -m pytest tests -q

test: setup
	@$(call unchanged,$(PY) -m pytest tests -q -m "not long" && $(PY) -m pytest --nbval-lax notebooks -q)

# The real-process federations (TLS SuperLink + SuperNodes streaming a 3 GiB store; a SuperNode killed
# mid-round): about 15 minutes here, so not part of `make test`.
test-long: setup
	@$(call unchanged,$(PY) -m pytest tests -q -m long -s)

# JupyterLab on the notebooks; as root (containers) it needs --allow-root.
lab: setup
	$(PY) -m jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# Re-resolve requirements.lock from requirements.in (needs the package registry).
lock:
	python3 -m venv /tmp/chainfed-lock && /tmp/chainfed-lock/bin/pip install -q -r requirements.in -c constraints.txt
	/tmp/chainfed-lock/bin/pip freeze | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > requirements.lock
