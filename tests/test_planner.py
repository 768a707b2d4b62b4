"""The planner on real model shapes (configs only, no weights), checked against hand arithmetic.

Hand arithmetic for Llama-2-7B in float16 at tp=1, max_len 4096, batch 1:
  parameters = 32000*4096*2 (embedding + LM head) + 32*(4*4096*4096 + 3*4096*11008 + 2*4096) + 4096
             = 6,738,415,616 -> weights 13,476,831,232 B
  KV cache   = 2 * 32 layers * 32 heads * 128 * 4096 * 2 B = 2,147,483,648 B
  activations= 4096*(2*4096 + 11008)*2 + 4096*32000*(2 + 4) = 943,718,400 B
  total      = int(16,568,033,280 * 1.10) + 2**30 = 19,298,578,432 B (17.97 GiB)
Llama-2-70B (80 layers, 8192 hidden, 64 heads, 8 KV heads, 28672 MLP) in float16:
  tp=8: weights (68,713,185,280/8 + 263,462,912)*2 = 17,705,222,144; KV 2*80*1*128*4096*2 = 167,772,160;
        activations 4096*(16384 + 3584)*2 + 786,432,000 = 950,009,856; total 21,779,046,400 B (20.28 GiB)
  tp=4: weights 34,883,518,464; KV 335,544,320; activations 979,369,984; total 40,892,017,868 B (38.08 GiB)
"""

from __future__ import annotations

import json

import pytest
from accelerate import init_empty_weights
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GotOcr2ImageProcessor,
    InternVLConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
)

