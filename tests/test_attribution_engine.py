"""Attribution engine on tiny random models: targets, methods vs direct captum, trust figures."""

from __future__ import annotations

import html
import json
import re
import threading

import numpy as np
import pytest
import torch

from engine.attribution import (
    Attribution,
    TargetSpec,
    agreement,
    all_methods,
    available_methods,
    budget,
    estimate,
    explain,
    get_method,
    html_report,
)
from engine.attribution.agreement import kendall, spearman, top_k_overlap
from engine.attribution.faithfulness import curve_points
from engine.attribution.targets import Target
from engine.errors import CancelledError, InputError, MemoryBudgetError

LM_TEXT = "the capital of france is"
CLS_TEXT = "this movie is very good . the plot is boring !"


@pytest.fixture(scope="module", autouse=True)
def private_home(tmp_path_factory):
    """The estimate's timing cache goes to a temporary WORKBENCH_HOME, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_HOME", str(tmp_path_factory.mktemp("engine-home")))
        yield


@pytest.fixture(scope="module")
def wb(tmp_path_factory):
    from engine import Workbench

    return Workbench(home=tmp_path_factory.mktemp("attr-home"), device="cpu")


@pytest.fixture(scope="module")
def llama(wb, tiny_models):
    return wb.load(str(tiny_models["llama"])).loaded


@pytest.fixture(scope="module")
def classifier(wb, tiny_models):
    return wb.load(str(tiny_models["classifier"])).loaded


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_every_required_method():
    names = {m.name for m in all_methods()}
    assert {
        "integrated_gradients",
        "saliency",
        "input_x_gradient",
        "gradient_shap",
        "deeplift",
        "feature_ablation",
        "occlusion",
        "shapley_value_sampling",
        "lime",
        "kernel_shap",
        "attention_rollout",
    } <= names
    for method in all_methods():
        defaults = method.make_options()  # every method has valid defaults
        assert dataclass_is_frozen(defaults)


def dataclass_is_frozen(obj) -> bool:
    with pytest.raises(Exception):  # noqa: B017 - FrozenInstanceError
        obj.__setattr__("x", 1)
    return True


def test_available_methods_excludes_deeplift_on_silu_and_gelu(llama, classifier):
    for loaded in (llama, classifier):
        names = [m.name for m in available_methods(loaded)]
        assert "deeplift" not in names and "integrated_gradients" in names
    reason = get_method("deeplift").incompatibility(llama)
    assert "SiLU" in reason


def test_option_specs_drive_controls():
    specs = {s.name: s for s in get_method("integrated_gradients").option_specs()}
    assert specs["steps"].type == "int" and specs["steps"].default == 50
    assert specs["baseline"].type == "choice" and specs["baseline"].choices == (
        "pad",
        "zero",
        "mask",
    )
    assert get_method("shapley_value_sampling").make_options({"samples": 3}).samples == 3


def test_bad_method_and_options_are_clear():
    with pytest.raises(InputError, match="choose one of: integrated_gradients"):
        get_method("magic")
    with pytest.raises(InputError, match="steps must be at least 2"):
        get_method("ig").make_options({"steps": 1})
    with pytest.raises(InputError, match="baseline must be one of pad, zero, mask"):
        get_method("ig").make_options({"baseline": "noise"})
    with pytest.raises(InputError, match="has no option samples"):
        get_method("ig").make_options({"samples": 5})


# --- targets: every score checked against a direct log-probability ---------------------------


@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec(),
        TargetSpec(text=" paris"),
        TargetSpec(text=" paris city ."),
        TargetSpec(text=" paris", contrast=" the"),
    ],
    ids=["next-token", "one-token", "continuation", "contrast"],
)
def test_lm_target_score_equals_direct_logprob(llama, spec):
    with llama.use():
        target = Target(llama, LM_TEXT, spec)
        with torch.no_grad():
            mine = float(target.score(target.free_embeds()))
        direct = target.direct_score()
    assert mine == pytest.approx(direct, abs=1e-5)
    # and against an independent from-scratch computation with plain token ids
    tok = llama.tokenizer
    ids = tok(LM_TEXT, return_tensors="pt")["input_ids"]

    def logprob(cont_ids):
        full = torch.cat([ids[0], torch.tensor(cont_ids)]).unsqueeze(0)
        with torch.no_grad():
            lp = torch.log_softmax(llama.model(full).logits[0], -1)
        return sum(float(lp[ids.shape[1] - 1 + j, t]) for j, t in enumerate(cont_ids))

    if spec.text:
        expected = logprob(tok(spec.text, add_special_tokens=False)["input_ids"])
        if spec.contrast:
            expected -= logprob(tok(spec.contrast, add_special_tokens=False)["input_ids"])
    else:
        with torch.no_grad():
            logits = llama.model(ids).logits[0, -1]
        expected = float(torch.log_softmax(logits, -1).max())
    assert mine == pytest.approx(expected, abs=1e-5)


def test_lm_target_matches_captum_llm_attribution_forward(llama):
    """captum's LLMAttribution with use_cached_outputs=False scores the same log-prob."""
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    tok = llama.tokenizer
    llm = LLMAttribution(FeatureAblation(llama.model), tok, attr_target="log_prob")
    inp = TextTokenInput(LM_TEXT, tok)
    target_ids = torch.tensor(tok(" paris city", add_special_tokens=False)["input_ids"])
    captum_value = llm._forward_func(None, inp, target_ids, use_cached_outputs=False)
    with llama.use():
        target = Target(llama, LM_TEXT, TargetSpec(text=" paris city"))
        with torch.no_grad():
            per_token = target.forward(target.free_embeds())[0]
    total, *tokens = captum_value[0].tolist()  # [total, per-token...]
    assert total == pytest.approx(float(per_token.sum()), abs=1e-5)
    np.testing.assert_allclose(tokens, per_token.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "spec", [TargetSpec(), TargetSpec(label="negative"), TargetSpec(label="1", contrast="negative")]
)
def test_classifier_target_score_equals_direct(classifier, spec):
    with classifier.use():
        target = Target(classifier, CLS_TEXT, spec)
        with torch.no_grad():
            mine = float(target.score(target.free_embeds()))
        ids = target.input_ids
        with torch.no_grad():
            logits = classifier.model(input_ids=ids).logits[0]
    if spec.contrast:
        expected = float(logits[1] - logits[0])
    else:
        index = int(logits.argmax()) if not spec.label else 0
        expected = float(torch.log_softmax(logits, -1)[index])
    assert mine == pytest.approx(expected, abs=1e-5)


