"""The time budget's planning on injected (measured) times: no clock is read here."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest

from fastlesson.budget import (
    MAX_FULL_EPOCHS,
    SAFETY,
    Timings,
    estimate_timings,
    plan_budget,
    replan_full,
)

# seconds, shaped like flowers102-small (lite0, 160 px, 2 CPU cores)
T = Timings(spent=60.0, precompute_epoch=3.0, head_epoch=45.0, lr_find_full=60.0, full_epoch=100.0, valid=10.0,
            finish=40.0)


def _total(plan) -> float:
    return sum(plan.parts_s.values())


def test_minimal_budget_error_names_the_shortest_that_works():
    minimal = T.spent + T.precompute_epoch + T.head_epoch + T.lr_find_full + T.full_epoch + T.valid + T.finish
    with pytest.raises(ValueError, match=r"budget=4\.0 min is too short.*needs about (\d+\.\d) min") as e:
        plan_budget(4 * 60, T, precompute_epochs=8, head_cycles=2)
    need = float(e.value.args[0].split("--budget ")[1].split()[0])
    assert need * 60 >= minimal / SAFETY > (need - 0.1) * 60
    plan = plan_budget(need * 60, T, precompute_epochs=8, head_cycles=2)  # that budget does work
    assert plan.full_cycles == [1] and plan.head_cycles >= 1


@pytest.mark.parametrize("minutes", [6, 8, 12, 20, 40])
def test_plan_fits_the_budget_and_uses_it(minutes):
    plan = plan_budget(minutes * 60, T, precompute_epochs=8, head_cycles=2)
    assert _total(plan) == pytest.approx(plan.planned_s)
    assert plan.planned_s <= SAFETY * minutes * 60
    assert plan.planned_s > 0.9 * SAFETY * minutes * 60  # and uses most of it
    assert all(isinstance(n, int) and n >= 1 for n in plan.full_cycles)


def test_more_budget_buys_more_step8_cycles_then_more_head_cycles():
    plans = [plan_budget(m * 60, T, precompute_epochs=8, head_cycles=2) for m in (6, 12, 20, 40)]
    epochs = [sum(p.full_cycles) for p in plans]
    assert epochs == sorted(epochs) and epochs[0] < epochs[-1]
    big = plans[-1]
    assert big.full_cycles[:3] == [1, 2, 4]  # doubling SGDR cycles (cycle_mult=2) first
    assert big.precompute_epochs == 8 and big.head_cycles >= 2
    tight = plan_budget(6 * 60, T, precompute_epochs=8, head_cycles=2)
    assert tight.full_cycles[0] == 1 and tight.head_cycles <= 2


def test_tight_budget_cuts_head_epochs_first_in_reverse():
    # room for the minimal recipe plus a few precompute epochs, not for a second head cycle
    budget = (T.spent + 3 * T.precompute_epoch + T.head_epoch + T.lr_find_full + T.full_epoch + T.valid
              + T.finish + 1) / SAFETY
    plan = plan_budget(budget, T, precompute_epochs=8, head_cycles=2)
    assert (plan.precompute_epochs, plan.head_cycles, plan.full_cycles) == (3, 1, [1])


def test_last_cycle_may_be_shorter_to_fill_the_budget():
    t = Timings(spent=0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=10, valid=0, finish=0)
    plan = plan_budget(60 / SAFETY, t, precompute_epochs=1, head_cycles=1, head_fixed=True)
    assert plan.full_cycles == [1, 2, 3]  # 1 + 2 + 4 = 7 epochs would not fit 6; 1 + 2 + 3 does


def test_step8_replan_never_raises_and_keeps_one_cycle():
    late = Timings(spent=10_000, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=100, valid=10,
                   finish=40)
    plan = plan_budget(60, late, precompute_epochs=2, head_cycles=1, head_fixed=True)
    assert plan.full_cycles == [1] and (plan.precompute_epochs, plan.head_cycles) == (2, 1)


def test_replan_after_a_cycle_uses_the_measured_epoch_time():
    """After cycle 2, 230 s left: a 27 s epoch buys cycles of 4 and 4 more epochs; a 60 s one shrinks
    cycle 3 to 3 epochs; a 400 s one ends step 8 there. Never past the budget."""
    budget = 570.0 / SAFETY  # 570 s to plan to
    for full_epoch, expect in ((27.0, [1, 2, 4, 4]), (60.0, [1, 2, 3]), (400.0, [1, 2])):
        t = Timings(spent=300.0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=full_epoch,
                    valid=3.0, finish=40.0)
        plan = replan_full(budget, t, [1, 2])
        assert plan.full_cycles == expect, full_epoch
        assert plan.planned_s == pytest.approx(_total(plan)) and plan.planned_s <= SAFETY * budget or expect == [1, 2]
    assert sum([1, 2, 4, 8, 16]) == MAX_FULL_EPOCHS  # the bound fit_until_overfit gets under a budget
    with pytest.raises(ValueError, match="done=\\[\\]"):
        replan_full(budget, T, [])


def test_long_rule_is_one_epoch_then_one_cycle_of_all_that_fits():
    t = Timings(spent=0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=10, valid=0, finish=0)
    plan = plan_budget(200 / SAFETY, t, precompute_epochs=1, head_cycles=1, head_fixed=True, rule="long")
    assert plan.full_cycles == [1, 19]  # doubling would give 1, 2, 4, 8, 5
    assert plan_budget(200 / SAFETY, t, 1, 1, head_fixed=True).full_cycles == [1, 2, 4, 8, 5]
    assert plan.planned_s == pytest.approx(200.0)
    huge = plan_budget(10_000, t, 1, 1, head_fixed=True, rule="long")
    assert huge.full_cycles == [1, MAX_FULL_EPOCHS - 1]  # the same bound as doubling's 1 + 2 + 4 + 8 + 16
    assert plan_budget(15 / SAFETY, t, 1, 1, head_fixed=True, rule="long").full_cycles == [1]  # 2nd does not fit


def test_long_rule_replans_the_long_cycle_after_the_first_and_nothing_after_it():
    budget = 300.0 / SAFETY
    for full_epoch, expect in ((10.0, [1, 24]), (20.0, [1, 12]), (400.0, [1])):
        t = Timings(spent=50.0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=full_epoch,
                    valid=0.0, finish=10.0)
        assert replan_full(budget, t, [1], rule="long").full_cycles == expect, full_epoch
    early = Timings(spent=100.0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=1.0, valid=0.0,
                    finish=0.0)
    assert replan_full(budget, early, [1, 5], rule="long").full_cycles == [1, 5]  # time left, no restart
    assert replan_full(budget, early, [1, 5]).full_cycles[:3] == [1, 5, 10]  # doubling would restart
    with pytest.raises(ValueError, match="rule='halving' is unknown; use one of doubling, long"):
        replan_full(budget, early, [1], rule="halving")


def test_valid_every_epoch_costs_a_validation_per_epoch():
    t = Timings(spent=0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=10, valid=5, finish=0)
    ends = plan_budget(42 / SAFETY, t, 1, 1, head_fixed=True)  # 1 + 2 epochs, 2 validations: 40 s
    every = plan_budget(42 / SAFETY, t, 1, 1, valid_every_epoch=True, head_fixed=True)
    assert sum(ends.full_cycles) == 3 and sum(every.full_cycles) < 3


def test_estimates_prefer_measured_times():
    m = {"spent": 30.0, "body_pass": 40.0, "head_batch": 0.01}
    before = estimate_timings(m, n_train_batches=30, n_valid_batches=10, n_train=960, n_valid=320,
                              precompute=True, lr_find_iters=100, tta_passes=5)
    assert before.valid == pytest.approx(10.0) and before.precompute_epoch == pytest.approx(0.4)
    assert before.full_epoch > before.head_epoch - before.valid  # an unfrozen epoch costs more
    after = estimate_timings({**m, "head_epoch_train": 33.0, "valid": 9.0, "full_batch": 3.0,
                              "lr_find_full_done": True}, 30, 10, 960, 320, True, 100, 5)
    assert (after.head_epoch, after.valid, after.full_epoch, after.lr_find_full) == (42.0, 9.0, 90.0, 0.0)


def test_estimates_use_the_body_forward_time_not_the_first_decode():
    """Step 2's pass over full-size photos is mostly decoding (once; cached after): the epoch estimates
    follow the body's forward time when it was measured."""
    m = {"spent": 30.0, "body_pass": 90.0, "body_forward": 20.0, "head_batch": 0.01}
    t = estimate_timings(m, n_train_batches=30, n_valid_batches=10, n_train=960, n_valid=320,
                         precompute=True, lr_find_iters=100, tta_passes=0)
    assert t.valid == pytest.approx(5.0) and t.head_epoch == pytest.approx(15.0 * 1.15 + 5.0)
    old = estimate_timings({k: v for k, v in m.items() if k != "body_forward"}, 30, 10, 960, 320, True, 100, 0)
    assert old.valid == pytest.approx(22.5)  # without it, the whole pass