from evalkit.errors import UsageError
from evalkit.planner import (
    GIB,
    check_run_layout,
    estimate,
    image_tokens_per_image,
    plan,
    read_image_tokens_per_image,
    read_shape,
    recommend,
)
from evalkit.planner import main as planner_main
from evalkit.vision_shape import video_tokens_per_clip

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "yi-34b": dict(
        hidden_size=7168,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        intermediate_size=20480,
        vocab_size=64000,
        max_position_embeddings=4096,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = {}
    for name, kwargs in SHAPES.items():
        folder = tmp_path_factory.mktemp(name)
        LlamaConfig(**kwargs, dtype="float16").save_pretrained(folder)
        out[name] = read_shape(str(folder))
    return out


def test_parameter_counts(shapes):
    assert shapes["llama-2-7b"].parameters == 6_738_415_616
    assert shapes["llama-2-70b"].parameters == 68_976_648_192


def test_llama_7b_cell(shapes):
    row = estimate(shapes["llama-2-7b"], tp=1, gpus=8, max_len=4096, batch=1)
    assert (row.weights, row.kv_cache, row.activations) == (13_476_831_232, 2_147_483_648, 943_718_400)
    assert row.total == 19_298_578_432


def test_llama_70b_cells(shapes):
    tp8 = estimate(shapes["llama-2-70b"], tp=8, gpus=8, max_len=4096, batch=1)
    assert (tp8.weights, tp8.kv_cache, tp8.activations, tp8.total) == (
        17_705_222_144,
        167_772_160,
        950_009_856,
        21_779_046_400,
    )
    tp4 = estimate(shapes["llama-2-70b"], tp=4, gpus=8, max_len=4096, batch=1)
    assert (tp4.weights, tp4.kv_cache, tp4.activations, tp4.total) == (
        34_883_518_464,
        335_544_320,
        979_369_984,
        40_892_017_868,
    )


@pytest.mark.parametrize(
    ("model", "gpu_mem", "expected_tp"),
    [
        ("llama-2-7b", 40, 1),
        ("llama-2-7b", 80, 1),
        ("llama-2-13b", 40, 1),
        ("llama-2-13b", 80, 1),
        ("yi-34b", 40, 2),
        ("yi-34b", 80, 1),
        ("llama-2-70b", 40, 4),
        ("llama-2-70b", 80, 2),
    ],
)
def test_recommendation_on_8_gpus(shapes, model, gpu_mem, expected_tp):
    rows = plan(shapes[model], gpus=8, max_len=4096, batch=1)
    assert [r.tp for r in rows] == [1, 2, 4, 8]
    best = recommend(rows, gpu_mem)
    assert best.tp == expected_tp and best.dp == 8 // expected_tp
    assert best.total <= gpu_mem * GIB
    smaller = [r for r in rows if r.tp < expected_tp]
    assert all(r.total > gpu_mem * GIB or r.problem for r in smaller)


def test_sharding_rules(shapes):
    rows = {r.tp: r for r in plan(shapes["yi-34b"], gpus=16, max_len=4096, batch=1)}
    assert rows[16].problem == "tp(16) does not divide attention heads(56)"
    assert rows[8].problem is None


# Vision-language models: the dimensions of the released checkpoints' config.json files (hub layout:
# Qwen2.5-VL keeps its text fields at the top level, the others nest a text_config). No weights.
LLAVA_NEXT_34B = {
    "model_type": "llava_next",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 64000,
    "projector_hidden_act": "gelu",
    "text_config": {
        "model_type": "llama",
        "hidden_size": 7168,
        "intermediate_size": 20480,
        "max_position_embeddings": 4096,
        "num_attention_heads": 56,
        "num_hidden_layers": 60,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 5000000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 64064,
    },
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}
QWEN25_VL_72B = {
    "model_type": "qwen2_5_vl",
    "hidden_act": "silu",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "max_position_embeddings": 128000,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 8192,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}
QWEN25_VL_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2}
INTERNVL3_78B = {
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151667,
    "projector_hidden_act": "gelu",
    "text_config": {
        "model_type": "qwen2",
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "max_position_embeddings": 32768,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 151674,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "model_type": "internvl_vision",
        "attention_bias": False,
        "hidden_act": "gelu",
        "hidden_size": 3200,
        "image_size": [448, 448],
        "intermediate_size": 12800,
        "layer_norm_eps": 1e-06,
        "layer_scale_init_value": 0.1,
        "norm_type": "rms_norm",
        "num_attention_heads": 25,
        "num_channels": 3,
        "num_hidden_layers": 45,
        "patch_size": [14, 14],
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "use_qk_norm": True,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}
INTERNVL3_PREPROCESSOR = {
    "crop_to_patches": False,
    "max_patches": 12,
    "min_patches": 1,
    "size": {"height": 448, "width": 448},
}

# name: (config, preprocessor_config.json or None, nominal size, vision tower + projector
# parameters as transformers' own classes build them, image tokens bound, recommended tp on 8 x 80 GiB)
VLMS = {
    "llava-v1.6-34b": (LLAVA_NEXT_34B, None, 34e9, 362_249_216, 2928, 1),
    "qwen2.5-vl-72b": (QWEN25_VL_72B, QWEN25_VL_PREPROCESSOR, 72e9, 704_573_696, 16386, 4),
    "internvl3-78b": (INTERNVL3_78B, INTERNVL3_PREPROCESSOR, 78e9, 5_708_504_448, 3330, 4),
}


def write_model(folder, config: dict, preprocessor: dict | None = None) -> str:
    (folder / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(folder)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    return {
        name: write_model(tmp_path_factory.mktemp(name), config, preprocessor)
        for name, (config, preprocessor, *_) in VLMS.items()
    }


@pytest.mark.parametrize("name", VLMS)
def test_vlm_parameters_near_published_size(vlm_dirs, name):
    _, _, nominal, vision, tokens, _ = VLMS[name]
    shape = read_shape(vlm_dirs[name])
    assert shape.vision == vision
    assert shape.parameters == pytest.approx(nominal, rel=0.05)
    assert read_image_tokens_per_image(vlm_dirs[name]) == tokens


def meta_vision_parameters(config) -> tuple[int, int]:
    """(vision tower + projector, all) parameters of the transformers model built on the meta device."""
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    vision = sum(p.numel() for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n)
    return vision, model.num_parameters()


def test_vision_counts_agree_with_transformers_at_full_size(vlm_dirs):
    for name in VLMS:
        shape = read_shape(vlm_dirs[name])
        vision, total = meta_vision_parameters(AutoConfig.from_pretrained(vlm_dirs[name]))
        assert shape.vision == vision, name
        # Weights as built, before any tying; the text formula leaves out biases (Qwen2 q/k/v: 80 x 10,240).
        assert 0 <= total - shape.parameters <= 1_000_000, name


TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)


def tiny_vlm_configs() -> dict[str, dict]:
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    llama = LlamaConfig(**TINY_TEXT)
    internvl = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return {
        "llava": LlavaConfig(vision_config=clip, text_config=llama, vision_feature_layer=-2).to_dict(),
        "llava two feature layers, no projector bias": LlavaConfig(
            vision_config=clip, text_config=llama, vision_feature_layer=[-2, -3], multimodal_projector_bias=False
        ).to_dict(),
        "llava_next": LlavaNextConfig(
            vision_config=clip, text_config=llama, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]]
        ).to_dict(),
        "qwen2_vl": Qwen2VLConfig(
            text_config=TINY_TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4)
        ).to_dict(),
        "qwen2_5_vl": Qwen2_5_VLConfig(
            text_config=TINY_TEXT,
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=40, out_hidden_size=64, num_heads=4, patch_size=4
            ),
        ).to_dict(),
        "internvl layer norms": InternVLConfig(
            text_config={**TINY_TEXT, "model_type": "qwen2"},
            vision_config=dict(**internvl, attention_bias=True, use_mask_token=True, use_mean_pooling=False),
        ).to_dict(),
        "internvl rms norms, qk norm": InternVLConfig(
            text_config={**TINY_TEXT, "model_type": "qwen2"},
            vision_config=dict(**internvl, norm_type="rms_norm", use_qk_norm=True),
        ).to_dict(),
    }


