"""Build a clean image data set (train/ and valid/ class folders) from a web image search or a URL list.

Every URL ends up in `manifest.json` with a status; see `STATUSES`. Pipeline: search (or --from-urls) ->
download (concurrent, bounded) -> verify and normalise -> deduplicate -> seeded split -> place files.
"""

from fastlesson.scrape.fetch import RETRY_HTTP, FetchResult, fetch_url, sniff_format
from fastlesson.scrape.image import JPEG_QUALITY, NormalisedImage, normalise_image, phash_distance
from fastlesson.scrape.pipeline import (
    MANIFEST,
    MANIFEST_VERSION,
    STAGING,
    STATUSES,
    ScrapeConfig,
    ScrapeResult,
    UrlEntry,
    assign_split,
    check_config,
    class_folder,
    dedupe,
    load_manifest,
    read_url_list,
    run_scrape,
    scrape_dataset,
)
from fastlesson.scrape.search import (
    DDGSBackend,
    QueryOutcome,
    SearchBackend,
    SearchHit,
    StaticBackend,
    search_with_retry,
)

__all__ = [
    # the pipeline (fastlesson.scrape.pipeline)
    "MANIFEST", "MANIFEST_VERSION", "STAGING", "STATUSES", "ScrapeConfig", "ScrapeResult", "UrlEntry",
    "assign_split", "check_config", "class_folder", "dedupe", "load_manifest", "read_url_list",
    "run_scrape", "scrape_dataset",
    # one download (fetch), one image (image), one search query (search)
    "RETRY_HTTP", "FetchResult", "fetch_url", "sniff_format",
    "JPEG_QUALITY", "NormalisedImage", "normalise_image", "phash_distance",
    "DDGSBackend", "QueryOutcome", "SearchBackend", "SearchHit", "StaticBackend", "search_with_retry",
]
