"""Tiny models and tokenizers built offline from configs, and small datasets: nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from more threads, and on a machine shared with other work more threads than idle cores
# make every step several times slower (bench/threads.py): one thread per test process, also in subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the a cat dog sat on mat hello world how are you today fine thanks what is your name my I am model "
    "who made you small language train data tell me about weather sunny rain cloud good bad yes no please "
    "one two three four five six seven eight nine ten river mountain tree house blue red green"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(corpus() + ["system user assistant"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings))


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_cache(tmp_path_factory):
    """Prepared-data cache of this test session, never the user's (subprocesses inherit it)."""
    os.environ["SFTUNE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a ChatML byte-level BPE tokenizer, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama with attention dropout: every training step also depends on the random generators, so an
    exact resume must restore them."""
    folder = tmp_path_factory.mktemp("tiny-dropout")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer), attention_dropout=0.2, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-plain")
    tokenizer = build_tokenizer(chat_template=None)
    tokenizer.save_pretrained(folder)
    build_model(len(tokenizer)).save_pretrained(folder)
    return folder


def collator(config, tokenizer, processor=None, device_type: str = "cpu"):
    """The run's micro-batch builder for `config` in one process on `device_type` (a list of batches per call)."""
    from sftune.batching import plan_batching
    from sftune.data.collate import make_collator

    return make_collator(plan_batching(config, device_type=device_type), tokenizer,
                         processor)


def conversations(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": " ".join(rng.choice(WORDS) for _ in range(4))})
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def chat_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "chat.jsonl", conversations())


@pytest.fixture
def text_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data" / "text.jsonl", [{"text": t} for t in corpus(40, seed=1)])


def asset_folder(name: str) -> Path:
    """A real asset fetched by `make assets` (scripts/fetch_assets.py); tests that need one skip without it."""
    from sftune import assets

    folder = assets.cache_dir() / "assets" / name
    if not all((folder / Path(member).name).is_file() for member in assets.ASSETS[name].files):
        pytest.skip(f"asset '{name}' not fetched: run `make assets`")
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from sftune import assets

    folder = assets.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("SmolLM2 not fetched: run `make assets`")
    return folder


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The real Qwen3 tokenizer and chat template (a fresh copy per test module would be slow; do not modify it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(asset_folder("qwen3-tokenizer"))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


# ---- a tiny vision-language model: LLaVA = SigLIP vision tower + projector + the tiny Llama above

IMAGE_TOKEN = "<image>"
VISION_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llava(seed: int = 0):
    """(model, processor): images of 28 x 28 pixels in patches of 14, so each image is 4 `<image>` tokens.

    Uses the PIL image processor: the torchvision-based ones do not install beside torch 2.13.
    """
    import torch
    from transformers import (
        LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tokenizer,
        patch_size=14, vision_feature_select_strategy="full", num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN, chat_template=VISION_CHATML_TEMPLATE,
    )
    vision = SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """The tiny LLaVA and its processor, saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    model, processor = build_llava()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_images(n: int, seed: int = 0) -> list:
    """PIL images of assorted sizes (the processor resizes them to 28 x 28)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3),
                                         dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """name -> the tiny checkpoint folder of that vision-language family (tests/vision_families.py), built once."""
    from vision_families import save_family

    built: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in built:
            built[name] = save_family(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return folder


def sized_images(sizes: list[tuple[int, int]], seed: int = 0) -> list:
    """Random PIL images of the given (height, width) sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
