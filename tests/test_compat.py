"""``evalkit.compat`` (the SQuAD and ROUGE stand-ins, offline evaluate) and the wording of
``evalkit.tasks.problems`` for import, exit, few-shot and registry problems; in process, except one
short subprocess that checks the ``evaluate`` import hook with a stand-in ``evaluate`` package."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from evalkit import compat
from evalkit.compat import Rouge, compute_exact, compute_f1, get_tokens, install_compat, normalize_answer
from evalkit.tasks.problems import reason

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- SQuAD answer scores


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An apple,  a PEAR and the plum. ", "apple pear and plum"),
        ("U.S.A.", "usa"),
        ("another theater", "another theater"),  # articles only as whole words
        ("the-the", "thethe"),  # punctuation goes first, so no article is left here
        ("¿Qué?", "¿qué"),  # only ASCII punctuation is removed
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_get_tokens():
    assert get_tokens("The cat, the hat.") == ["cat", "hat"]
    assert get_tokens("") == []
    assert get_tokens("the") == []


def test_compute_exact():
    assert compute_exact("The Eiffel Tower", "eiffel tower.") == 1
    assert compute_exact("Eiffel Tower", "the tower") == 0
    assert compute_exact("", "") == 1
    assert compute_exact("a", "") == 1  # both normalize to nothing
    assert isinstance(compute_exact("x", "x"), int)


def test_compute_f1_by_hand():
    # gold {quick, brown, fox}, prediction {quick, fox, jumped}: 2 shared, P = R = 2/3
    assert compute_f1("The quick brown fox", "a quick fox jumped") == pytest.approx(2 / 3)
    # gold {cat, cat, dog}, prediction {cat}: 1 shared, P = 1, R = 1/3, F1 = 2 * 1/3 / (4/3) = 1/2
    assert compute_f1("cat cat dog", "cat") == pytest.approx(0.5)
    # shared counts are a multiset intersection: {cat, cat} & {cat, cat, cat} = 2; P = 2/3, R = 1
    assert compute_f1("cat cat", "cat cat cat") == pytest.approx(0.8)
    assert compute_f1("Paris", "London") == 0
    assert compute_f1("Paris!", "paris") == 1.0


def test_compute_f1_no_answer():
    assert compute_f1("", "") == 1  # both no-answer
    assert compute_f1("the", "") == 1  # a gold answer of only an article has no tokens either
    assert compute_f1("", "Paris") == 0
    assert compute_f1("Paris", "") == 0


def test_squad_metrics_module_stands_in_for_transformers():
    install_compat()
    import transformers.data.metrics.squad_metrics as squad_metrics
    from transformers.data.metrics import squad_metrics as same

    assert same is squad_metrics
    assert squad_metrics.compute_f1 is compute_f1
    assert squad_metrics.compute_exact is compute_exact
    assert squad_metrics.normalize_answer is normalize_answer
    assert squad_metrics.get_tokens is get_tokens
    with pytest.raises(AttributeError, match="evalkit's stand-in.*needs transformers < 5"):
        squad_metrics.squad_evaluate  # noqa: B018


def test_squad_metrics_fallback_comes_after_the_real_finders():
    """Only when the real import fails: the stand-in's finder is asked after the path finder."""
    install_compat()
    fallback = next(i for i, f in enumerate(sys.meta_path) if isinstance(f, compat._SquadMetricsFallback))
    assert fallback > sys.meta_path.index(importlib.machinery.PathFinder)
    assert compat._SquadMetricsFallback().find_spec("transformers.data.other") is None


# ---------------------------------------------------------------- ROUGE against rouge_score

PREDICTIONS = ["the cat sat on the mat", "a quick brown dog", "hello there general kenobi", "nothing in common"]
REFERENCES = ["the cat was on the mat", "the quick brown fox jumps", "hello there", "entirely different words"]


def _scorer(types_=("rouge1", "rouge2", "rougeL", "rougeLsum"), **kwargs):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types_), **kwargs)


def test_rouge_per_sample_matches_rouge_score():
    got = Rouge().compute(predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False)
    scorer = _scorer()
    expected = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
    assert list(got) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    for key, values in got.items():
        assert values == [e[key].fmeasure for e in expected]
    assert got["rouge1"][0] == pytest.approx(5 / 6)  # 5 of 6 unigrams shared both ways
    assert got["rouge1"][3] == 0.0


