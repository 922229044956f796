"The book's structure: every notebook is in the site, starts with a title, and chapters have a Colab badge."
import re

import nbformat
import pytest
import yaml

from conftest import ROOT

QUARTO = (ROOT / "nbs" / "_quarto.yml").read_text()
CHAPTERS = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))
TOOLKIT = sorted((ROOT / "nbs" / "toolkit").glob("*.ipynb"))

def _entries(items):
    "Every file named in a Quarto sidebar `contents` tree, in order."
    for it in items:
        if isinstance(it, str): yield it
        elif "href" in it: yield it["href"]
        elif "contents" in it: yield from _entries(it["contents"])

def _listed():
    cfg = yaml.safe_load(QUARTO)
    return list(_entries(cfg["website"]["sidebar"]["contents"]))

def test_site_config_is_valid_and_names_only_existing_files():
    cfg = yaml.safe_load(QUARTO)
    assert cfg["project"]["type"] == "website"
    listed = _listed()
    assert listed[0] == "index.ipynb" and len(listed) == len(set(listed))
    assert all((ROOT / "nbs" / f).exists() for f in listed), [f for f in listed if not (ROOT / "nbs" / f).exists()]
    sections = [s["section"] for s in cfg["website"]["sidebar"]["contents"] if "section" in s]
    assert sections == ["Chapters", "Toolkit"]

def test_there_are_chapters_and_toolkit_notebooks():
    assert CHAPTERS and len(TOOLKIT) >= 5

@pytest.mark.parametrize("nb", CHAPTERS + TOOLKIT + [ROOT / "nbs" / n for n in ("index.ipynb", "instructors.ipynb", "protocol.ipynb")],
                         ids=lambda p: p.stem)
def test_notebook_is_in_the_sidebar_and_has_a_title(nb):
    rel = nb.relative_to(ROOT / "nbs").as_posix()
    assert rel in _listed(), f"{rel} is not listed in nbs/_quarto.yml"
    first = _cells(nb)[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{rel} must start with a '# ' title"

def _cells(nb):
    "The notebook's cells after an optional leading raw cell of Quarto front matter (e.g. `draft: true`)."
    cells = nbformat.read(nb, as_version=4).cells
    return cells[1:] if cells and cells[0].cell_type == "raw" and cells[0].source.startswith("---") else cells

@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_colab_badge_for_itself(nb):
    "The badge opens this notebook, in a cell of its own: nbdev turns the title cell into page metadata, badge and all."
    cells = _cells(nb)
    assert "colab-badge.svg" not in cells[0].source
    badge = cells[1].source
    assert cells[1].cell_type == "markdown" and "colab-badge.svg" in badge and f"blob/main/nbs/{nb.name}" in badge

def test_chapters_are_listed_in_reading_order():
    listed = [f for f in _listed() if re.fullmatch(r"\d\d_\w+\.ipynb", f)]
    assert listed == sorted(listed) and set(listed) == {p.name for p in CHAPTERS}

def test_nbdev_settings():
    import tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    nbdev = cfg["tool"]["nbdev"]
    assert nbdev["nbs_path"] == "nbs" and nbdev["doc_path"] == "_docs" and nbdev["tst_flags"] == "notest slow"
    assert "nbgrader" in nbdev["allowed_cell_metadata_keys"] and "colab" in nbdev["allowed_metadata_keys"]
    assert cfg["project"]["scripts"]["ssl-book"] == "ssl_book.cli:main"

def _code(cell) -> "ast.Module | None":
    "The cell's Python (directives, magics and shell lines dropped), or None where it does not parse."
    import ast
    lines = [l for l in cell.source.split("\n") if not l.lstrip().startswith(("#|", "!", "%"))]
    try: return ast.parse("\n".join(lines))
    except SyntaxError: return None

def _imported(node) -> dict[str, str]:
    "{bound name: what it names} for an import statement; relative and package-absolute imports of ours agree."
    import ast
    if isinstance(node, ast.Import): return {(a.asname or a.name).split(".")[0]: a.name for a in node.names}
    base = "ssl_book." * (node.level > 0) + (node.module or "")
    return {a.asname or a.name: f"{base}.{a.name}" for a in node.names}

def _bindings(tree) -> dict[str, str | None]:
    """Names a cell binds at module level (in loops and branches too; not inside functions, classes, lambdas or
    comprehensions), each with what an import binds it to, or None for any other binding."""
    import ast
    out = {}
    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out[node.name] = None; return
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)): return
        if isinstance(node, (ast.Import, ast.ImportFrom)): out.update(_imported(node)); return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store): out[node.id] = None
        if isinstance(node, ast.ExceptHandler) and node.name: out[node.name] = None
        for child in ast.iter_child_nodes(node): visit(child)
    visit(tree)
    return out

@pytest.mark.parametrize("nb", CHAPTERS + TOOLKIT, ids=lambda p: p.stem)
def test_no_cell_rebinds_a_name_the_exported_code_reads(nb):
    """In a notebook, exported functions look their helpers up in the notebook's namespace. A later cell that binds
    the same name to something else (an exercise's `_out = ...`, a `def predict`, an import of another `split`) breaks
    them for every cell after it: in the package all is well, so only a reader running the chapter top to bottom sees
    the error. Importing the same object again is fine."""
    import ast
    exported, read, rebound = {}, set(), {}
    for cell in _cells(nb):
        tree = _code(cell) if cell.cell_type == "code" else None
        if tree is None: continue
        if cell.source.startswith("#| export"):
            for node in tree.body:                        # the module-level names the package defines or imports
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): exported[node.name] = None
                elif isinstance(node, (ast.Import, ast.ImportFrom)): exported.update(_imported(node))
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                        exported.update({n.id: None for n in ast.walk(t) if isinstance(n, ast.Name)})
            read |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            read |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
        else:
            for name, what in _bindings(tree).items():
                if name in exported and name in read and (what is None or what != exported[name]):
                    rebound.setdefault(name, []).append(cell.get("id"))
    assert not rebound, f"cells rebind names that exported code reads (rename them): {rebound}"
