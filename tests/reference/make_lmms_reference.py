"""Regenerate the lmms-eval 0.7.3 reference outputs used by tests/test_lmms_parity.py.

Run by a developer, never by the test-suite. lmms-eval's own model classes need torchvision, which
does not load with evalkit's torch, so lmms-eval lives in a separate virtual environment::

    python3.11 -m venv /work/lmms-ref-venv
    /work/lmms-ref-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 accelerate
    /work/lmms-ref-venv/bin/pip install --no-deps lmms-eval==0.7.3
    /work/lmms-ref-venv/bin/pip install loguru datasets tenacity pytablewriter sqlitedict sacrebleu \\
        evaluate jsonlines openai pillow decord qwen-vl-utils av opencv-python-headless openpyxl "filelock<4"

lmms-eval's internvl_hf class decodes clips through transformers, which needs torchcodec, and
torchcodec needs FFmpeg's shared libraries; PyAV's wheel ships FFmpeg 8, so name them as torchcodec
looks for them (the script then puts that folder on LD_LIBRARY_PATH)::

    /work/lmms-ref-venv/bin/pip install torchcodec
    cd /work/lmms-ref-venv/lib/python3.11/site-packages/av.libs
    for f in libav*-*.so.* libsw*-*.so.*; do ln -sf "$f" "$(echo "$f" | sed -E 's/-[0-9a-f]{8}([.]so[.][0-9]+).*/\\1/')"; done

Then, from the repository root, with evalkit's own Python (it builds the tiny models and data)::

    python tests/reference/make_lmms_reference.py [--python /work/lmms-ref-venv/bin/python]

It builds the seeded tiny VLMs (evalkit.testing.tinyvlm) and the local hub-schema data
(evalkit.testing.lmms_data), runs ``python -m lmms_eval`` (batch size 1, greedy as each YAML says,
offline, the data folder as working directory) and writes one JSON per (model, task) to
``tests/reference/lmms-eval-0.7.3/<family>.<task>.json``: per doc the prompt text lmms-eval logged
(``input``), the raw generation, the filtered answer and the per-sample metric values; the task's
aggregates (stderr keys left out) and the exact command.

The tiny models are saved by evalkit's venv, where torchvision does not load, so they carry no video
processor; lmms-eval's qwen2_vl and internvl_hf classes call ``AutoProcessor``, which then refuses
the folder. This script runs those two on a copy whose processor_config.json also holds a video
processor with the image processor's settings. Image-only prompts never reach it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HF_HOME = "hf_home"  # evalkit.testing.lmms_data.HF_HOME: where the writers put video tasks' clips
OUT_DIR = REPO / "tests" / "reference" / "lmms-eval-0.7.3"
# Judge tasks are run against tests/openai_stub.py's judge, which grades by the request's hash
# (``hashed_grade``), greedily: mmvet's YAML samples at temperature 0.2, and sampled tokens follow
# each tool's own random stream.
JUDGE_MODEL = "stub-model"
JUDGED = {"mmvet": ["--gen_kwargs", "temperature=0"]}
# lmms-eval 0.7.3 runs qwen2_5_vl as its chat class, which hands a multi-round task's requests to the
# simple class's generate_until_multi_round in the chat request layout (doc_to_messages where that
# method expects generation settings), which fails (AttributeError) before any model call; its
# simple class runs them.
TASK_FLAGS = {**JUDGED, "ovo_forward": ["--force_simple"]}
# Groups run by name, and the member tasks whose references they give.
GROUPS = {"pope_full": ["pope_adv", "pope_pop", "pope_random"]}
# (tiny family, lmms-eval model class, tasks)
RUNS = [
    ("llava", "llava_hf", ["mme", "pope", "chartqa", "ai2d"]),
    ("llava", "llava_hf", ["scienceqa_img", "mmbench_en_dev_static", "mmmu_val", "docvqa_val", "pope_full"]),
    ("llava", "llava_hf", ["mmvet"]),
    ("qwen2_vl", "qwen2_vl", ["mme"]),
    ("qwen2_vl", "qwen2_vl", ["videomme", "egoschema_subset"]),
    ("qwen2_vl", "qwen2_vl", ["ovo_forward"]),
    ("qwen2_5_vl", "qwen2_5_vl", ["mme"]),
    ("qwen2_5_vl", "qwen2_5_vl", ["videomme", "egoschema_subset"]),
    ("qwen2_5_vl", "qwen2_5_vl", ["ovo_forward"]),
    ("internvl", "internvl_hf", ["mme"]),
    ("internvl", "internvl_hf", ["videomme", "egoschema_subset"]),
    ("llava_onevision", "llava_hf", ["mme", "videomme", "egoschema_subset"]),
]
VIDEO_PROCESSORS = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "internvl": "InternVLVideoProcessor",
    "llava_onevision": "LlavaOnevisionVideoProcessor",
}
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# lmms-eval's chat classes (llava_hf, internvl_hf) prompt with the task's doc_to_messages, but log
# doc_to_text as "input"; this asks lmms-eval for those messages (media parts kept as their type).
MESSAGES_SCRIPT = r"""
import json, sys
from lmms_eval.tasks import TaskManager, get_task_dict
name, doc_ids = sys.argv[1], json.loads(sys.argv[2])
task = get_task_dict([name], TaskManager(), task_type="chat")[name]
docs = task.eval_docs
def part(c):
    return {"type": c["type"]} if c["type"] in ("image", "video", "audio") else c
