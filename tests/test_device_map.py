"""split_device_map on tiny configs: config.json only, no weights and no CUDA, as the map comes
from memory budgets alone. GPU numbers are arbitrary and out of order on purpose."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2VLConfig,
)

from evalkit.errors import UsageError
from evalkit.models.device_map import split_device_map

GPUS = [5, 2, 7]
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)
CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
VISION_PARTS = ("vision_tower", "visual", "multi_modal_projector", "image_newline")


def tiny_configs():
    return {
        "llama": (LlamaConfig(**TEXT), AutoModelForCausalLM),
        "llama-tied": (LlamaConfig(**TEXT, tie_word_embeddings=True), AutoModelForCausalLM),
        "llava": (
            LlavaConfig(vision_config=CLIPVisionConfig(**CLIP), text_config=LlamaConfig(**TEXT)),
            AutoModelForImageTextToText,
        ),
        "llava_next": (
            LlavaNextConfig(
                vision_config=CLIPVisionConfig(**CLIP),
                text_config=LlamaConfig(**TEXT),
                image_grid_pinpoints=[[32, 64], [64, 32]],
            ),
            AutoModelForImageTextToText,
        ),
        "qwen2_vl": (
            Qwen2VLConfig(
                text_config=TEXT, vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4)
            ),
            AutoModelForImageTextToText,
        ),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (folder holding only config.json, auto class)."""
    out = {}
    for name, (config, auto_class) in tiny_configs().items():
        folder = tmp_path_factory.mktemp(name)
        config.save_pretrained(folder)
        out[name] = (str(folder), auto_class)
    return out


def skeleton(folder: str, auto_class: type) -> torch.nn.Module:
    with init_empty_weights():
        return auto_class.from_config(AutoConfig.from_pretrained(folder))


def weight_bytes(folder: str, auto_class: type) -> int:
    return compute_module_sizes(skeleton(folder, auto_class), dtype=torch.float32)[""]


def parameter_devices(folder: str, auto_class: type, device_map: dict) -> dict[str, int | str]:
    """Each parameter's device under the map (its longest matching name); every one must be covered."""
    devices = {}
    for name, _ in skeleton(folder, auto_class).named_parameters():
        owners = [k for k in device_map if k == "" or name == k or name.startswith(f"{k}.")]
        assert owners, f"{name} is not in the device map"
        devices[name] = device_map[max(owners, key=len)]
    return devices


def layer_devices(devices: dict[str, int | str]) -> list[int | str]:
    """The device of each decoder layer, in layer order."""
    found: dict[int, int | str] = {}
    for name, device in devices.items():
        if ".layers." in name and "vision" not in name and "visual" not in name:
            found[int(name.split(".layers.")[1].split(".")[0])] = device
    return [found[i] for i in sorted(found)]


def first_gpu_parts(devices: dict[str, int | str]) -> dict[str, int | str]:
    return {n: d for n, d in devices.items() if "embed_tokens" in n or any(p in n.split(".") for p in VISION_PARTS)}


@pytest.mark.parametrize("name", ["llama", "llava", "llava_next", "qwen2_vl"])
def test_vision_projector_and_embeddings_on_the_first_gpu(models, name):
    folder, auto_class = models[name]
    memory = dict.fromkeys(GPUS, 10 * weight_bytes(folder, auto_class))
    device_map = split_device_map(folder, auto_class, GPUS, memory, "float32")
    devices = parameter_devices(folder, auto_class, device_map)
    pinned = first_gpu_parts(devices)
    assert any("embed_tokens" in n for n in pinned)
    if name != "llama":
        assert any(p in n for n in pinned for p in ("vision_tower", "visual"))
    assert set(pinned.values()) == {GPUS[0]}
    assert set(devices.values()) <= set(GPUS)
    # Ample budgets still spread the decoder layers (an even share each), in the GPUs' order.
    layers = layer_devices(devices)
    assert len(set(layers)) >= 2
    assert [GPUS.index(d) for d in layers] == sorted(GPUS.index(d) for d in layers)