def test_recipe_with_budget_plans_prints_and_records(tmp_path, monkeypatch):
    """A tiny run with a budget: the plan is printed at step 8 and recorded planned vs actual; the plan
    itself comes from measured times (replaced here by fixed ones, so no clock decides the test)."""
    import fastlesson.recipe as recipe

    from _recipe_helpers import write_image_folder

    fixed = Timings(spent=1.0, precompute_epoch=0.1, head_epoch=1.0, lr_find_full=1.0, full_epoch=0.5,
                    valid=0.1, finish=0.5)  # 6 s: step 3 1 epoch, step 4 1 cycle; step 8 (replanned) 1, 2, 2
    # after step 8's first cycle (its epoch time measured): 5.5 s spent, no room for another cycle
    late = Timings(spent=5.5, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=0.5, valid=0.1,
                   finish=0.5)
    monkeypatch.setattr(recipe, "_timings", lambda state: late if "full_epoch_train" in state.times else fixed)
    data = write_image_folder(tmp_path / "data")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = recipe.run_recipe(recipe.RecipeConfig(data=str(data), smoke=True, out=str(tmp_path / "run"),
                                                    budget=5.7 / SAFETY / 60))  # 5.7 s to plan to
    printed = buf.getvalue()
    head, full = printed.index("Step 8/8"), printed.index("budget plan:")
    assert head < full < printed.index("cycle 1:")
    b = json.loads((tmp_path / "run" / "metrics.json").read_text())["budget"]
    assert b["budget_min"] == pytest.approx(5.7 / SAFETY / 60) and b["first_plan"]["full_cycles"] == [1, 2]
    assert b["step8_plan"]["full_cycles"] == [1, 2, 2]  # re-planned at step 8, steps 3-4 done
    assert [r["after_cycle"] for r in b["replans"]] == [1] and b["replans"][0]["full_cycles"] == [1]
    assert b["planned"]["full_cycles"] == [1] and b["actual"]["full_cycles"] == 1  # the re-plan was followed
    assert b["planned"]["head_cycles"] == 1
    assert "SGDR cycles of 1, 2, 2 epoch(s)" in printed
    assert b["planned"]["precompute_epochs"] == res.config.precompute_epochs  # smoke: 1, all it asks
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Time budget" in md and "| planned |" in md and "| actual |" in md


