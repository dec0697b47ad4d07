"""`mllm view`: `mllm eval` results as a static HTML report, item by item, in a browser.

One job per module: `results` (read a result's metrics JSON and its records JSONL, and find each item's
image by loading the benchmark the result names), `views` (per benchmark, a registry: what an item shows,
which facets it is filtered by, how items pair up, the summary panels), `thumbs` (thumbnails beside the
report) and `page` (cards, order, the HTML). The report is one `index.html` and a `thumbs/` folder: no
server, no network, nothing from a CDN; it opens from disk.
"""

from mllm.viewer.page import build_view

__all__ = ["build_view"]