def test_rouge_aggregate_is_the_bootstrap_mid_under_the_metric_seed():
    from rouge_score import scoring

    metric = Rouge(seed=42)
    state = np.random.get_state()
    got = metric.compute(predictions=PREDICTIONS, references=REFERENCES)
    after = np.random.get_state()
    assert after[0] == state[0] and (after[1] == state[1]).all() and after[2] == state[2]  # restored

    scorer = _scorer()
    aggregator = scoring.BootstrapAggregator()
    for p, r in zip(PREDICTIONS, REFERENCES, strict=True):
        aggregator.add_scores(scorer.score(r, p))
    np.random.seed(42)
    expected = {k: v.mid.fmeasure for k, v in aggregator.aggregate().items()}
    np.random.set_state(state)
    assert got == expected
    per_sample = Rouge().compute(predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False)
    assert got["rouge1"] == pytest.approx(np.mean(per_sample["rouge1"]), abs=0.1)  # a bootstrap median of means
    # the same seed gives the same result again
    assert Rouge(seed=42).compute(predictions=PREDICTIONS, references=REFERENCES) == got


def test_rouge_identical_texts_score_one():
    got = Rouge().compute(predictions=["hello there", "general kenobi"], references=["hello there", "general kenobi"])
    assert got == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0}


def test_rouge_multiple_references_stemmer_tokenizer_types():
    refs = [["the cat was on the mat", "a cat"], ["dogs running"]]
    preds = ["the cat sat on the mat", "dog runs"]
    got = Rouge().compute(
        predictions=preds, references=refs, rouge_types=["rouge1", "rougeL"], use_aggregator=False, use_stemmer=True
    )
    scorer = _scorer(("rouge1", "rougeL"), use_stemmer=True)
    expected = [scorer.score_multi(r, p) for p, r in zip(preds, refs, strict=True)]
    assert got == {k: [e[k].fmeasure for e in expected] for k in ("rouge1", "rougeL")}
    assert got["rouge1"][1] > 0  # only with the stemmer: dogs/dog, running/runs

    # a tokenizer function replaces rouge_score's (which lower-cases and drops non-alphanumerics)
    got = Rouge().compute(
        predictions=["A-B c"], references=["a-b C"], rouge_types=["rouge1"], use_aggregator=False, tokenizer=str.split
    )
    assert got == {"rouge1": [0.0]}


def test_rouge_accumulates_like_evaluate_and_checks_inputs():
    metric = Rouge(seed=7)
    metric.add_batch(predictions=PREDICTIONS[:2], references=REFERENCES[:2])
    metric.add(prediction=PREDICTIONS[2], reference=REFERENCES[2])
    got = metric.compute(predictions=PREDICTIONS[3:], references=REFERENCES[3:])
    assert got == Rouge(seed=7).compute(predictions=PREDICTIONS, references=REFERENCES)
    assert metric.compute() == {}  # everything was used and forgotten
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        Rouge().compute(predictions=["a", "b"], references=["a"])
    with pytest.raises(TypeError):
        Rouge().compute(predictions=[1], references=["a"])
    # tuples are fine (galician_bench passes the columns of zip(*items))
    assert Rouge().compute(predictions=("a b",), references=("a b",), use_aggregator=False)["rouge1"] == [1.0]


def test_rouge_seed_defaults_to_numpy_state_as_evaluate_does():
    np.random.seed(1234)
    first = Rouge().seed
    np.random.seed(1234)
    assert Rouge().seed == first


# ---------------------------------------------------------------- the evaluate.load wrapper


def _fake_evaluate(fail: BaseException | None) -> types.ModuleType:
    module = types.ModuleType("fake_evaluate")
    module.calls = []

    def load(path, *args, **kwargs):
        module.calls.append((path, args, kwargs))
        if fail is not None:
            raise fail
        return f"original {path}"

    module.load = load
    return module


def test_load_wrapper_falls_back_only_for_rouge():
    fake = _fake_evaluate(FileNotFoundError("Couldn't find a module script at ./rouge/rouge.py."))
    compat._patch_evaluate(fake)
    metric = fake.load("rouge", keep_in_memory=True, seed=3)
    assert isinstance(metric, Rouge) and metric.seed == 3
    assert fake.calls[0] == ("rouge", (), {"keep_in_memory": True, "seed": 3})  # evaluate was asked first
    with pytest.raises(FileNotFoundError):
        fake.load("bleu")
    assert fake.calls[-1][0] == "bleu"
    with pytest.raises(FileNotFoundError):  # rouge is a metric: no stand-in for another module type
        fake.load("rouge", module_type="comparison")


def test_load_wrapper_prefers_a_loadable_original_and_passes_other_names():
    fake = _fake_evaluate(None)
    compat._patch_evaluate(fake)
    assert fake.load("rouge") == "original rouge"
    assert fake.load("accuracy", "config", experiment_id="x") == "original accuracy"
    assert fake.calls[-1] == ("accuracy", ("config",), {"experiment_id": "x"})


