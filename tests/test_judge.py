"""LLM-as-judge: lmms-eval's own ``mmvet`` task, unchanged, scored through evalkit's judge proxy.

A local OpenAI-compatible stub (tests/openai_stub.py) plays the judge: it grades MM-Vet's prompt
1.0 when the prediction is the ground truth and 0.0 otherwise, and accepts only the right key. The
task loads and scores on local data in its hub schema (``evalkit.testing.lmms_data``) through the
real code paths (``plan.load_tasks``, ``results.score_outputs``), in-process; a command-line run
checks the refusals (no judge, an unreachable judge) and one whole run on a tiny LLaVA with resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubBehaviour

from evalkit.config import RunConfig
from evalkit.errors import UsageError
from evalkit.judge import JOURNAL, JudgeFailed, JudgeOptions, JudgeProxy, task_environment
from evalkit.plan import RunPlan, load_tasks
from evalkit.preflight import check_tasks
from evalkit.results import score_outputs
from evalkit.tasks.judged import judge_tasks
from evalkit.tasks.requests import PromptOptions, TaskPlan, build_plans, number_requests
from evalkit.tasks.scoring import concurrently
from evalkit.testing.lmms_data import HF_HOME, MMVET_DOCS, write_mix_evals, write_mmbench, write_mme, write_mmvet
from evalkit.timings import Phases

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by make install")

JUDGE_MODEL = "judge-7b"
SECRET = "sk-judge-test-0123456789"
# The model's answers to the four MM-Vet docs: right, right (an <OR> alternative), wrong, right.
PREDICTIONS = ["red", "three", "right", "green <AND> square"]
EXPECTED_SCORE = 75.0


def grade(messages) -> str:
    """MM-Vet's judge prompt ends with ``question | ground truth | prediction |``: 1.0 for the truth or
    one of its <OR> alternatives, else 0.0."""
    _, truth, prediction = [" ".join(c.split()) for c in messages[-1]["content"].splitlines()[-1].split(" | ")[:3]]
    right = {truth, *(a.strip() for a in truth.split("<OR>"))}
    return "1.0" if prediction.rstrip(" |") in right else "0.0"


def forget_task_code() -> None:
    """lm-eval imports a task's code once per process (``sys.modules``, keyed by its path), so its
    judge client keeps the address it read then: right for a run, which is one process, but each
    scoring here starts its own proxy, so it imports lmms-eval's task code afresh."""
    import sys

    for name in [n for n in sys.modules if "/lmms_eval/tasks/" in n]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def fresh_task_code():
    forget_task_code()


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A working folder with lmms-lab-encoder/MMVet, MME and MMBench, as the tasks look for them."""
    write_mmvet(tmp_path)
    write_mme(tmp_path)
    write_mmbench(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_config(tmp_path: Path, stub: OpenAIStub | None, **extra) -> RunConfig:
    judge = {"judge_base_url": stub.base_url, "judge_model": JUDGE_MODEL} if stub else {}
    return RunConfig(model="tiny", output=tmp_path / "out", **{"tasks": ("mmvet",), "concurrency": 4, **judge, **extra})


def score_tasks(config: RunConfig, proxy: JudgeProxy | None, outputs: list[str] = PREDICTIONS):
    """The configured tasks loaded and scored on ``outputs`` (MM-Vet's predictions by default), as a
    run's rank 0 does, through ``proxy``."""
    loaded = load_tasks(config, str(config.output), proxy.url if proxy else None)
    plans = build_plans(loaded["tasks"], PromptOptions())
    requests = number_requests(plans)
    plan = RunPlan(model_path="tiny", tasks=plans, groups={}, requests=requests, model={}, task_hashes={}, done=set())
    return score_outputs(config, plan, outputs, Phases(), proxy)


def judge_prompts(stub: OpenAIStub) -> list[str]:
    return [body["messages"][-1]["content"] for _, body in stub.behaviour.bodies]


def files_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def test_mmvet_is_scored_by_the_judge_and_resume_asks_nothing(data, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)  # the default --judge-api-key-env
    behaviour = StubBehaviour(api_key=SECRET, chat_reply=grade)
    with OpenAIStub(behaviour) as stub:
        config = run_config(tmp_path, stub)
        config.output.mkdir()
        with JudgeProxy(config.judge_options(), config.output) as proxy:
            scored = score_tasks(config, proxy)
        assert scored.results["results"]["mmvet"]["gpt_eval_score,none"] == EXPECTED_SCORE
        assert scored.results["judge"] == {"base_url": stub.base_url, "model": JUDGE_MODEL, "asked": 4, "replayed": 0}

        # The judge got MM-Vet's own prompt for each doc, as the judge model, with the real key.
        prompts = judge_prompts(stub)
        expected = {
            f"{question} | {truth.replace('<AND>', ' <AND> ').replace('<OR>', ' <OR> ')} | {pred} |"
            for (*_, question, truth, _), pred in zip(MMVET_DOCS, PREDICTIONS, strict=True)
        }
        assert {p.splitlines()[-1] for p in prompts} == expected
        assert all(p.startswith("Compare the ground truth and prediction from AI models") for p in prompts)
        assert {body["model"] for _, body in stub.behaviour.bodies} == {JUDGE_MODEL}
        assert set(behaviour.headers_seen) == {f"Bearer {SECRET}"}
        # lmms-eval's provider appends the route to OPENAI_API_URL once more; the proxy takes both forms
        assert {path for path, _ in stub.behaviour.bodies} == {"/v1/chat/completions"}

        journal = [json.loads(line) for line in (config.output / JOURNAL).read_text().splitlines()]
        assert sorted(e["request"]["messages"][-1]["content"] for e in journal) == sorted(prompts)
        assert {e["reply"]["choices"][0]["message"]["content"] for e in journal} == {"1.0", "0.0"}

        # Scoring again over the same folder (what --resume does) replays every answer.
        forget_task_code()
        with JudgeProxy(config.judge_options(), config.output) as proxy:
            again = score_tasks(config, proxy)
        assert len(stub.behaviour.bodies) == 4
        assert again.results["judge"]["asked"] == 0 and again.results["judge"]["replayed"] == 4
        assert again.results["results"]["mmvet"]["gpt_eval_score,none"] == EXPECTED_SCORE

    assert SECRET not in files_text(config.output)
    assert SECRET not in repr(config.judge_options().server(api_key=SECRET))
    assert os_key() == SECRET  # the placeholder task code saw is gone again


def os_key() -> str | None:
    import os

    return os.environ.get("OPENAI_API_KEY")


def test_task_code_sees_the_proxy_and_a_placeholder_key_only_while_it_loads_and_scores(monkeypatch):
    import os

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("MODEL_VERSION", raising=False)
    with task_environment("http://127.0.0.1:5/v1", JUDGE_MODEL):
        assert os.environ["OPENAI_API_URL"] == "http://127.0.0.1:5/v1/chat/completions"
        assert (os.environ["API_TYPE"], os.environ["MODEL_VERSION"]) == ("openai", JUDGE_MODEL)
        assert SECRET not in os.environ.values()
    assert os.environ["OPENAI_API_KEY"] == SECRET and "MODEL_VERSION" not in os.environ


def test_judge_tasks_are_found_by_what_their_scoring_calls(data, tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "utils.py").write_text(
        "import requests\n\n"
        "def ask_judge(prompt):\n    return requests.post('http://judge/v1/chat/completions', json={}).json()\n\n"
        "def judged(doc, results):\n    return {'acc': float(ask_judge(results[0]) == 'yes')}\n\n"
        "def by_rule(doc, results):\n    return {'acc': float(results[0] == doc['answer'])}\n"
    )
    for name, function in (("own_judged", "judged"), ("own_rule", "by_rule")):
        (tmp_path / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: lmms-lab-encoder/MME\ntest_split: test\noutput_type: generate_until\n"
            f"doc_to_visual: image\ndoc_to_text: question\ndoc_to_target: answer\n"
            f"process_results: !function utils.{function}\nmetric_list:\n  - metric: acc\n"
        )
    config = RunConfig(
        model="tiny",
        tasks=("mmvet", "mme", "own_judged", "own_rule", "mmbench_en_dev", "mmbench_en_dev_static"),
        output=tmp_path / "out",
        include_path=(tmp_path / "tasks",),
    )
    tasks = load_tasks(config, "tiny")["tasks"]
    # mmbench_en_dev_static reaches MMBench_Evaluator's judge code but scores by rules
    assert judge_tasks(tasks) == ["mmbench_en_dev", "mmvet", "own_judged"]
    with pytest.raises(UsageError) as caught:
        check_tasks(config, tasks)
    assert str(caught.value) == (
        "task(s) mmbench_en_dev, mmvet, own_judged score answers with an LLM judge; pass --judge-base-url URL (its "
        "OpenAI-compatible API) and --judge-model NAME (key from $OPENAI_API_KEY, or name another variable "
        "with --judge-api-key-env)"
    )


def pick_option(messages) -> str:
    """MixEval-X's option extractor: the letter of the option the model's answer names, as ``[[X]]``
    (the filter shows the judge a doc's list of responses, as lmms-eval's does: ``['red']``)."""
    prompt = messages[-1]["content"]
    options = prompt.rsplit("Options:", 1)[1].split("Model's Answer:")[0]
    answer = prompt.rsplit("Model's Answer:", 1)[1].split("Your Judgment:")[0].strip(" \n[]'").lower()
    for line in options.strip().splitlines():
        letter, _, text = line.partition(". ")
        if text.strip().lower() == answer:
            return f"The option chosen by the model: [[{letter.strip()}]]"
    return "No option matches."


def test_a_judge_in_a_filter_is_found_and_asked(tmp_path, monkeypatch):
    """mix_evals' multiple-choice filter asks the judge which option the answer chose: lmms-eval's
    own code reads an undefined API_KEY there under its default OpenAI provider, and evalkit defines
    it, so the task builds, is known as a judge task, and scores through the proxy."""
    write_mix_evals(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / HF_HOME))
    with OpenAIStub(StubBehaviour(chat_reply=pick_option)) as stub:
        config = run_config(tmp_path, stub, tasks=("mix_evals_image2text_mc",))
        tasks = load_tasks(config, "tiny")["tasks"]
        assert judge_tasks(tasks) == ["mix_evals_image2text_mc"]
        forget_task_code()
        config.output.mkdir()
        with JudgeProxy(config.judge_options(), config.output) as proxy:
            # right (B), wrong (C for B), right (A)
            scored = score_tasks(config, proxy, ["red", "three", "left"])
    assert [row["filtered_resps"] for row in scored.samples["mix_evals_image2text_mc"]] == [["1"], ["2"], ["0"]]
    assert scored.results["results"]["mix_evals_image2text_mc"]["exact_match,flexible-extract"] == pytest.approx(2 / 3)
    assert len(stub.behaviour.bodies) == 3


