"""A time budget for the recipe: from measured (or estimated) epoch times, how many epochs fit.

`plan_budget` is a pure function of numbers (seconds), so it is tested without a clock: the recipe
measures its own times as it goes (`estimate_timings`) and asks it twice: after step 2, before any
training (head epochs, step-8 cycles; a budget too short for the minimal recipe is a ValueError
naming the shortest that would work), and at the start of step 8 with everything before it measured
(the whole SGDR cycles of step 8, the only ones whose snapshots are good).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SAFETY = 0.99  # plan to this fraction of the budget: step 8 is re-planned on measured epochs after each cycle,
#                so only the last cycle and the export are estimates (the export is estimated ~10 s high)
FULL_OVER_FROZEN = 3.0  # an unfrozen training batch ~ 3x a frozen-body one (forward, backward, step)
AUG_OVERHEAD = 1.15  # an augmented training pass over the frozen body vs the clean step-2 body pass
FINISH_VALID_PASSES = 2  # the final get_preds, and the confusion matrix's (fastai's interpretation runs its own)
FINISH_FIXED_S = 5.0  # s: plots, report.md, the bundle and export.pkl, besides the validation passes
MAX_HEAD_CYCLES = 3  # step 4 gets at most this many cycles from spare time (the lesson: 2-3)
MAX_FULL_CYCLES = 5  # step 8: at most 1 + 2 + 4 + 8 + 16 epochs however long the budget
MAX_FULL_EPOCHS = 2 ** MAX_FULL_CYCLES - 1  # the most epochs a plan of step 8 can hold (31)
CYCLE_RULES = ("doubling", "long")  # how step 8's budget becomes SGDR cycles (see _grow_cycles)


@dataclass
class Timings:
    """Seconds: spent so far, and what each remaining unit of work costs."""

    spent: float  # wall-clock of the run so far
    precompute_epoch: float  # one epoch of step 3, validation included
    head_epoch: float  # one epoch of step 4 (training pass + validation)
    lr_find_full: float  # step 7 (0 once done)
    full_epoch: float  # the training pass of one unfrozen epoch (step 8)
    valid: float  # one validation pass
    finish: float  # final evaluation (with TTA), plots, report and export
    full_epoch_small: float | None = None  # progressive resizing: a step-8 training pass at the smaller size


@dataclass
class BudgetPlan:
    """What fits: epochs of step 3, cycles of step 4, the step-8 cycle lengths; seconds planned."""

    budget_s: float
    precompute_epochs: int
    head_cycles: int
    full_cycles: list[int]
    planned_s: float  # the whole run, as planned
    parts_s: dict = field(default_factory=dict)  # planned seconds per part

    def as_dict(self) -> dict:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _full_s(t: Timings, cycles: list[int], valid_every_epoch: bool) -> float:
    """Step 8's cycles `cycles` (the plan's last ones); with progressive resizing every cycle but the
    plan's last trains at the smaller size."""
    passes = sum(cycles) if valid_every_epoch else len(cycles)
    if t.full_epoch_small is None or not cycles:
        return sum(cycles) * t.full_epoch + passes * t.valid
    return sum(cycles[:-1]) * t.full_epoch_small + cycles[-1] * t.full_epoch + passes * t.valid


def _cost(t: Timings, p: int, h: int, cycles: list[int], valid_every_epoch: bool) -> dict:
    return {"spent": t.spent, "precompute": p * t.precompute_epoch, "head_sgdr": h * t.head_epoch,
            "lr_find_full": t.lr_find_full, "full_sgdr": _full_s(t, cycles, valid_every_epoch),
            "finish": t.finish}


def _total(parts: dict) -> float:
    return sum(parts.values())


