"""The command lines, run as a user would: scripts/recipe.py (--help, --smoke), scripts/predict.py, and
the one CLI layer (fastlesson/cli.py): every config field an option, help from the field comments, one
error style (exit 2, one `error:` line) for the recipe, the scraper and the sweep, console scripts."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from fastlesson import cli as cli_mod
from fastlesson.cli import field_help, parse_recipe_args, recipe_main, scrape_main, sweep_main
from fastlesson.predict import predict_main
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
    def parse(argv):
        return parse_recipe_args(argv)[0]

    assert parse([]) == RecipeConfig()  # no arguments: the offline default (sample data, lite0)
    cfg = parse(["--data", "flowers", "--arch", "resnet34", "--size", "224", "--bs", "16", "--opt", "ranger",
                 "--epochs-max", "15", "--seed", "1", "--out", "o", "--no-precompute", "--no-pretrained",
                 "--hard-mining", "0.25", "--lr-factor", "10", "--no-tta", "--valid-every-epoch", "--smoke",
                 "--label-smoothing", "0.1"])
    assert cfg == RecipeConfig(data="flowers", arch="resnet34", size=224, bs=16, opt="ranger", epochs_max=15,
                               seed=1, out="o", precompute=False, pretrained=False, hard_mining=0.25,
                               lr_factor=10.0, tta=False, valid_every_epoch=True, smoke=True, label_smoothing=0.1)


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
    assert predict_main([str(out), str(broken), str(tmp_path / "absent.jpg")]) == 1
    assert "no image could be predicted" in capsys.readouterr().err


def test_predict_pickle_needs_trust_and_then_agrees(smoke_run, tmp_path, capsys):
    _, out, data = smoke_run
    main = predict_main
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



# ---------- the one CLI layer ----------

def one_error_line(err: str) -> str:
    """The single `error:` line of a failed command (progress lines such as torch's "Downloading" may
    precede it); fails on a traceback or on more than one error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


RECIPE_FIELDS = [f.name for f in dataclasses.fields(RecipeConfig)]
CHOICES = {"opt": "ranger", "log": "csv", "budget_cycles": "long"}


def non_default(name: str):
    """(argv, expected value) that sets field `name` of RecipeConfig to something other than its default."""
    tp = typing.get_type_hints(RecipeConfig)[name]
    default = getattr(RecipeConfig(), name)
    flag = "--" + name.replace("_", "-")
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if name in CHOICES:
        return [flag, CHOICES[name]], CHOICES[name]
    if base is bool:
        return ([f"--no-{name.replace('_', '-')}"], False) if default else ([flag], True)
    if base is int:
        value = 128 if default is None else default + 1  # None (off): a size below the default 160 px
        return [flag, str(value)], value
    if base is float:
        value = 0.5 if not default else default / 2  # None or 0.0: some other fraction
        return [flag, str(value)], value
    return [flag, "some-value"], "some-value"


@pytest.mark.parametrize("name", RECIPE_FIELDS)
def test_every_recipe_field_is_reachable_on_the_cli(name):
    argv, value = non_default(name)
    cfg, resume = parse_recipe_args(argv)
    assert getattr(cfg, name) == value != getattr(RecipeConfig(), name)
    assert cfg == dataclasses.replace(RecipeConfig(), **{name: value}) and resume is None


def test_old_flag_names_still_work_as_aliases():
    cfg, _ = parse_recipe_args(["--train-bn", "--no-precompute", "--no-pretrained", "--no-tta",
                                "--valid-every-epoch", "--smoke", "--freeze-to", "0"])
    assert cfg == RecipeConfig(bn_freeze=False, precompute=False, pretrained=False, tta=False,
                               valid_every_epoch=True, smoke=True, freeze_to=0)
    assert parse_recipe_args(["--no-bn-freeze"])[0].bn_freeze is False
    assert parse_recipe_args(["--hard-mining", "0.25", "--hard-mining", "none"])[0].hard_mining is None


