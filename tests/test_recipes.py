"ssl_book.recipes and the results store: stages and budgets, resume, transfer, teacher/student, records, leaderboard."
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from ssl_book.data import split
from ssl_book.experiment import make_model, run_experiment
from ssl_book.presets import get_preset
from ssl_book.recipes import (RECIPES, FineTune, Recipe, Stage, Student, fit_recipe, register_recipe, with_new_head)
from ssl_book.results import (find_record, format_table, leaderboard, load_records, plot_leaderboard, run_id,
                              save_record, summarize)
from ssl_book.train import Supervised, fit

@pytest.fixture
def tiny(digits):
    preset = get_preset("tiny")
    train, test = digits
    return preset, train, test, split(train.labels, preset.n_labeled, seed=0)

def _two_stage():
    return Recipe("two_stage", [Stage("probe", lambda ctx: FineTune(ctx.new_model(), freeze_encoder=True), 0.25),
                                Stage("tune", lambda ctx: FineTune(ctx.previous.model, encoder_lr=0.1), 0.75)])

def _new_head_stages():
    "A second stage that builds a new head: resuming must rebuild it with the same initial weights."
    return Recipe("heads", [Stage("first", lambda ctx: Supervised(ctx.new_model()), 0.5),
                            Stage("second", lambda ctx: FineTune(with_new_head(ctx.previous_model(), 10), encoder_lr=0.5),
                                  0.5)])

def test_budgets_add_up_and_bad_recipes_are_errors():
    r = Recipe("r", [Stage(n, lambda ctx: None, 1 / 3) for n in "abc"])
    assert r.budgets(2000) == [667, 666, 667] and sum(r.budgets(301)) == 301
    with pytest.raises(ValueError, match="add up to 1"): Recipe("r", [Stage("a", lambda c: None, 0.5)])
    with pytest.raises(ValueError, match="differ"): Recipe("r", [Stage("a", lambda c: None, 0.5)] * 2)
    with pytest.raises(ValueError, match="steps or seed"): Recipe("r", [Stage("a", lambda c: None, 1.0, {"steps": 3})])
    with pytest.raises(ValueError, match="unknown FitConfig"): Recipe("r", [Stage("a", lambda c: None, 1.0, {"nonsense": 3})])
    with pytest.raises(ValueError, match="cannot be shared"): r.budgets(2)
    with pytest.raises(ValueError, match="at least one"): Recipe("r", [])

def test_stage_ema_keeps_the_runs_horizon_relative_to_its_length(tiny):
    from ssl_book.recipes import stage_ema_decay
    assert stage_ema_decay(0.99, 1.0) == pytest.approx(0.99) and stage_ema_decay(0.99, 0.5) == pytest.approx(0.98)
    assert stage_ema_decay(0.0, 0.3) == 0.0 and stage_ema_decay(0.9, 0.05) == 0.0
    preset, train, test, s = tiny
    seen = []
    r = Recipe("r", [Stage("a", lambda ctx: Supervised(ctx.new_model()), 0.5),
                     Stage("b", lambda ctx: Supervised(ctx.new_model()), 0.5, {"ema_decay": 0.5})])
    import ssl_book.recipes as R
    orig = R.fit
    R.fit = lambda m, tr, sp, cfg, *a, **k: (seen.append(cfg.ema_decay), orig(m, tr, sp, cfg, *a, **k))[1]
    try: fit_recipe(r, lambda: make_model(preset, train, 0), train, s, replace(preset.fit, steps=4, ema_decay=0.9),
                    device="cpu", progress=False)
    finally: R.fit = orig
    assert seen == [pytest.approx(0.8), 0.5]                               # scaled; an explicit setting wins

def test_recipe_uses_the_whole_budget_and_each_stage_builds_on_the_last(tiny, tmp_path):
    preset, train, test, s = tiny
    cfg = replace(preset.fit, steps=40, eval_every=10)
    res = fit_recipe(_two_stage(), lambda: make_model(preset, train, 0), train, s, cfg, test, device="cpu",
                     progress=False)
    assert res.steps == [10, 30] and [h.final["step"] for h in res.histories] == [10, 30]
    assert res.methods[1].model is res.methods[0].model                  # the tune stage continues the probe's model
    assert [st["method"] for st in res.settings()["stages"]] == ["finetune", "finetune"]
    assert res.settings()["stages"][1]["settings"] == {"encoder_lr": 0.1, "freeze_encoder": False}

