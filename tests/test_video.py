"""Video tasks: clips as digests, the frame rule, decoding with PyAV, and a tiny Qwen2-VL that sees
the frames (different clips give different generations), run with ``python -m evalkit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evalkit.tasks.video import Clip, FrameRule, clip_digest, decode
from evalkit.testing.lmms_data import write_clip

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "fixtures" / "tasks" / "video"


def test_frame_rule_follows_lmms_eval_qwen2_vl():
    rule = FrameRule()
    # 2 fps: 10 s at 30 fps is 20 frames, spread over the clip
    picked = rule.indices(300, 30.0)
    assert len(picked) == 20 and picked[0] == 0 and picked[-1] == 299
    assert len(rule.indices(8, 4.0)) == 4  # 2 s: at least 4 frames
    assert len(rule.indices(3000, 30.0)) == 32  # capped at max_num_frames
    assert all(len(rule.indices(n, 30.0)) % 2 == 0 for n in (4, 37, 90, 301))


def test_frame_rule_follows_internvl_video_processor():
    """InternVL's video processor: 32 frames, each from the middle of its stretch of the clip
    (``arange(step / 2, total, step)`` with ``step = total / 32``, in float32, truncated)."""
    from evalkit.tasks.video import rule_for

    rule = rule_for("internvl")
    assert rule.indices(64, 30.0) == list(range(1, 64, 2))
    picked = rule.indices(1000, 25.0)
    assert len(picked) == 32 and picked[0] == 15 and picked[-1] == 984
    assert rule.indices(12, 4.0) == list(range(12))  # a shorter clip: every frame


def test_frame_rule_follows_lmms_eval_qwen2_5_vl():
    """lmms-eval's qwen2_5_vl class asks qwen-vl-utils for min(32, frames) frames, floored to an
    even count (at least 2), at ``linspace(0, total - 1, n).round()`` whatever the clip's rate."""
    from evalkit.tasks.video import rule_for

    rule = rule_for("qwen2_5_vl")
    assert rule.indices(32, 4.0) == list(range(32))
    assert rule.indices(7, 30.0) == [0, 1, 2, 4, 5, 6]  # 6 frames: linspace 0, 1.2, 2.4, 3.6, 4.8, 6
    picked = rule.indices(1000, 25.0)
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 999 and picked[1] == 32
    with pytest.raises(ValueError, match="at least 2 frames"):  # evalkit refuses such a clip for every rule
        rule.indices(1, 30.0)
    assert (rule.min_pixels, rule.max_pixels) == (256 * 28 * 28, 768 * 28 * 28)


def test_frame_rules_of_a_multi_round_tasks_rounds():
    """A round of lmms-eval's generate_until_multi_round: its qwen2_vl class takes the fps rule's
    frames and then exactly 32 at ``linspace(..., dtype=int)``, repeats kept; its qwen2_5_vl class
    takes qwen-vl-utils' 2 fps (floored to even), at most 32 of those, with positions at 24 fps."""
    from evalkit.tasks.video import rule_for

    qwen2 = rule_for("qwen2_vl", rounds=True)
    assert qwen2.indices(8, 4.0) == [0] * 11 + [2] * 10 + [5] * 10 + [7]  # 4 frames (0, 2, 5, 7), 32 picks
    assert len(qwen2.indices(3000, 30.0)) == 32 and rule_for("qwen2_vl") != qwen2
    qwen25 = rule_for("qwen2_5_vl", rounds=True)
    assert qwen25.indices(8, 4.0) == [0, 2, 5, 7]
    # 23 frames at 4 fps: 11.5 frames at 2 fps, floored to 10 (the generate_until rule rounds to 12)
    assert qwen25.indices(23, 4.0) == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22]
    assert len(rule_for("qwen2_vl").indices(23, 4.0)) == 12
    picked = qwen25.indices(3000, 30.0)  # 200 frames at 2 fps, 32 of them
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 2999
    assert qwen25.positions_fps == 24.0 and rule_for("qwen2_5_vl").positions_fps is None
    assert rule_for("internvl", rounds=True) == rule_for("internvl")  # its own rule where a class has none


def test_clip_digest_names_content_and_rule(tmp_path):
    a = write_clip(tmp_path / "a.mp4", ["red", "blue"])
    b = write_clip(tmp_path / "b.mp4", ["green", "white"])
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(a.read_bytes())
    rule = FrameRule()
    assert clip_digest(Clip(str(a), rule)) == clip_digest(Clip(str(copy), rule))
    assert clip_digest(Clip(str(a), rule)) != clip_digest(Clip(str(b), rule))
    assert clip_digest(Clip(str(a), rule)) != clip_digest(Clip(str(a), FrameRule(max_frames=16)))
    assert clip_digest(Clip(str(a), rule)).startswith("video:sha256:")


