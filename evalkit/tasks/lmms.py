"""lmms-eval's task files, unchanged, as lm-eval tasks.

An lmms-eval task YAML is an lm-eval YAML with a few more keys. ``LmmsTask`` is lm-eval's
``ConfigurableTask`` that takes them, with lmms-eval's meaning:

* ``doc_to_visual``: a field name (lmms-eval wraps its value in a list) or a function of the doc,
  or of the doc and the prompt kwargs, returning the doc's images. It becomes the task's
  ``doc_to_image``, so lm-eval's own request building attaches the images (``{"visual": [...]}``).
* ``lmms_eval_specific_kwargs`` (formerly ``model_specific_prompt_kwargs``): per-model blocks of
  prompt settings. The block is the one named for the lmms-eval model class that runs the model
  the task is built for (``metadata["pretrained"]``; see ``lmms_models``), else lmms-eval's
  ``default``. ``doc_to_text``, ``doc_to_visual`` and ``doc_to_messages`` functions receive it as
  their second argument.
* ``model_specific_generation_kwargs`` / ``model_specific_target_kwargs``: per-model blocks merged
  into ``generation_kwargs`` / passed to a ``doc_to_target`` function.
* ``doc_to_messages``: a function of the doc returning chat messages whose content parts are text
  and images. The request's context is those messages with each image part replaced by
  ``{"type": "image"}`` (the request's next image); the images go with the request as visuals.
* ``full_docs``: ``process_results`` also receives the evaluation docs (``full_docs=``).
* ``reasoning_tags`` / ``auto_strip_thinking``: reasoning blocks leave the filtered responses
  before ``process_results`` (see ``lmms_scoring``).

A generation request carries the settings that model class would generate with
(``lmms_models.request_gen_kwargs``). Scoring follows lmms-eval's evaluator (``lmms_scoring``):
only ``metric_list`` metrics are aggregated, ``args`` aggregations receive the run's output
folder, and n-samples counts docs, not metric values.

As in lmms-eval, a generate_until task's outputs are stripped before ``process_results``. Keys
that only matter to lmms-eval's own runner (``group_alias``, ``process_results_use_image``,
``cluster_key``, ``score_key``) are accepted and ignored; so are ``dataset_kwargs`` entries that
only steer its downloader. Audio is refused.

One flaw of lmms-eval 0.7.3's own code is mended (``define_judge_key``): mix_evals' multiple-choice
filter builds its judge client from a module-level ``API_KEY`` that its ``utils.py`` defines only
for ``API_TYPE=azure``, so under lmms-eval's default ``openai`` provider the task cannot even be
built (``NameError``). evalkit defines it as lmms-eval's sibling module (audio2text) does for that
provider, from ``OPENAI_API_KEY``, which the judge proxy sets while task code loads.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask

from evalkit.tasks import video
from evalkit.tasks.lmms_models import model_name, model_type, prepare_image, request_gen_kwargs
from evalkit.tasks.lmms_scoring import (
    THINKING_TAGS,
    AggregationArgs,
    bind_args,
    listed_metrics,
    reasoning_tags,
    sample_counts,
    strip_response,
)

PROMPT_KWARGS = ("lmms_eval_specific_kwargs", "model_specific_prompt_kwargs")
# Keys that make a YAML an lmms-eval task.
LMMS_KEYS = frozenset(
    {
        "doc_to_visual",
        "doc_to_messages",
        *PROMPT_KWARGS,
        "model_specific_generation_kwargs",
        "model_specific_target_kwargs",
    }
)
# Keys only lmms-eval's runner reads; they change nothing in what is evaluated here.
IGNORED_KEYS = frozenset({"group_alias", "process_results_use_image", "cluster_key", "score_key"})
EXTRA_KEYS = LMMS_KEYS | IGNORED_KEYS | {"full_docs", "reasoning_tags", "auto_strip_thinking"}
# Output types only lmms-eval runs, and which of its model classes or loops run them (0.7.3).
LMMS_ONLY_OUTPUT_TYPES = {
    "generate_visual_cot": "a model that draws an image before it answers (lmms-eval's ovis_u1, bagel_unig2u, "
    "illume_plus, qwen_image_edit classes; its llava_hf, qwen2_vl and internvl_hf classes refuse it too)",
}
MULTI_ROUND = "generate_until_multi_round"
AGENTIC = "generate_until_agentic"
# lmms-eval's evaluator: an agentic doc's steps unless its generation_kwargs say otherwise.
AGENTIC_STEPS = 12
# What lmms-eval's evaluator copies from an agentic doc's last state into its fallback answer.
AGENTIC_STATE_KEYS = ("cash", "days_elapsed", "inventory", "mobile_data_working")
# dataset_kwargs entries that steer lmms-eval's downloader, not datasets.load_dataset.
DOWNLOADER_KWARGS = ("max_retries", "num_proc", "local_files_only", "force_download", "force_unzip", "create_link")


def is_lmms_config(cfg: Mapping[str, Any]) -> bool:
    return any(key in cfg for key in LMMS_KEYS)


def default_hf_home() -> None:
    """lmms-eval's video tasks read ``os.environ["HF_HOME"]`` when their code is imported (and find
    clips under it); without the variable they fail with a KeyError. The default is the folder the
    Hugging Face libraries use when it is unset."""
    if "HF_HOME" not in os.environ:
        from huggingface_hub import constants

        os.environ["HF_HOME"] = constants.HF_HOME


def adopt_lmms_metrics(metric_list: Any) -> None:
    """Give lm-eval's registry the metrics and aggregations a task names that only lmms-eval
    defines (``anls``, ``mean_last30``, ...), as lmms-eval registers them. lmms-eval's metrics
    module is imported (about 5 s) only when such a name appears."""
    from lm_eval.api import registry as lm

    wanted = [m for m in metric_list or [] if isinstance(m, Mapping) and isinstance(m.get("metric"), str)]
    missing_metrics = [m["metric"] for m in wanted if m["metric"] not in lm.metric_registry]
    missing_aggs = [
        m["aggregation"]
        for m in wanted
        if isinstance(m.get("aggregation"), str) and m["aggregation"] not in lm.aggregation_registry
    ]
    if not (missing_metrics or missing_aggs):
        return
    try:
        import lmms_eval.api.metrics  # noqa: F401 - registers lmms-eval's metrics
        from lmms_eval.api import registry as lmms
    except ImportError:
        return  # lm-eval then names the metric it does not know
    for name in missing_aggs:
        if name in lmms.AGGREGATION_REGISTRY:
            lm.register_aggregation(name)(lmms.AGGREGATION_REGISTRY[name])
    for name in missing_metrics:
        if name not in lmms.METRIC_REGISTRY:
            continue
        aggregate = lmms.METRIC_AGGREGATION_REGISTRY.get(name)
        agg_name = next((a for a, fn in lmms.AGGREGATION_REGISTRY.items() if fn is aggregate), None)
        if agg_name and agg_name not in lm.aggregation_registry:
            lm.register_aggregation(agg_name)(aggregate)
        details = (
            {"higher_is_better": lmms.HIGHER_IS_BETTER_REGISTRY[name]} if name in lmms.HIGHER_IS_BETTER_REGISTRY else {}
        )
        if agg_name:
            details["aggregation"] = agg_name
        lm.register_metric(metric=name, **details)(lmms.METRIC_REGISTRY[name])


def define_judge_key(filter_list: Any) -> None:
    """``API_KEY`` in the task module of each filter that builds an OpenAI-provider judge client
    from it without defining it (see the module's description)."""
    for pipeline in filter_list if isinstance(filter_list, list) else []:
        steps = pipeline.get("filter") if isinstance(pipeline, Mapping) else None
        for step in steps if isinstance(steps, list) else []:
            namespace = _task_globals(step.get("function") if isinstance(step, Mapping) else None)
            if namespace.get("API_TYPE") == "openai" and "API_KEY" not in namespace:
                namespace["API_KEY"] = os.environ.get("OPENAI_API_KEY", "")


def _task_globals(obj: Any) -> dict[str, Any]:
    """The module namespace a task file's function or class runs in ({} for anything else)."""
    members = vars(obj).values() if isinstance(obj, type) else [obj]
    for member in members:
        if inspect.isfunction(member):
            return member.__globals__
    return {}


def choose_prompt_kwargs(blocks: Any, name: str | None, *, legacy: bool = False) -> Any:
    """lmms-eval's choice: the model's own block; else ``default`` laid over the whole mapping
    (``model_specific_prompt_kwargs``, the former name, gives the ``default`` block alone)."""
    if not isinstance(blocks, Mapping):
        return blocks
    if name in blocks:
        return blocks[name]
    if legacy:
        return blocks.get("default")
    for fallback in ("default", "dataset"):
        if isinstance(blocks.get(fallback), Mapping):
            return {**blocks, **blocks[fallback]}
    return dict(blocks)


def _choose_block(blocks: Any, name: str | None, missing: Any) -> Any:
    if not isinstance(blocks, Mapping):
        return blocks
    return blocks[name] if name in blocks else blocks.get("default", missing)


def _audio_columns(features: Any) -> list[str]:
    """Top-level columns holding audio (an Audio feature, or a list of them)."""
    found = []
    for name, feature in (features or {}).items():
        inner = getattr(feature, "feature", feature)  # datasets.Sequence / List
        if isinstance(feature, datasets.Audio) or isinstance(inner, datasets.Audio):
            found.append(name)
    return found


def _takes_two(fn: Callable) -> bool:
    try:
        return len(inspect.signature(fn).parameters) == 2
    except (TypeError, ValueError):
        return False


def split_messages(messages: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Chat messages with each image part replaced by ``{"type": "image"}``, and the images in order."""
    if not isinstance(messages, list):
        raise TypeError(f"doc_to_messages must return a list of messages, got {type(messages).__name__}")
    out, images = [], []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in [] if isinstance(content, str) else content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                image = next((part[k] for k in ("url", "image", "path") if part.get(k) is not None), None)
                if image is None:
                    raise ValueError("doc_to_messages gave an image part without its image (url, image or path)")
                images.append(image)
                parts.append({"type": "image"})
            else:
                raise ValueError(f"doc_to_messages gave a '{kind}' part; evalkit passes only text and images")
        out.append({"role": message["role"], "content": parts})
    return out, images


@dataclass(frozen=True)
class Round:
    """One later round of a multi-round doc, or ``terminal``: the doc has had all its rounds."""

    terminal: bool
    context: Any
    info: Any
    visuals: Any  # None: an agentic step keeps the visuals it had
    outputs: Any = None  # an agentic task's outputs so far as it rewrote them (None: as they were)


class LmmsTask(ConfigurableTask):
    """lm-eval's ConfigurableTask with lmms-eval's task keys (see the module's description)."""

    def __init__(
        self,
        data_dir: Any = None,
        cache_dir: Any = None,
        download_mode: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        config = dict(config or {})
        config.pop("class", None)
        kind = config.get("output_type")
        if kind in LMMS_ONLY_OUTPUT_TYPES:
            raise ValueError(
                f"output_type '{kind}' needs {LMMS_ONLY_OUTPUT_TYPES[kind]}; evalkit runs generate_until, "
                f"generate_until_multi_round, generate_until_agentic, loglikelihood, multiple_choice and "
                f"loglikelihood_rolling"
            )
        # A multi-round or agentic task's first round is lm-eval's generate_until request; the rest
        # follow it (``next_round``, ``evalkit.rounds``), each a generation of its own.
        self._kind = kind
        self.multi_round = kind in (MULTI_ROUND, AGENTIC)
        self.agentic = kind == AGENTIC
        generation = config.get("generation_kwargs") or {}
        self.max_steps = int(generation.get("max_agentic_steps", AGENTIC_STEPS)) if self.agentic else 0
        if self.multi_round:
            config["output_type"] = "generate_until"
        self._lmms = {key: config.pop(key) for key in sorted(EXTRA_KEYS) if key in config}
        self._reasoning = reasoning_tags(self._lmms.get("reasoning_tags"))
        self._strip_thinking = bool(self._lmms.get("auto_strip_thinking")) and self._reasoning is None
        self.model_name = model_name(config.get("metadata"))
        self.aggregation_args = AggregationArgs()  # scoring names the run's output folder here
        self._frame_rule = video.rule_for(model_type(config.get("metadata")), rounds=kind == MULTI_ROUND)
        legacy = "lmms_eval_specific_kwargs" not in self._lmms
        blocks = self._lmms.get(PROMPT_KWARGS[1] if legacy else PROMPT_KWARGS[0])
        self.lmms_eval_specific_kwargs = deepcopy(choose_prompt_kwargs(blocks, self.model_name, legacy=legacy))
        self.model_specific_target_kwargs = _choose_block(
            self._lmms.get("model_specific_target_kwargs"), self.model_name, None
        )
        generation = _choose_block(self._lmms.get("model_specific_generation_kwargs"), self.model_name, {})
        self._visual = self._lmms.get("doc_to_visual")
        self._messages = self._lmms.get("doc_to_messages")
        self._full_docs = bool(self._lmms.get("full_docs"))
        if self._messages is not None and not callable(self._messages):
            raise TypeError("doc_to_messages must be a !function")
        # lm-eval attaches images to a request only when doc_to_image is set; ours answers it.
        self._own_image = config.get("doc_to_image") is None and (self._visual or self._messages) is not None
        if self._own_image:
            config["doc_to_image"] = self._messages or self._visual
        adopt_lmms_metrics(config.get("metric_list"))
        define_judge_key(config.get("filter_list"))
        super().__init__(data_dir=data_dir, cache_dir=cache_dir, download_mode=download_mode, config=config)
        if generation and self.config.generation_kwargs is not None:
            self.config.generation_kwargs.update(deepcopy(generation))

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = dict(dataset_kwargs or {})
        if "From_YouTube" in options:
            raise ValueError("dataset_kwargs From_YouTube (clips fetched from YouTube) is not supported")
        # As lmms-eval: the clips are already under $HF_HOME/<cache_dir>, where the task's code looks.
        for key in (*DOWNLOADER_KWARGS, "video", "cache_dir"):
            options.pop(key, None)
        if options.pop("load_from_disk", False):
            self.dataset = datasets.load_from_disk(self.DATASET_PATH)
        else:
            super().download(options or None, **kwargs)
        splits = self.dataset.values() if isinstance(self.dataset, Mapping) else [self.dataset]
        audio = sorted({name for split in splits for name in _audio_columns(split.features)})
        if audio:
            raise ValueError(
                f"task '{self.config.task}' is an audio task (its data has audio column {', '.join(audio)}); "
                f"evalkit evaluates text, images and image-text tasks"
            )

    # ------------------------------------------------------------ what lm-eval asks the task

    def doc_to_text(self, doc: Any, doc_to_text: Any = None) -> Any:
        fn = doc_to_text if doc_to_text is not None else self.config.doc_to_text
        if fn is None and self._messages is not None:
            messages, _ = split_messages(self._call_messages(doc))
            return "\n".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")
        if self.prompt is None and callable(fn) and self.lmms_eval_specific_kwargs is not None:
            return fn(doc, self.lmms_eval_specific_kwargs)
        return super().doc_to_text(doc, doc_to_text)

    def doc_to_target(self, doc: Any, doc_to_target: Any = None) -> Any:
        fn = doc_to_target if doc_to_target is not None else self.config.doc_to_target
        if self.prompt is None and callable(fn) and self.model_specific_target_kwargs is not None:
            return fn(doc, self.model_specific_target_kwargs)
        return super().doc_to_target(doc, doc_to_target)

    def doc_to_image(self, doc: Any, doc_to_image: Any = None) -> Any:
        """The doc's visuals as the model's lmms-eval class hands them to its processor."""
        return self._for_model(self._doc_visuals(doc, doc_to_image))

    def _for_model(self, visuals: Any) -> Any:
        if isinstance(visuals, list):
            return [prepare_image(self.model_name, v) for v in visuals]
        return prepare_image(self.model_name, visuals)

    def next_round(self, doc: Any, round_idx: int, previous: list[str], info: Any) -> Round:
        """Round ``round_idx`` of a multi-round doc after the answers ``previous``, as lmms-eval's
        model classes ask the task for it: ``doc_to_text(doc, previous_output=..., round_idx=...,
        previous_round_info=...)`` gives (visuals, context, terminal, outputs, info)."""
        step = self.config.doc_to_text(
            doc,
            lmms_eval_specific_kwargs=self.lmms_eval_specific_kwargs,
            previous_output=list(previous),
            round_idx=round_idx,
            previous_round_info=info,
        )
        if self.agentic and isinstance(step, str):  # lmms-eval's agent loop: the next prompt alone
            return Round(terminal=False, context=step, info=info, visuals=None)
        if not (isinstance(step, tuple) and len(step) == 5):
            if self.agentic:  # its agent loop stops there
                return Round(terminal=True, context=None, info=info, visuals=None)
            raise ValueError(
                f"task '{self.config.task}': doc_to_text of round {round_idx} returned {type(step).__name__}, "
                f"not lmms-eval's (visuals, context, terminal, outputs, info)"
            )
        visuals, context, terminal, outputs, info = step
        if visuals is not None:
            visuals = self._for_model(video.as_clips(visuals, self._frame_rule))
        return Round(terminal=bool(terminal), context=context, info=info, visuals=visuals, outputs=outputs)

    def round_visuals(self, doc: Any, round_idx: int, previous: list[str], info: Any) -> Any:
        """The visuals of a later round, for the rank that evaluates it."""
        return self.next_round(doc, round_idx, previous, info).visuals

    def agentic_answer(self, final: str, info: Any, outputs: list[str]) -> str:
        """An agentic doc's answer, as lmms-eval's evaluator gives it to ``process_results``: the last
        output, or, when the task kept state and that output is not a JSON object (it never
        submitted), a JSON account of the state that says so."""
        if info is None or final.strip().startswith("{"):
            return final
        kept = info if isinstance(info, dict) else {}
        state = kept.get("state", {})
        answer = {
            "success": False,
            "error": "max_agentic_steps_reached",
            "tool_calls": float(kept.get("tool_calls", 0)),
            "valid_tool_calls": float(kept.get("valid_tool_calls", kept.get("tool_calls", 0))),
            "invalid_steps": float(kept.get("invalid_steps", 0.0)),
            "state": state,
            "last_model_output": final,
            "trace": outputs,
        }
        if isinstance(state, dict):
            answer.update({key: state[key] for key in AGENTIC_STATE_KEYS if key in state})
        return json.dumps(answer, ensure_ascii=False)

    def _doc_visuals(self, doc: Any, doc_to_image: Any = None) -> Any:
        if doc_to_image is not None or not self._own_image:
            return super().doc_to_image(doc, doc_to_image)
        if self._messages is not None:
            return split_messages(self._call_messages(doc))[1]
        visual = self._visual
        if isinstance(visual, str):
            if visual not in doc:
                raise KeyError(f"doc_to_visual: the docs have no field '{visual}'")
            return [doc[visual]]
        if callable(visual):
            kwargs = self.lmms_eval_specific_kwargs
            visual = visual(doc, kwargs) if kwargs is not None and _takes_two(visual) else visual(doc)
        return video.as_clips(visual, self._frame_rule)

    def _call_messages(self, doc: Any) -> Any:
        fn = self._messages
        kwargs = self.lmms_eval_specific_kwargs
        if kwargs is None:
            return fn(doc)
        params = inspect.signature(fn).parameters
        named = "lmms_eval_specific_kwargs" in params
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if named or var_kw:
            return fn(doc, lmms_eval_specific_kwargs=kwargs)
        return fn(doc, kwargs) if len(params) == 2 else fn(doc)

    def fewshot_context(
        self,
        doc: Any,
        num_fewshot: int,
        system_instruction: str | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        chat_template: Callable[..., str] | None = None,
        gen_prefix: str | None = None,
    ) -> Any:
        if self._messages is None:
            return super().fewshot_context(
                doc=doc,
                num_fewshot=num_fewshot,
                system_instruction=system_instruction,
                apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
                chat_template=chat_template,
                gen_prefix=gen_prefix,
            )
        if num_fewshot:
            raise ValueError(
                f"task '{self.config.task}': doc_to_messages builds the whole conversation, "
                f"so it takes no few-shot examples (num_fewshot {num_fewshot})"
            )
        messages, _ = split_messages(self._call_messages(doc))
        description = self.resolve_field(doc, self.config.description) or ""
        system = "\n\n".join(s for s in (system_instruction, description) if s)
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return messages

    def construct_requests(self, doc: Any, ctx: Any, **kwargs: Any) -> Any:
        """lm-eval's requests, a generation request with the settings the model's lmms-eval class
        would generate with (after any --gen-kwargs, as in lmms-eval)."""
        requests = super().construct_requests(doc, ctx, **kwargs)
        if self.OUTPUT_TYPE != "generate_until":
            return requests
        for request in requests if isinstance(requests, list) else [requests]:
            context, gen_kwargs, *rest = request.arguments
            settings = request_gen_kwargs(self.model_name, gen_kwargs)
            settings.pop("max_agentic_steps", None)  # the agent loop's, never the model's
            if self._kind == MULTI_ROUND:  # lmms-eval's multi-round methods drop until: a round ends at end of sequence
                settings["until"] = []
            request.arguments = (context, settings, *rest)
        return requests

    # ------------------------------------------------------------ scoring, as lmms-eval's evaluator

    def apply_filters(self) -> None:
        if self._strip_thinking:  # lmms-eval puts its thinking filter first in every pipeline
            raw = [instance.resps for instance in self.instances]
            for instance in self.instances:
                instance.resps = [strip_response(r, THINKING_TAGS) for r in instance.resps]
            super().apply_filters()
            for instance, resps in zip(self.instances, raw, strict=True):
                instance.resps = resps
        else:
            super().apply_filters()
        if self._reasoning is not None:
            for instance in self.instances:
                for key, value in instance.filtered_resps.items():
                    instance.filtered_resps[key] = strip_response(value, self._reasoning)

    def aggregation(self) -> dict[str, Callable]:
        return bind_args(super().aggregation(), self.aggregation_args)

    def aggregated_metrics(self, raw: dict[tuple[str, str], list]) -> dict[tuple[str, str], list]:
        """The raw metric values lmms-eval aggregates (``metric_list``'s metrics only)."""
        return listed_metrics(raw, super().aggregation())

    def sample_counts(self, taken: int) -> dict[str, int]:
        return sample_counts(len(self._all_docs), taken)

    def process_results(self, doc: Any, results: Any) -> Any:
        if self.OUTPUT_TYPE == "generate_until" and not self.multi_round:
            if results and isinstance(results[0], list):
                results = results[0]
            results = [r.strip() if r is not None else "" for r in results]
        if self._full_docs and callable(self.config.process_results):
            return self.config.process_results(doc, results, full_docs=self._all_docs)
        return super().process_results(doc, results)

    @functools.cached_property
    def _all_docs(self) -> Any:
        """The eval docs, built once (``eval_docs`` runs process_docs again on every access)."""
        return self.eval_docs

    def dump_config(self) -> dict[str, Any]:
        """lm-eval's dump with the lmms-eval keys as the YAML gave them (functions as their source)."""
        dumped = super().dump_config()
        if self._own_image:
            dumped.pop("doc_to_image", None)
        if self.multi_round:
            dumped["output_type"] = self._kind
        for key, value in self._lmms.items():
            dumped[key] = self.config.serialize_function(value) if callable(value) else deepcopy(value)
        return dumped
