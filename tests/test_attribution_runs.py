"""Explanations as engine runs: the ExplanationSet, private random generators under threads,
option types, the lock-free calibrated estimate and the CLI's early output-path check."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from engine.attribution import (
    ExplanationSet,
    ExplanationSpec,
    MethodRun,
    TargetSpec,
    calibration,
    estimate,
    explain,
    get_method,
    start_explanation,
)
from engine.attribution.agreement import top_k_overlap
from engine.errors import InputError

LM_TEXT = "the capital of france is"
CLS_TEXT = "this movie is very good . the plot is boring !"
RANDOM = {
    "gradient_shap": {"samples": 6, "stdevs": 0.2},
    "lime": {"samples": 40},
    "kernel_shap": {"samples": 40},
    "shapley_value_sampling": {"samples": 3},
}


@pytest.fixture(scope="module", autouse=True)
def private_home(tmp_path_factory):
    """The timing cache goes to a temporary WORKBENCH_HOME, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("runs-home")))
        yield


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("runs-store"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"])).loaded


@pytest.fixture(scope="module")
def classifier(wb, tiny_models):
    return wb.load(str(tiny_models["classifier"])).loaded


# --- the run and its typed result ---------------------------------------------------------


def test_run_returns_an_explanation_set_equal_to_direct_calls(classifier):
    spec = ExplanationSpec(
        CLS_TEXT,
        TargetSpec(label="positive"),
        methods=(
            MethodRun("ig", {"steps": 16, "auto_steps": False}),
            MethodRun("feature_ablation"),
            MethodRun("gradient_shap", {"samples": 5}),
        ),
        seed=3,
    )
    run = start_explanation(classifier, spec)
    seen = []
    while not run.done:
        seen.append(run.snapshot())
        time.sleep(0.01)
    result = run.wait(60)
    final = run.snapshot()
    assert final.state == "done" and final.fraction == 1.0 and final.error is None
    assert isinstance(result, ExplanationSet) and final.result is result
    assert all(0 <= s.fraction <= 1 for s in seen)
    assert final.partial == result.attributions  # the finished methods, published as they end
    # each attribution equals the same method run directly, in this thread
    assert [a.method for a in result.attributions] == [
        "integrated_gradients",
        "feature_ablation",
        "gradient_shap",
    ]
    for attribution, method_run in zip(result.attributions, spec.methods, strict=True):
        direct = explain(
            classifier, CLS_TEXT, spec.target, method_run.method, method_run.options_dict(), seed=3
        )
        np.testing.assert_allclose(attribution.scores, direct.scores, atol=1e-6)
    # the agreement table: every pair, each figure recomputed here (scipy for the ranks)
    from scipy import stats

    rows = result.agreement.rows
    assert [(r.method_a, r.method_b) for r in rows] == [
        ("integrated_gradients", "feature_ablation"),
        ("integrated_gradients", "gradient_shap"),
        ("feature_ablation", "gradient_shap"),
    ]
    by_name = {a.method: a.scores[a.free] for a in result.attributions}
    for row in rows:
        a, b = by_name[row.method_a], by_name[row.method_b]
        assert row.spearman == pytest.approx(stats.spearmanr(a, b).statistic)
        assert row.kendall == pytest.approx(stats.kendalltau(a, b).statistic)
        assert row.top_k_overlap == top_k_overlap(a, b, row.k)
    assert result.provenance.model == classifier.name and result.provenance.seed == 3
    assert result.provenance.fingerprint == classifier.fingerprint
    assert result.spec == spec.validated(classifier)
    frame = result.agreement_frame()
    assert list(frame["spearman"]) == [r.spearman for r in rows]


def test_explanation_set_json_round_trip(classifier, tmp_path):
    spec = ExplanationSpec(
        CLS_TEXT,
        TargetSpec(),
        methods=(MethodRun("saliency"), MethodRun("occlusion", {"window": 2})),
        seed=11,
    )
    result = start_explanation(classifier, spec).wait(60)
    back = ExplanationSet.from_dict(json.loads(result.to_json()))
    assert back.spec == result.spec and back.provenance == result.provenance
    assert back.agreement == result.agreement or all(  # NaN != NaN: compare field by field
        (x.method_a, x.method_b, x.k) == (y.method_a, y.method_b, y.k)
        and np.allclose([x.spearman, x.kendall], [y.spearman, y.kendall], equal_nan=True)
        for x, y in zip(back.agreement.rows, result.agreement.rows, strict=True)
    )
    for a, b in zip(back.attributions, result.attributions, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.tokens == b.tokens and a.options == b.options and a.method == b.method
        np.testing.assert_array_equal(a.faithfulness.deletion, b.faithfulness.deletion)
    assert back.attributions[1].options["window"] == 2
    saved = ExplanationSet.load(result.save(tmp_path / "set.json"))
    assert saved.spec.methods[1] == MethodRun("occlusion", {"window": 2})
    # one method: no agreement table, still a set
    single = start_explanation(classifier, ExplanationSpec(CLS_TEXT)).wait(60)
    assert single.agreement is None and len(single.attributions) == 1
    assert ExplanationSet.from_dict(json.loads(single.to_json())).agreement is None


def test_views_draw_from_the_result(llama):
    spec = ExplanationSpec(LM_TEXT, TargetSpec(text=" paris city"), per_token=True)
    (attribution,) = start_explanation(llama, spec).wait(60).attributions
    words = attribution.group_frame("word")
    assert list(words["word"]) == ["capital", "of", "france", "is"]  # "the" is anchored
    top = attribution.bar_chart("token", k=3).data
    assert len(top) == 3 and abs(top["score"].iloc[0]) == max(abs(top["score"]))
    matrix = attribution.matrix_frame()
    assert len(matrix) == 2 * int(attribution.free.sum())  # 2 output tokens x free inputs
    assert attribution.matrix_chart() is not None
    curves = attribution.faithfulness.to_frame()
    assert set(curves["curve"]) == {"deletion", "insertion", "random deletion"}
    spec_dict = attribution.faithfulness.chart().to_dict()
    assert spec_dict["mark"]["type"] == "line"


def test_cancel_and_failure_are_one_line_and_stay(llama):
    spec = ExplanationSpec(
        LM_TEXT,
        methods=(MethodRun("shapley_value_sampling", {"samples": 1000, "internal_batch_size": 1}),),
    )
    run = start_explanation(llama, spec)
    run.cancel()
    assert run.join(60)
    snap = run.snapshot()
    assert snap.cancelled and "cancelled" in snap.error.lower() and "\n" not in snap.error
    # an input error found while running: the run fails with the engine's own line
    failed = start_explanation(llama, ExplanationSpec(LM_TEXT, TargetSpec(text=" paris" * 40)))
    assert failed.join(60)
    first = failed.snapshot()
    assert first.state == "failed" and "at most 32 are allowed" in first.error
    assert failed.snapshot().error == first.error  # it stays with the run
    with pytest.raises(InputError, match="at most 32"):
        failed.wait(1)


# --- option values of the wrong type ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ig", {"steps": "50"}, r"steps must be a whole number \(int\), not str '50'"),
        ("ig", {"steps": True}, r"steps must be a whole number \(int\), not bool True"),
        ("ig", {"steps": 50.5}, r"steps must be a whole number \(int\), not float"),
        ("ig", {"auto_steps": 1}, r"auto_steps must be true or false \(bool\), not int 1"),
        ("gradient_shap", {"stdevs": "0.1"}, r"stdevs must be a number \(float\), not str"),
        ("gradient_shap", {"stdevs": False}, r"stdevs must be a number \(float\), not bool"),
        ("occlusion", {"baseline": 3}, r"baseline must be one of pad, zero, mask \(got 3\)"),
        ("ig", {"stepz": 50}, r"has no option stepz; its options are: .*steps \(a whole number\)"),
    ],
)
def test_wrong_option_types_are_input_errors(llama, method, options, message):
    with pytest.raises(InputError, match=message):
        get_method(method).make_options(options)
    with pytest.raises(InputError, match=message):  # the run refuses before starting
        start_explanation(llama, ExplanationSpec(LM_TEXT, methods=(MethodRun(method, options),)))
    with pytest.raises(InputError, match=message):
        explain(llama, LM_TEXT, TargetSpec(), method, options)
    with pytest.raises(InputError, match=message):
        estimate(llama, LM_TEXT, TargetSpec(), method, options)


