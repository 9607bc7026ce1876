"""Engine settings: validated once, errors name the setting, copies are checked again."""

from __future__ import annotations

import pytest

from triforce.errors import SettingError, TriforceError
from triforce.settings import METHODS, EngineSettings


@pytest.mark.parametrize("name, low", [("gamma", 1), ("draft_gamma", 1), ("budget", 1), ("chunk_size", 1),
                                       ("sink", 0), ("window", 1), ("rebuild_every", 1), ("prefill_chunk", 1)])
def test_each_knob_below_its_minimum_is_refused_by_name(name, low):
    EngineSettings(**{name: low})  # the minimum itself is fine
    for bad in (low - 1, 2.5, True, "3"):
        with pytest.raises(SettingError) as info:
            EngineSettings(**{name: bad})
        assert info.value.setting == name and f">= {low}" in info.value.problem
        assert str(info.value).startswith(name)


def test_gammas_are_chosen_by_the_controller_unless_fixed():
    default = EngineSettings(method="triforce", draft="ngram")
    assert default.gamma == default.draft_gamma == "auto" and default.adaptive
    assert list(default.gamma_choices) == list(range(1, 9)) and list(default.draft_gamma_choices) == [1, 2, 3, 4]
    fixed = default.replace(gamma=4, draft_gamma=2)
    assert not fixed.adaptive and fixed.gammas == [2, 4]
    half = default.replace(gamma=4)
    assert half.adaptive and half.gamma_choices == (4,) and half.gammas == [4, 4]
    assert not EngineSettings().adaptive  # plain decoding has nothing to choose
    with pytest.raises(SettingError, match="gamma must be 'auto' or an integer >= 1, got 'sometimes'"):
        EngineSettings(gamma="sometimes")


def test_method_draft_and_context_are_checked():
    with pytest.raises(SettingError, match="method must be one of"):
        EngineSettings(method="magic")
    for method in METHODS:
        needs = any(spec.model == "draft" for spec in METHODS[method])
        if needs:
            with pytest.raises(SettingError) as info:
                EngineSettings(method=method)
            assert info.value.setting == "draft" and method in info.value.problem
        assert EngineSettings(method=method, draft="ngram").needs_draft == needs
    with pytest.raises(SettingError, match="draft must be a loaded model, a draft head or 'ngram'"):
        EngineSettings(method="triforce", draft="path/to/a/draft")
    with pytest.raises(SettingError, match="draft must be a loaded model"):
        EngineSettings(draft=42)
    with pytest.raises(SettingError, match="max_context must be an integer >= 2"):
        EngineSettings(max_context=1)
    assert isinstance(SettingError("gamma", "x"), TriforceError)  # every face already handles these


def test_replace_checks_again_and_refuses_unknown_names():
    base = EngineSettings(method="triforce", draft="ngram")
    assert base.replace(gamma=3).gamma == 3 and base.gamma == "auto"
    with pytest.raises(SettingError, match="gamma must be 'auto' or an integer >= 1"):
        base.replace(gamma=0)
    with pytest.raises(SettingError) as info:
        base.replace(temperature=0.5)
    assert info.value.setting == "temperature" and "not a setting" in info.value.problem
    with pytest.raises(SettingError, match="draft is needed by method triforce"):
        base.replace(draft=None)
    assert base.replace(method="autoregressive", draft=None).levels == ()


def test_gammas_and_rows_past_the_context_follow_the_levels():
    """The level below the top gathers gamma tokens, the one below it draft_gamma; a step
    writes at most gamma (+ draft_gamma under a middle level) rows past its context."""
    ar = EngineSettings(gamma=5, draft_gamma=3)
    spec = EngineSettings(method="speculative", draft="ngram", gamma=5, draft_gamma=3)
    tri = EngineSettings(method="triforce", draft="ngram", gamma=5, draft_gamma=3)
    assert (ar.gammas, spec.gammas, tri.gammas) == ([], [5], [3, 5])
    assert (ar.rows_past_context, spec.rows_past_context, tri.rows_past_context) == (0, 5, 8)
    assert EngineSettings(method="triforce", draft="ngram").rows_past_context == 8 + 4  # the largest choices


def test_the_drafting_levels_weights_are_the_models_own_or_a_block_format():
    settings = EngineSettings(method="triforce", draft="ngram", retrieval_weights="q4_0", draft_weights="q8_0")
    assert (settings.retrieval_weights, settings.draft_weights) == ("q4_0", "q8_0")
    for name in ("retrieval_weights", "draft_weights"):
        with pytest.raises(SettingError, match=f"{name} must be 'model' or one of q8_0"):
            EngineSettings(**{name: "int3"})
