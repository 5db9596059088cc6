"""One command-line layer for the recipe, the scraper and the sweep, built from their config dataclasses.

Every field of the config becomes a `--field-name` option whose help is the field's comment in the class
source (the trailing one, or the comment block just above it) and whose default is the dataclass default.
Booleans get `--x/--no-x`; `X | None` fields take `none` (or '') for None; list and tuple fields take
several values. Bad input of any kind (an option, a config value, a missing file, unavailable weights, a
bad YAML grid) ends the command with exit status 2 and one line on stderr: `error: <what and the fix>`.

    fastlesson-recipe --help        (or python scripts/recipe.py --help)
    fastlesson-scrape --help
    fastlesson-sweep --help
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["field_help", "config_parser", "config_from_args", "one_line", "recipe_main", "scrape_main",
           "sweep_main", "USAGE_ERROR"]

USAGE_ERROR = 2  # exit status for bad input, argparse's own
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as a shell reports it
NONE_WORDS = ("none", "")  # what an `X | None` option takes for None


# ---------- help text from the class source ----------

def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, True when the comment is the whole line)."""
    out = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            out[row] = (text, not lines[row - 1][:col].strip())
    return out


def field_help(cls: type) -> dict[str, str]:
    """Each dataclass field's help: its trailing comment, else the comment block just above it, else
    `field(metadata={"help": ...})`, else ''. Read with ast + tokenize from the class source."""
    helps = {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. made at run time): metadata only
        return helps
    comments = _comments(source)
    tree = ast.parse(source)
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if name not in helps:
            continue
        trailing = comments.get(node.end_lineno)
        if trailing and not trailing[1]:
            text = trailing[0]
        else:  # the block of whole-line comments right above the field
            block, row = [], node.lineno - 1
            while row in comments and comments[row][1]:
                block.insert(0, comments[row][0])
                row -= 1
            text = " ".join(block)
        if text:
            helps[name] = text
    return helps


# ---------- types -> argparse ----------

def _split_optional(tp) -> tuple[object, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False). Unions of several types keep the first."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return tp, False


def _scalar(tp) -> Callable[[str], object]:
    """The converter for one value of type `tp` (int, float, str; Path and anything else as str)."""
    if tp is bool:
        return _parse_bool
    return tp if tp in (int, float) else str


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def _converter(conv, optional: bool, choices: Sequence | None):
    """Wraps `conv`: 'none'/'' -> None for optional fields, and a choices check that names the choices."""
    def convert(text: str):
        if optional and text.strip().lower() in NONE_WORDS:
            return None
        try:
            value = conv(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"invalid {getattr(conv, '__name__', 'value')} value: {text!r}") from None
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r}: use one of {', '.join(map(str, choices))}")
        return value
    convert.__name__ = getattr(conv, "__name__", "value")
    return convert


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(_show, value)) if value else "(none)"
    if value == "":
        return "''"
    return "none" if value is None else str(value)


class _Parser(argparse.ArgumentParser):
    """argparse with the one error style: `error: <message>; see <prog> --help` on one line, exit 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {one_line(message)}; see {self.prog} --help\n")


def config_parser(cls: type, *, prog: str | None = None, description: str | None = None,
                  skip: Iterable[str] = (), positional: Iterable[str] = (),
                  choices: Mapping[str, Sequence] | None = None,
                  aliases: Mapping[str, tuple[str, bool]] | None = None,
                  metavars: Mapping[str, str] | None = None,
                  helps: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one option per field of dataclass `cls` (except `skip`).

    `positional`: fields given without a flag (lists take any number). `choices`: allowed values per
    field. `aliases`: extra flag -> (bool field, value it sets), e.g. {"--train-bn": ("bn_freeze", False)}.
    `helps`: help for fields that have no comment. Defaults come from `cls()` and are shown in the help.
    """
    choices, aliases, metavars = dict(choices or {}), dict(aliases or {}), dict(metavars or {})
    skip, positional = set(skip), set(positional)
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {k: v or dict(helps or {}).get(k, "") for k, v in field_help(cls).items()}
    hints, default = typing.get_type_hints(cls), cls()
    alias_for = {}
    for flag, (name, value) in aliases.items():
        alias_for.setdefault(name, []).append((flag, value))
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        _add_field(p, f.name, hints[f.name], getattr(default, f.name), helps[f.name],
                   positional=f.name in positional, choices=choices.get(f.name),
                   metavar=metavars.get(f.name))
        for flag, value in alias_for.get(f.name, []):
            p.add_argument(flag, dest=f.name, action="store_const", const=value, default=argparse.SUPPRESS,
                           help=f"= --{'' if value else 'no-'}{f.name.replace('_', '-')}")
    return p


