"""fastlesson: the fast.ai lesson-2 recipe, reproduced and repaired on top of fastai.

The public API is re-exported here explicitly: plain functions that take a fastai ``Learner``.
"""

__version__ = "0.1.0"

# --- core: finder ---
# --- end core: finder ---
# --- core: schedule ---
# --- end core: schedule ---
# --- core: optim ---
# --- end core: optim ---
# --- core: precompute ---
# --- end core: precompute ---
# --- recipe: data ---
# --- end recipe: data ---
# --- recipe: models ---
# --- end recipe: models ---
# --- recipe: recipe/report/export ---
# --- end recipe: recipe/report/export ---
# --- seed extras: callbacks ---
# --- end seed extras: callbacks ---
# --- seed extras: smallcnn/sweep ---
# --- end seed extras: smallcnn/sweep ---
# --- scrape ---
# --- end scrape ---
