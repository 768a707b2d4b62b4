"""``evalkit.tasks.validate`` and ``python -m evalkit tasks list|validate``, in process, with no
model and no dataset: validation stops where lm-eval would load the data."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from lm_eval.tasks._index import TaskIndex

from evalkit.tasks.commands import main
from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.validate import validate

GEN_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: no_such_file.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
{extra}
"""


@pytest.fixture(scope="module")
def library() -> TaskLibrary:
    return TaskLibrary()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task_yamls")
    files = {
        "good": GEN_TASK.format(name="tv_good", extra="metric_list:\n  - metric: exact_match\n    aggregation: mean"),
        "bad_metric": GEN_TASK.format(
            name="tv_bad_metric", extra="metric_list:\n  - metric: exact_matsh\n    aggregation: mean"
        ),
        "bad_aggregation": GEN_TASK.format(
            name="tv_bad_aggregation", extra="metric_list:\n  - metric: exact_match\n    aggregation: meen"
        ),
        "bad_filter": GEN_TASK.format(
            name="tv_bad_filter",
            extra="filter_list:\n  - name: strict\n    filter:\n      - function: regexx\n      - function: take_first",
        ),
        "missing_package": GEN_TASK.format(name="tv_missing_package", extra="process_results: !function helpers.score"),
    }
    paths = {}
    for key, text in files.items():
        paths[key] = root / f"{key}.yaml"
        paths[key].write_text(text)
    group_dir = root / "group"
    group_dir.mkdir()
    (group_dir / "group.yaml").write_text(
        textwrap.dedent(
            """\
            group: tv_group
            task:
              - arc_easy
              - tv_member_bad
            """
        )
    )
    (group_dir / "member.yaml").write_text(
        GEN_TASK.format(name="tv_member_bad", extra="metric_list:\n  - metric: no_such_metric_xyz")
    )
    paths["group_dir"] = group_dir
    (root / "helpers.py").write_text("import evalkit_no_such_package_xyz\n\ndef score(doc, results):\n    return {}\n")
    return paths


def test_library_task_and_group_valid_without_data(library: TaskLibrary) -> None:
    assert validate(library, ["arc_challenge", "mmlu", "demo"]) == {"arc_challenge": None, "mmlu": None, "demo": None}


def test_yaml_file_valid(library: TaskLibrary, task_files: dict[str, Path]) -> None:
    assert validate(library, [str(task_files["good"])]) == {str(task_files["good"]): None}


@pytest.mark.parametrize(
    "key, expected",
    [
        ("bad_metric", "metric 'exact_matsh' is not one of lm-eval's metrics (did you mean 'exact_match'?)"),
        ("bad_aggregation", "metric 'exact_match': unknown aggregation 'meen' (did you mean 'mean'?)"),
        ("bad_filter", "filter 'strict': unknown filter function 'regexx' (did you mean 'regex'?)"),
        (
            "missing_package",
            "needs the Python package 'evalkit-no-such-package-xyz', which is not installed "
            "(pip install evalkit-no-such-package-xyz)",
        ),
    ],
)
def test_invalid_task_reason(library: TaskLibrary, task_files: dict[str, Path], key: str, expected: str) -> None:
    name = str(task_files[key])
    why = validate(library, [name])[name]
    assert why is not None and expected in why
    assert "\n" not in why and "Traceback" not in why


def test_group_names_its_invalid_member(task_files: dict[str, Path]) -> None:
    library = TaskLibrary()
    # what --include-path adds, without re-indexing all of lm-eval's tasks (about 15 s)
    library.task_index.update(TaskIndex.build([task_files["group_dir"]]))
    assert validate(library, ["tv_group"])["tv_group"] == (
        "group 'tv_group' > task 'tv_member_bad': metric 'no_such_metric_xyz' is not one of lm-eval's metrics; "
        "needs the evaluate metric 'no_such_metric_xyz', which the evaluate package fetches from the Hugging Face "
        "Hub and which is not in its local module cache; load it once where the hub is reachable "
        "(python -c \"import evaluate; evaluate.load('no_such_metric_xyz')\") and copy HF_HOME/modules here"
    )
    path = str(task_files["group_dir"] / "group.yaml")
    assert "cannot load a group from its YAML path" in (validate(library, [path])[path] or "")


def test_inline_group_member_is_named(library: TaskLibrary) -> None:
    # lm-eval 0.4.13's flan_held_in defines its members inline, with an `include:` it does not resolve there
    why = validate(library, ["flan_held_in"])["flan_held_in"] or ""
    assert why.startswith("group 'flan_held_in' > group 'flan_held_in::anli_r1_flan' > task "), why
    assert "unknown key 'include'" in why


def test_group_of_library_group_member(library: TaskLibrary) -> None:
    # t0_eval (lm-eval 0.4.13) lists inline tasks without a 'task' key, which its factory refuses
    assert "must have 'task' or 'group' key" in (validate(library, ["t0_eval"])["t0_eval"] or "")