def _add_field(p, name: str, tp, default, helptext: str, positional: bool = False, choices=None,
               metavar=None) -> None:
    base, optional = _split_optional(tp)
    origin = typing.get_origin(base)
    helptext = helptext.replace("%", "%%")
    # the default, unless the comment already says it (e.g. "(default 3e-3)" of a grid axis)
    shown = "" if "default" in helptext else f" [default: {_show(default)}]".replace("%", "%%")
    if base is bool and not positional:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default,
                       action=argparse.BooleanOptionalAction, help=helptext + shown)
        return
    kw = {"default": default, "help": helptext + shown}
    if origin in (list, tuple) or base in (list, tuple):
        item = (typing.get_args(base) or (str,))[0]
        kw["type"] = _converter(_scalar(item), False, choices)
        kw["nargs"] = "*" if positional else "+"
    else:
        kw["type"] = _converter(_scalar(base), optional, choices)
    if choices is not None:
        kw["metavar"] = "{" + ",".join(map(str, choices)) + ("} or none" if optional else "}")
    if metavar:
        kw["metavar"] = metavar
    if positional:
        p.add_argument(name, **kw)
    else:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, **kw)


def config_from_args(cls: type, ns: argparse.Namespace, **extra):
    """`cls(**fields found in ns, **extra)`; tuple-typed fields get tuples (argparse gives lists)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in vars(ns):
            value = getattr(ns, f.name)
            base = _split_optional(hints[f.name])[0]
            is_tuple = typing.get_origin(base) is tuple or base is tuple
            values[f.name] = tuple(value) if is_tuple and isinstance(value, list) else value
    return cls(**{**values, **extra})


# ---------- one error line ----------

def one_line(message: object) -> str:
    """A message as one line: newlines and runs of spaces become single spaces."""
    return " ".join(str(message).split())


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (not a bug): reported as one line, exit 2."""
    import yaml

    from fastlesson.loggers import MissingExtraError
    from fastlesson.models import WeightsUnavailableError

    return (ValueError, FileNotFoundError, NotADirectoryError, WeightsUnavailableError, MissingExtraError,
            yaml.YAMLError)


def _run(body: Callable[[], int | None]) -> int:
    """Run a CLI body: its status, or 2 and one `error:` line for bad input (no traceback)."""
    try:
        status = body()
    except _bad_input_errors() as e:
        print(f"error: {one_line(e) or type(e).__name__}", file=sys.stderr)
        return USAGE_ERROR
    return 0 if status is None else int(status)


# ---------- the recipe ----------

RECIPE_DESCRIPTION = """\
Train an image classifier with the fast.ai lesson-2 recipe, export it, and write a report.

The eight steps: data + pretrained backbone; LR range test; head on precomputed activations; head
with augmentation (SGDR, cycle_len=1); unfreeze; discriminative LRs; LR range test again; full
network with SGDR (cycle_mult=2) until validation loss stops improving, keeping the best weights.

    fastlesson-recipe                        # offline default: shipped flower sample, CPU, minutes
    fastlesson-recipe --data flowers --opt lookahead-radam
    fastlesson-recipe --data ../shared/data/flowers102-small --size 160 --out runs/flowers
    fastlesson-recipe --smoke --out /tmp/smoke   # seconds-long run with every step and output
    fastlesson-recipe --resume runs/flowers      # continue an interrupted run

Outputs in --out: report.md (open it), metrics.json, history.csv, config.json, PNG plots, and the
model as a safe bundle (model.safetensors + model.json, for fastlesson-predict) and fastai's export.pkl.
"""
RECIPE_ALIASES = {"--train-bn": ("bn_freeze", False)}  # today's flag: = --no-bn-freeze


def recipe_parser(prog: str = "fastlesson-recipe") -> argparse.ArgumentParser:
    """The recipe's parser: every RecipeConfig field, plus --resume RUN_DIR."""
    from fastlesson.budget import CYCLE_RULES
    from fastlesson.loggers import LOGGERS
    from fastlesson.optim import OPTIMIZERS
    from fastlesson.recipe import RecipeConfig

    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    choices = {"opt": OPTIMIZERS, "budget_cycles": CYCLE_RULES, **({"log": LOGGERS} if "log" in names else {})}
    p = config_parser(RecipeConfig, prog=prog, description=RECIPE_DESCRIPTION, choices=choices,
                      aliases=RECIPE_ALIASES, metavars={"hard_mining": "FRACTION", "progressive": "PX", "average_cycles": "N"})
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the interrupted run in RUN_DIR from its last completed step or cycle, "
                        "with the config and data it was started with (no other options)")
    return p