def plain(messages):
    return [dict(m, content=[part(c) for c in m["content"]] if isinstance(m["content"], list) else m["content"])
            for m in messages]
print(json.dumps({i: plain(task.doc_to_messages(docs[i])) for i in doc_ids}))
"""
CHAT_CLASSES = {"llava_hf", "internvl_hf"}
# Sample-row keys that are not per-sample metrics.
ROW_KEYS = {"doc_id", "target", "resps", "filtered_resps", "token_counts", "doc_hash", "input_media", "input"}


def with_video_processor(model: Path, family: str, work: Path) -> Path:
    """A copy of ``model`` whose processor_config.json also declares a video processor (see above)."""
    if family not in VIDEO_PROCESSORS:
        return model
    copy = work / f"{model.name}-with-video-processor"
    shutil.copytree(model, copy)
    config = json.loads((copy / "processor_config.json").read_text())
    video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    config["video_processor"] = {**video, "video_processor_type": VIDEO_PROCESSORS[family]}
    (copy / "processor_config.json").write_text(json.dumps(config, indent=2))
    return copy


# Three of lmms-eval 0.7.3's classes are run with one change each, by code run before its command line:
# * its llava_hf chat class hands the processor images=[] with a video-only request, which
#   LLaVA-OneVision's image processor rejects (IndexError), so that class runs no video task on
#   LLaVA-OneVision; the references give that one argument as None, as the class means it.
# * its internvl_hf and qwen2_5_vl classes load every model in bfloat16. evalkit left-pads each
#   prompt to a width bucket, so that no result depends on which requests share a batch; in bfloat16
#   that padding moves the logits by a rounding step, enough to flip a near tie (measured: 1 of 20
#   InternVL docs, at its 15th generated token; 1 of 3 Qwen2.5-VL egoschema docs). The references
#   load those models in float32, as evalkit's parity runs do.
EMPTY_IMAGES_AS_NONE = """
import transformers
call = transformers.LlavaOnevisionProcessor.__call__
def called(self, images=None, text=None, videos=None, **kwargs):
    return call(self, images=images or None, text=text, videos=videos, **kwargs)
transformers.LlavaOnevisionProcessor.__call__ = called
"""
FLOAT32 = """
import torch, transformers
def in_float32(cls):
    load = cls.from_pretrained
    cls.from_pretrained = lambda *a, **k: load(*a, **{**k, "torch_dtype": torch.float32})
