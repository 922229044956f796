"The exercise convention: student copies hide solutions; the instructor's checks pass and the student's fail."
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from ssl_book.exercises import (exercise_cells, exercise_summary, grading_manifest, is_check_cell, is_solution_cell,
                                make_student_copy, release_book, strip_solutions)
from conftest import ROOT

CHAPTERS = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))

def test_strip_solutions_keeps_indent_and_rest():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\nprint('after')"
    assert strip_solutions(src) == "def f(x):\n    y = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\nprint('after')"
    assert strip_solutions("### BEGIN SOLUTION\nanswer\n### END SOLUTION", code=False) == "YOUR ANSWER HERE"

@pytest.mark.parametrize("src", ["### BEGIN SOLUTION\nx", "x\n### END SOLUTION",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"])
def test_unbalanced_markers_are_errors(src):
    with pytest.raises(ValueError):
        strip_solutions(src)

def test_student_copy_clears_exercise_outputs(tmp_path):
    meta_sol = {"nbgrader": {"solution": True, "grade": False, "grade_id": "s", "locked": False}}
    meta_chk = {"nbgrader": {"solution": False, "grade": True, "grade_id": "c", "locked": True, "points": 1}}
    out = [nbformat.v4.new_output("stream", name="stdout", text="correct\n")]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print('setup')", outputs=list(out)),
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION", metadata=meta_sol, outputs=list(out)),
        nbformat.v4.new_code_cell("assert f() == 1; print('correct')", metadata=meta_chk, outputs=list(out))])
    nbformat.write(nb, tmp_path / "ex.ipynb")
    cells = nbformat.read(make_student_copy(tmp_path / "ex.ipynb", tmp_path / "out"), as_version=4).cells
    assert cells[0].outputs and not cells[1].outputs and not cells[2].outputs
    assert "raise NotImplementedError()" in cells[1].source and cells[2].metadata["nbgrader"]["locked"]

def test_notebook_without_solutions_is_an_error(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(nb, tmp_path / "a.ipynb")
    with pytest.raises(ValueError, match="nothing to hide"):
        make_student_copy(tmp_path / "a.ipynb", tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        make_student_copy(tmp_path / "missing.ipynb", tmp_path / "out")

@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_has_exercises(nb):
    counts = exercise_summary(nb)
    assert counts["solutions"] >= 4 and counts["checks"] >= 2, counts

def test_exercise_cells_keep_what_the_exercises_use_and_skip_the_rest():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import math"), nbformat.v4.new_code_cell("data = list(range(5))"),
        nbformat.v4.new_code_cell("model = train_for_an_hour(data)"),
        nbformat.v4.new_code_cell("def helper(x):\n    return math.sqrt(x) + offset"),
        nbformat.v4.new_code_cell("offset = 1"),
        nbformat.v4.new_code_cell("%matplotlib inline"),
        nbformat.v4.new_code_cell("def total(xs):\n    ### BEGIN SOLUTION\n    return sum(xs)\n    ### END SOLUTION",
                                  metadata={"nbgrader": {"solution": True}}),
        nbformat.v4.new_code_cell("assert total(data) == 10 and helper(4) == 3", metadata={"nbgrader": {"grade": True}})])
    # cell 2 (the training) is skipped; 3 is used by the check, and 4 by 3's function body; 5 is not Python: kept
    assert exercise_cells(nb) == [0, 1, 3, 4, 5, 6, 7]

