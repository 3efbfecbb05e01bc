# Two commands do everything on a fresh clone:
#   make quickstart   set up .venv, fetch the assets, run notebooks/00_quickstart.ipynb -> reports/ + figures/
#   make test         set up if needed, run the unit tests and nbval over notebooks/
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: setup assets quickstart test unit report lock
PROFILE ?= quick

setup:
	@bash scripts/setup.sh

assets: setup
	$(PY) -m chainfed_core.assets

quickstart: assets
	@mkdir -p reports figures
	$(PY) -m papermill notebooks/00_quickstart.ipynb reports/00_quickstart.ipynb --cwd notebooks \
		-p max_train 1000 -p max_test 500 -p rounds 6 -p tag full
	$(PY) -m jupyter nbconvert --to html reports/00_quickstart.ipynb --output-dir reports
	@echo "report: reports/00_quickstart.html"

# Every result notebook of a profile (quick | cpu-full | gpu-full) through papermill, then one
# HTML report: make report PROFILE=cpu-full  ->  reports/report_cpu-full.html
report: assets
	$(PY) scripts/run_batch.py --profile $(PROFILE)

unit: setup
	$(PY) -m pytest tests -q


test: setup
	$(PY) -m pytest tests -q
	$(PY) -m pytest --nbval-lax notebooks -q

# Re-resolve requirements.lock from requirements.in (needs the package registry).
lock:
	python3 -m venv /tmp/chainfed-lock && /tmp/chainfed-lock/bin/pip install -q -r requirements.in -c constraints.txt
	/tmp/chainfed-lock/bin/pip freeze | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' > requirements.lock
