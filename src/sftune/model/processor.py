"""A vision-language processor for image training on a machine without torchvision.

Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and other video-capable families) ship a video processor, whose class needs
torchvision; `AutoProcessor.from_pretrained` then fails where torchvision is not installed, although images need
only the image processor, which has a PIL backend. Such a checkpoint loads here as the same processor class
without its video processor: the image processor through its PIL backend (`backend="pil"`), the tokenizer, the
chat template and every processor setting as saved. It is saved again with the checkpoint's video processor
settings, so the trained model's processor loads with `AutoProcessor` wherever torchvision is installed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("sftune")


def needs_torchvision(err: Exception) -> bool:
    """`err` is transformers saying a class needs torchvision, which is not installed."""
    from transformers.utils import is_torchvision_available

    return isinstance(err, ImportError) and "torchvision" in str(err).lower() and not is_torchvision_available()


def load_without_video(name: str, model_config: Any, source_kwargs: dict[str, Any]) -> Any:
    """The processor of the checkpoint `name` without its video processor (see the module's docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.models.auto.video_processing_auto import get_video_processor_config

    processor_class = PROCESSOR_MAPPING[type(model_config)]
    video_settings = get_video_processor_config(name, **source_kwargs)
    image_only = _image_only_class(processor_class, video_settings)
    parts = {"image_processor": AutoImageProcessor.from_pretrained(name, backend="pil", **source_kwargs),
             "tokenizer": AutoTokenizer.from_pretrained(name, **source_kwargs)}
    settings, extra = image_only.get_processor_dict(name, **source_kwargs)
    processor = image_only.from_args_and_dict([parts[a] for a in image_only.get_attributes()], settings, **extra)
    image_processor = processor.image_processor
    video = video_settings.get("video_processor_type", "its video processor")
    log.info("processor: torchvision is not installed, so %s loads without %s: images train (through %s), "
             "videos are unavailable", processor_class.__name__, video, type(image_processor).__name__)
    return processor


def _image_only_class(processor_class: type, video_settings: dict[str, Any]) -> type:
    """`processor_class` without the video_processor argument, under the same name (the saved files name the real
    class), writing the checkpoint's video processor settings into processor_config.json when saved."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # the parent's attributes come from the signature of type(self).__init__, which has no video_processor
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        settings = processor_class.to_dict(self)
        if video_settings:
            settings["video_processor"] = dict(video_settings)
        return settings

    return type(processor_class.__name__, (processor_class,), {
        "__init__": __init__, "to_dict": to_dict, "__module__": processor_class.__module__,
        "__doc__": f"{processor_class.__name__} for images only: no video processor (it needs torchvision).",
    })
