"""Build a clean image data set from a web image search: `python scripts/scrape.py daisy horse --dest data/dh`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fastlesson.scrape import ScrapeConfig, run_scrape  # noqa: E402

HELP = {
    "n_images": "search results asked for, per class",
    "query_suffix": 'appended to each query, e.g. "photo"',
    "type_image": "search filter: photo | clipart | gif | transparent | line ('' for none)",
    "size": "search filter: Small | Medium | Large | Wallpaper",
    "license_image": "search filter: any | Public | Share | ShareCommercially | Modify | ModifyCommercially",
    "from_urls": 'JSON {"class": [urls]}, CSV class,url[,source,license], or a previous manifest.json',
    "valid_pct": "fraction of each class put in valid/",
    "max_size": "px, longer side of saved JPEGs",
    "min_size": "px, reject images whose shorter side is smaller",
    "max_bytes": "bytes, largest download accepted",
    "max_pixels": "px, decompression-bomb cap (width*height)",
    "timeout": "s, per connect/read",
    "max_seconds": "s, whole download of one URL",
    "retries": "extra attempts per URL on transient errors",
    "near_dup_bits": "phash Hamming distance (of 64 bits) counted as near-duplicate",
    "min_per_class": "exit 1 if a class keeps fewer images",
}


def parse_args(argv=None) -> ScrapeConfig:
    """ScrapeConfig from the command line; every field is an option with the dataclass default."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("classes", nargs="*", help="class names, used as search queries and folder names")
    for f in fields(ScrapeConfig):
        if f.name in ("classes", "progress"):
            continue
        default = getattr(ScrapeConfig(), f.name)
        typ = {int: int, float: float}.get(type(default), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=default,
                       help=f"{HELP.get(f.name, '')} (default: {default})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = vars(p.parse_args(argv))
    for k in ("type_image", "size", "license_image", "from_urls"):
        args[k] = args[k] or None  # '' switches a filter off
    return ScrapeConfig(**args)


if __name__ == "__main__":
    sys.exit(run_scrape(parse_args()))