def test_recipe_help_text_comes_from_the_field_comments(capsys):
    with pytest.raises(SystemExit):
        recipe_main(["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse re-wraps the text
    helps = field_help(RecipeConfig)
    for name in RECIPE_FIELDS:
        assert helps[name], f"RecipeConfig.{name} has no comment to take its help from"
        assert "".join(helps[name].split()) in out, name
    assert "".join("--head-cycles HEAD_CYCLES".split()) in out and "[default:2]" in out
    # a comment block above the field (freeze_to's) is its help when there is no trailing comment
    assert "freeze" in helps["freeze_to"].lower() or "unfreez" in helps["freeze_to"].lower()


@dataclass
class _Example:
    """A config written the way fastlesson's are."""

    n: int = 3  # batches, per step (100% of them)
    # a comment block
    # of two lines
    ratio: float | None = None
    names: list[str] = field(default_factory=list, metadata={"help": "from metadata"})
    flag: bool = True  # switch it off with --no-flag
    sizes: tuple[int, ...] = (1, 2)


def test_field_help_trailing_block_and_metadata():
    assert field_help(_Example) == {"n": "batches, per step (100% of them)",
                                    "ratio": "a comment block of two lines", "names": "from metadata",
                                    "flag": "switch it off with --no-flag", "sizes": ""}


def test_config_parser_types_and_defaults(capsys):
    p = cli_mod.config_parser(_Example, prog="ex")
    ns = p.parse_args(["--n", "4", "--ratio", "0.5", "--names", "a", "b", "--no-flag", "--sizes", "3", "4", "5"])
    assert cli_mod.config_from_args(_Example, ns) == _Example(n=4, ratio=0.5, names=["a", "b"], flag=False,
                                                              sizes=(3, 4, 5))
    assert cli_mod.config_from_args(_Example, p.parse_args([])) == _Example()
    p.print_help()
    out = capsys.readouterr().out
    assert "(100% of them) [default: 3]" in out and "--flag, --no-flag" in out and "[default: 1 2]" in out
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "three"])
    assert e.value.code == 2
    assert one_error_line(capsys.readouterr().err) == \
        "error: argument --n: invalid int value: 'three'; see ex --help"