def test_recipe_with_the_long_rule_plans_one_long_cycle_after_the_first(tmp_path, monkeypatch):
    """--budget-cycles long: step 8 planned as 1 epoch + one cycle of what fits, that cycle re-planned
    from cycle 1's measured epoch time, and no restart after it (fixed timings, no clock)."""
    import fastlesson.recipe as recipe

    from _recipe_helpers import write_image_folder

    fixed = Timings(spent=1.0, precompute_epoch=0.1, head_epoch=1.0, lr_find_full=1.0, full_epoch=0.5,
                    valid=0.1, finish=0.5)  # step 8 from 2.5 s: (1 + 5) * 0.5 + 2 * 0.1 = 3.2 s fits 5.7
    measured = Timings(spent=3.0, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=0.25,
                       valid=0.1, finish=0.5)  # after cycle 1: 2.2 s left, 8 epochs of 0.25 s + a validation
    monkeypatch.setattr(recipe, "_timings", lambda state: measured if "full_epoch_train" in state.times else fixed)
    data = write_image_folder(tmp_path / "data")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = recipe.run_recipe(recipe.RecipeConfig(data=str(data), smoke=True, out=str(tmp_path / "run"),
                                                    budget=5.7 / SAFETY / 60, budget_cycles="long"))
    b = res.metrics["budget"]
    assert b["step8_plan"]["full_cycles"] == [1, 5]
    assert "SGDR cycles of 1, 5 epoch(s)" in buf.getvalue()
    assert b["replans"][0] == {"after_cycle": 1, "full_cycles": [1, 8], "planned_s": pytest.approx(5.6)}
    assert all(r["full_cycles"] == [1, 8] for r in b["replans"][1:])  # no third cycle, whatever time is left
    assert next(s for s in res.steps if s["name"] == "full_sgdr")["cycles"] <= 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["budget_cycles"] == "long"
    with pytest.raises(ValueError, match="RecipeConfig.budget_cycles='halving' is not valid: use one of "
                                         "doubling, long"):
        recipe.RecipeConfig(budget_cycles="halving").validate()


def test_recipe_with_a_too_short_budget_stops_before_training(tmp_path, monkeypatch):
    import fastlesson.recipe as recipe

    from _recipe_helpers import write_image_folder

    slow = Timings(spent=50.0, precompute_epoch=1.0, head_epoch=100.0, lr_find_full=10, full_epoch=100.0,
                   valid=1.0, finish=10.0)
    monkeypatch.setattr(recipe, "_timings", lambda state: slow)
    trained = []
    monkeypatch.setattr(recipe, "precompute_head", lambda *a, **k: trained.append(1))
    data = write_image_folder(tmp_path / "data")
    need = math.ceil((50 + 1 + 100 + 10 + 100 + 1 + 10) / SAFETY / 6) / 10  # the minimal recipe, in minutes
    with pytest.raises(ValueError, match=rf"budget=1\.0 min is too short.*--budget {need:.1f}"), \
            contextlib.redirect_stdout(io.StringIO()):
        recipe.run_recipe(recipe.RecipeConfig(data=str(data), smoke=True, out=str(tmp_path / "run"), budget=1))
    assert not trained


