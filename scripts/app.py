"""Serve a Gradio demo of a trained run (see fastlesson/app.py), or write it as a Hugging Face Space.

    python scripts/app.py RUN_DIR [--backend onnx|torch] [--port 7860] [--space DEST]
"""

import sys

from fastlesson.app import app_main

if __name__ == "__main__":
    sys.exit(app_main(prog="scripts/app.py"))