in_float32(transformers.InternVLForConditionalGeneration)
in_float32(transformers.Qwen2_5_VLForConditionalGeneration)
"""
# * its multi-round classes (qwen2_5_vl among them) answer a doc with a tuple of its rounds' answers;
#   its evaluator keeps a list of strings as it is, "one entry per round" (api/instance.py,
#   unwrap_generation_output), but turns a tuple into its str(), whose single string ovo_forward's
#   process_results then indexes round by round (IndexError from the second round on: lmms-eval
#   0.7.3 cannot score ovo_forward). The references hand the evaluator the rounds as that list.
ROUNDS_AS_LISTS = """
import lmms_eval.api.instance, lmms_eval.evaluator
unwrap = lmms_eval.api.instance.unwrap_generation_output
def rounds_as_list(output):
    if isinstance(output, tuple) and output and all(isinstance(x, str) for x in output):
        output = list(output)
    return unwrap(output)
lmms_eval.evaluator.unwrap_generation_output = rounds_as_list
"""
RUN_CLI = """
from lmms_eval.__main__ import cli_evaluate
cli_evaluate()
"""
PATCHED = {
    "llava_onevision": ("EMPTY_IMAGES_AS_NONE", EMPTY_IMAGES_AS_NONE),
    "internvl": ("FLOAT32", FLOAT32),
    "qwen2_5_vl": ("FLOAT32", FLOAT32),
}
TASK_PATCHES = {"ovo_forward": ("ROUNDS_AS_LISTS", ROUNDS_AS_LISTS)}


def ffmpeg_env(python: str) -> dict[str, str]:
    """LD_LIBRARY_PATH with the lmms-eval venv's PyAV FFmpeg libraries, for torchcodec (see above)."""
    found = sorted(Path(python).absolute().parents[1].glob("lib/python3*/site-packages/av.libs"))
    return {"LD_LIBRARY_PATH": str(found[0])} if found else {}


def judge_env(judge: str | None) -> dict[str, str]:
    """What lmms-eval's judge code reads (its OpenAI provider posts to OPENAI_API_URL); judge tasks'
    code builds its client when imported, so even building their prompts needs a key."""
    url = f"{judge or 'http://127.0.0.1:9/v1'}/chat/completions"
    return {"API_TYPE": "openai", "OPENAI_API_URL": url, "OPENAI_API_KEY": "sk-stub", "MODEL_VERSION": JUDGE_MODEL}