def _grow_cycles(fits, cycles: list[int], rule: str = "doubling") -> list[int]:
    """The cycles of step 8 that fit, continuing `cycles` (those planned or trained so far).

    "doubling": cycles of 1, 2, 4, ... epochs while they fit, then one last shorter whole cycle if one
    does (the lesson's SGDR, cycle_mult=2). "long": the first 1-epoch cycle (it measures step 8's epochs),
    then everything that fits in one more cycle, so the LR anneals once over the whole budget instead of
    restarting at each doubling; nothing after that second cycle.
    """
    if rule not in CYCLE_RULES:
        raise ValueError(f"rule={rule!r} is unknown; use one of {', '.join(CYCLE_RULES)}")
    if rule == "long":
        if len(cycles) != 1:
            return list(cycles)
        n = next((n for n in range(MAX_FULL_EPOCHS - cycles[0], 0, -1) if fits(cycles + [n])), None)
        return list(cycles) if n is None else cycles + [n]
    while len(cycles) < MAX_FULL_CYCLES and fits(cycles + [2 * cycles[-1]]):
        cycles = cycles + [2 * cycles[-1]]
    if len(cycles) < MAX_FULL_CYCLES:
        extra = next((n for n in range(2 * cycles[-1] - 1, 0, -1) if fits(cycles + [n])), None)
        if extra is not None:
            cycles = cycles + [extra]
    return cycles


def plan_budget(budget_s: float, t: Timings, precompute_epochs: int, head_cycles: int,
                valid_every_epoch: bool = False, head_fixed: bool = False, rule: str = "doubling") -> BudgetPlan:
    """The plan that ends the whole run within `budget_s` (planning to SAFETY of it).

    Greedy, in order: the minimal recipe (1 epoch of step 3, 1 cycle of step 4, one 1-epoch cycle in
    step 8; a ValueError naming the shortest budget when even that does not fit); then step 3's
    epochs and step 4's cycles up to the config's (`precompute_epochs`, `head_cycles`); then whole
    step-8 SGDR cycles (`rule`, see _grow_cycles); then spare time to more head cycles
    (up to MAX_HEAD_CYCLES). `head_fixed`: steps 3-4 are done (their counts are given, cost 0 in `t`);
    then only step 8 is planned and a budget already spent still gets its one cycle.
    """
    limit = SAFETY * budget_s
    p, h = (precompute_epochs, head_cycles) if head_fixed else (1, 1)

    def fits_with(pp, hh, cyc):
        return _total(_cost(t, 0 if head_fixed else pp, 0 if head_fixed else hh, cyc, valid_every_epoch)) <= limit

    if not head_fixed and not fits_with(1, 1, [1]):
        need = _total(_cost(t, 1, 1, [1], valid_every_epoch)) / SAFETY
        raise ValueError(f"budget={budget_s / 60:.1f} min is too short for even the minimal recipe here "
                         f"(1 precompute epoch, 1 head cycle, one 1-epoch cycle in step 8): it needs about "
                         f"{math.ceil(need / 6) / 10:.1f} min; use --budget {math.ceil(need / 6) / 10:.1f} "
                         f"or more")
    if not head_fixed:
        while p < precompute_epochs and fits_with(p + 1, h, [1]):
            p += 1
        while h < head_cycles and fits_with(p, h + 1, [1]):
            h += 1
    cycles = _grow_cycles(lambda c: fits_with(p, h, c), [1], rule)
    while not head_fixed and h < max(head_cycles, MAX_HEAD_CYCLES) and fits_with(p, h + 1, cycles):
        h += 1
    parts = _cost(t, 0 if head_fixed else p, 0 if head_fixed else h, cycles, valid_every_epoch)
    return BudgetPlan(budget_s=float(budget_s), precompute_epochs=p, head_cycles=h, full_cycles=cycles,
                      planned_s=_total(parts), parts_s=parts)


