# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pinned for this project's machines (x86_64, Python 3.11), where pip finds both on local disk.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test nbval clean site-check

# Some machines set PYTHONDONTWRITEBYTECODE=1, and pip installs with --no-compile (faster setup): together they make
# every Python process (each pytest worker, each notebook kernel) compile torch from source again, 10 s or more each.
# Let the first import write the bytecode, so the rest reuse it.
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile $(TORCH)
	$(BIN)/pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default: every registered method and recipe against the supervised baseline on
## scikit-learn's digits, on one split; prints the table and writes runs/bench/results.png.
demo: $(STAMP)
	$(BIN)/ssl-book bench --preset tiny

## The whole test suite: pytest on tests/, and nbval on every notebook with the tiny preset.
## nbval runs on a copy whose outputs are cleared (nbdev-clean drops execution counts, and nbval then fails with
## "Unrun reference cell has outputs"). nbconvert --clear-output keeps the cell metadata, which nbdev-clean --clear-all
## would drop: the instructor page and the exercises page read nbgrader's metadata from the chapters.
## Two workers with one thread each (pytest-xdist): the tiny models are too small to use two threads well.
## --dist loadscope keeps each notebook (and each test file) in one worker, in order.
test: $(STAMP)
	rm -rf .nbval && cp -r nbs .nbval
	$(BIN)/jupyter nbconvert --clear-output --inplace --log-level=WARN $$(find .nbval -name "*.ipynb")
	SSL_BOOK_PRESET=tiny MPLBACKEND=Agg OMP_NUM_THREADS=1 $(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadscope \
		--durations=10 tests .nbval --nbval-lax

## The site as a reader sees it: nbdev-proc-nbs (what Quarto is given), then every page rendered with nbconvert and
## opened in headless Chromium (Debian's chromium package: apt-get install chromium). Writes the pages and three
## screenshots to runs/site/. Not part of `make test`: CI machines have no Chromium, and the Pages workflow runs Quarto.
site-check: $(STAMP)
	$(BIN)/nbdev-proc-nbs
	$(BIN)/python tests/site_check.py --proc _proc --out runs/site

clean:
	rm -rf .nbval runs _docs _proc
