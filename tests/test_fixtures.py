"""The shared fixtures themselves behave as the other tests assume."""

from fastai.callback.schedule import fit_one_cycle as _fastai_fit_one_cycle  # noqa: F401  (patches Learner)


def test_tiny_learner_has_three_groups_and_learns(tiny_learner):
    learn = tiny_learner()
    learn.create_opt()
    assert len(learn.opt.param_lists) == 3
    with learn.no_bar(), learn.no_logging():
        before = learn.validate()[0]
        learn.fit(3, 1e-2)
        after = learn.validate()[0]
    assert after < before


def test_image_folder_layouts(image_folder):
    root = image_folder(classes=("x", "y"), n_per_class=4)
    assert len(list((root / "train" / "x").glob("*.jpg"))) == 4
    flat = image_folder(name="flat", layout="flat", classes=("x", "y"), n_per_class=3)
    assert sorted(p.name for p in flat.iterdir()) == ["x", "y"]