def test_load_wrapper_is_applied_once():
    fake = _fake_evaluate(None)
    original = fake.load
    compat._patch_evaluate(fake)
    wrapped = fake.load
    compat._patch_evaluate(fake)
    assert fake.load is wrapped and wrapped.__wrapped__ is original


def test_install_compat_is_idempotent():
    install_compat()
    before = list(sys.meta_path)
    install_compat()
    install_compat()
    assert sys.meta_path == before
    assert sum(isinstance(f, compat._SquadMetricsFallback) for f in sys.meta_path) == 1
    if "evaluate" not in sys.modules:
        assert sum(isinstance(f, compat._PatchEvaluateWhenImported) for f in sys.meta_path) == 1


def test_real_evaluate_load_rouge_offline(monkeypatch, tmp_path):
    evaluate = pytest.importorskip("evaluate")
    install_compat()
    monkeypatch.chdir(tmp_path)  # no ./rouge/rouge.py here
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    metric = evaluate.load("rouge")
    assert isinstance(metric, Rouge)
    got = metric.compute(predictions=PREDICTIONS, references=REFERENCES, use_aggregator=False)
    assert got["rouge1"][0] == pytest.approx(5 / 6)
    with pytest.raises(FileNotFoundError, match="bleu"):  # other names: evaluate's own answer
        evaluate.load("bleu")


HOOK_SCRIPT = """
import sys
from evalkit.compat import Rouge, install_compat
from evalkit.code_exec import CodeEval
install_compat(); install_compat()
assert "evaluate" not in sys.modules
from evaluate import load  # a reference taken after the import: already the wrapped one
import evaluate
assert isinstance(load("rouge"), Rouge), load
assert isinstance(evaluate.load("code_eval"), CodeEval)
try:
    evaluate.load("bleu")
except FileNotFoundError:
    pass
else:
    raise AssertionError("bleu should have gone to the stand-in evaluate")
print("ok")
"""


