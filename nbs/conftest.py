"""pytest configuration for nbs/: notebooks executed by nbmake run on their small-data switch."""

import os
import tempfile

# Notebook kernels inherit this environment; each notebook's first cell reads the switch.
os.environ.setdefault("FASTLESSON_SMALL", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# reduced copies of big photos (fastlesson.data's image cache) go to a folder of this run, not ~/.cache
os.environ.setdefault("FASTLESSON_CACHE", tempfile.mkdtemp(prefix="fastlesson-nb-cache-"))