def test_transient_failures_are_retried_by_the_proxy(data, tmp_path):
    with OpenAIStub(StubBehaviour(failures_per_prompt=1, failure_status=503, chat_reply=grade)) as stub:
        config = run_config(tmp_path, stub, max_retries=2)
        config.output.mkdir()
        with JudgeProxy(config.judge_options(), config.output) as proxy:
            scored = score_tasks(config, proxy)
        assert scored.results["results"]["mmvet"]["gpt_eval_score,none"] == EXPECTED_SCORE
        assert sorted(stub.behaviour.attempts.values()) == [2, 2, 2, 2]


def post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_refused_request_is_asked_once_and_ends_the_scoring(tmp_path):
    """Judge task code retries a failed call in loops of its own (MM-Vet: 3 x 5 tries, 10 s apart)
    and then scores the doc as a wrong answer. The proxy asks the judge once (400 is not retried),
    answers the repeats at once, and scoring ends after that doc with the reason."""
    with OpenAIStub(StubBehaviour(failures_per_prompt=99, failure_status=400)) as stub:
        options = run_config(tmp_path, stub).judge_options()
        with JudgeProxy(options, tmp_path) as proxy:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "grade this"}]}
            answers = [post(f"{proxy.url}/chat/completions/chat/completions", body) for _ in range(3)]
            assert [status for status, _ in answers] == [502, 502, 502]
            assert "HTTP 400 from" in answers[0][1]["error"]["message"]
            assert list(stub.behaviour.attempts.values()) == [1]
            assert post(f"{proxy.url}/embeddings", body)[0] == 404

            started = []

            class Task:  # a judge task whose process_results meets that failure
                def process_results(self, doc, results):
                    started.append(doc)
                    return post(f"{proxy.url}/chat/completions", body)[1]

            plan = TaskPlan(name="judged", task=Task(), limit=None)
            with pytest.raises(JudgeFailed) as caught:
                concurrently(1, proxy.check_answered)(plan, [(n, n, ["x"]) for n in range(5)])
            assert started == [0]
    message = str(caught.value)
    assert message.startswith("the judge did not answer 1 request(s) (HTTP 400 from ")
    assert message.endswith(
        f"the 0 answers it gave are saved in {tmp_path / JOURNAL}; rerun with --resume to ask only for the rest"
    )
    assert not (tmp_path / JOURNAL).exists()


