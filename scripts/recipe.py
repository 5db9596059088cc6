"""Train an image classifier with the fast.ai lesson-2 recipe: `python scripts/recipe.py --help`.

The same command as the installed `fastlesson-recipe`; the options come from RecipeConfig's fields
(fastlesson/cli.py builds them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fastlesson.cli import recipe_main  # noqa: E402

main = recipe_main  # the name tests and older callers use

if __name__ == "__main__":
    sys.exit(recipe_main(prog="scripts/recipe.py"))
