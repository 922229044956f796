"""The site build, up to what Quarto is given: `nbdev-proc-nbs` on a clean copy, offline and without data.

nbdev executes every exported cell and every cell that contains an import while it prepares the pages. Those cells
must only import and define: a cell that loads data or trains would break the Pages build (or download CIFAR-10)."""
import ast, json, os, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = sorted(p.relative_to(ROOT / "nbs") for p in (ROOT / "nbs").rglob("*.ipynb")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts))
_SAFE = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_EXPORT = ("#| export", "#| exports", "#| exporti")


def _executed_by_nbdev(source: str) -> bool:
    "nbdev-proc-nbs runs exported cells and any cell with an import anywhere in it (nbdev.processors._do_eval)."
    if any(line.strip().startswith(_EXPORT) for line in source.splitlines()): return True
    try: tree = ast.parse(source)
    except SyntaxError: return False                   # magics and the like: nbdev does not run them either
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=str)
def test_cells_that_nbdev_executes_only_import_and_define(nb):
    """Outside exported cells, a cell with an import holds only imports and definitions (the Colab install cell,
    an `if` that does nothing outside Colab, is the one exception)."""
    bad = []
    for cell in nbformat.read(ROOT / "nbs" / nb, as_version=4).cells:
        src = cell.source
        if cell.cell_type != "code" or not _executed_by_nbdev(src): continue
        if any(line.strip().startswith(_EXPORT) for line in src.splitlines()): continue
        if "google.colab" in src: continue
        work = [type(n).__name__ for n in ast.parse(src).body if not isinstance(n, _SAFE)]
        if work: bad.append(f"{cell.get('id')}: {work} in {src.splitlines()[0][:60]!r}")
    assert not bad, f"put imports in a cell of their own (nbdev-proc-nbs runs these cells): {bad}"


CHAPTERS = [nb for nb in NOTEBOOKS if nb.parent == Path(".") and nb.stem[:2].isdigit()]

@pytest.mark.parametrize("nb", CHAPTERS, ids=str)
def test_figure_code_is_folded_on_the_site(nb):
    "A page leads with prose and figures: a cell that makes a figure folds its code (exported code stays visible)."
    unfolded = [c.get("id") for c in nbformat.read(ROOT / "nbs" / nb, as_version=4).cells
                if c.cell_type == "code" and ("plt.subplots(" in c.source or "plt.figure(" in c.source)
                and "#| code-fold:" not in c.source and "#| export" not in c.source and "BEGIN SOLUTION" not in c.source]
    assert not unfolded, f"add '#| code-fold: true' to the figure cells {unfolded}"


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    "The first step of the Pages build, `nbdev-proc-nbs`, on a copy with no data, an empty cache and no network."
    tmp_path = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs", ignore=shutil.ignore_patterns("results", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "bin").mkdir(); (tmp_path / "home").mkdir()
    quarto = tmp_path / "bin" / "quarto"               # nbdev offers to install Quarto when it is missing: it is not
    quarto.write_text("#!/bin/sh\nexit 0\n"); quarto.chmod(0o755)    # needed for this step, so a stand-in answers
    dead = "http://127.0.0.1:9"                        # nothing listens there: any download fails at once
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path / "home"),
           "SSL_BOOK_CACHE": str(tmp_path / "home" / "cache"), "SSL_BOOK_DATA": str(tmp_path / "home" / "none"),
           "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    env.pop("SSL_BOOK_PRESET", None)                   # the build runs with the reader's default preset
    exe = Path(sys.executable).with_name("nbdev-proc-nbs")
    run = subprocess.run([str(exe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    return run, tmp_path / "_proc"


@pytest.mark.slow
def test_nbdev_proc_nbs_processes_every_notebook_offline(proc):
    run, out = proc
    assert run.returncode == 0, run.stderr[-3000:]
    processed = {p.relative_to(out) for p in out.rglob("*.ipynb")}
    assert set(NOTEBOOKS) <= processed, f"not processed: {sorted(map(str, set(NOTEBOOKS) - processed))}"
    # the pages show exercises as students get them: no solution marker, and no line of any answer
    for nb in NOTEBOOKS:
        cells = json.loads((out / nb).read_text())["cells"]
        page = "\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells)
        markers = [l for l in page.splitlines() if l.strip() in ("### BEGIN SOLUTION", "### END SOLUTION")]
        assert not markers or nb == Path("toolkit/exercises.ipynb"), f"{nb}: solution markers on the page"   # it explains them
        leaked = [line for line in _answer_lines(ROOT / "nbs" / nb) if line in page]
        assert not leaked, f"{nb}: answer lines on the page: {leaked[:3]}"


@pytest.mark.slow
def test_every_page_renders_in_a_browser(proc, tmp_path, capsys):
    "tests/site_check.py (`make site-check`): every image loads, no solution markers, the TeX is there."
    import site_check
    if site_check.browser() is None: pytest.skip("no Chromium here (apt-get install chromium); `make site-check` needs it")
    run, out = proc
    assert run.returncode == 0
    rc = site_check.main(["--proc", str(out), "--out", str(tmp_path), "--screenshots"])
    assert rc == 0, capsys.readouterr().out


def _answer_lines(path: Path) -> list[str]:
    "The distinctive lines inside the notebook's BEGIN/END SOLUTION regions (long enough not to occur elsewhere)."
    out = []
    for cell in nbformat.read(path, as_version=4).cells:
        inside = False
        for line in cell.source.splitlines():
            if line.strip() == "### BEGIN SOLUTION": inside = True
            elif line.strip() == "### END SOLUTION": inside = False
            elif inside and len(line.strip()) >= 40: out.append(line.strip())
    return out