def test_recipe_resumes_each_stage_bit_exact(tiny, tmp_path):
    preset, train, test, s = tiny
    cfg = replace(preset.fit, steps=30, eval_every=5)
    ref = fit_recipe(_two_stage(), lambda: make_model(preset, train, 0), train, s, cfg, test, device="cpu",
                     progress=False, checkpoint_dir=tmp_path / "ref")
    crash = _two_stage()
    build = crash.stages[1].build
    class Boom(Exception): pass
    def dying(ctx):
        m = build(ctx); step = m.training_step
        m.training_step = lambda b: (_ for _ in ()).throw(Boom()) if b.step == 12 else step(b)
        return m
    crash.stages[1] = Stage("tune", dying, 0.75)
    with pytest.raises(Boom):
        fit_recipe(crash, lambda: make_model(preset, train, 0), train, s, cfg, test, device="cpu", progress=False,
                   checkpoint_dir=tmp_path / "run")
    again = fit_recipe(_two_stage(), lambda: make_model(preset, train, 0), train, s, cfg, test, device="cpu",
                       progress=False, checkpoint_dir=tmp_path / "run")
    a, b = ref.method.model.state_dict(), again.method.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_acc"] for r in again.history.rows] == [r["test_acc"] for r in ref.history.rows]

def test_resume_at_a_stage_boundary_rebuilds_the_same_new_head(tiny, tmp_path):
    "A crash after stage 0 finished but before stage 1's first checkpoint: the resumed run equals the uninterrupted one."
    preset, train, test, s = tiny
    cfg = replace(preset.fit, steps=20, eval_every=5)
    mk = lambda: make_model(preset, train, 0)
    ref = fit_recipe(_new_head_stages(), mk, train, s, cfg, test, device="cpu", progress=False)
    crash = _new_head_stages()
    build = crash.stages[1].build
    class Boom(Exception): pass
    def dying(ctx):
        m = build(ctx)
        m.training_step = lambda b: (_ for _ in ()).throw(Boom())
        return m
    crash.stages[1] = Stage("second", dying, 0.5)
    with pytest.raises(Boom):
        fit_recipe(crash, mk, train, s, cfg, test, device="cpu", progress=False, checkpoint_dir=tmp_path)
    torch.rand(7)                                                         # a different global RNG state
    again = fit_recipe(_new_head_stages(), mk, train, s, cfg, test, device="cpu", progress=False, checkpoint_dir=tmp_path)
    a, b = ref.method.model.state_dict(), again.method.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the EMA copy it fine-tunes was made trainable: the encoder did move
    assert any(p.requires_grad for p in again.method.model.encoder.parameters())

