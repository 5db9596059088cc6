#!/usr/bin/env bash
# Mutation testing with mutmut 3 (not part of CI): does the suite fail when the code is broken?
#
#   tools/mutation.sh                       # every module below, ~90 min on 2 cores (caps per module)
#   tools/mutation.sh scrape.image          # one module (dotted: fastlesson/scrape/image.py)
#   MUTATION_CAP_S=300 tools/mutation.sh precompute   # override the time cap (s) of each module run
#   MUTATION_SAMPLE=120 tools/mutation.sh   # a seeded random sample of 120 mutants per module (0: all)
#
# Each module runs in its own scratch copy of the repo ($MUTATION_WORK/<module>, default
# /tmp/fastlesson-mutation), with [tool.mutmut] of pyproject.toml rewritten to mutate only that module
# and to collect only the fast test files that cover it; mutmut then runs, per mutant, only the tests
# that call the mutated function. A module that hits its cap stops early: the summary counts the
# mutants checked so far ("checked" < "mutants") and the score is over those. mutmut runs the mutants
# whose tests are cheapest first, so a capped run scores the cheap functions (plots, small helpers);
# MUTATION_SAMPLE=N instead checks N mutants drawn at random (seed MUTATION_SEED) from the whole module,
# an unbiased estimate whose 95% interval the summary prints.
# Output: one line per module in $MUTATION_WORK/summary.md, and `mutmut results` (survivors, timeouts)
# in $MUTATION_WORK/<module>/survivors.txt. Look at a survivor with
#   cd $MUTATION_WORK/<module> && mutmut show <mutant name>
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${MUTATION_WORK:-/tmp/fastlesson-mutation}
JOBS=${MUTATION_JOBS:-2}  # mutants tested at once (one per core)
NICE=${MUTATION_NICE:-15}
SAMPLE=${MUTATION_SAMPLE:-0}  # mutants per module drawn at random; 0: every mutant (cheapest first)
SEED=${MUTATION_SEED:-0}
# one thread per mutant: mutmut forks its workers, and a forked OpenMP/BLAS thread pool can hang
# (mutants then show as timeouts); tests/conftest.py keeps torch at this count
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

# module -> the fast test files that cover it (the recipe, notebooks and CLIs are too slow to run per mutant)
declare -A TESTS=(
  [finder]="tests/test_finder.py"
  [schedule]="tests/test_schedule.py tests/test_recipe.py"
  [precompute]="tests/test_precompute.py"
  [callbacks]="tests/test_callbacks.py"
  [export]="tests/test_export.py"
  [data]="tests/test_data.py"
  [scrape.image]="tests/test_scrape.py"
  [scrape.fetch]="tests/test_scrape.py"
)
# module -> a pytest -k expression that narrows those files (empty: all of them). scrape.image is
# covered by the normalise_image unit tests (pixels of known images); the end-to-end scrape tests would
# add minutes per mutant (tools/mutation.sh scrape.fetch runs them all)
declare -A KEXPR=(
  [schedule]="test_schedule or fit_until_overfit"  # fit_until_overfit's tests live with the recipe's
  [scrape.image]="16bit or normalise_defaults or cmyk or exif_orientation or format_comes or signature or garbage or unidentifiable or jpeg_quality or animated_gif or inclusive or phash_distance or bomb or truncated or too_small_and_resize or near_duplicate_threshold"
  [scrape.fetch]="not recipe_smoke"
)
# module -> time cap in seconds; the caps add up to 90 minutes
declare -A CAP_S=(
  [finder]=720 [schedule]=720 [precompute]=720 [callbacks]=720
  [export]=720 [data]=600 [scrape.image]=600 [scrape.fetch]=600
)
ORDER=(finder schedule precompute callbacks export data scrape.image scrape.fetch)

