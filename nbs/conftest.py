"""pytest configuration for nbs/: notebooks executed by nbmake run on their small-data switch."""

import os

# Notebook kernels inherit this environment; each notebook's first cell reads the switch.
os.environ.setdefault("FASTLESSON_SMALL", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
