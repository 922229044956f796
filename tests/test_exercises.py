"The exercise convention: student copies hide solutions; the instructor's checks pass and the student's fail."
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from ssl_book.exercises import (exercise_cells, exercise_summary, is_check_cell, is_solution_cell, make_student_copy,
                                strip_solutions)
from conftest import ROOT

CHAPTERS = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))

def test_strip_solutions_keeps_indent_and_rest():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\nprint('after')"
    assert strip_solutions(src) == "def f(x):\n    y = 1\n    raise NotImplementedError()\nprint('after')"
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

@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_student_checks_fail_with_not_implemented(nb, tmp_path):
    """The student copy's check cells fail until the student answers. Only the exercises' slice of the chapter runs:
    nbval has already run the instructor's copy, solutions and checks included, in full."""
    student = nbformat.read(make_student_copy(nb, tmp_path / "student"), as_version=4)
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
