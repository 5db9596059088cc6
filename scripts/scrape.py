"""Build a clean image data set from a web image search: `python scripts/scrape.py daisy horse --dest data/dh`.

The same command as the installed `fastlesson-scrape`; the options come from ScrapeConfig's fields
(fastlesson/cli.py builds them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fastlesson.cli import scrape_main  # noqa: E402

main = scrape_main

if __name__ == "__main__":
    sys.exit(scrape_main(prog="scripts/scrape.py"))