# --- attributions equal a direct captum call with the same settings ------------------------


def _direct_ig_classifier(loaded, text, label, steps):
    from captum.attr import LayerIntegratedGradients

    tok = loaded.tokenizer
    enc = tok(text, return_tensors="pt", return_special_tokens_mask=True)
    ids = enc["input_ids"]
    baseline = ids.clone()
    baseline[enc["special_tokens_mask"].bool()] = -1
    baseline[baseline != -1] = tok.pad_token_id
    baseline[baseline == -1] = ids[baseline == -1]

    def forward(input_ids):
        return torch.log_softmax(loaded.model(input_ids=input_ids).logits, -1)[:, label]

    lig = LayerIntegratedGradients(forward, loaded.model.get_input_embeddings())
    attr, delta = lig.attribute(
        ids, baselines=baseline, n_steps=steps, return_convergence_delta=True
    )
    return attr.sum(-1)[0].detach().numpy(), float(delta[0])


def test_ig_classifier_allclose_to_direct_captum(classifier):
    result = explain(
        classifier,
        CLS_TEXT,
        TargetSpec(label="positive"),
        "integrated_gradients",
        {"steps": 32, "auto_steps": False},
        faithfulness=False,
    )
    assert result.steps_used == 32 and len(result.step_trials) == 1
    direct, delta = _direct_ig_classifier(classifier, CLS_TEXT, 1, 32)
    np.testing.assert_allclose(result.scores, direct, atol=1e-6, rtol=1e-4)
    assert result.convergence_delta == pytest.approx(delta, abs=1e-6)