def test_judge_flags_are_checked_together():
    base = {"model": "m", "tasks": ("mmvet",), "output": Path("out")}
    assert "--judge-base-url and --judge-model go together" in RunConfig(**base, judge_model="x").problems()[0]
    bad = RunConfig(**base, judge_base_url="localhost:8000", judge_model="x").problems()
    assert bad == ["--judge-base-url 'localhost:8000' must start with http:// or https://"]
    options = RunConfig(**base, judge_base_url="http://j/v1", judge_model="x", concurrency=3).judge_options()
    assert options == JudgeOptions(
        base_url="http://j/v1",
        model="x",
        api_key_env="OPENAI_API_KEY",
        concurrency=3,
        max_retries=5,
        request_timeout=600.0,
    )


# ----------------------------------------------------------------------------- command line


def cli_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_judge_task_without_a_judge_is_refused_before_the_model_loads(data, tmp_path):
    from conftest import TINY_MODEL, run_evalkit

    run = run_evalkit(
        ["--model", str(TINY_MODEL), "--device", "cpu", "--tasks", "mme,mmvet"],
        output=tmp_path / "out",
        cwd=data,
        env={"OPENAI_API_KEY": SECRET},
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip() == (
        "evalkit: error: task(s) mmvet score answers with an LLM judge; pass --judge-base-url URL (its "
        "OpenAI-compatible API) and --judge-model NAME (key from $OPENAI_API_KEY, or name another variable "
        "with --judge-api-key-env)"
    )
    assert not cli_files(tmp_path / "out")


def test_an_unreachable_or_wrong_judge_is_refused_before_the_model_loads(data, tmp_path):
    from conftest import TINY_MODEL, free_port, run_evalkit

    url = f"http://127.0.0.1:{free_port()}/v1"
    args = ["--model", str(TINY_MODEL), "--device", "cpu", "--tasks", "mmvet", "--judge-api-key-env", "JUDGE_KEY"]
    run = run_evalkit(
        [*args, "--judge-base-url", url, "--judge-model", JUDGE_MODEL, "--max-retries", "1"],  # the probe retries
        output=tmp_path / "out",
        cwd=data,
        env={"JUDGE_KEY": SECRET},
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith(f"evalkit: error: cannot reach an OpenAI-compatible server at --judge-base-url {url}: ")
    assert SECRET not in run.stdout + run.stderr
    assert not cli_files(tmp_path / "out")

    with OpenAIStub() as stub:  # it serves "stub-model"
        run = run_evalkit(
            [*args, "--judge-base-url", stub.base_url, "--judge-model", JUDGE_MODEL],
            output=tmp_path / "out",
            cwd=data,
            env={"JUDGE_KEY": SECRET},
        )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        f"evalkit: error: the judge at --judge-base-url {stub.base_url} serves stub-model, not --judge-model {JUDGE_MODEL}"
    )
    assert not cli_files(tmp_path / "out")


def test_a_whole_run_scores_through_the_judge_and_resume_never_asks_twice(data, tmp_path):
    """A tiny LLaVA answers lmms-eval's mmvet; the judge grades through the proxy; the run resumed in
    the same folder replays every grade and writes the same results."""
    from evalkit.testing.tinyvlm import build_tiny_vlm

    from conftest import run_evalkit

    model = build_tiny_vlm("llava", tmp_path / "llava")
    behaviour = StubBehaviour(api_key=SECRET, chat_reply=grade)
    args = [
        "--model", str(model), "--device", "cpu", "--tasks", "mmvet", "--gen-kwargs", "max_gen_toks=8",
        "--judge-base-url", "", "--judge-model", "stub-model", "--judge-api-key-env", "JUDGE_KEY",
        "--concurrency", "2", "--bootstrap-iters", "0",
    ]  # fmt: skip
    with OpenAIStub(behaviour) as stub:
        args[args.index("--judge-base-url") + 1] = stub.base_url
        first = run_evalkit(args, output=tmp_path / "out", cwd=data, env={"JUDGE_KEY": SECRET})
        assert first.returncode == 0, first.stderr[-3000:]
        asked = len(behaviour.bodies)
        resumed = run_evalkit([*args, "--resume"], output=tmp_path / "out", cwd=data, env={"JUDGE_KEY": SECRET})
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert asked == len(MMVET_DOCS) and len(behaviour.bodies) == asked  # none from the resumed run
    assert set(behaviour.headers_seen) == {f"Bearer {SECRET}"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["judge"] == {"base_url": stub.base_url, "model": "stub-model", "asked": 0, "replayed": asked}
    assert results["config"]["judge_api_key_env"] == "JUDGE_KEY"
    assert "gpt_eval_score,none" in results["results"]["mmvet"]
    assert len((tmp_path / "out" / JOURNAL).read_text().splitlines()) == asked
    assert f"judge stub-model: {asked} answer(s) asked, 0 replayed" in first.stdout
    assert SECRET not in files_text(tmp_path / "out") + first.stdout + first.stderr + resumed.stdout + resumed.stderr


def judge_phyx(messages) -> str:
    """PhyX's multiple-choice judge prompt ends with the ground truth and the predicted answer: 1
    when the answer names the red ball (option A), else 0."""
    prompt = messages[-1]["content"]
    truth = prompt.rsplit("Ground truth answer:", 1)[1].split("\n")[0].strip()
    predicted = prompt.rsplit("Predicted answer:", 1)[1].split("\n")[0].strip()
    return "1" if truth == "A" and "red" in predicted else "0"


def test_a_judge_client_with_its_own_address_asks_the_proxy(tmp_path, monkeypatch):
    """phyx's judge code builds an OpenAI client for api.deepseek.com when imported (and refuses to
    load without ``Deepseek_API``); evalkit points that client at the judge proxy, so the task is a
    judge task like any other: the stub judge gets PhyX's own prompts, as the judge model."""
    from evalkit.testing.lmms_data import write_phyx

    write_phyx(tmp_path)
    monkeypatch.chdir(tmp_path)
    with OpenAIStub(StubBehaviour(chat_reply=judge_phyx)) as stub:
        config = run_config(tmp_path, stub, tasks=("phyx_mc",))
        assert judge_tasks(load_tasks(config, "tiny")["tasks"]) == ["phyx_mc"]
        forget_task_code()
        config.output.mkdir()
        with JudgeProxy(config.judge_options(), config.output) as proxy:
            # B by its letter (no judge), A as "the red one" (judged right), C as "the blue one" (judged wrong)
            scored = score_tasks(config, proxy, ["B", "the red one", "the blue one"])
    assert scored.results["results"]["phyx_mc"]["eval_results,none"] == pytest.approx(2 / 3)
    prompts = judge_prompts(stub)
    assert len(prompts) == 2 and all("Ground truth answer:" in p for p in prompts)
    assert {body["model"] for _, body in stub.behaviour.bodies} == {JUDGE_MODEL}
    assert scored.results["judge"]["asked"] == 2
