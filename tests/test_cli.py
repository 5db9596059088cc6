"""The command lines, run as a user would: scripts/recipe.py (--help, --smoke) and scripts/predict.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastlesson.recipe import RecipeConfig

from _recipe_helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# one thread: tiny images gain nothing from more, and on a busy CPU two threads crawl
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


def script_main(script: str):
    """The `main(argv)` of scripts/<script>, imported from its file (in-process: no import cost)."""
    spec = importlib.util.spec_from_file_location(f"_cli_{script[:-3]}", ROOT / "scripts" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def cli(script: str, *args, check: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} {args} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python scripts/recipe.py --smoke` on a small image folder."""
    data = write_image_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "smoke"
    res = cli("recipe.py", "--smoke", "--data", data, "--out", out, "--opt", "sgd", check=True)
    return res, out, data


def test_recipe_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        script_main("recipe.py")(["--help"])  # in-process: the --smoke test runs the file itself
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--data", "--arch", "--size", "--bs", "--opt", "--epochs-max", "--seed", "--out",
                 "--no-precompute", "--no-pretrained", "--hard-mining", "--lr-factor", "--no-tta", "--valid-every-epoch", "--smoke"):
        assert flag in out
    assert "lookahead-radam" in out and "sample" in out


def test_recipe_flags_reach_the_config():
    parse = script_main("recipe.py").__globals__["parse_args"]
    assert parse([]) == RecipeConfig()  # no arguments: the offline default (sample data, lite0)
    cfg = parse(["--data", "flowers", "--arch", "resnet34", "--size", "224", "--bs", "16", "--opt", "ranger",
                 "--epochs-max", "15", "--seed", "1", "--out", "o", "--no-precompute", "--no-pretrained",
                 "--hard-mining", "0.25", "--lr-factor", "10", "--no-tta", "--valid-every-epoch", "--smoke"])
    assert cfg == RecipeConfig(data="flowers", arch="resnet34", size=224, bs=16, opt="ranger", epochs_max=15,
                               seed=1, out="o", precompute=False, pretrained=False, hard_mining=0.25,
                               lr_factor=10.0, tta=False, valid_every_epoch=True, smoke=True)


def test_recipe_smoke_makes_every_output(smoke_run):
    res, out, _ = smoke_run
    for i in range(1, 9):
        assert f"Step {i}/8:" in res.stdout
    for name in ("config.json", "metrics.json", "history.csv", "report.md", "model.json",
                 "model.safetensors", "export.pkl", "lr_schedule.png", "losses.png"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["opt"] == "sgd" and cfg["smoke"] is True  # the CLI's choices reach the config


def test_recipe_bad_input_is_one_clear_line(tmp_path, capsys):
    main = script_main("recipe.py")
    assert main(["--data", str(tmp_path / "missing"), "--smoke", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error:") and "missing" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["--opt", "adamw"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_predict_json_reports_bad_files_and_predicts_the_rest(smoke_run, tmp_path):
    _, out, data = smoke_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00not a jpeg")
    res = cli("predict.py", out, data / "valid", broken, "--json", check=True)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    good = [r for r in rows if "error" not in r]
    bad = [r for r in rows if "error" in r]
    assert len(good) == len(list((data / "valid").rglob("*.jpg"))) and len(bad) == 1
    assert bad[0]["path"] == str(broken) and str(broken) in res.stderr
    classes = json.loads((out / "model.json").read_text())["classes"]
    for r in good:
        assert set(r) == {"path", "label", "prob", "top5"}
        assert r["label"] in classes and r["top5"][0] == [r["label"], r["prob"]]
        assert len(r["top5"]) == min(5, len(classes))


def test_predict_exit_code_when_nothing_predicted(smoke_run, tmp_path, capsys):
    _, out, _ = smoke_run
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    assert script_main("predict.py")([str(out), str(broken), str(tmp_path / "absent.jpg")]) == 1
    assert "no image could be predicted" in capsys.readouterr().err


def test_predict_pickle_needs_trust_and_then_agrees(smoke_run, tmp_path, capsys):
    _, out, data = smoke_run
    main = script_main("predict.py")
    assert main([str(out / "export.pkl"), str(data / "valid"), "--json"]) == 2
    captured = capsys.readouterr()
    assert "--trust-pickle" in captured.err and not captured.out.strip()
    img = tmp_path / "rgba.png"
    Image.open(next((data / "valid").rglob("*.jpg"))).convert("RGBA").save(img)
    args = [str(data / "valid"), str(img), "--json", "--tta"]
    assert main([str(out), *args]) == 0
    safe = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert main([str(out / "export.pkl"), *args, "--trust-pickle"]) == 0
    pkl = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert len(safe) == len(pkl) == len(list((data / "valid").rglob("*.jpg"))) + 1
    assert [r["label"] for r in safe] == [r["label"] for r in pkl]
    for a, b in zip(safe, pkl):
        assert a["prob"] == pytest.approx(b["prob"], abs=1e-5)


@pytest.mark.parametrize("exc", ["missing_folder", "no_weights"])
def test_recipe_bad_input_is_one_error_line(exc, tmp_path, monkeypatch, capsys):
    """A missing data folder or unavailable pretrained weights: one `error:` paragraph, exit 2, no traceback."""
    from fastlesson.models import WeightsUnavailableError

    main = script_main("recipe.py")
    if exc == "no_weights":
        def no_weights(cfg):
            raise WeightsUnavailableError("No ImageNet weights for resnet50 here: use --arch tf_efficientnet_lite0")
        monkeypatch.setitem(main.__globals__, "run_recipe", no_weights)
        args = ["--arch", "resnet50"]
    else:
        args = ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert ("nope" in err) if exc == "missing_folder" else ("tf_efficientnet_lite0" in err)
    assert not (tmp_path / "out").exists()  # nothing left behind
