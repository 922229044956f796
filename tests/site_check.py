"""Render the processed pages and look at them in a real browser: `make site-check`.

Quarto cannot be installed on the project's machines, so this renders what Quarto would be given (`nbdev-proc-nbs`
output in `_proc/`) with nbconvert's HTML exporter instead, and opens every page in headless Chromium (Debian's
`chromium` package). A script added to each page reports, once the page has loaded:

- figures that failed to load (every figure is an embedded PNG, so none should; linked images such as the Colab
  badge need the network and are not counted);
- solution markers (`### BEGIN SOLUTION`) in the rendered prose, where a written answer would show as a heading;
- whether the TeX of the page's markdown survived (MathJax is not fetched offline, so the check is that the source
  is there, in the rendered prose and not only in code).

Usage: python tests/site_check.py [--proc _proc] [--out runs/site] [--screenshots 01_introduction 03_consistency ...]
Writes one HTML file per page into --out, prints one line per page and exits 1 if any page fails.
"""
from __future__ import annotations
import argparse, json, re, shutil, subprocess, sys
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const prose = [...document.querySelectorAll(".jp-RenderedMarkdown")].map(e => e.innerText).join(" ");
  const local = imgs.filter(i => !/^https?:/.test(i.getAttribute("src") || ""));   // figures; not the Colab badge
  const report = {images: local.length, broken: local.filter(i => !(i.complete && i.naturalWidth > 0)).length,
                  markers: /^\\s*#* *(BEGIN|END) SOLUTION\\s*$/m.test(prose),
                  tex: /\\$\\$|\\\\\\(|\\$[^$\\s][^$]*\\$/.test(prose)};
  const pre = document.createElement("pre"); pre.id = "site-check"; pre.style.display = "none";
  pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
});
</script>"""


def browser() -> str | None:
    "The Chromium executable, if one is installed."
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def render(nb: Path, out: Path) -> Path:
    "The notebook as one self-contained HTML page (nbconvert's lab template), with the probe before </body>."
    from nbconvert import HTMLExporter
    import nbformat
    raw = json.loads(nb.read_text())
    for c in raw["cells"]:                     # nbdev's own keys (timings, show_doc flags): not nbformat, Quarto ignores them
        c.get("metadata", {}).pop("execution", None); c.pop("has_sd", None)
    raw.get("metadata", {}).pop("widgets", None)   # else nbconvert adds the widget manager from unpkg.com: no load event offline
    book = nbformat.reads(json.dumps(raw), as_version=4)
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(book)
    page = out / nb.with_suffix(".html").name
    page.write_text(html.replace("</body>", PROBE + "\n</body>"))
    return page


def _chromium(exe: str, *args: str) -> str:
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def check(exe: str, page: Path) -> dict:
    "Load the page in Chromium and return the probe's report (None fields if the probe never ran)."
    dom = _chromium(exe, "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri())
    m = re.search(r'<pre id="site-check"[^>]*>(.*?)</pre>', dom, re.S)
    return json.loads(m.group(1).replace("&quot;", '"')) if m else {"images": None, "broken": None, "markers": None, "tex": None}


def screenshot(exe: str, page: Path, png: Path, size: str = "1280,1600") -> Path:
    _chromium(exe, f"--screenshot={png.resolve()}", f"--window-size={size}", "--hide-scrollbars", page.resolve().as_uri())
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proc", default="_proc", help="nbdev-proc-nbs output (run `nbdev-proc-nbs` first)")
    ap.add_argument("--out", default="runs/site")
    ap.add_argument("--screenshots", nargs="*", default=["index", "03_consistency", "toolkit_presets"])
    a = ap.parse_args(argv)
    exe = browser()
    if exe is None:
        print("no Chromium here: install Debian's chromium package (apt-get install chromium)", file=sys.stderr)
        return 2
    proc, out = Path(a.proc), Path(a.out)
    notebooks = sorted(proc.rglob("*.ipynb"))
    if not notebooks: print(f"no notebooks under {proc}: run nbdev-proc-nbs first", file=sys.stderr); return 2
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for nb in notebooks:
        name = "_".join(nb.relative_to(proc).with_suffix("").parts)
        page = render(nb, out)
        page = page.rename(out / f"{name}.html")
        r = check(exe, page)
        ok = r["broken"] == 0 and r["markers"] is False
        md = " ".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown")
        needs_tex = bool(re.search(r"\$\$|\$[^$\s][^$]*\$", md))
        ok = ok and (r["tex"] or not needs_tex)
        print(f"{'ok  ' if ok else 'FAIL'} {name:<28} images {r['images']}, broken {r['broken']}, "
              f"solution markers {r['markers']}, TeX {'present' if r['tex'] else 'absent'}{' (expected)' if needs_tex else ''}")
        if not ok: failed.append(name)
        if name in a.screenshots: print(f"     screenshot {screenshot(exe, page, out / f'{name}.png')}")
    print(f"{len(notebooks) - len(failed)} of {len(notebooks)} pages pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
