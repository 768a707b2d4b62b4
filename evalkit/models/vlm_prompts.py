"""Requests as a vision-language model's processor renders them: chat-template text and its token
ids, image placeholders not yet expanded (each backend expands them with the images).

Every prompt goes through the processor's chat template as one user turn (images where the
context's ``<image>`` markers are, or first), so each family gets its own image tokens.
"""

from __future__ import annotations

import transformers
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from evalkit.models.protocol import GenerationInput, Messages

IMAGE_MARKER = "<image>"


class ChatPrompts:
    """The chat-template prompt of each request, as text or as token ids."""

    def __init__(self, processor: transformers.ProcessorMixin, backend: str) -> None:
        if not getattr(processor, "chat_template", None):
            raise ValueError(
                f"its processor has no chat template, which {backend} renders every prompt with; "
                "add chat_template.jinja (or chat_template.json) from the model's release"
            )
        self.processor = processor
        self.bos_text = processor.tokenizer.bos_token

    def text(self, request: GenerationInput) -> str:
        """The request as chat-template text, image placeholders not yet expanded."""
        kinds = request.images.kinds if request.images is not None else ()
        messages = to_messages(request.context, kinds)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def adds_special_tokens(self, prompt: str) -> bool:
        """Whether the tokenizer should add its special tokens: a template that writes the BOS text
        itself must not get a second one."""
        return not (self.bos_text and prompt.startswith(self.bos_text))

    def ids(self, prompt: str) -> list[int]:
        """The prompt's token ids, one placeholder per image."""
        return self.processor.tokenizer(prompt, add_special_tokens=self.adds_special_tokens(prompt))["input_ids"]


def to_messages(context: str | Messages, kinds: tuple[str, ...]) -> Messages:
    """One user turn from prompt text (images at its ``<image>`` markers, or first; videos first),
    or the request's own chat messages, checked to hold one image part per image. ``kinds`` is
    "image" or "video" per visual, in order."""
    videos = [{"type": "video"} for kind in kinds if kind == "video"]
    images = len(kinds) - len(videos)
    if isinstance(context, list):
        if videos:
            raise ValueError("chat messages with videos are not supported; give the prompt as text")
        parts = [part for message in context if not isinstance(message["content"], str) for part in message["content"]]
        found = sum(1 for part in parts if part.get("type") == "image")
        if found != images:
            raise ValueError(f"the chat messages have {found} image parts for {images} images")
        return context
    pieces = context.split(IMAGE_MARKER)
    if len(pieces) == 1:
        content = [{"type": kind} for kind in kinds] + [{"type": "text", "text": context}]
    elif len(pieces) - 1 != images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {IMAGE_MARKER} markers for {images} images")
    else:
        content = list(videos)
        for i, piece in enumerate(pieces):
            # The template writes its own separator around an image.
            text = piece.lstrip() if i > 0 else piece
            text = text.rstrip() if i < len(pieces) - 1 else text
            if i > 0:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def load_processor(path: str, *, trust_remote_code: bool = False) -> transformers.ProcessorMixin:
    """``AutoProcessor.from_pretrained``, except where transformers would refuse an image model.

    Some processors (Qwen2-VL, InternVL, ...) also hold a video processor, and in transformers 5
    every video processor needs torchvision, so without it they cannot load at all. Images alone
    do not need it: there the processor loads without its video part. So does a checkpoint that
    holds no video processor's settings (an image-only fine-tune), where transformers would refuse it.
    """
    if is_torchvision_available():
        try:
            return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except OSError as error:
            if "video processor" not in str(error):
                raise
    processor_dict, _ = transformers.ProcessorMixin.get_processor_dict(path, trust_remote_code=trust_remote_code)
    name = processor_dict.get("processor_class")
    if name is None:
        model_type = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name or "", None)
    if cls is None or "video_processor" not in cls.get_attributes():
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return image_only(cls).from_pretrained(path, trust_remote_code=trust_remote_code)


def image_only(cls: type[transformers.ProcessorMixin]) -> type[transformers.ProcessorMixin]:
    """``cls`` without its video processor, under the same name, so it saves and loads the same
    files and ``AutoProcessor`` finds it wherever torchvision is installed."""

    def get_attributes(klass) -> list[str]:
        return [a for a in cls.get_attributes() if a != "video_processor"]

    return type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__})
