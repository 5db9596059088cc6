"""Predict image classes with a model exported by scripts/recipe.py (see fastlesson/predict.py).

    python scripts/predict.py RUN_DIR photo.jpg more_photos/ [--json] [--tta] [--backend onnx|torch]
"""

import sys

from fastlesson.predict import predict_main

if __name__ == "__main__":
    sys.exit(predict_main(prog="scripts/predict.py"))