def test_vision_counts_agree_with_transformers_on_every_variant(tmp_path):
    for name, config in tiny_vlm_configs().items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        shape = read_shape(write_model(folder, config))
        vision, _ = meta_vision_parameters(AutoConfig.from_pretrained(folder))
        assert shape.vision == vision, name


def test_text_configs_have_no_vision(shapes):
    assert all(s.vision == 0 and s.vision_width == 0 for s in shapes.values())
    assert image_tokens_per_image(LlamaConfig(**TINY_TEXT).to_dict()) == 0


def test_image_token_bounds_are_the_processors_maxima():
    """The bound equals the most tokens the real processors give over many image sizes."""
    sizes = [
        (h, w) for h in (10, 100, 336, 500, 672, 1000, 2000, 4000) for w in (10, 100, 336, 500, 672, 1000, 2000, 4000)
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<image>": 0, "<unk>": 1}, unk_token="<unk>")),
        additional_special_tokens=["<image>"],
    )
    llava_next = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            image_grid_pinpoints=LLAVA_NEXT_34B["image_grid_pinpoints"],
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert max(llava_next._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]) == 2928
    assert image_tokens_per_image(LLAVA_NEXT_34B) == 2928

    accepted = [(h, w) for h, w in sizes + [(3584, 3584), (3585, 3585)] if max(h, w) / min(h, w) <= 200]
    qwen = Qwen2VLImageProcessor(**QWEN25_VL_PREPROCESSOR)
    most = max(qwen.get_number_of_image_patches(h, w, {}) // 4 for h, w in accepted)
    assert most + 2 == image_tokens_per_image(QWEN25_VL_72B, QWEN25_VL_PREPROCESSOR) == 16386
    # A small max_pixels, where an image 200 times wider than high gets more tokens than max_pixels allows.
    small = {"min_pixels": 256, "max_pixels": 2304, "patch_size": 4, "merge_size": 2}
    qwen = Qwen2VLImageProcessor(**small)
    most = max(qwen.get_number_of_image_patches(h, w, {}) // 4 for h, w in accepted + [(5, 1000), (40, 8000)])
    assert most > 2304 // 8**2
    assert most + 2 == image_tokens_per_image(QWEN25_VL_72B, small)

    tiles = GotOcr2ImageProcessor(max_patches=12, size={"height": 448, "width": 448})
    most = max(tiles.get_number_of_image_patches(h, w, {"crop_to_patches": True}) for h, w in sizes)
    assert 2 + 256 * most == image_tokens_per_image(INTERNVL3_78B, INTERNVL3_PREPROCESSOR) == 3330


def test_image_token_defaults_and_saved_settings(tmp_path):
    assert image_tokens_per_image(QWEN25_VL_72B) == 28 * 28 * 1280 // 28**2 + 2  # Qwen2VLImageProcessor's default
    assert image_tokens_per_image(INTERNVL3_78B, {"max_patches": 6}) == 7 * 256 + 2
    llava = tiny_vlm_configs()["llava"]
    assert image_tokens_per_image(llava) == 16
    assert image_tokens_per_image({**llava, "vision_feature_select_strategy": "full"}) == 17
    # transformers 5 saves the image processor's settings nested in processor_config.json.
    folder = tmp_path / "qwen"
    folder.mkdir()
    write_model(folder, QWEN25_VL_72B)
    (folder / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {
                    "size": {"longest_edge": 2304, "shortest_edge": 256},
                    "merge_size": 2,
                    "patch_size": 4,
                }
            }
        )
    )
    assert read_image_tokens_per_image(str(folder)) == image_tokens_per_image(
        QWEN25_VL_72B, {"max_pixels": 2304, "min_pixels": 256, "patch_size": 4, "merge_size": 2}
    )