def test_whole_numbers_are_accepted_for_float_options():
    options = get_method("gradient_shap").make_options({"stdevs": 1, "samples": np.int64(4)})
    assert options.stdevs == 1.0 and isinstance(options.stdevs, float) and options.samples == 4


# --- private random generators --------------------------------------------------------------


def _explain_all(loaded, text, spec, seed):
    return {
        name: explain(loaded, text, spec, name, options, seed=seed, faithfulness=False).scores
        for name, options in RANDOM.items()
    }


def test_random_methods_leave_the_global_generators_alone(llama):
    torch_before = torch.get_rng_state()
    numpy_before = np.random.get_state()
    _explain_all(llama, LM_TEXT, TargetSpec(text=" paris"), seed=4)
    assert torch.equal(torch.get_rng_state(), torch_before)
    numpy_after = np.random.get_state()
    assert numpy_after[2] == numpy_before[2]
    np.testing.assert_array_equal(numpy_after[1], numpy_before[1])


def test_two_models_in_two_threads_each_reproduce_their_single_thread_result(llama, classifier):
    """Both explanations draw at the same time, while a third thread draws from (and
    reseeds) the process-wide generators: each still equals its single-thread result."""
    jobs = {
        "llama": (llama, LM_TEXT, TargetSpec(text=" paris"), 1),
        "classifier": (classifier, CLS_TEXT, TargetSpec(label="positive"), 2),
    }
    alone = {key: _explain_all(*job) for key, job in jobs.items()}
    assert not np.allclose(alone["llama"]["lime"][:5], 0)
    stop = threading.Event()

    def noise() -> None:  # another user of the global generators
        while not stop.is_set():
            torch.manual_seed(int(time.perf_counter_ns()) % 1000)
            np.random.seed(int(time.perf_counter_ns()) % 1000)
            torch.rand(8)
            np.random.uniform(size=8)
            time.sleep(0.0002)

    together: dict[str, list] = {key: [] for key in jobs}
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            for _ in range(2):
                barrier.wait(30)
                together[key].append(_explain_all(*jobs[key]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    noisy = threading.Thread(target=noise, daemon=True)
    noisy.start()
    threads = [threading.Thread(target=worker, args=(key,)) for key in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    noisy.join(5)
    assert not errors, errors
    for key in jobs:
        assert len(together[key]) == 2  # every round of every thread finished
        for round_scores in together[key]:
            for name in RANDOM:
                np.testing.assert_array_equal(round_scores[name], alone[key][name], err_msg=name)


def test_runs_in_parallel_reproduce_their_seeds(llama, classifier):
    """The same through start_explanation: two runs at once, several random methods each."""
    methods = tuple(MethodRun(name, options) for name, options in RANDOM.items())
    specs = {
        llama: ExplanationSpec(LM_TEXT, TargetSpec(text=" paris"), methods, seed=9),
        classifier: ExplanationSpec(CLS_TEXT, TargetSpec(), methods, seed=10),
    }
    alone = {m: start_explanation(m, s).wait(120) for m, s in specs.items()}
    started = {m: start_explanation(m, s) for m, s in specs.items()}
    for model, run in started.items():
        got = run.wait(120)
        for a, b in zip(got.attributions, alone[model].attributions, strict=True):
            np.testing.assert_array_equal(a.scores, b.scores, err_msg=a.method)


# --- the pre-flight estimate ----------------------------------------------------------------


def _hold(loaded):
    """Hold the model's lock in another thread until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with loaded.use():
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(10)
    return release, thread


def test_estimate_never_waits_for_a_busy_model_and_runs_no_forward_pass(llama, monkeypatch):
    spec = TargetSpec(text=" paris")
    calibration.forget()
    release, thread = _hold(llama)
    try:
        started = time.perf_counter()
        busy = estimate(llama, LM_TEXT, spec, "ig", {"steps": 20}, wait=False)
        assert time.perf_counter() - started < 5  # not the lock's 600 s timeout
        assert not busy.calibrated and busy.time_range().startswith("~")
        assert busy.rows == 22 and busy.seconds_low < busy.seconds < busy.seconds_high
    finally:
        release.set()
        thread.join(10)
    # the benchmark started in the background when the model was busy; it ran once it was free
    measured = estimate(llama, LM_TEXT, spec, "ig", {"steps": 20}, wait=True)
    assert measured.calibrated and not measured.time_range().startswith("~")
    # measured once: later estimates (model busy or not) read the cache, with no forward pass
    calls = []
    original = llama.model.forward
    monkeypatch.setattr(
        llama.model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    release, thread = _hold(llama)
    try:
        again = estimate(llama, LM_TEXT, spec, "ig", {"steps": 20}, wait=False)
        other = estimate(llama, LM_TEXT, spec, "feature_ablation", faithfulness=True, wait=False)
    finally:
        release.set()
        thread.join(10)
    assert again.calibrated and other.calibrated and calls == []
    assert again.seconds == pytest.approx(measured.seconds)


def test_calibrated_seconds_follow_the_measured_rates(llama):
    rates = calibration.Rates(
        key="k", bucket=16, batch=16, forward=(0.01, 0.02, 0.04), backward=(0.1,), measured=0.0
    )
    low, mid, high = rates.seconds(rows=10, tokens=8, gradient=False)
    assert (low, mid, high) == pytest.approx(
        (0.01 * 5 * calibration.LOW, 0.02 * 5, 0.04 * 5 * calibration.HIGH)
    )
    assert rates.seconds(rows=10, tokens=16, gradient=True) == pytest.approx(
        (0.1 * 10 * calibration.LOW, 1.0, 0.1 * 10 * calibration.HIGH)
    )
    assert [calibration.bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
    # a finished run adds its own seconds per row to the rates of its bucket
    calibration.forget()
    before = calibration.rates(llama, 7, wait=True)
    calibration.observe(llama, 7, True, rows=4, seconds=2.0)
    after = calibration.cached(llama, 7)
    assert after.backward == (*before.backward, 2.0 / 4 * 16 / 7)
    # and the disk cache gives the measured rates to a fresh process
    calibration.forget()
    from_disk = calibration.cached(llama, 7)
    assert from_disk is not None and from_disk.forward == before.forward


# --- CLI: output paths are checked before any work -----------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/proc/nope.html", "Cannot write the HTML report to /proc/nope.html"),
        ("/proc/nope/a.html", "the folder /proc/nope does not exist"),
        ("/tmp", "it is a folder"),
    ],
)
def test_cli_unwritable_html_fails_at_once(tiny_models, capsys, monkeypatch, path, message):
    import workbench.cli.explain as cli_explain
    from workbench.cli import main

    def no_loading():
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(cli_explain, "open_workbench", no_loading)
    code = main(["explain", str(tiny_models["llama"]), LM_TEXT, "--html", path])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") == 0 and err.startswith("error:")


def test_cli_writes_an_escaped_report(tiny_models, capsys, monkeypatch, tmp_path):
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "cli-home"))
    out = tmp_path / "report.html"
    text = 'the movie <script>alert(1)</script> is "><img src=x onerror=alert(2)>'
    code = main(["explain", str(tiny_models["llama"]), text, "--html", str(out), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["text"] == text and len(data["scores"]) == len(data["tokens"])
    report = out.read_text()
    assert "<script" not in report and "<img" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert not list(tmp_path.glob(".report.html*"))  # no temporary or probe file left