def test_evaluate_import_hook_wraps_the_real_module_once(tmp_path):
    """The import hook wraps the one real ``evaluate`` when it is first imported (a stand-in package
    here, so this is quick): rouge and code_eval served, other names left to evaluate."""
    package = tmp_path / "evaluate"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent(
            """
            def load(path, *args, **kwargs):
                raise FileNotFoundError(f"Couldn't find a module script at ./{path}/{path}.py.")
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", HOOK_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---------------------------------------------------------------- offline evaluate


def test_evaluate_offline_follows_hub_offline(monkeypatch):
    config = sys.modules.get("evaluate.config")
    if config is not None:
        monkeypatch.setattr(config, "HF_EVALUATE_OFFLINE", False)
    for name in ("HF_EVALUATE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "x")  # so that the undo removes what install_compat sets
        monkeypatch.delenv(name)

    install_compat()
    assert "HF_EVALUATE_OFFLINE" not in os.environ  # nothing says offline: left alone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    install_compat()
    assert os.environ["HF_EVALUATE_OFFLINE"] == "1"
    if config is not None:
        assert config.HF_EVALUATE_OFFLINE is True

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "0")  # an explicit choice is kept
    install_compat()
    assert os.environ["HF_EVALUATE_OFFLINE"] == "0"


# ---------------------------------------------------------------- problems wording


def _raised(exc: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            raise cause or exc
        except BaseException:
            if cause is None:
                raise
            raise exc from cause
    except BaseException as caught:  # noqa: BLE001
        return caught


def test_missing_submodule_of_installed_package():
    version = importlib.metadata.version("transformers")
    error = ModuleNotFoundError("No module named 'transformers.data.metrics'", name="transformers.data.metrics")
    expected = f"the installed transformers {version} has no module transformers.data.metrics (a version mismatch)"
    assert reason(error) == expected
    assert reason(_raised(RuntimeError("loading utils.py failed"), error)) == expected


def test_missing_package_wording_kept():
    error = ModuleNotFoundError("No module named 'tarski'", name="tarski")
    assert reason(error) == "needs the Python package 'tarski', which is not installed (pip install tarski)"
    error = ModuleNotFoundError("No module named 'sklearn.metrics'", name="sklearn")
    assert reason(error) == "needs the Python package 'scikit-learn', which is not installed (pip install scikit-learn)"


def test_pip_names_with_extras_and_urls():
    error = ModuleNotFoundError("No module named 'math_verify'", name="math_verify")
    assert reason(error) == (
        "needs the Python package 'math-verify', which is not installed (pip install 'math-verify[antlr4_11_0]')"
    )
    error = ModuleNotFoundError("No module named 'tinyBenchmarks'", name="tinyBenchmarks")
    assert reason(error) == (
        "needs the Python package 'tinyBenchmarks', which is not installed "
        "(pip install git+https://github.com/felipemaiapolo/tinyBenchmarks)"
    )


def test_cannot_import_name_from_installed_package():
    origin = importlib.util.find_spec("datasets").origin
    version = importlib.metadata.version("datasets")
    error = ImportError(f"cannot import name 'load_metric' from 'datasets' ({origin})", name="datasets", path=origin)
    assert reason(error) == f"the installed datasets {version} has no load_metric (a version mismatch)"
    sub = importlib.util.find_spec("datasets.utils").origin
    error = ImportError(f"cannot import name 'gone' from 'datasets.utils' ({sub})", name="datasets.utils", path=sub)
    assert reason(error) == f"the installed datasets {version} has no datasets.utils.gone (a version mismatch)"


def test_cannot_import_name_from_a_task_module_is_not_a_version_mismatch(tmp_path):
    path = str(tmp_path / "utils.py")
    error = ImportError(f"cannot import name 'helper' from 'utils' ({path})", name="utils", path=path)
    assert "version mismatch" not in reason(error)
    error = ImportError("cannot import name 'x' from partially initialized module 'datasets' (circular import)")
    assert "version mismatch" not in reason(error)


def test_system_exit_when_imported():
    message = "Error: SWI-Prolog (swipl) is not installed or not in PATH."
    assert reason(SystemExit(message)) == f"the task's code exits when imported: {message}"
    assert reason(SystemExit(3)) == "the task's code exits when imported: sys.exit(3)"
    assert reason(SystemExit()) == "the task's code exits when imported: sys.exit()"


def test_fewshot_config_unknown_key():
    from lm_eval.config.task import FewshotConfig

    with pytest.raises(TypeError) as caught:
        FewshotConfig(samplr="first_n")
    assert reason(caught.value) == "fewshot_config: unknown key 'samplr' (did you mean 'sampler'?)"


def test_task_config_unknown_key_kept():
    from lm_eval.config.task import TaskConfig

    with pytest.raises(TypeError) as caught:
        TaskConfig(task="t", doc_to_txt="x")
    assert reason(caught.value) == "unknown key 'doc_to_txt' (did you mean 'doc_to_text'?)"


def test_filter_registered_by_two_task_folders():
    from lm_eval.api.registry import Registry

    registry = Registry("filter")
    first = type("GrammarFilter", (), {"__module__": "lm_eval.tasks.acpbench.gen_2shot.acp_utils"})
    second = type("GrammarFilter", (), {"__module__": "lm_eval.tasks.acpbench.gen_2shot_with_pddl.acp_utils"})
    registry.register("ACP_grammar_filter")(first)
    with pytest.raises(ValueError, match="already registered") as caught:
        registry.register("ACP_grammar_filter")(second)
    assert reason(caught.value) == (
        "two task folders register the same filter name 'ACP_grammar_filter' "
        "(lm_eval.tasks.acpbench.gen_2shot.acp_utils and lm_eval.tasks.acpbench.gen_2shot_with_pddl.acp_utils), "
        "and lm-eval keeps one registry per process, so their tasks cannot be loaded in one run; "
        "evaluate them in separate runs"
    )
    # only the message (e.g. after pickling): the same sentence, without the modules
    bare = ValueError("'filter' alias 'ACP_grammar_filter' already registered (existing=a, new=b)")
    assert reason(bare).startswith("two task folders register the same filter name 'ACP_grammar_filter', and")


def test_other_messages_unchanged():
    text = (
        "Couldn't find a module script at /x/bleu/bleu.py. Module 'bleu' doesn't exist on the Hugging Face Hub either."
    )
    assert reason(FileNotFoundError(text)).startswith("needs the evaluate metric 'bleu'")
    assert reason(
        ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)"), "org/data:cfg"
    ) == (
        "dataset 'org/data' (config 'cfg') is not available offline: there is no local copy in ./org/data/ (where "
        "load_dataset looks from the working folder) or in the Hugging Face datasets cache, and the Hugging Face Hub "
        "is not reachable; download it where the hub is reachable and put the local copy in ./org/data/ "
        "(or point dataset_kwargs.data_files at local files)"
    )


# ---------------------------------------------------------------- the tasks this is for


def test_validate_accepts_squad_and_rouge_tasks():
    """Tasks that import squad_metrics (xquad, coqa, galician_bench) or load rouge (evalita)."""
    from evalkit.tasks.library import TaskLibrary
    from evalkit.tasks.validate import validate

    install_compat()
    names = ["xquad_en", "coqa", "summarization_gl", "evalita-sp_sum_task_fp_p1"]
    assert validate(TaskLibrary(), names) == dict.fromkeys(names)