@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_vl"])
def test_a_tight_budget_spreads_layers_over_every_gpu(models, name):
    folder, auto_class = models[name]
    total = weight_bytes(folder, auto_class)
    pinned_bytes = sum(
        size
        for part, size in compute_module_sizes(skeleton(folder, auto_class), dtype=torch.float32).items()
        if part.rsplit(".", 1)[-1] in (*VISION_PARTS, "embed_tokens")
    )
    # The first GPU holds the pinned parts and a little more (accelerate keeps room for one layer
    # there too); the others share the rest.
    memory = {GPUS[0]: pinned_bytes + total // 4, GPUS[1]: total * 3 // 5, GPUS[2]: total * 3 // 5}
    device_map = split_device_map(folder, auto_class, GPUS, memory, "float32")
    devices = parameter_devices(folder, auto_class, device_map)
    assert set(first_gpu_parts(devices).values()) == {GPUS[0]}
    assert set(layer_devices(devices)) >= set(GPUS[1:])
    for gpu in GPUS:
        held = sum(p.numel() * 4 for n, p in skeleton(folder, auto_class).named_parameters() if devices[n] == gpu)
        assert held <= memory[gpu]


def test_only_the_ranks_own_gpus_are_used(models):
    folder, auto_class = models["llava"]
    total = weight_bytes(folder, auto_class)
    memory = dict.fromkeys(range(8), 100 * total)  # budgets for the whole node; the rank owns 6 and 3
    device_map = split_device_map(folder, auto_class, [6, 3], memory, "float32")
    devices = parameter_devices(folder, auto_class, device_map)
    assert set(devices.values()) == {6, 3}
    assert set(first_gpu_parts(devices).values()) == {6}


def test_a_tied_lm_head_stays_with_the_embeddings(models):
    folder, auto_class = models["llama-tied"]
    memory = dict.fromkeys(GPUS, weight_bytes(folder, auto_class))
    devices = parameter_devices(folder, auto_class, split_device_map(folder, auto_class, GPUS, memory, "float32"))
    assert devices["lm_head.weight"] == devices["model.embed_tokens.weight"] == GPUS[0]
    assert len(set(layer_devices(devices))) >= 2


def test_too_small_a_budget_is_refused_with_the_shortfall(models):
    folder, auto_class = models["llava"]
    total = weight_bytes(folder, auto_class)
    with pytest.raises(UsageError, match=r"does not fit on GPUs \[5, 2, 7\].*left over") as refused:
        split_device_map(folder, auto_class, GPUS, dict.fromkeys(GPUS, total // 4), "float32")
    assert "\n" not in str(refused.value)
    with pytest.raises(UsageError, match="vision tower, projector and input embeddings need .* on GPU 5"):
        split_device_map(folder, auto_class, GPUS, {5: 1000, 2: 10 * total, 7: 10 * total}, "float32")
    with pytest.raises(UsageError, match=r"no memory budget for GPU\(s\) \[7\]"):
        split_device_map(folder, auto_class, GPUS, {5: total, 2: total}, "float32")


def test_the_dtype_sets_the_sizes(models):
    folder, auto_class = models["llama"]
    total = weight_bytes(folder, auto_class)  # float32
    memory = dict.fromkeys(GPUS, int(total * 0.4))
    with pytest.raises(UsageError):
        split_device_map(folder, auto_class, GPUS, memory, "float32")
    assert set(split_device_map(folder, auto_class, GPUS, memory, torch.bfloat16).values()) <= set(GPUS)


def test_transformers_loads_with_the_map(tmp_path):
    """The map's names (a parameter among them: LLaVA-NeXT's image_newline) are the ones
    from_pretrained places by; on CPU every GPU number is replaced by "cpu"."""
    config, _ = tiny_configs()["llava_next"]
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(tmp_path)
    total = weight_bytes(str(tmp_path), AutoModelForImageTextToText)
    device_map = split_device_map(
        str(tmp_path), AutoModelForImageTextToText, GPUS, dict.fromkeys(GPUS, total), "float32"
    )
    assert device_map["model.image_newline"] == GPUS[0]
    model, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path, device_map=dict.fromkeys(device_map, "cpu"), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.model.image_newline.abs().sum() > 0