def test_unknown_name_is_one_reason_line(library: TaskLibrary) -> None:
    results = validate(library, ["arc_chalenge", "arc_easy"])
    assert results["arc_chalenge"].startswith("unknown task 'arc_chalenge' (did you mean 'arc_challenge'?)")
    assert results["arc_easy"] is None


def test_validation_leaves_lm_eval_as_it_was(library: TaskLibrary) -> None:
    import logging

    import datasets
    import lm_eval.tasks._factory as factory
    from lm_eval.api.task import ConfigurableTask

    validate(library, ["arc_easy"])
    assert factory.ConfigurableTask is ConfigurableTask
    assert datasets.load_dataset.__module__ == "datasets.load"
    assert logging.root.manager.disable == 0


def test_cli_exit_codes(task_files: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "arc_challenge", str(task_files["good"])]) == 0
    out, _ = capfd.readouterr()
    assert out.splitlines()[-1] == "1 of 1 tasks valid (100.0%), 1 of 1 task files valid (100.0%)"

    bad = str(task_files["bad_metric"])
    assert main(["validate", "arc_challenge", bad]) == 1
    out, _ = capfd.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{bad}: task 'tv_bad_metric': metric 'exact_matsh'")
    assert lines[1] == "1 of 1 tasks valid (100.0%), 0 of 1 task files valid (0.0%)"


def test_cli_usage_errors(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "arc_chalenge"]) == 1
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("arc_chalenge: unknown task 'arc_chalenge' (did you mean 'arc_challenge'?)")
    assert lines[1:] == ["0 of 1 unknown names valid (0.0%)"] and not err
    assert main(["validate", "--bogus"]) == 2
    _, err = capfd.readouterr()
    assert err.startswith("evalkit: error: unrecognized arguments: --bogus") and len(err.splitlines()) == 1
    assert main(["frobnicate"]) == 2
    assert main(["list", "--include-path", "/no/such/folder"]) == 2


def test_cli_list(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out, _ = capfd.readouterr()
    lines = out.splitlines()
    mmlu, demo, demo_gen = "mmlu  [lm-eval]", "demo  [evalkit]", "demo_gen  [evalkit]"
    assert mmlu in lines and demo in lines and demo_gen in lines
    groups, tags, tasks = (lines.index(h) for h in lines if h.endswith("):"))
    assert groups < lines.index(mmlu) < tags < lines.index(demo) < tasks < lines.index(demo_gen)
    assert lines[-1].endswith(" tasks") and "groups" in lines[-1] and "tags" in lines[-1]


def test_each_folder_is_indexed_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new or edited --include-path folder re-indexes that folder alone, and the merged index is
    what lm-eval's TaskIndex builds over all the folders at once."""
    monkeypatch.setenv("EVALKIT_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "mine"
    mine.mkdir()
    task = "task: my_task\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
    (mine / "my_task.yaml").write_text(task + "tag: mmlu_stem\n")
    built: list[list[Path]] = []
    real_build = TaskIndex.build

    def recording_build(paths, **kwargs):
        built.append(list(paths))
        return real_build(paths, **kwargs)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(recording_build))
    first = TaskLibrary([mine])
    assert "my_task" in first.all_tasks and "mmlu" in first.all_tasks
    roots = first._roots
    assert sorted(map(str, built)) == sorted(str([root]) for root in roots), "each folder on its own"
    whole = real_build(roots)
    assert {n: (e.kind, e.yaml_path, e.tags) for n, e in first._index.items()} == {
        n: (e.kind, e.yaml_path, e.tags) for n, e in whole.items()
    }
    built.clear()
    (mine / "my_task.yaml").write_text(task)  # edited: only this folder is indexed again
    TaskLibrary([mine])
    assert built == [[mine.resolve()]]
    built.clear()
    TaskLibrary([mine])
    assert built == []


def test_a_local_dataset_folder_is_resolved_once_per_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmlu's 57 tasks each load a config of one local folder: its card is read once, and every
    config loads the same data as without the shortcut."""
    import datasets
    import datasets.load
    from library_data import write_mmlu

    from evalkit.tasks.library import local_dataset_modules_once

    write_mmlu(tmp_path, test_docs=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    subjects = ["abstract_algebra", "anatomy", "virology"]
    plain = [datasets.load_dataset("cais/mmlu", s)["test"].to_list() for s in subjects]
    calls: list[str] = []
    real = datasets.load.dataset_module_factory

    def counted(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets.load, "dataset_module_factory", counted)
    with local_dataset_modules_once():
        once = [datasets.load_dataset("cais/mmlu", s)["test"].to_list() for s in subjects]
    assert calls == ["cais/mmlu"]
    assert once == plain
    assert datasets.load.dataset_module_factory is counted, "put back afterwards"