mods=("$@")
[ ${#mods[@]} -eq 0 ] && mods=("${ORDER[@]}")
for m in "${mods[@]}"; do
  [ -n "${TESTS[$m]:-}" ] || { echo "unknown module '$m'; choose from: ${ORDER[*]}" >&2; exit 2; }
done
command -v mutmut >/dev/null || { echo "mutmut not found: pip install -e '.[dev]'" >&2; exit 2; }

mkdir -p "$WORK"
summary="$WORK/summary.md"
[ -f "$summary" ] || printf '| module | mutants | checked | killed | timeout | survived | no tests | score (95%% interval) | minutes |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n' > "$summary"

for m in "${mods[@]}"; do
  dir="$WORK/$m"
  rm -rf "$dir"
  mkdir -p "$dir"
  # a clean copy: sources, tests, scripts (tests run some) and the config; no caches, no old mutants
  tar -C "$REPO" --exclude=__pycache__ --exclude=.pytest_cache -cf - fastlesson tests scripts pyproject.toml \
    | tar -C "$dir" -xf -
  # one module, its tests: rewrite the two one-line keys of [tool.mutmut]
  python3 - "$dir/pyproject.toml" "fastlesson/${m//.//}.py" "${KEXPR[$m]:-}" ${TESTS[$m]} <<'EOF'
import json, re, sys
path, module, kexpr, tests = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
selection = tests + (["-k", kexpr] if kexpr else [])
text = open(path).read()
for key, value in (("only_mutate", [module]), ("pytest_add_cli_args_test_selection", selection)):
    text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
    assert n == 1, f"[tool.mutmut] {key} must be on one line in pyproject.toml"
open(path, "w").write(text)
EOF
  cap=${MUTATION_CAP_S:-${CAP_S[$m]}}
  echo "== $m: mutating fastlesson/${m//.//}.py with ${TESTS[$m]} (cap ${cap} s, $JOBS jobs)"
  start=$(date +%s)
  names=()
  if [ "$SAMPLE" -gt 0 ]; then
    # generate the mutants and the test stats only: a name that matches nothing stops mutmut right
    # after them (it asserts), then draw the sample from every mutant name
    (cd "$dir" && MPLBACKEND=Agg nice -n "$NICE" mutmut run --max-children "$JOBS" no-such-mutant \
        > generate.log 2>&1) || true
    (cd "$dir" && mutmut results --all true 2>/dev/null) | python3 -c '
import random, sys
names = sorted({line.split(":")[0].strip() for line in sys.stdin if "__mutmut_" in line})
k = min(int(sys.argv[1]), len(names))
print("\n".join(random.Random(int(sys.argv[2])).sample(names, k)))' "$SAMPLE" "$SEED" > "$dir/sample.txt"
    mapfile -t names < "$dir/sample.txt"
    [ ${#names[@]} -gt 0 ] || { echo "   no mutants listed: see $dir/generate.log"; continue; }
    echo "   sample: ${#names[@]} mutants (seed $SEED), listed in $dir/sample.txt"
  fi
  (cd "$dir" && MPLBACKEND=Agg timeout --signal=INT --kill-after=30 "$cap" \
      nice -n "$NICE" mutmut run --max-children "$JOBS" "${names[@]}" > run.log 2>&1) \
      || echo "   (stopped: exit $?, see $dir/run.log)"
  minutes=$(( ($(date +%s) - start + 30) / 60 ))
  (cd "$dir" && mutmut export-cicd-stats > /dev/null 2>&1 && mutmut results > survivors.txt 2>&1) || true
  python3 - "$dir/mutants/mutmut-cicd-stats.json" "$m" "$minutes" >> "$summary" <<'EOF'
import json, sys
path, module, minutes = sys.argv[1:]
try:
    s = json.load(open(path))
except (OSError, ValueError):
    print(f"| {module} | run failed: see run.log | | | | | | | {minutes} |")
    raise SystemExit
checked = s["killed"] + s["timeout"] + s["survived"] + s["no_tests"] + s["suspicious"] + s["segfault"]
killed = s["killed"] + s["timeout"]
score = killed / checked if checked else 0.0
# Wilson 95% interval of the kill rate: the error of a sample (or of a capped run, were it random)
z, n = 1.96, max(checked, 1)
mid, half = (score + z * z / (2 * n)), z * ((score * (1 - score) + z * z / (4 * n)) / n) ** 0.5
lo, hi = (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)
print(f"| {module} | {s['total']} | {checked} | {s['killed']} | {s['timeout']} | {s['survived']} "
      f"| {s['no_tests']} | {score:.0%} ({lo:.0%}-{hi:.0%}) | {minutes} |")
EOF
  tail -n 1 "$summary"
done
echo
cat "$summary"