def _execute(nb, cwd):
    env_before = os.environ.get("SSL_BOOK_PRESET")
    os.environ["SSL_BOOK_PRESET"] = "tiny"
    try:
        NotebookClient(nb, timeout=600, allow_errors=True, kernel_name="python3",
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        if env_before is None: os.environ.pop("SSL_BOOK_PRESET")
        else: os.environ["SSL_BOOK_PRESET"] = env_before
    return nb

def _errors(cell):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    "The whole book released as an instructor would: `release_book(nbs/)`."
    out = tmp_path_factory.mktemp("release")
    return out, release_book(ROOT / "nbs", out)

def test_release_has_every_chapter_and_a_manifest_row_per_exercise(release):
    import csv
    out, manifest = release
    assert sorted(p.name for p in out.glob("*.ipynb")) == [p.name for p in CHAPTERS]
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == sum(exercise_summary(nb)["solutions"] for nb in CHAPTERS)
    for nb in CHAPTERS:
        mine = [r for r in rows if r["chapter"] == nb.name]
        cells = nbformat.read(nb, as_version=4).cells
        checks = sorted(c.metadata["nbgrader"]["grade_id"] for c in cells if is_check_cell(c) and not is_solution_cell(c))
        assert sorted(r["check"] for r in mine if r["kind"] == "auto-checked") == checks     # every check cell, once
        written = [c for c in cells if c.cell_type == "markdown" and is_solution_cell(c)]
        assert sum(r["kind"] == "written" for r in mine) == len(written)

def test_manifest_kinds_on_a_small_notebook(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION",
                                  metadata={"nbgrader": {"solution": True, "grade": False, "grade_id": "ex1"}}),
        nbformat.v4.new_code_cell("import math"),                              # a plain cell between answer and check
        nbformat.v4.new_code_cell("assert f() == 1", metadata={"nbgrader": {"grade": True, "solution": False,
                                                                             "grade_id": "ex1-check", "points": 3}}),
        nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 2\n### END SOLUTION",
                                  metadata={"nbgrader": {"solution": True, "grade": False, "grade_id": "ex2"}}),
        nbformat.v4.new_markdown_cell("### BEGIN SOLUTION\nbecause\n### END SOLUTION",
                                      metadata={"nbgrader": {"solution": True, "grade": True, "grade_id": "ex3",
                                                             "points": 2}})])
    nbformat.write(nb, tmp_path / "ch.ipynb")
    rows = grading_manifest(tmp_path / "ch.ipynb")
    assert [(r["exercise"], r["kind"], r["check"], r["points"]) for r in rows] == [
        ("ex1", "auto-checked", "ex1-check", 3), ("ex2", "by hand (code)", None, 0), ("ex3", "written", None, 2)]
    with pytest.raises(ValueError, match="not a folder"):
        release_book(tmp_path / "ch.ipynb", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to release"):
        release_book(tmp_path / "empty", tmp_path / "out")

@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_student_checks_fail_with_not_implemented(nb, release):
    """The released copy's check cells fail until the student answers. Only the exercises' slice of the chapter runs:
    nbval has already run the instructor's copy, solutions and checks included, in full."""
    student = nbformat.read(release[0] / nb.name, as_version=4)
    assert "### BEGIN SOLUTION" not in "".join(c.source for c in student.cells)
    keep = exercise_cells(student)
    student.cells = [c for i, c in enumerate(student.cells) if i in keep]
    run = _execute(student, nb.parent)
    checks = [c for c in run.cells if is_check_cell(c) and c.cell_type == "code"]
    assert checks and all(any(e["ename"] == "NotImplementedError" for e in _errors(c)) for c in checks)
    others = [c.source[:60] for c in run.cells if _errors(c) and not (is_check_cell(c) or is_solution_cell(c))]
    assert not others, f"cells of the exercises' slice failed (a missing dependency?): {others}"


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_every_code_solution_compiles(nb):
    "Solutions that train several models carry NBVAL_SKIP; they must still be valid Python."
    import ast
    for c in nbformat.read(nb, as_version=4).cells:
        if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source:
            ast.parse(c.source)


def test_nbgrader_generate_assignment_agrees_with_our_student_copy(tmp_path):
    "nbgrader's own generator, run on a chapter, writes the same student notebook as `make_student_copy`."
    pytest.importorskip("nbgrader", reason="nbgrader is a test extra: pip install -e '.[dev]'")
    import subprocess
    nb = ROOT / "nbs" / "03_consistency.ipynb"
    (tmp_path / "source" / "ch03").mkdir(parents=True)
    (tmp_path / "source" / "ch03" / nb.name).write_bytes(nb.read_bytes())
    exe = os.path.join(os.path.dirname(sys.executable), "nbgrader")
    run = subprocess.run([exe, "generate_assignment", "ch03", f"--CourseDirectory.root={tmp_path}", "--no-db", "--force"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = nbformat.read(tmp_path / "release" / "ch03" / nb.name, as_version=4).cells
    ours = nbformat.read(make_student_copy(nb, tmp_path / "ours"), as_version=4).cells
    assert [c.source for c in ours] == [c.source for c in theirs]
    keys = ("grade_id", "solution", "grade", "locked", "points")
    meta = lambda cells: [{k: c.metadata.get("nbgrader", {}).get(k) for k in keys} for c in cells]
    assert meta(ours) == meta(theirs)


# What each check must not call: the package's (or a library's) implementation of the very function the student writes.
# A student could call it and pass; the checks compare with fixed values and properties instead.
REFERENCES = {
    "01_introduction": {"ex2-check": ["F.cross_entropy"], "ex3-check": ["lr_factor"]},
    "02_assumptions": {"ex1-check": ["propagation_step"], "ex2-check": ["_scipy_entropy", "scipy"]},
    "03_consistency": {"ex1-check": ["sigmoid_rampup"], "ex2-check": ["fixmatch_loss"], "ex3-check": ["sharpen"]},
    "04_pseudo_labels": {"ex1-check": ["lee_alpha"], "ex2-check": ["select_pseudo_labels"]},
    "05_mixmatch": {"ex1-check": ["sharpen"], "ex2-check": ["mixup"]},
    "06_noisy_student": {"ex1-check": ["distill_loss", "kl_div"], "ex2-check": ["balance_weights"]},
    "07_simclr": {"ex1-check": ["nt_xent", "NTXentLoss", "cross_entropy"], "ex2-check": ["uniformity", "pdist"]},
    "09_robustness": {"ex1-check": ["contrast"], "ex2-check": ["motion_kernel"], "ex3-check": ["mce"]},
}

@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_checks_do_not_compare_with_a_reference_the_student_could_call(nb):
    checks = {c.metadata["nbgrader"]["grade_id"]: c.source for c in nbformat.read(nb, as_version=4).cells
              if c.cell_type == "code" and is_check_cell(c) and not is_solution_cell(c)}
    for check, names in REFERENCES.get(nb.stem, {}).items():
        called = [n for n in names if re.search(rf"(?<![\w]){re.escape(n)}\b", checks[check])]   # not my_<name>
        assert not called, f"{nb.stem} {check} uses {called}: compare with fixed values or properties instead"
