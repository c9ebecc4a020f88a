"""Render a local HTML page to PNG in Debian's Chromium (for the README's images).

    python scripts/screenshot.py PAGE.html OUT.png [--width 1400] [--full-page]
"""

import argparse
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page")
    ap.add_argument("out")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--full-page", action="store_true")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        page.goto(Path(a.page).resolve().as_uri())
        page.screenshot(path=a.out, full_page=a.full_page)
        browser.close()
    print(a.out)


if __name__ == "__main__":
    main()