@pytest.mark.parametrize("name", VLMS)
def test_vlm_plan_on_8_gpus(vlm_dirs, name, capsys):
    recommended = VLMS[name][-1]
    assert planner_main(["--model", vlm_dirs[name], "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert f"recommended: tp={recommended} x dp={8 // recommended}" in out
    assert f"at most {VLMS[name][4]} tokens each" in out


def test_images_add_to_max_len(vlm_dirs, tmp_path, capsys):
    planner_main(
        ["--model", vlm_dirs["internvl3-78b"], "--gpus", "8", "--gpu-mem", "80", "--max-len", "1000", "--images", "2"]
    )
    assert "max_len 7660," in capsys.readouterr().out
    LlamaConfig(**SHAPES["llama-2-7b"]).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="not a vision-language model"):
        planner_main(["--model", str(tmp_path), "--gpus", "8", "--gpu-mem", "80", "--images", "1"])


def test_vlm_layout_that_cannot_fit_is_refused_before_loading(vlm_dirs):
    model = vlm_dirs["internvl3-78b"]  # a config and nothing else: no weights to load
    max_len = 1000 + 2 * read_image_tokens_per_image(model)
    with pytest.raises(UsageError) as refused:
        check_run_layout(model, "bfloat16", tp=2, gpus=8, gpu_mem_gib=80, max_len=max_len, batch=1)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("layout tp=2 x dp=4 does not fit") and "suggests --tp 4" in message
    check_run_layout(model, "bfloat16", tp=4, gpus=8, gpu_mem_gib=80, max_len=max_len, batch=1)


def test_video_token_bound_is_the_most_a_frame_rule_gives():
    """A clip's bound equals the most tokens Qwen's video path gives over clip sizes and lengths: the
    frame rule's frames, two per temporal patch, each resized within the rule's pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from evalkit.tasks.video import FrameRule

    rule = FrameRule()
    most = 0
    for total, fps in ((8, 4.0), (300, 30.0), (3000, 30.0), (100000, 25.0)):
        frames = len(rule.indices(total, fps))
        for h, w in ((32, 32), (360, 640), (672, 896), (1080, 1920), (2160, 3840)):
            new_h, new_w = smart_resize(h, w, factor=28, min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)
            most = max(most, -(-frames // 2) * (new_h // 28) * (new_w // 28))
    assert most + 2 == video_tokens_per_clip(QWEN25_VL_72B, QWEN25_VL_PREPROCESSOR, rule.max_frames, rule.max_pixels)
    assert video_tokens_per_clip(INTERNVL3_78B, INTERNVL3_PREPROCESSOR, 8, rule.max_pixels) == 8 * 3330
    assert video_tokens_per_clip(LlamaConfig(**TINY_TEXT).to_dict(), None, 32, rule.max_pixels) == 0


def test_clips_add_their_bound_to_the_longest_request():
    from evalkit.preflight import longest_request_bound
    from evalkit.tasks.images import Visuals
    from evalkit.tasks.requests import Request

    def request(*digests: str) -> Request:
        visuals = Visuals(task="t", doc_id=0, digests=digests) if digests else None
        return Request(0, "t", 0, 0, 0, "generate_until", ("ab", {"max_gen_toks": 10}), visuals=visuals)

    assert longest_request_bound([request()], 100000, 50, 700) == 2 + 2 + 10
    assert longest_request_bound([request("sha256:a", "video:sha256:b")], 100000, 50, 700) == 14 + 50 + 700
    assert longest_request_bound([request("video:sha256:b", "video:sha256:c")], 1000, 50, 700) == 1000