def replan_full(budget_s: float, t: Timings, done: list[int], valid_every_epoch: bool = False,
                rule: str = "doubling") -> BudgetPlan:
    """After step 8's cycles `done` (their time is in `t.spent`; `t.full_epoch` measured on them): the
    whole cycles that still fit by `rule` ("doubling": on from the last one trained, then one shorter;
    "long": after the first cycle, one cycle of all that fits); `done` alone when none does. Called after every cycle, so an epoch estimate that was off (step 7's range-test
    batches predict step 8's epochs only to ~10%) is corrected while there is time left to use."""
    if not done:
        raise ValueError("replan_full needs the cycles already trained (done=[]): plan step 8 with plan_budget")
    limit = SAFETY * budget_s
    done = list(done)

    def parts(cycles):
        return {"spent": t.spent, "full_sgdr": _full_s(t, cycles[len(done):], valid_every_epoch),
                "finish": t.finish}

    cycles = _grow_cycles(lambda c: _total(parts(c)) <= limit, done, rule)
    p = parts(cycles)
    return BudgetPlan(budget_s=float(budget_s), precompute_epochs=0, head_cycles=0, full_cycles=cycles,
                      planned_s=_total(p), parts_s=p)


def estimate_timings(m: dict, n_train_batches: int, n_valid_batches: int, n_train: int, n_valid: int,
                     precompute: bool, lr_find_iters: int, tta_passes: int,
                     small_ratio: float | None = None, average_pass: bool = False) -> Timings:
    """Timings from what the recipe measured so far (`m`, seconds; missing keys are estimated):
    spent, body_pass (step 2's cached body pass over train + valid; body_forward: the body's forward
    calls in it, preferred), head_batch (a step-2 range-test
    batch), head_epoch_train / valid (step 4 measured), full_batch (a step-7 range-test batch),
    lr_find_full_done (True once step 7 ran), full_epoch_train (step 8's training passes, measured).
    `small_ratio`: progressive resizing, (small size / size)**2; then full_epoch_small is
    full_epoch_train_small (measured) or that fraction of a full-size epoch (convolutions scale with the
    pixels: lite0 at 128 vs 160 px, 0.66 of the time per batch on 2 CPU cores). `average_pass`: the
    finish also validates step 8's averaged cycle ends (RecipeConfig.average_cycles), one more pass."""
    frac_valid = n_valid / max(1, n_train + n_valid)
    # the body's forward time in step 2's pass, when measured: the pass's wall time also holds the first
    # decode of every image (full-size photos, before the decode cache), which later epochs do not pay
    body = m.get("body_forward", m.get("body_pass", 0.0))
    if "valid" in m:
        valid = m["valid"]
    elif precompute and "body_pass" in m:  # body_forward is measured within that pass
        valid = body * frac_valid
    else:
        valid = m["head_batch"] * n_valid_batches / FULL_OVER_FROZEN
    if precompute:
        pre = m["head_batch"] * (n_train_batches + n_valid_batches)  # on the cache: the head alone
        head_train = m.get("head_epoch_train", body * (1 - frac_valid) * AUG_OVERHEAD)
    else:
        head_train = m.get("head_epoch_train", m["head_batch"] * n_train_batches)
        pre = head_train + valid
    full_batch = m.get("full_batch", FULL_OVER_FROZEN * head_train / max(1, n_train_batches))
    full_epoch = m.get("full_epoch_train", full_batch * n_train_batches)
    small = None
    if small_ratio is not None:
        small = m.get("full_epoch_train_small", small_ratio * full_epoch)
        if "full_epoch_train" not in m and "full_epoch_train_small" in m:  # the bigger of two estimates
            full_epoch = max(full_epoch, small / small_ratio)
    return Timings(spent=m.get("spent", 0.0), precompute_epoch=pre, head_epoch=head_train + valid,
                   lr_find_full=0.0 if m.get("lr_find_full_done") else lr_find_iters * full_batch,
                   full_epoch=full_epoch, valid=valid,
                   finish=valid * (FINISH_VALID_PASSES + average_pass + tta_passes * AUG_OVERHEAD) + FINISH_FIXED_S,
                   full_epoch_small=small)