def test_ig_causal_lm_allclose_to_captum_llm_gradient_attribution(llama):
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    tok = llama.tokenizer
    llm = LLMGradientAttribution(
        LayerIntegratedGradients(llama.model, llama.model.get_input_embeddings()), tok
    )
    inp = TextTokenInput(LM_TEXT, tok)
    baselines = torch.full_like(inp.to_tensor(), tok.pad_token_id)
    direct = llm.attribute(inp, target=" paris city", baselines=baselines, n_steps=20)
    result = explain(
        llama,
        LM_TEXT,
        TargetSpec(text=" paris city", anchor_first=False),
        "ig",
        {"steps": 20, "auto_steps": False},
        per_token=True,
        faithfulness=False,
    )
    np.testing.assert_allclose(result.token_matrix, direct.token_attr.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.scores, direct.seq_attr.numpy(), atol=1e-5, rtol=1e-4)
    # without the matrix, the sequence scores come from one run on the summed score
    single = explain(
        llama,
        LM_TEXT,
        TargetSpec(text=" paris city", anchor_first=False),
        "ig",
        {"steps": 20, "auto_steps": False},
        faithfulness=False,
    )
    np.testing.assert_allclose(single.scores, result.scores, atol=1e-5, rtol=1e-4)


def test_feature_ablation_allclose_to_captum_llm_attribution(llama):
    from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

    tok = llama.tokenizer
    llm = LLMAttribution(FeatureAblation(llama.model), tok, attr_target="log_prob")
    inp = TextTokenInput(LM_TEXT, tok, baselines=tok.pad_token_id)
    direct = llm.attribute(inp, target=" paris", use_cached_outputs=False)
    result = explain(
        llama,
        LM_TEXT,
        TargetSpec(text=" paris", anchor_first=False),
        "feature_ablation",
        faithfulness=False,
    )
    np.testing.assert_allclose(result.scores, direct.seq_attr.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["saliency", "input_x_gradient"])