def run_lmms_eval(
    python: str,
    model_class: str,
    model: Path,
    tasks: list[str],
    data: Path,
    out: Path,
    judge: str | None = None,
    patch: str | None = None,
) -> list[str]:
    argv = [python, *(["-c", patch + RUN_CLI] if patch else ["-m", "lmms_eval"]), "--model", model_class]
    argv += ["--model_args", f"pretrained={model},device_map=cpu", "--device", "cpu", "--tasks", ",".join(tasks)]
    argv += ["--batch_size", "1", "--log_samples", "--output_path", str(out)]
    argv += [flag for task in tasks for flag in TASK_FLAGS.get(task, [])]
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "HF_DATASETS_CACHE": str(out / "hf_datasets_cache"),
        "HF_HOME": str(data / HF_HOME),
    }
    env.update(judge_env(judge))
    env.update(ffmpeg_env(python))
    print(f"cd {data} && {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=data, env=env, capture_output=True, text=True)
    (out / "lmms_eval.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not list(out.glob("*/[0-9]*_results.json")):
        sys.exit(f"lmms-eval failed (rc={proc.returncode}); log: {out / 'lmms_eval.log'}\n{proc.stderr[-3000:]}")
    print(f"finished in {time.monotonic() - start:.1f}s", flush=True)
    return argv


def chat_messages(python: str, task: str, doc_ids: list[int], data: Path, out: Path) -> dict[int, list]:
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "HF_DATASETS_CACHE": str(out / "hf_datasets_cache"),
        "HF_HOME": str(data / HF_HOME),
        **judge_env(None),
    }
    argv = [python, "-c", MESSAGES_SCRIPT, task, json.dumps(doc_ids)]
    proc = subprocess.run(argv, cwd=data, env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def doc_record(row: dict) -> dict:
    # lmms-eval logs "resps" only where it differs from "filtered_resps" (it strips before scoring).
    return {
        "doc_id": row["doc_id"],
        "input": row["input"],
        "target": row["target"],
        "resps": row.get("resps", row["filtered_resps"]),
        "filtered_resps": row["filtered_resps"],
        "metrics": {k: v for k, v in row.items() if k not in ROW_KEYS},
    }


def reference(family: str, model_class: str, task: str, out: Path, argv: list[str], model: Path, data: Path) -> dict:
    results = json.loads(next(out.glob("*/[0-9]*_results.json")).read_text())
    rows = [json.loads(line) for line in next(out.glob(f"*/*_samples_{task}.jsonl")).read_text().splitlines()]
    import_versions = [argv[0], "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"]
    torch_version, transformers_version = subprocess.check_output(import_versions, text=True).split()
    record = {
        "lmms_eval_version": "0.7.3",
        "torch_version": torch_version,
        "transformers_version": transformers_version,
        "command": shlex.join(["python", *argv[1:]]).replace(str(out.parent), "<tmp>"),
        "family": family,
        "model_class": model_class,
        "model_sha256": hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest(),
        "task": task,
        "results": {k: v for k, v in results["results"][task].items() if "_stderr" not in k and k != "alias"},
        "n-samples": results["n-samples"][task],
        "docs": [doc_record(row) for row in sorted(rows, key=lambda r: r["doc_id"])],
    }
    if model_class in CHAT_CLASSES:
        messages = chat_messages(argv[0], task, [doc["doc_id"] for doc in record["docs"]], data, out)
        for doc in record["docs"]:
            doc["messages"] = messages[doc["doc_id"]]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="/work/lmms-ref-venv/bin/python", help="the lmms-eval venv's python")
    parser.add_argument("--only", default="", help="comma-separated family.task references to write (default: all)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from evalkit.testing.lmms_data import WRITERS
    from evalkit.testing.tinyvlm import build_tiny_vlm

    work = Path(tempfile.mkdtemp(prefix="lmms-ref-"))
    data = work / "data"
    for write in WRITERS.values():
        write(data)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for number, (family, model_class, all_tasks) in enumerate(RUNS):
        tasks = [t for t in all_tasks if not only or f"{family}.{t}" in only]
        if not tasks:
            continue
        model = build_tiny_vlm(family, work / "models" / f"{family}-{number}")
        out = work / f"out-{family}-{number}"
        out.mkdir()
        with contextlib.ExitStack() as stack:
            judge = None
            if any(task in JUDGED for task in tasks):
                from openai_stub import OpenAIStub, StubBehaviour, hashed_grade

                judge = stack.enter_context(OpenAIStub(StubBehaviour(chat_reply=hashed_grade))).base_url
            served = with_video_processor(model, family, work)
            changes = [PATCHED[family]] if family in PATCHED else []
            changes += [TASK_PATCHES[task] for task in tasks if task in TASK_PATCHES]
            label = ", ".join(name for name, _ in changes) or None
            patch = "".join(code for _, code in changes) or None
            argv = run_lmms_eval(args.python, model_class, served, tasks, data, out, judge, patch)
            if label:  # the command as recorded names the change instead of spelling it out
                argv = [argv[0], "-c", f"<{label}; then as python -m lmms_eval>", *argv[3:]]
        for task in (member for name in tasks for member in GROUPS.get(name, [name])):
            ref = reference(family, model_class, task, out, argv, model, data)
            path = OUT_DIR / f"{family}.{task}.json"
            path.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
