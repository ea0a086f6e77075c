"""Tiny vision-language checkpoints of the families people fine-tune, built offline from configs.

Each builder returns (model, processor) and `save_family` writes them the way the Hub ships them: weights and
config, tokenizer, chat template, the image processor's config, and for the Qwen families a video processor config
too (its class needs torchvision, which cannot be installed beside torch 2.13; sftune must load such a checkpoint
for image training all the same). Tokenizers are byte-level BPEs trained in-process on a few sentences with the
family's special tokens; chat templates follow each family's layout (turn markers, how an image is written).
Vision towers are 1-2 layers of hidden 32, text models 2 layers of hidden 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import corpus

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3")


def user(*parts) -> dict:
    """A user message of parts: None for an image, text otherwise."""
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def family_tokenizer(special: list[str], **settings):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus() + ["system user assistant model User Assistant"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, **settings)


# ---------------------------------------------------------------- Qwen2-VL, Qwen2.5-VL, Qwen3-VL

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (  # the layout of Qwen2-VL's template: a default system turn, images as vision_start/pad/end
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_image_processor(patch: int):
    from transformers import Qwen2VLImageProcessorPil

    # images of 2x2 to 4x4 merged patches: 4 to 16 image tokens, decided by each image's size
    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    min_pixels=(2 * patch) ** 2, max_pixels=(4 * patch) ** 2)


def qwen_processor_class(name: str):
    """The family's processor class without its video processor (whose class needs torchvision), named as the
    real class so that the saved files name it."""
    import transformers

    base = getattr(transformers, name)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(name, (base,), {"__init__": __init__})


def build_qwen(kind: str, seed: int = 0):
    import transformers

    tokenizer = family_tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    patch = 16 if kind == "qwen3_vl" else 14
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32,
                                                                             "hidden_size": 64, "mlp_ratio": 2},
                                            **tokens)
        model_class, processor_name = transformers.Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    elif kind == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config={**vision, "window_size": 56, "fullatt_block_indexes": [1],
                                             "out_hidden_size": 64}, **tokens)
        model_class, processor_name = transformers.Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    else:
        text = {**text, "head_dim": 16, "rope_parameters": {**text["rope_parameters"], "mrope_interleaved": True}}
        config = transformers.Qwen3VLConfig(
            text_config=text, vision_config={**vision, "out_hidden_size": 64, "num_position_embeddings": 16,
                                             "deepstack_visual_indexes": [0]}, **tokens)
        model_class, processor_name = transformers.Qwen3VLForConditionalGeneration, "Qwen3VLProcessor"
    processor = qwen_processor_class(processor_name)(image_processor=qwen_image_processor(patch),
                                                     tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    torch.manual_seed(seed)
    return model_class(config), processor


def qwen_video_config(processor) -> dict:
    """The video processor config a Qwen checkpoint ships (written by hand: the class needs torchvision)."""
    image = processor.image_processor
    video_class = "Qwen3VLVideoProcessor" if type(processor).__name__ == "Qwen3VLProcessor" else "Qwen2VLVideoProcessor"
    return {"video_processor_type": video_class, "processor_class": type(processor).__name__,
            "patch_size": image.patch_size, "merge_size": image.merge_size,
            "temporal_patch_size": image.temporal_patch_size, "size": dict(image.size),
            "image_mean": list(image.image_mean), "image_std": list(image.image_std)}


# ---------------------------------------------------------------- Gemma 3

GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<end_of_image>", "<image_soft_token>"]
GEMMA_TEMPLATE = (  # Gemma 3's layout: BOS, <start_of_turn>user / model, images as <start_of_image>
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3(seed: int = 0):
    from transformers import (
        Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor, SiglipVisionConfig,
    )

    tokenizer = family_tokenizer(
        GEMMA_SPECIAL, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tokenizer._tokenizer.post_processor = _bos_post_processor(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIAL}
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tokenizer,
        image_seq_length=4, chat_template=GEMMA_TEMPLATE)
    vision = SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                query_pre_attn_scalar=16, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                bos_token_id=ids["<bos>"])
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config), processor


def _bos_post_processor(tokenizer):
    from tokenizers import processors

    bos = tokenizer.bos_token
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                         special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))])


# ---------------------------------------------------------------- Idefics3 (SmolVLM)

IDEFICS_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                   "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS_TEMPLATE = (  # SmolVLM's layout: "User:<image>text<end_of_utterance>\nAssistant: reply<end_of_utterance>"
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(seed: int = 0):
    from transformers import (
        Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig,
    )

    tokenizer = family_tokenizer(IDEFICS_SPECIAL, eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    # crops of 28 px (4 patches of 14, merged 2x2 into 1 image token each): images larger than 28 px are split
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 56}, max_image_size={"longest_edge": 28},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=1,
                                  chat_template=IDEFICS_TEMPLATE)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                       tie_word_embeddings=False)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(config), processor


# ---------------------------------------------------------------- all of them


def build_family(name: str, seed: int = 0):
    from conftest import build_llava

    if name == "llava":
        return build_llava(seed)
    if name.startswith("qwen"):
        return build_qwen(name, seed)
    return {"gemma3": build_gemma3, "idefics3": build_idefics3}[name](seed)


def save_family(name: str, folder: Path, seed: int = 0) -> Path:
    """The family's tiny checkpoint, laid out as on the Hub."""
    model, processor = build_family(name, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if name.startswith("qwen"):
        (folder / "video_preprocessor_config.json").write_text(json.dumps(qwen_video_config(processor), indent=1))
    return folder