def test_finetune_of_an_untrainable_encoder_is_a_clear_error(tiny):
    preset, train, test, s = tiny
    frozen = make_model(preset, train, 0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FineTune(frozen)
    FineTune(frozen, freeze_encoder=True)                                  # a probe is fine

def test_label_free_last_stage_is_a_clear_error(tiny):
    from ssl_book.experiment import run_one
    from ssl_book.recipes import RECIPES
    from ssl_book.train import Method
    class Free(Supervised):
        uses_labels = False
        def training_step(self, batch): return self.model(batch.aug.weak(batch.x)).logsumexp(1).mean(), {}
    preset, train, test, s = tiny
    RECIPES["_free"] = lambda preset=None: Recipe("_free", [Stage("only", lambda ctx: Free(ctx.new_model()), 1.0)])
    try:
        with pytest.raises(ValueError, match="ends without a test accuracy"):
            run_one(replace(preset, fit=replace(preset.fit, steps=2)), "_free", train, test, s, 0, device="cpu")
    finally: del RECIPES["_free"]

def test_a_recipes_run_id_changes_with_its_builders_constants():
    a = Recipe("r", [Stage("s", lambda ctx: Student(ctx.new_model(), ctx.previous_model(), tau=0.95), 1.0)])
    b = Recipe("r", [Stage("s", lambda ctx: Student(ctx.new_model(), ctx.previous_model(), tau=0.9), 1.0)])
    assert a.identity() != b.identity() and a.identity() == a.identity()

def test_a_recipes_run_id_changes_with_its_factorys_arguments():
    "A builder made inside a factory reads the factory's arguments from its closure: they name the run too."
    def factory(tau: float) -> Recipe:
        return Recipe("r", [Stage("s", lambda ctx: Student(ctx.new_model(), ctx.previous_model(), tau=tau), 1.0)])
    assert factory(0.95).identity() != factory(0.9).identity() and factory(0.9).identity() == factory(0.9).identity()

def test_probe_leaves_the_encoder_alone_and_finetune_scales_its_rate(tiny):
    preset, train, test, s = tiny
    src = make_model(preset, train, 0)
    before = {k: v.clone() for k, v in src.encoder.state_dict().items()}
    probe = FineTune(with_new_head(src, train.n_classes), freeze_encoder=True)
    head0 = probe.model.head.weight.clone()
    fit(probe, train, s, replace(preset.fit, steps=20, eval_every=20, mu=0), test, progress=False, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in src.encoder.state_dict().items())    # BatchNorm included
    assert not torch.equal(head0, probe.model.head.weight)                               # the head did learn
    tune = FineTune(with_new_head(src, train.n_classes), encoder_lr=0.1)
    assert [g.get("lr_scale", 1.0) for g in tune.param_groups()] == [1.0, 0.1]
    with pytest.raises(ValueError): FineTune(nn.Linear(2, 2))
    with pytest.raises(ValueError): FineTune(src, encoder_lr=-1)
    with pytest.raises(ValueError): with_new_head(nn.Linear(2, 2), 10)

def test_student_uses_the_teachers_offline_targets_by_index(tiny):
    preset, train, test, s = tiny
    teacher = make_model(preset, train, 0)
    fit(Supervised(teacher), train, s, replace(preset.fit, steps=40, mu=0), progress=False, device="cpu")
    st = Student(make_model(preset, train, 1), teacher, tau=0.0)
    st.setup(train, s, torch.device("cpu"))
    from ssl_book.evaluate import predict
    probs = predict(teacher, train.images[s.unlabeled]).softmax(1)
    assert torch.allclose(st._targets[s.unlabeled].cpu(), probs) and st._targets[s.labeled].abs().sum() == 0
    h = fit(st, train, s, replace(preset.fit, steps=20, eval_every=20), test, progress=False, device="cpu")
    acc = (probs.argmax(1) == train.labels[s.unlabeled]).float().mean().item()
    assert abs(h.final["teacher_acc"] - acc) < 0.15 and h.final["mask"] == 1.0
    with pytest.raises(ValueError, match="another model"): Student(teacher, teacher)
    with pytest.raises(ValueError): Student(make_model(preset, train, 1), teacher, tau=2.0)

def test_records_are_written_reused_and_named_by_the_run(tiny, tmp_path):
    preset, train, test, s = tiny
    preset = replace(preset, fit=replace(preset.fit, steps=20, eval_every=10))
    recs = run_experiment(preset, ["supervised", "teacher_student"], seeds=[0, 1], data=(train, test), store=tmp_path)
    files = sorted((tmp_path / "tiny").glob("*.json"))
    assert len(files) == 4 and len(load_records(tmp_path, "tiny")) == 4
    r = json.loads(files[0].read_text())
    for key in ("preset", "data", "method", "settings", "labels", "seed", "split", "steps", "test_acc_ema",
                "test_acc_raw", "history", "minutes", "load_before", "machine", "run_id"):
        assert key in r, key
    assert r["machine"]["ssl_book"] and r["test_acc_ema"] is not None and r["data"] == "scikit-learn digits"
    ts = next(x for x in recs if x["method"] == "teacher_student")
    assert [st["steps"] for st in ts["settings"]["stages"]] == [7, 6, 7] and len(ts["stage_histories"]) == 3
    # a second call reads the records instead of training
    import ssl_book.experiment as E
    orig, E.fit = E.fit, None
    try: again = run_experiment(preset, ["supervised"], seeds=[0, 1], data=(train, test), store=tmp_path)
    finally: E.fit = orig
    assert [a["run_id"] for a in again] == [x["run_id"] for x in recs if x["method"] == "supervised"]
    # another setting is another run
    other = run_experiment(replace(preset, fit=replace(preset.fit, lr=0.01)), ["supervised"], seeds=[0],
                           data=(train, test), store=tmp_path)
    assert other[0]["run_id"] not in {x["run_id"] for x in recs}

def test_missing_runs_are_skipped_or_named_and_never_trained_unless_asked(tiny, tmp_path):
    preset, train, test, s = tiny
    preset = replace(preset, fit=replace(preset.fit, steps=10, eval_every=10))
    have = [r["run_id"] for r in run_experiment(preset, ["supervised"], seeds=[0], data=(train, test), store=tmp_path)]
    ids = lambda rs: [r["run_id"] for r in rs]
    import ssl_book.experiment as E
    orig, E.fit = E.fit, None                                   # any training would fail
    try:
        assert ids(run_experiment(preset, ["supervised"], seeds=[0, 1], data=(train, test), store=tmp_path, missing="skip")) == have
        with pytest.raises(ValueError, match=r"1 of 2 runs .*supervised \(50 labels, seed 1\)"):
            run_experiment(preset, ["supervised"], seeds=[0, 1], data=(train, test), store=tmp_path, missing="error")
        assert ids(run_experiment(preset, ["supervised"], seeds=[0], data=(train, test), store=tmp_path, missing="error")) == have
    finally: E.fit = orig
    with pytest.raises(ValueError, match="missing must be"): run_experiment(preset, ["supervised"], store=tmp_path, missing="no")
    with pytest.raises(ValueError, match="give `store`"): run_experiment(preset, ["supervised"], missing="skip")

def test_bench_precision_fixes_the_runs_precision(tmp_path, capsys):
    from ssl_book.cli import main
    args = ["bench", "--preset", "tiny", "--methods", "supervised", "--steps", "5", "--store", str(tmp_path), "--out",
            str(tmp_path / "out"), "--precision", "fp32"]
    assert main(args) == 0
    rec = json.loads(next((tmp_path / "tiny").glob("*.json")).read_text())
    assert rec["precision"] == "fp32" and rec["config"]["precision"] == "fp32"
    with pytest.raises(SystemExit): main(args[:-1] + ["fp16"])
    assert "invalid choice" in capsys.readouterr().err

def test_leaderboard_table_and_chart(tmp_path):
    for m, accs in (("supervised", (0.80, 0.82, 0.81)), ("a", (0.86, 0.87, 0.85)), ("b", (0.81, 0.83, 0.80))):
        for seed, a in enumerate(accs):
            save_record({"run_id": run_id({"m": m, "s": seed}), "preset": "cpu", "method": m, "labels": 1000,
                         "seed": seed, "test_acc": a, "test_acc_ema": a, "test_acc_raw": a - 0.02, "minutes": 2.0},
                        tmp_path)
    rows = leaderboard("cpu", tmp_path)
    assert [r["method"] for r in rows] == ["supervised", "a", "b"]
    a, b = rows[1], rows[2]
    assert a["acc_mean"] == pytest.approx(86.0) and a["acc_std"] == pytest.approx(1.0) and a["seeds"] == 3
    assert a["raw_mean"] == pytest.approx(84.0) and a["clear"] and not b["clear"]
    assert a["vs_baseline"] == pytest.approx(5.0)
    assert "(clear)" in format_table(rows) and "(in spread)" in format_table(rows)
    # runs of one method under another setting are another row, not more seeds
    save_record({"run_id": "x1", "config_id": "other", "preset": "cpu", "method": "a", "labels": 1000, "seed": 0,
                 "test_acc": 0.5, "test_acc_raw": 0.5, "minutes": 1.0}, tmp_path)
    rows2 = leaderboard("cpu", tmp_path)
    assert sorted(r["seeds"] for r in rows2 if r["method"] == "a") == [1, 3]
    assert {r["name"] for r in rows2 if r["method"] == "a"} == {"a [other]", "a"}
    for p, cid in (("fp32", "c32"), ("bf16", "c16")):              # configurations that differ in precision only
        save_record({"run_id": f"y{p}", "config_id": cid, "preset": "cpu", "method": "c", "labels": 1000, "seed": 0,
                     "precision": p, "test_acc": 0.5, "test_acc_raw": 0.5, "minutes": 1.0}, tmp_path)
    assert {r["name"] for r in leaderboard("cpu", tmp_path) if r["method"] == "c"} == {"c (fp32)", "c (bf16)"}
    # a run at another step budget (a chapter's short ablation) stays off the board unless asked for
    save_record({"run_id": "short", "config_id": "q", "preset": "cpu", "method": "a", "labels": 1000, "seed": 0,
                 "steps": 500, "test_acc": 0.4, "test_acc_raw": 0.4, "minutes": 1.0}, tmp_path)
    assert "a [q]" not in {r["name"] for r in leaderboard("cpu", tmp_path)}
    assert "a [q]" in {r["name"] for r in leaderboard("cpu", tmp_path, steps=None)}
    assert "a [q]" in {r["name"] for r in leaderboard("cpu", tmp_path, steps=500)}
    save_record({"run_id": "long", "preset": "cpu", "method": "a_method_name_longer_than_nineteen", "labels": 1000,
                 "seed": 0, "test_acc": 0.5, "test_acc_raw": 0.5, "minutes": 1.0}, tmp_path)
    table = format_table(leaderboard("cpu", tmp_path)).splitlines()                  # a long name keeps the columns
    assert len({len(line) for line in table}) == 1
    ax = plot_leaderboard(rows, highlight=["a"])
    assert ax.get_xlabel().startswith("test accuracy") and len(ax.patches) == 3
    assert leaderboard("cpu", tmp_path, methods=["b"])[1]["method"] == "b" and len(leaderboard("cpu", tmp_path, methods=["b"])) == 2
    assert find_record(tmp_path, "cpu", run_id({"m": "a", "s": 1}))["test_acc"] == 0.87
    with pytest.raises(ValueError, match="needs"): save_record({"preset": "cpu"}, tmp_path)
    with pytest.raises(ValueError, match="no rows"): plot_leaderboard([])

def test_one_seed_is_never_called_clear():
    rows = summarize([{"method": m, "labels": 5, "seed": 0, "test_acc": a, "test_acc_raw": a, "minutes": 1}
                      for m, a in (("supervised", 0.5), ("x", 0.9))])
    assert rows[1]["clear"] is None and "(1 seed)" in format_table(rows)

@pytest.mark.slow
def test_teacher_student_beats_supervised_on_digits(digits):
    "Learning outcome: the registered recipe, on the same budget and split, beats the baseline on seeds 0-2."
    recs = run_experiment("tiny", ["supervised", "teacher_student"], seeds=[0, 1, 2], data=digits, device="cpu")
    acc = {(r["method"], r["seed"]): 100 * r["test_acc"] for r in recs}
    for seed in (0, 1, 2):
        assert acc["teacher_student", seed] >= acc["supervised", seed] + 1.5, (seed, acc)     # 7 of 450 test images

def test_run_checkpoint_finds_a_stored_runs_checkpoints(digits, tmp_path):
    "A chapter gets a stored run's model back from its record: a .pt file for a method, a folder for a recipe."
    from dataclasses import replace
    from ssl_book.experiment import run_checkpoint
    from ssl_book.presets import get_preset
    preset = get_preset("tiny")
    preset = replace(preset, fit=replace(preset.fit, steps=6, eval_every=3))
    recs = run_experiment(preset, ["supervised", "teacher_student"], seeds=[0], data=digits, device="cpu",
                          store=tmp_path / "store", checkpoint_dir=tmp_path / "ck")
    sup, ts = recs
    assert run_checkpoint(tmp_path / "ck", sup).is_file() and run_checkpoint(tmp_path / "ck", sup).suffix == ".pt"
    assert run_checkpoint(tmp_path / "ck", ts).is_dir() and len(list(run_checkpoint(tmp_path / "ck", ts).glob("*.pt"))) == 3

def test_trained_method_gives_back_the_stored_runs_model(digits, tmp_path):
    "From a record and its checkpoint: the same model (the record's accuracy, exactly), no training; clear errors else."
    from dataclasses import replace
    from ssl_book.evaluate import accuracy
    from ssl_book.experiment import trained_method, trained_model
    from ssl_book.presets import get_preset
    preset = get_preset("tiny")
    preset = replace(preset, fit=replace(preset.fit, steps=12, eval_every=6))
    train, test = digits
    sup, ts = run_experiment(preset, ["supervised", "teacher_student"], seeds=[1], data=digits, device="cpu",
                             checkpoint_dir=tmp_path)
    back = trained_method(preset, sup, train, test, checkpoint_dir=tmp_path)
    assert accuracy(back.ema_model, test) == pytest.approx(sup["test_acc"], abs=1e-6)
    for rec in (sup, ts):                 # trained_model: the model behind test_acc (EMA, not raw), method or recipe
        assert accuracy(trained_model(preset, rec, train, test, checkpoint_dir=tmp_path), test) == \
            pytest.approx(rec["test_acc"], abs=1e-6)
    with pytest.raises(ValueError, match="not a registered method"):
        trained_method(preset, ts, train, test, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="not the record's"):
        trained_method(preset, {**sup, "seed": 2}, train, test)
    with pytest.raises(ValueError, match="not one of preset"):
        trained_method("cpu", sup, train, test)

def test_trained_recipe_gives_back_every_stage_of_a_stored_run(tiny, tmp_path):
    "A recipe's record and checkpoints give back its stages: the same final model, the shared pretraining; clear errors."
    from ssl_book.evaluate import accuracy
    from ssl_book.experiment import trained_method, trained_recipe
    from ssl_book.recipes import pretext_recipe
    preset, train, test, s = tiny
    cls = _FlipAgreement.make()
    small = replace(preset, fit=replace(preset.fit, steps=9, eval_every=3))
    register_recipe("_flip_finetune", lambda p=None: pretext_recipe("_flip_finetune", cls, {}, "finetune", p))
    try:
        a, c = run_experiment(small, ["_flip_finetune"], labels=[small.n_labeled, 2 * small.n_labeled], seeds=[0],
                              data=(train, test), device="cpu", checkpoint_dir=tmp_path)
        for rec in (a, c):                                       # c: another label count, the label-free split recorded
            back = trained_recipe(small, rec, train, test, checkpoint_dir=tmp_path, device="cpu")
            assert [h.rows for h in back.histories] == rec["stage_histories"]        # resumed: nothing trained again
            assert accuracy(back.method.ema_model, test) == pytest.approx(rec["test_acc"], abs=1e-6)
            assert back.methods[0].name == cls.name
        # without checkpoints it trains again, to the same weights (the oracle: the stored run's accuracy)
        again = trained_recipe(small, c, train, test, checkpoint_dir=tmp_path / "elsewhere", device="cpu")
        assert accuracy(again.method.ema_model, test) == pytest.approx(c["test_acc"], abs=1e-6)
        with pytest.raises(ValueError, match="not a registered recipe"):
            trained_recipe(small, {**a, "method": "supervised"}, train, test)
        with pytest.raises(ValueError, match="not a registered method"):
            trained_method(small, a, train, test)
        with pytest.raises(ValueError, match="label-free split"):
            trained_recipe(small, {**c, "label_free_split": "0" * 12}, train, test)
        with pytest.raises(ValueError, match="steps"):
            trained_recipe(preset, a, train, test)
    finally:
        RECIPES.pop("_flip_finetune")

def test_run_checkpoint_keeps_dots_in_method_names(tmp_path):
    "Two methods whose names differ after a dot (temperatures, say) must not share a checkpoint file."
    from ssl_book.experiment import run_checkpoint
    rec = lambda m, rid: {"preset": "tiny", "method": m, "labels": 50, "seed": 0, "run_id": rid}
    a, b = run_checkpoint(tmp_path, rec("x_t0.1", "aaa")), run_checkpoint(tmp_path, rec("x_t0.5", "bbb"))
    assert a != b and a.name == "x_t0.1-50-s0-aaa.pt" and b.suffix == ".pt"

class _FlipAgreement:
    "A toy pretext task for the sharing tests: the features of an image and of its mirror image should agree."
    @staticmethod
    def make():
        from ssl_book.recipes import Pretext
        class FlipAgreement(Pretext):
            name = "flip_agreement"
            def __init__(self, model, probe=True, scale=1.0):
                super().__init__(model, probe); self.scale = scale
            def settings(self): return {"scale": self.scale}
            def pretext_step(self, images, aug):
                x = aug.weak(images)
                f, g = self.model.encoder(x), self.model.encoder(x.flip(-1))
                return self.scale * (f - g).pow(2).mean() - f.std(0).mean(), {}
        return FlipAgreement

def test_recipes_that_begin_alike_share_their_pretraining(tiny, tmp_path):
    from ssl_book.recipes import pretext_recipe
    preset, train, test, s = tiny
    cls = _FlipAgreement.make()
    cfg = replace(preset.fit, steps=12, eval_every=4)
    mk = lambda: make_model(preset, train, 0)
    run = lambda strategy, where, shared, kw=None: fit_recipe(
        pretext_recipe(strategy, cls, kw or {}, strategy, preset), mk, train, s, cfg, test, device="cpu", progress=False,
        checkpoint_dir=tmp_path / where, preset=preset, shared_dir=shared)
    probe = run("probe", "probe", tmp_path / "stages")
    assert len(list((tmp_path / "stages").glob("*.pt"))) == 2                     # pretraining and probe, by key
    tuned = run("finetune", "finetune", tmp_path / "stages")
    # the pretraining was reloaded, not trained again: its history, timings included, is the probe run's
    assert tuned.histories[0].rows == probe.histories[0].rows
    assert len(list((tmp_path / "stages").glob("*.pt"))) == 3                     # + the fine-tuning stage
    assert (tmp_path / "finetune" / "0-pretrain.pt").exists()                     # the run's own folder is complete
    # the oracle: the same recipe without sharing gives the same weights
    alone = run("finetune", "alone", None)
    a, b = alone.method.model.state_dict(), tuned.method.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # other pretext settings are another pretraining
    other = run("probe", "other", tmp_path / "stages", {"scale": 2.0})
    assert other.histories[0].rows != probe.histories[0].rows
    assert len(list((tmp_path / "stages").glob("*.pt"))) == 5
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit_recipe(pretext_recipe("p", cls, {}, "probe", preset), mk, train, s, cfg, device="cpu", progress=False,
                   shared_dir=tmp_path / "stages")

def test_run_experiment_shares_pretraining_between_recipes(tiny, tmp_path):
    "Two registered recipes of one pretext task on one split: the second reloads the first's pretraining."
    from ssl_book.recipes import pretext_recipe
    preset, train, test, s = tiny
    cls = _FlipAgreement.make()
    small = replace(preset, fit=replace(preset.fit, steps=9, eval_every=3))
    for strategy in ("probe", "finetune"):
        register_recipe(f"_flip_{strategy}", lambda p=None, st=strategy: pretext_recipe(f"_flip_{st}", cls, {}, st, p))
    try:
        a, b = run_experiment(small, ["_flip_probe", "_flip_finetune"], seeds=[0], data=(train, test),
                              checkpoint_dir=tmp_path)
        assert a["stage_histories"][0] == b["stage_histories"][0]
        assert len(list((tmp_path / "tiny" / "stages").glob("*.pt"))) == 3
        assert "label_free_split" not in a                                  # the preset's own label count
        # another label count: the same pretraining (the label-free stage draws from the preset's split), a new transfer
        c, = run_experiment(small, ["_flip_finetune"], labels=[2 * small.n_labeled], seeds=[0], data=(train, test),
                            checkpoint_dir=tmp_path)
        assert c["labels"] == 2 * small.n_labeled and c["label_free_split"] == a["split"] != c["split"]
        assert c["stage_histories"][0] == a["stage_histories"][0] and c["run_id"] != b["run_id"]
        assert len(list((tmp_path / "tiny" / "stages").glob("*.pt"))) == 4
    finally:
        for strategy in ("probe", "finetune"): RECIPES.pop(f"_flip_{strategy}")

def test_a_label_free_stage_must_not_use_labels(tiny):
    preset, train, test, s = tiny
    r = Recipe("r", [Stage("a", lambda ctx: Supervised(ctx.new_model()), 1.0, label_free=True)])
    with pytest.raises(ValueError, match="label_free"):
        fit_recipe(r, lambda: make_model(preset, train, 0), train, s, replace(preset.fit, steps=2), device="cpu",
                   progress=False)

def test_a_notebooks_pretext_class_gets_the_packages_run_id():
    "A chapter notebook defines its pretext classes in __main__; its runs must have the ids of `ssl-book bench`'s runs."
    from ssl_book.recipes import pretext_recipe
    from ssl_book.simclr import SimCLR
    ident = lambda cls: pretext_recipe("p", cls, {"temperature": 0.5}, "probe").identity()
    twin = type("SimCLR", (SimCLR,), {"__module__": "__main__"})        # the notebook's class: same name, in __main__
    assert ident(twin) == ident(SimCLR)
    other = type("NotInThePackage", (SimCLR,), {"__module__": "__main__"})
    assert ident(other) != ident(SimCLR)
    assert pretext_recipe("p", SimCLR, {"temperature": 0.1}, "probe").identity() != ident(SimCLR)

def test_trained_model_registers_the_chapters_in_a_fresh_process():
    "A chapter's method or recipe is known to trained_model before any chapter module was imported by hand."
    import subprocess, sys
    code = ("from ssl_book.experiment import trained_model\n"
            "for m in ('fixmatch', 'rotnet_finetune'):\n"
            "    try: trained_model('tiny', {'method': m, 'preset': 'cpu', 'seed': 0}, None)\n"
            "    except ValueError as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().split("\n")
    assert len(lines) == 2 and all("not one of preset 'tiny'" in line for line in lines), lines   # not "not registered"

def test_a_second_process_waits_for_a_shared_stage_instead_of_training_it(tiny, tmp_path, monkeypatch):
    "The stage lock: wait while another live process holds it, then reload its result; take over a dead one's lock."
    import os, shutil, socket, subprocess, sys, threading, time
    import ssl_book.recipes as recipes
    from ssl_book.recipes import pretext_recipe
    from ssl_book.train import load_checkpoint
    monkeypatch.setattr(recipes, "LOCK_POLL_S", 0.05)
    preset, train, test, s = tiny
    cls = _FlipAgreement.make()
    cfg = replace(preset.fit, steps=12, eval_every=4)
    run = lambda strategy, where, shared: fit_recipe(
        pretext_recipe(strategy, cls, {}, strategy, preset), lambda: make_model(preset, train, 0), train, s, cfg, test,
        device="cpu", progress=False, checkpoint_dir=tmp_path / where, preset=preset, shared_dir=shared)
    probe = run("probe", "probe", tmp_path / "a")
    pre = next(p for p in (tmp_path / "a").glob("*.pt") if load_checkpoint(p, "cpu")["history"] == probe.histories[0].rows)
    # another process of this machine trains the pretraining: its lock names a live process
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "b").mkdir()
        lock = tmp_path / "b" / (pre.name + ".lock")
        lock.write_text(f"{socket.gethostname()} {other.pid}")
        out = {}
        t = threading.Thread(target=lambda: out.update(r=run("finetune", "finetune", tmp_path / "b")))
        t.start(); time.sleep(1.0)
        assert t.is_alive() and not (tmp_path / "finetune").exists()                 # waiting, nothing trained
        shutil.copyfile(pre, tmp_path / "b" / pre.name); lock.unlink()                # the other process finishes
        t.join(60)
        assert not t.is_alive() and out["r"].histories[0].rows == probe.histories[0].rows
        # reloaded, not trained: the run's stage checkpoint is the shared file itself (a hard link)
        assert (tmp_path / "finetune" / "0-pretrain.pt").samefile(tmp_path / "b" / pre.name) and not lock.exists()
    finally:
        other.kill(); other.wait()
    # a lock whose process is gone, or that names this very process, is taken over at once and released afterwards
    for where, pid in [("c", other.pid), ("d", os.getpid())]:                    # `other` has exited
        (tmp_path / where).mkdir()
        lock = tmp_path / where / (pre.name + ".lock")
        lock.write_text(f"{socket.gethostname()} {pid}")
        if pid != os.getpid(): os.link(lock, lock.with_name(f"{lock.name}.{pid}"))   # the dead holder's own name, as it left it
        t = threading.Thread(target=lambda: out.update(again=run("probe", "again_" + where, tmp_path / where)))
        t.start(); t.join(60)
        assert not t.is_alive(), "a stale lock was waited for"
        assert out["again"].histories[0].rows[-1]["loss"] == probe.histories[0].rows[-1]["loss"] and not lock.exists()
        assert (tmp_path / where / pre.name).exists() and not list((tmp_path / where).glob("*.lock*"))