def parse_recipe_args(argv: Sequence[str] | None = None, prog: str = "fastlesson-recipe"):
    """Command line -> (RecipeConfig, resume RUN_DIR or None). Exit 2 on a bad option."""
    from fastlesson.recipe import RecipeConfig

    p = recipe_parser(prog)
    ns = p.parse_args(argv)
    cfg = config_from_args(RecipeConfig, ns)
    if ns.resume is not None and cfg != RecipeConfig():
        changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(RecipeConfig)
                   if getattr(cfg, f.name) != getattr(RecipeConfig(), f.name)]
        p.error(f"--resume {ns.resume} continues with the config the run started with: drop "
                f"{', '.join(changed)} (or start a new run without --resume)")
    return cfg, ns.resume


def recipe_main(argv: Sequence[str] | None = None, prog: str = "fastlesson-recipe") -> int:
    """`fastlesson-recipe` / `python scripts/recipe.py`: run (or --resume) the recipe; exit status."""
    cfg, resume = parse_recipe_args(argv, prog)

    def body():
        if resume is not None:
            from fastlesson.recipe import resume_recipe  # R1: the step functions of issue 12

            if not Path(resume).is_dir():
                raise FileNotFoundError(f"--resume {resume}: no such run folder; pass the --out folder "
                                        f"of the interrupted run")
            resume_recipe(resume)
            return 0
        from fastlesson.recipe import run_recipe

        # the run folder named now, so that an interrupted run can say how to continue it
        run_cfg = cfg if cfg.out is not None else dataclasses.replace(cfg, out=cfg.effective().out)
        try:
            run_recipe(run_cfg)
        except KeyboardInterrupt:
            print(f"\ninterrupted: continue with `{prog} --resume {run_cfg.out}`", file=sys.stderr)
            return INTERRUPTED
        return 0

    return _run(body)


# ---------- the scraper ----------

def scrape_parser(prog: str = "fastlesson-scrape") -> argparse.ArgumentParser:
    """The scraper's parser: class names as positionals, every other ScrapeConfig field an option."""
    from fastlesson import scrape
    from fastlesson.scrape import ScrapeConfig

    doc = (scrape.__doc__ or "").strip()  # the package's docstring
    desc = (doc + "\n\n    fastlesson-scrape daisy horse --dest data/dh\n"
            "    fastlesson-scrape --from-urls urls.json --dest data/dh   # a fixed URL list, no search\n\n"
            "Search filters (--type-image, --size, --license-image) and --from-urls take '' or none "
            "for off.")
    return config_parser(ScrapeConfig, prog=prog, description=desc, positional=("classes",),
                         helps={"dest": "output folder: train/ and valid/ class folders, manifest.json"})


def scrape_main(argv: Sequence[str] | None = None, prog: str = "fastlesson-scrape") -> int:
    """`fastlesson-scrape` / `python scripts/scrape.py`: scrape; 1 when a class is short, 2 on bad input."""
    from fastlesson.scrape import ScrapeConfig, run_scrape

    cfg = config_from_args(ScrapeConfig, scrape_parser(prog).parse_args(argv))
    return _run(lambda: run_scrape(cfg))


# ---------- the sweep ----------

SWEEP_DESCRIPTION = """\
Sweep small_cnn hyperparameters (or optimizers) and write a table, a CSV and loss plots.

    fastlesson-sweep --data cifar10 --grid bench/sweep_grid.yaml --out runs/sweep
    fastlesson-sweep --data cifar10 --lr 1e-3 3e-3 --channels 32,64 64,128 --opt adam radam
    fastlesson-sweep --smoke --out /tmp/smoke     # 2 configurations on tiny synthetic images

Grid options (--lr, --bs, --channels, ...) take several values; together with --grid they form the
grid of configurations (the command line wins over the YAML file). Re-running resumes in --out.
"""


def sweep_parser(prog: str = "fastlesson-sweep") -> argparse.ArgumentParser:
    """The sweep's parser: every SweepConfig field an option (grid axes take several values)."""
    from fastlesson.sweep import SweepConfig

    return config_parser(SweepConfig, prog=prog, description=SWEEP_DESCRIPTION)


def sweep_main(argv: Sequence[str] | None = None, prog: str = "fastlesson-sweep") -> int:
    """`fastlesson-sweep` / `python scripts/sweep.py`: run the sweep and print its table; exit status."""
    from fastlesson.sweep import SweepConfig, run_sweep

    cfg = config_from_args(SweepConfig, sweep_parser(prog).parse_args(argv))

    def body():
        import yaml

        try:
            result = run_sweep(cfg)
        except yaml.YAMLError as e:  # name the file and the line, not "<unicode string>"
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"--grid {cfg.grid}: not valid YAML ({getattr(e, 'problem', None) or e}{where}); "
                             f"fix the file (bench/sweep_grid.yaml shows the format)") from None
        files = result.files
        print(f"\n{files['table'].read_text()}\ntrained {result.trained}, resumed {result.resumed}; "
              f"table {files['table']}, CSV {files['csv']}, plots {files['plots']}")
        return 0

    return _run(body)