@pytest.mark.parametrize("argv, names", [
    (["--size", "big"], ["--size", "'big'"]),
    (["--opt", "adamw"], ["--opt", "'adamw'", "invalid choice", "ranger"]),
    (["--log", "tb"], ["--log", "'tb'", "tensorboard"]),
    (["--budget-cycles", "halving"], ["--budget-cycles", "'halving'", "doubling, long"]),
    (["--no-such-flag"], ["--no-such-flag"]),
    (["--resume", "runs/x", "--size", "64"], ["--resume", "--size"]),
])
def test_recipe_bad_options_exit_2_with_one_line(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        recipe_main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert e.value.code == 2 and all(n in line for n in names) and "--help" in line


@pytest.mark.parametrize("argv, names", [
    (["--size", "8"], ["RecipeConfig.size=8", ">= 16"]),  # config validate(): before any data is read
    (["--freeze-to", "-1"], ["freeze_to=-1", ">= 0"]),
    (["--lr-find-iters", "10"], ["lr_find_iters=10", ">= 24"]),
])
def test_recipe_bad_config_value_is_one_line_and_writes_nothing(argv, names, tmp_path, capsys):
    assert recipe_main([*argv, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(n in line for n in names), line
    assert not (tmp_path / "out").exists()


def test_recipe_missing_data_folder(tmp_path, capsys):
    assert recipe_main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "nope" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_recipe_no_weights_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A real failure, offline: resnet50's ImageNet weights are neither cached nor downloadable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert recipe_main(["--arch", "resnet50", "--out", str(out), "--smoke"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "resnet50" in line and "--arch tf_efficientnet_lite0" in line
    assert not out.exists()  # nothing left behind


def test_resume_is_wired_to_resume_recipe(tmp_path, monkeypatch, capsys):
    import fastlesson.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "resume_recipe", lambda run_dir: calls.append(run_dir))
    (tmp_path / "run").mkdir()
    assert recipe_main(["--resume", str(tmp_path / "run")]) == 0 and calls == [str(tmp_path / "run")]
    assert recipe_main(["--resume", str(tmp_path / "absent")]) == 2
    assert "absent" in one_error_line(capsys.readouterr().err) and len(calls) == 1

    def refuse(run_dir):
        raise ValueError(f"{run_dir} is finished: nothing to resume; start a new run")

    monkeypatch.setattr(recipe, "resume_recipe", refuse)
    assert recipe_main(["--resume", str(tmp_path / "run")]) == 2
    assert "is finished" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_names_the_resume_command(tmp_path, monkeypatch, capsys):
    import fastlesson.recipe as recipe

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run_recipe", interrupted)
    assert recipe_main(["--out", str(tmp_path / "run")]) == 130
    assert f"--resume {tmp_path / 'run'}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert recipe_main([]) == 130  # no --out: the run folder is named before the run starts
    assert "--resume runs/sample-tf_efficientnet_lite0-" in capsys.readouterr().err


def test_resume_of_the_finished_smoke_run_is_refused_in_one_line(smoke_run, capsys):
    _, out, _ = smoke_run
    assert recipe_main(["--resume", str(out)]) == 2
    assert str(out) in one_error_line(capsys.readouterr().err)


# ---------- scrape ----------

def test_scrape_every_field_is_an_option_and_old_flags_work():
    from fastlesson.scrape import ScrapeConfig

    p = cli_mod.scrape_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for f in dataclasses.fields(ScrapeConfig):
        if f.name != "classes":
            assert "--" + f.name.replace("_", "-") in flags, f.name
    assert "--no-progress" in flags
    ns = p.parse_args(["daisy", "horse", "--dest", "d", "--n-images", "5", "--type-image", "", "--size", "Large",
                       "--timeout", "0.5", "--no-progress", "--from-urls", "u.json"])
    cfg = cli_mod.config_from_args(ScrapeConfig, ns)
    assert cfg == ScrapeConfig(classes=["daisy", "horse"], dest="d", n_images=5, type_image=None, size="Large",
                               timeout=0.5, progress=False, from_urls="u.json")
    assert cli_mod.config_from_args(ScrapeConfig, p.parse_args([])) == ScrapeConfig()


@pytest.mark.parametrize("argv, names", [
    (["--from-urls", "{tmp}/missing.json"], ["missing.json"]),
    ([], ["no classes"]),
    (["--from-urls", "{tmp}/bad.json"], ["bad.json", "JSON"]),
])
def test_scrape_bad_input_exit_2_one_line(argv, names, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert scrape_main([*argv, "--dest", str(tmp_path / "d"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(n in line for n in names), line


def test_scrape_bad_option_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        scrape_main(["daisy", "--max-size", "big"])
    assert e.value.code == 2 and "--max-size" in one_error_line(capsys.readouterr().err)


# ---------- sweep ----------

def test_sweep_every_field_is_an_option_and_grid_axes_take_lists():
    from fastlesson.sweep import SweepConfig

    p = cli_mod.sweep_parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for f in dataclasses.fields(SweepConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    ns = p.parse_args(["--data", "cifar10", "--lr", "1e-3", "3e-3", "--channels", "32,64", "64,128",
                       "--opt", "adam", "radam", "--limit", "8", "--out", "o", "--smoke", "--no-aug",
                       "--bs", "16", "--train-pct", "0.8"])
    cfg = cli_mod.config_from_args(SweepConfig, ns)
    assert cfg == SweepConfig(data="cifar10", lr=[1e-3, 3e-3], channels=["32,64", "64,128"], opt=["adam", "radam"],
                              limit=8, out="o", smoke=True, aug=False, bs=[16], train_pct=0.8)


@pytest.mark.parametrize("grid, names", [
    ("learning_rate: [0.1]\n", ["learning_rate", "valid keys"]),  # a bad key
    ("lr: [0.1\n", ["bad.yaml"]),  # not YAML
    ("- 0.1\n", ["mapping"]),  # YAML, but not a mapping
    (None, ["missing.yaml"]),  # no such file
])
def test_sweep_bad_grid_exit_2_one_line_nothing_written(grid, names, tmp_path, capsys):
    path = tmp_path / ("bad.yaml" if grid is not None else "missing.yaml")
    if grid is not None:
        path.write_text(grid)
    assert sweep_main(["--smoke", "--out", str(tmp_path / "o"), "--grid", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert all(n in line for n in names), line
    assert not (tmp_path / "o").exists()


def test_sweep_bad_option_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        sweep_main(["--lr", "fast"])
    assert e.value.code == 2 and "'fast'" in one_error_line(capsys.readouterr().err)


# ---------- console scripts ----------

@pytest.mark.parametrize("name", ["fastlesson-recipe", "fastlesson-scrape", "fastlesson-sweep"])
def test_console_script_entry_points(name):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    if name not in eps:
        pytest.skip("fastlesson is not installed with its [project.scripts] (pip install -e .)")
    assert eps[name] == f"fastlesson.cli:{name.split('-')[1]}_main"


def test_installed_console_script_runs_help():
    exe = shutil.which("fastlesson-scrape")
    if exe is None:
        pytest.skip("fastlesson-scrape is not on PATH (pip install -e .)")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0 and "--from-urls" in res.stdout and "usage: fastlesson-scrape" in res.stdout