def test_progressive_resizing_plans_the_cycles_before_the_last_at_the_small_epoch_time():
    """Step 8 with progressive resizing: every cycle but the plan's last costs the small-size epoch, so
    the same budget holds more epochs (here 14 instead of 11), and the re-plan keeps that rule."""
    small = dataclasses.replace(T, full_epoch_small=64.0)
    plain, prog = plan_budget(1500 / SAFETY, T, 8, 2), plan_budget(1500 / SAFETY, small, 8, 2)
    assert plain.full_cycles == [1, 2, 4, 4] and prog.full_cycles == [1, 2, 4, 7]
    assert prog.parts_s["full_sgdr"] == pytest.approx((1 + 2 + 4) * 64.0 + 7 * 100.0 + 4 * 10.0)
    assert prog.planned_s <= 1500 and plain.planned_s <= 1500
    # after cycles 1 and 2 (small): 4 more small epochs and a last full-size cycle of what is left
    late = dataclasses.replace(small, spent=500.0)
    plan = replan_full(1500 / SAFETY, late, [1, 2])
    assert plan.full_cycles == [1, 2, 4, 6]
    assert plan.parts_s["full_sgdr"] == pytest.approx(4 * 64.0 + 6 * 100.0 + 2 * 10.0)


def test_progressive_estimates_scale_with_the_pixels_until_measured():
    m = {"spent": 30.0, "body_pass": 40.0, "head_batch": 0.01, "full_batch": 3.0}
    args = dict(n_train_batches=30, n_valid_batches=10, n_train=960, n_valid=320, precompute=True,
                lr_find_iters=100, tta_passes=0)
    assert estimate_timings(m, **args).full_epoch_small is None  # no progressive resizing
    t = estimate_timings(m, **args, small_ratio=0.64)
    assert (t.full_epoch, t.full_epoch_small) == (90.0, pytest.approx(57.6))
    # small epochs measured: the small time is the measured one; the full-size one the bigger of the
    # step-7 estimate and the small one scaled back up (never planned short)
    assert estimate_timings({**m, "full_epoch_train_small": 70.0}, **args, small_ratio=0.64).full_epoch == \
        pytest.approx(70.0 / 0.64)
    low = estimate_timings({**m, "full_epoch_train_small": 50.0}, **args, small_ratio=0.64)
    assert (low.full_epoch, low.full_epoch_small) == (90.0, 50.0)
    both = estimate_timings({**m, "full_epoch_train_small": 50.0, "full_epoch_train": 80.0}, **args,
                            small_ratio=0.64)
    assert (both.full_epoch, both.full_epoch_small) == (80.0, 50.0)


def test_recipe_with_progressive_resizing_trains_the_first_cycles_small(tmp_path, monkeypatch):
    """--progressive 16 with a budget: step 8's first cycle (not the plan's last) trains at 16 px, its
    epoch is timed as a small one, and the run records how many epochs were small (fixed timings)."""
    import fastlesson.recipe as recipe

    from _recipe_helpers import write_image_folder

    fixed = Timings(spent=1.0, precompute_epoch=0.1, head_epoch=1.0, lr_find_full=1.0, full_epoch=0.5,
                    valid=0.1, finish=0.5, full_epoch_small=0.25)
    late = Timings(spent=5.5, precompute_epoch=0, head_epoch=0, lr_find_full=0, full_epoch=0.5, valid=0.1,
                   finish=0.5, full_epoch_small=0.25)  # after cycle 1: no room for another cycle
    monkeypatch.setattr(recipe, "_timings", lambda state: late if "full_epoch_train_small" in state.times else fixed)
    data = write_image_folder(tmp_path / "data")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = recipe.run_recipe(recipe.RecipeConfig(data=str(data), smoke=True, out=str(tmp_path / "run"),
                                                    budget=5.7 / SAFETY / 60, progressive=16))
    b = res.metrics["budget"]
    assert len(b["step8_plan"]["full_cycles"]) > 1 and b["planned"]["full_cycles"] == [1]
    full = next(s for s in res.steps if s["name"] == "full_sgdr")
    assert (full["progressive_px"], full["progressive_epochs"], full["epochs"]) == (16, 1, 1)
    assert "1 epochs (1 at 16 px)" in buf.getvalue() and "at 16 px before the last cycle" in buf.getvalue()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["progressive"] == 16
    with pytest.raises(ValueError, match=r"RecipeConfig.progressive=160 is not valid: use a size in px from 16 "
                                         r"to below size=160 \(e.g. 128\), or None"):
        recipe.RecipeConfig(progressive=160).validate()