def test_gradient_methods_allclose_to_direct_captum(classifier, name):
    import captum.attr

    cls = {"saliency": "Saliency", "input_x_gradient": "InputXGradient"}[name]
    with classifier.use():
        target = Target(classifier, CLS_TEXT, TargetSpec(label="positive"))
        x = target.free_embeds().requires_grad_()
        kwargs = {"abs": False} if name == "saliency" else {}
        attr = getattr(captum.attr, cls)(target.score).attribute(x, **kwargs).detach()
    expected = attr.norm(dim=-1)[0] if name == "saliency" else attr.sum(-1)[0]
    result = explain(classifier, CLS_TEXT, TargetSpec(label="positive"), name, faithfulness=False)
    np.testing.assert_allclose(result.scores[result.free], expected.numpy(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", [m.name for m in all_methods() if m.name != "deeplift"])
def test_every_method_runs_on_both_kinds(llama, classifier, name):
    for loaded, text, spec in (
        (llama, LM_TEXT, TargetSpec(text=" paris")),
        (classifier, CLS_TEXT, TargetSpec()),
    ):
        options = (
            {"samples": 8} if "samples" in {s.name for s in get_method(name).option_specs()} else {}
        )
        result = explain(loaded, text, spec, name, options)
        # the pre-flight estimate counts exactly the rows the method runs (IG: every run tried
        # by step refinement; the estimate's first run, at most its worst case)
        plan = estimate(loaded, text, spec, name, options)
        expected = plan.rows
        if result.step_trials:
            expected = sum(
                estimate(loaded, text, spec, name, {"steps": s, "auto_steps": False}).rows
                for s, _rel in result.step_trials
            )
        assert result.forward_rows == expected and plan.rows <= expected <= plan.worst_rows
        assert result.scores.shape == (len(result.tokens),)
        assert np.all(result.scores[~result.free] == 0)
        assert np.isfinite(result.scores).all()
        assert result.faithfulness is not None


def test_deeplift_runs_where_activations_have_rules(tmp_path, wb):
    """A BERT with ReLU activations: DeepLift is offered and equals a direct captum call."""
    from captum.attr import DeepLift

    from engine import testing

    folder = testing.tiny_bert(
        tmp_path / "relu-bert",
        num_labels=2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_act="relu",
    )
    loaded = wb.load(str(folder)).loaded
    assert "deeplift" in [m.name for m in available_methods(loaded)]
    result = explain(loaded, CLS_TEXT, TargetSpec(label="0"), "deeplift", faithfulness=False)
    from engine.attribution.methods import _ScoreModule

    with loaded.use():
        target = Target(loaded, CLS_TEXT, TargetSpec(label="0"))
        attr = DeepLift(_ScoreModule(loaded.model, target.score)).attribute(
            target.free_embeds().requires_grad_(), baselines=target.baseline_free_embeds("pad")
        )
    np.testing.assert_allclose(
        result.scores[result.free], attr.sum(-1)[0].detach().numpy(), atol=1e-6
    )


# --- sampled, windowed and attention methods: equal to captum or to an exact value -------------


def _free_inputs(loaded, text, spec):
    """(target, inputs (1, k, d), pad baselines (1, k, d), (1, k, 1) token mask)."""
    target = Target(loaded, text, spec)
    x, base = target.free_embeds(), target.baseline_free_embeds("pad")
    k = x.shape[1]
    return target, x, base, torch.arange(k).view(1, k, 1)


@pytest.mark.parametrize("which", ["llama", "classifier"])
def test_gradient_shap_equals_captum_seeded_the_same(request, which):
    """captum's GradientShap after torch.manual_seed / np.random.seed(seed): the same draws."""
    from captum.attr import GradientShap

    loaded = request.getfixturevalue(which)
    text, spec = (
        (LM_TEXT, TargetSpec(text=" paris")) if which == "llama" else (CLS_TEXT, TargetSpec())
    )
    with loaded.use():
        target, x, base, _ = _free_inputs(loaded, text, spec)
        torch.manual_seed(7)
        np.random.seed(7)
        direct = GradientShap(target.score).attribute(
            x.clone().requires_grad_(), baselines=base, n_samples=12, stdevs=0.3
        )
    options = {"samples": 12, "stdevs": 0.3}
    result = explain(loaded, text, spec, "gradient_shap", options, seed=7, faithfulness=False)
    expected = direct.detach().sum(-1)[0].numpy()
    assert np.abs(expected).max() > 1e-3  # a zeros stub cannot pass
    np.testing.assert_allclose(result.scores[result.free], expected, atol=1e-6, rtol=1e-4)
    other = explain(loaded, text, spec, "gradient_shap", options, seed=8, faithfulness=False)
    assert not np.allclose(other.scores, result.scores)  # the seed drives the draws


def test_shapley_value_sampling_equals_captum_seeded_the_same(llama):
    from captum.attr import ShapleyValueSampling

    with llama.use():
        target, x, base, mask = _free_inputs(llama, LM_TEXT, TargetSpec(text=" paris"))
        torch.manual_seed(5)
        direct = ShapleyValueSampling(target.score).attribute(
            x, baselines=base, feature_mask=mask, n_samples=6
        )[0, :, 0]
    result = explain(
        llama,
        LM_TEXT,
        TargetSpec(text=" paris"),
        "shapley_value_sampling",
        {"samples": 6},
        seed=5,
        faithfulness=False,
    )
    assert float(direct.abs().max()) > 1e-3
    np.testing.assert_allclose(result.scores[result.free], direct.numpy(), atol=1e-6)
    # efficiency: each permutation's contributions add up to f(input) - f(baseline)
    with torch.no_grad():
        gap = result.target_score - float(target.score(base))
    assert float(result.scores.sum()) == pytest.approx(gap, abs=1e-5)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_occlusion_equals_hand_computed_windows(llama, window):
    """Each token's score: mean over the windows covering it of f(x) - f(x, window replaced)."""
    spec = TargetSpec(text=" paris")
    with llama.use(), torch.no_grad():
        target, x, base, _ = _free_inputs(llama, LM_TEXT, spec)
        k = x.shape[1]
        full = float(target.score(x))
        drops, covers = np.zeros(k), np.zeros(k)
        for start in range(k - window + 1):
            hidden = x.clone()
            hidden[:, start : start + window] = base[:, start : start + window]
            drops[start : start + window] += full - float(target.score(hidden))
            covers[start : start + window] += 1
    expected = drops / covers
    options = {"window": window}
    result = explain(llama, LM_TEXT, spec, "occlusion", options, faithfulness=False)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(result.scores[result.free], expected, atol=1e-5)


@pytest.fixture(scope="module")
def uniform_llama(wb, tiny_models, tmp_path_factory):
    """The tiny Llama with zero query weights: every head attends uniformly to the prefix."""
    from transformers import AutoModelForCausalLM

    from engine import testing

    folder = tmp_path_factory.mktemp("uniform") / "uniform-llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    model.save_pretrained(folder)
    testing.tiny_tokenizer().save_pretrained(folder)
    return wb.load(str(folder)).loaded


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_attention_rollout_exact_on_uniform_attention(uniform_llama, fusion):
    """Uniform causal attention A[i, j] = 1/(i+1): rollout is the last row of
    (A/2 + I/2)^layers, known in closed form, whatever the head fusion."""
    result = explain(
        uniform_llama,
        LM_TEXT,
        TargetSpec(text=" paris"),
        "attention_rollout",
        {"head_fusion": fusion},
        faithfulness=False,
    )
    n = len(result.tokens)
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    step = 0.5 * uniform + 0.5 * np.eye(n)
    layers = uniform_llama.model.config.num_hidden_layers
    expected = np.linalg.matrix_power(step, layers)[n - 1]
    np.testing.assert_allclose(result.scores[result.free], expected[result.free], atol=1e-6)
    assert not result.free[0] and result.scores[0] == 0  # the anchored first token


def test_attention_rollout_matches_the_models_own_attentions(classifier):
    """On a random BERT classifier: rollout from the model's eager attentions. The tiny
    tokenizer adds no [CLS], so it is read at the last position (the predicting one)."""
    result = explain(
        classifier,
        CLS_TEXT,
        TargetSpec(),
        "attention_rollout",
        {"head_fusion": "max"},
        faithfulness=False,
    )
    ids = classifier.encode(CLS_TEXT, return_tensors="pt")["input_ids"]
    with classifier.use(), classifier.eager_attention(), torch.no_grad():
        attentions = classifier.model(input_ids=ids, output_attentions=True).attentions
    n = ids.shape[1]
    rollout = np.eye(n)
    for layer in attentions:
        a = layer[0].max(0).values.double().numpy()
        a = 0.5 * a + 0.5 * np.eye(n)
        rollout = (a / a.sum(-1, keepdims=True)) @ rollout
    assert result.free.all() and result.tokens[0] == "this"
    np.testing.assert_allclose(result.scores, rollout[n - 1], atol=1e-6)


def test_classifier_explains_the_predicted_label_by_name(classifier):
    """No label given: the target is the argmax label of a direct forward pass, by name."""
    ids = classifier.encode(CLS_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = classifier.model(input_ids=ids).logits[0]
    predicted = classifier.model.config.id2label[int(logits.argmax())]
    result = explain(classifier, CLS_TEXT, TargetSpec(), "saliency", faithfulness=False)
    assert result.output_tokens == (predicted,)
    assert result.target_description == f"log p(label {predicted} (predicted))"
    other = "negative" if predicted == "positive" else "positive"
    chosen = explain(classifier, CLS_TEXT, TargetSpec(label=other), "saliency", faithfulness=False)
    assert chosen.output_tokens == (other,)
    assert chosen.target_description == f"log p(label {other})"
    assert chosen.label_probabilities[other] == pytest.approx(
        float(torch.softmax(logits, -1)[1 if other == "positive" else 0]), abs=1e-6
    )


# --- trust figures ------------------------------------------------------------------------


def test_ig_completeness_relation_and_statement(classifier):
    result = explain(classifier, CLS_TEXT, TargetSpec(), "ig", {"steps": 64})
    gap = result.target_score - result.baseline_score
    assert result.scores.sum() - gap == pytest.approx(result.convergence_delta, abs=1e-5)
    statement = result.delta_statement()
    assert ("converged" in statement) == (result.relative_delta <= 0.01)
    assert "completeness error" in statement


# Riemann-left sums converge slowly (error ~ 1/steps): a few steps are far above 1% on the tiny
# model, so step refinement has work to do in milliseconds.
COARSE = {"steps": 4, "integration": "riemann_left"}


def _direct_ig_free(loaded, spec, steps, integration):
    """Direct captum IG on the workbench's own score function: (k,) scores and delta."""
    from captum.attr import IntegratedGradients

    with loaded.use():
        target = Target(loaded, LM_TEXT, spec)
        attr, delta = IntegratedGradients(target.score).attribute(
            target.free_embeds().requires_grad_(),
            baselines=target.baseline_free_embeds("pad"),
            n_steps=steps,
            method=integration,
            return_convergence_delta=True,
        )
    return attr.detach().sum(-1)[0].numpy(), float(delta[0])


def test_ig_step_refinement_doubles_until_under_one_percent(llama):
    spec = TargetSpec(text=" paris")
    seen: list[tuple[float, str]] = []
    result = explain(
        llama,
        LM_TEXT,
        spec,
        "ig",
        COARSE,
        faithfulness=False,
        progress=lambda f, m: seen.append((f, m)),
    )
    trials = result.step_trials
    steps = [s for s, _ in trials]
    assert steps == [4 * 2**i for i in range(len(steps))] and len(steps) >= 2
    assert trials[0][1] > 0.01 and trials[-1][1] <= 0.01  # stopped at the first converged run
    assert all(rel > 0.01 for _, rel in trials[:-1])
    assert result.steps_used == steps[-1] and result.delta_ok
    assert result.relative_delta == pytest.approx(trials[-1][1])
    assert result.options["steps"] == 4  # the request is kept; steps_used is what ran
    assert result.forward_rows == sum(s + 2 for s in steps)
    statement = result.delta_statement()
    assert statement.startswith(f"Integrated Gradients converged after {steps[-1]} steps")
    assert f"tried {steps[0]} steps: {trials[0][1]:.2%}" in statement
    # the kept run equals a direct captum call at the steps used
    direct, delta = _direct_ig_free(llama, spec, steps[-1], "riemann_left")
    np.testing.assert_allclose(result.scores[result.free], direct, atol=1e-5, rtol=1e-4)
    assert result.convergence_delta == pytest.approx(delta, abs=1e-5)
    # progress kept working across the runs and said it was refining
    assert any(m.startswith(f"Refining: {steps[1]} steps") for _, m in seen)
    assert seen[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in seen)
    # the trials survive the JSON round trip
    back = Attribution.from_dict(json.loads(result.to_json()))
    assert back.step_trials == trials and back.steps_used == result.steps_used


def test_ig_step_refinement_off_and_cap(llama):
    spec = TargetSpec(text=" paris")
    off = explain(llama, LM_TEXT, spec, "ig", {**COARSE, "auto_steps": False}, faithfulness=False)
    assert off.steps_used == 4 and len(off.step_trials) == 1 and off.forward_rows == 6
    assert off.relative_delta > 0.01 and not off.delta_ok
    statement = off.delta_statement()
    assert "did NOT converge at 4 steps" in statement and "turn on Refine steps" in statement
    refined = explain(llama, LM_TEXT, spec, "ig", COARSE, faithfulness=False)
    assert refined.step_trials[0] == pytest.approx(off.step_trials[0])  # same first run
    # capped before converging: every run tried is reported, the best one kept
    capped = explain(llama, LM_TEXT, spec, "ig", {**COARSE, "max_steps": 6}, faithfulness=False)
    assert [s for s, _ in capped.step_trials] == [4, 6]
    best = min(capped.step_trials, key=lambda t: t[1])
    assert capped.steps_used == best[0] and capped.relative_delta == pytest.approx(best[1])
    statement = capped.delta_statement()
    assert "did NOT converge even at 6 steps" in statement and "Raise Max steps" in statement
    # max_steps at or below steps: no refinement
    single = explain(llama, LM_TEXT, spec, "ig", {**COARSE, "max_steps": 4}, faithfulness=False)
    assert [s for s, _ in single.step_trials] == [4]


def test_cancel_during_step_refinement(llama):
    cancel = threading.Event()

    def progress(_fraction: float, message: str) -> None:
        if message.startswith("Refining"):
            cancel.set()

    with pytest.raises(CancelledError, match="cancelled"):
        explain(
            llama,
            LM_TEXT,
            TargetSpec(text=" paris"),
            "ig",
            COARSE,
            faithfulness=False,
            progress=progress,
            cancel=cancel,
        )


def test_faithfulness_curves_are_consistent(llama):
    result = explain(llama, LM_TEXT, TargetSpec(text=" paris"), "feature_ablation")
    f = result.faithfulness
    assert f.fractions[0] == 0 and f.fractions[-1] == 1
    assert f.deletion[0] == pytest.approx(result.target_score, abs=1e-5)
    assert f.insertion[-1] == pytest.approx(result.target_score, abs=1e-5)
    assert f.deletion[-1] == pytest.approx(f.insertion[0], abs=1e-5)  # everything removed
    assert f.comprehensiveness == pytest.approx(
        np.mean(result.target_score - f.deletion[1:]), abs=1e-6
    )
    assert list(curve_points(50)) == sorted(set(curve_points(50)))
    assert len(curve_points(50)) == 21 and curve_points(3).tolist() == [0, 1, 2, 3]


def test_agreement_statistics_match_scipy():
    from scipy import stats as scipy_stats  # a project dependency: never skip this check

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(size=12)
    b[3] = b[4]  # a tie
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)
    assert top_k_overlap(np.arange(6.0), np.arange(6.0)[::-1], 3) == 0.0
    assert top_k_overlap(np.arange(6.0), np.arange(6.0), 3) == 1.0


def test_agreement_table_and_mismatch(classifier, llama):
    runs = [
        explain(classifier, CLS_TEXT, TargetSpec(), m, faithfulness=False)
        for m in ("ig", "feature_ablation", "saliency")
    ]
    table = agreement(runs)
    assert len(table.rows) == 3 and {r.method_a for r in table.rows} >= {"integrated_gradients"}
    other = explain(llama, LM_TEXT, TargetSpec(), "saliency", faithfulness=False)
    with pytest.raises(InputError, match="same model, text and target"):
        agreement([runs[0], other])


def test_grouping_into_sentences(classifier):
    result = explain(classifier, CLS_TEXT, TargetSpec(), "feature_ablation", faithfulness=False)
    labels, sums = result.groups("sentence")
    assert labels == ["this movie is very good .", "the plot is boring !"]
    free = result.scores[result.free]
    assert sums.sum() == pytest.approx(free.sum())
    words, _ = result.groups("word")
    assert words[:2] == ["this", "movie"]


# --- runs: progress, cancel, memory, bad input ------------------------------------------------


def test_progress_and_cancel(llama):
    seen = []
    explain(
        llama,
        LM_TEXT,
        TargetSpec(),
        "ig",
        {"steps": 10},
        progress=lambda f, m: seen.append(f),
        faithfulness=False,
    )
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError, match="cancelled"):
        explain(llama, LM_TEXT, TargetSpec(), "ig", cancel=cancel)


def test_estimate_and_memory_refusal(llama, monkeypatch):
    e = estimate(llama, LM_TEXT, TargetSpec(text=" paris"), "ig", {"steps": 50})
    assert e.rows == 52 and e.tokens == 6 and e.fits and e.seconds > 0 and e.extra_rows == 0
    # step refinement's worst case: 50, 100, 200 and 400 steps (+2 rows each) all run
    assert e.attempts == 4 and e.worst_rows == 52 + 102 + 202 + 402
    assert e.worst_seconds == pytest.approx(e.seconds * e.worst_rows / e.rows)
    off = estimate(llama, LM_TEXT, TargetSpec(text=" paris"), "ig", {"auto_steps": False})
    assert (off.attempts, off.worst_rows, off.worst_seconds) == (1, 52, off.seconds)
    with_curves = estimate(
        llama, LM_TEXT, TargetSpec(text=" paris"), "ig", {"steps": 50}, faithfulness=True
    )
    assert with_curves.extra_rows == 3 * 5  # 0..4 tokens removed, three curves
    assert with_curves.seconds > e.seconds and with_curves.rows == e.rows
    # 5 tokens, the first held fixed (no BOS): k = 4 free tokens; captum scores the baseline
    # once, then k perturbations per permutation
    big = estimate(llama, LM_TEXT, TargetSpec(), "shapley_value_sampling", {"samples": 10})
    assert big.rows == 10 * 4 + 1
    monkeypatch.setattr(budget, "available_bytes", lambda loaded: 1000)
    with pytest.raises(MemoryBudgetError, match="would not fit|GiB"):
        explain(llama, LM_TEXT, TargetSpec(), "ig")


@pytest.mark.parametrize(
    ("which", "text", "spec", "message"),
    [
        ("llama", "   ", TargetSpec(), "text is empty"),
        ("llama", LM_TEXT, TargetSpec(text=" paris" * 40), "at most 32 are allowed"),
        ("llama", LM_TEXT, TargetSpec(label="positive"), "has no labels"),
        ("llama", LM_TEXT, TargetSpec(text=" paris", contrast=" "), "contrast text is empty"),
        ("classifier", CLS_TEXT, TargetSpec(label="happy"), "no label 'happy'"),
        ("classifier", CLS_TEXT, TargetSpec(text="x"), "choose a label"),
    ],
)
def test_bad_input_is_a_clear_input_error(request, which, text, spec, message):
    loaded = request.getfixturevalue(which)
    with pytest.raises(InputError, match=message):
        explain(loaded, text, spec, "saliency")


def test_incompatible_method_and_model_kind(llama, wb, tiny_models):
    with pytest.raises(InputError, match="DeepLift cannot run"):
        explain(llama, LM_TEXT, TargetSpec(), "deeplift")
    encoder = wb.load(str(tiny_models["bert"])).loaded
    with pytest.raises(InputError, match="sequence classifier or a causal LM"):
        explain(encoder, CLS_TEXT, TargetSpec(), "saliency")


# --- export ------------------------------------------------------------------------------------


def test_json_round_trip_and_html_report(classifier, tmp_path):
    runs = [explain(classifier, CLS_TEXT, TargetSpec(), m) for m in ("ig", "occlusion")]
    path = runs[0].save(tmp_path / "r.json")
    back = Attribution.load(path)
    np.testing.assert_allclose(back.scores, runs[0].scores)
    assert back.faithfulness.comprehensiveness == runs[0].faithfulness.comprehensiveness
    data = json.loads(path.read_text())
    assert data["provenance"]["versions"]["captum"]
    assert data["options"]["steps"] == 50 and data["method"] == "integrated_gradients"
    report = html_report(runs)
    assert "Method agreement" in report and "Integrated Gradients" in report
    assert report.count('class="tok"') == 2 * int(runs[0].free.sum())


HOSTILE = 'the movie <script>alert(1)</script> is good "><img src=x onerror=alert(2)> !'


def test_html_report_escapes_hostile_text(llama):
    """Input and target text with markup: every piece shows as text, none becomes a tag."""
    target = TargetSpec(text=' paris "><img src=x onerror=alert(3)>')
    runs = [explain(llama, HOSTILE, target, m) for m in ("saliency", "feature_ablation")]
    report = html_report(runs)
    assert "<script" not in report.lower() and "<img" not in report.lower()
    assert "onerror=" not in report.replace("onerror=alert(", "")  # only escaped copies
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report  # the input, shown as text
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in report
    # (the target's markup is not in the tiny vocabulary: it decodes to [UNK] tokens)
    assert "log p(&#x27;paris[UNK][UNK]" in report
    # the coloured spans cover the original characters, escaped
    assert report.count('class="tok"') == 2 * int(runs[0].free.sum())
    for attribution in runs:  # the coloured text: only our spans, its text is the input
        block = attribution.html()
        assert "<script" not in block and "<img" not in block
        assert html.unescape(re.sub(r"<[^>]+>", "", block)) == HOSTILE


def test_cli_explain_json(tiny_models, capsys, monkeypatch, tmp_path):
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "cli-home"))
    code = main(
        [
            "explain",
            str(tiny_models["llama"]),
            LM_TEXT,
            "--target",
            " paris",
            "--method",
            "integrated_gradients",
            "--steps",
            "16",
            "--no-auto-steps",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == ["the", "capital", "of", "france", "is"]
    assert len(data["scores"]) == 5 and isinstance(data["convergence_delta"], float)
    assert data["steps_used"] == 16 and len(data["step_trials"]) == 1
    assert data["options"]["auto_steps"] is False
    code = main(
        [
            "explain",
            str(tiny_models["classifier"]),
            CLS_TEXT,
            "--label",
            "nope",
            "--method",
            "saliency",
        ]
    )
    assert code == 2 and "no label 'nope'" in capsys.readouterr().err