def test_decode_picks_frames_by_the_rule(tmp_path):
    clip = write_clip(tmp_path / "a.mp4", ["red", "blue"], frames_each=8, fps=4)  # 16 frames, 4 s
    video = decode(Clip(str(clip), FrameRule()))
    assert len(video.frames) == 8 and video.frames[0].size == (32, 32)
    first, last = np.asarray(video.frames[0])[24, 24], np.asarray(video.frames[-1])[24, 24]
    assert first[0] > 150 > first[2] and last[2] > 150 > last[0]  # red, then blue


def test_missing_and_broken_clips_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        clip_digest(Clip(str(tmp_path / "none.mp4"), FrameRule()))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError, match="cannot decode video"):
        clip_digest(Clip(str(broken), FrameRule()))


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory) -> Path:
    from evalkit.testing.tinyvlm import build_tiny_vlm

    return build_tiny_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


def video_run(work: Path, model: Path, clips: dict[str, list[str]], *, missing: str | None = None):
    hf_home = work / "hf"
    rows = []
    for name, colours in clips.items():
        write_clip(hf_home / "video_fixture" / name, colours)
        rows.append({"clip": name, "question": "What colour is the shape?", "answer": colours[0]})
    if missing:
        rows.append({"clip": missing, "question": "What colour is the shape?", "answer": "red"})
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "data" / "video.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "evalkit", "--model", str(model), "--backend", "hf-vlm"]
    command += ["--tasks", "vlm_video", "--include-path", str(TASKS), "--output", str(work / "out"), "--device", "cpu"]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_different_clips_give_different_generations(tmp_path, qwen_model, family):
    from evalkit.testing.tinyvlm import build_tiny_vlm

    model = qwen_model if family == "qwen2_vl" else build_tiny_vlm(family, tmp_path / family)
    clips = {"red.mp4": ["red", "red"], "blue.mp4": ["blue", "blue"], "mixed.mp4": ["green", "white"]}
    done = video_run(tmp_path, model, clips)
    assert done.returncode == 0, done.stderr[-2000:]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_vlm_video.jsonl").read_text().splitlines()]
    answers = [s["resps"][0][0] for s in samples]
    assert len(set(answers)) == len(clips), answers
    visuals = [s["arguments"] for s in samples]
    assert all("video:sha256:" in json.dumps(v) for v in visuals)


@pytest.mark.parametrize("broken", [False, True])
def test_missing_or_undecodable_clip_ends_with_one_line(tmp_path, qwen_model, broken):
    if broken:
        bad = tmp_path / "hf" / "video_fixture" / "bad.mp4"
        bad.parent.mkdir(parents=True)
        bad.write_bytes(b"\0" * 4096)
    done = video_run(tmp_path, qwen_model, {"red.mp4": ["red", "red"]}, missing="bad.mp4")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("evalkit: error:")]
    expected = "cannot decode video" if broken else "does not exist"
    assert len(errors) == 1 and expected in errors[0] and "bad.mp4" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_later_rounds_missing_clip_ends_the_run_with_one_line(tmp_path, qwen_model):
    """ovo_forward's third round of a doc names a clip that is not there: found when that round is
    asked for, after the rounds before it ran; one line, exit 2, no results (the rounds that ran are
    kept for --resume)."""
    from evalkit.testing.lmms_data import HF_HOME, write_ovo_forward

    write_ovo_forward(tmp_path)
    missing = tmp_path / HF_HOME / "ovobench" / "chunked_videos" / "102_2.mp4"
    missing.unlink()
    env = {**os.environ, "HF_HOME": str(tmp_path / HF_HOME), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "evalkit", "--model", str(qwen_model), "--tasks", "lmms:ovo_forward"]
    command += ["--output", str(tmp_path / "out"), "--device", "cpu", "--gen-kwargs", "max_new_tokens=4"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("evalkit: error:")]
    assert len(errors) == 1 and "ovo_forward" in errors[0] and "round 2" in errors[0], done.stderr[-2000:]
    assert str(missing) in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    assert any((tmp_path / "out" / "shards").glob("*.jsonl"))


def test_lmms_eval_video_task_with_a_missing_clip_ends_with_one_line(tmp_path, qwen_model):
    """lmms-eval's videomme calls sys.exit() for a missing clip: one line, exit 2, nothing written."""
    from evalkit.testing.lmms_data import HF_HOME, VIDEOMME_DOCS, write_videomme

    write_videomme(tmp_path)
    missing = tmp_path / HF_HOME / "videomme" / "data" / f"{VIDEOMME_DOCS[1][0]}.mp4"
    missing.unlink()
    env = {**os.environ, "HF_HOME": str(tmp_path / HF_HOME), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "evalkit", "--model", str(qwen_model), "--tasks", "lmms:videomme"]
    command += ["--output", str(tmp_path / "out"), "--device", "cpu"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("evalkit: error:")]
    assert len(errors) == 1 and "videomme" in errors[0] and str(missing) in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
