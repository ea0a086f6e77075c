"""Vision-language SFT on the families people fine-tune: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Idefics3 (SmolVLM),
LLaVA, each a tiny checkpoint built offline (tests/vision_families.py).

Every check compares sftune against the family's own processor and model: the token ids and inputs sftune builds
against what the processor returns for the same conversation, sftune's forward against the model's own forward
on the processor's output, packed rows against each document run alone, two processes against one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import collator, sized_images, write_jsonl
from sftune import SFTConfig, train
from sftune.data.image_tokens import PROBE_SIZES
from sftune.data.prepare import prepare_train_data
from sftune.data.render import IGNORE_INDEX
from sftune.errors import ConfigError, UserError
from sftune.model.load import load_processor
from sftune.training.loss import CausalLMWithLoss
from vision_families import FAMILIES, assistant, user

# sizes (height, width) that Qwen's dynamic resolution turns into different numbers of tokens, and Idefics3 into
# different crop layouts
SIZES = [(40, 60), (90, 30), (64, 64), (30, 120), (50, 50), (70, 45)]
ANSWERS = ["a cat on the mat", "a dog in the rain", "a red house", "blue river and green tree"]
TURN_ENDS = {"gemma3": "<end_of_turn>", "idefics3": "<end_of_utterance>"}  # the others: ChatML's <|im_end|>


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-data")
    (folder / "img").mkdir()
    for i, image in enumerate(sized_images(SIZES)):
        image.save(folder / "img" / f"{i}.png")
    return folder


def image_rows() -> list[dict]:
    """One image; two images of different sizes in two turns; text only."""
    return [
        {"images": ["img/0.png"], "messages": [user(None, "what is this"), assistant(ANSWERS[0])]},
        {"images": ["img/1.png", "img/3.png"], "messages": [user(None, "what is this"), assistant(ANSWERS[1]),
                                                            user("and this", None), assistant(ANSWERS[2])]},
        {"images": [], "messages": [user("hello there"), assistant(ANSWERS[3])]},
    ]


def config_for(model_dir, data, tmp_path=None, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), max_length=256,
                    output_dir=str(tmp_path / "run") if tmp_path else "unused", report_to="none")
    settings.update(overrides)
    return SFTConfig(**settings)


def prepared(config: SFTConfig):
    processor = load_processor(config)
    data = prepare_train_data(config, processor.tokenizer, processor=processor)
    return sorted(data.train_rows, key=lambda r: int(np.min(r["index"]))), processor, data


def loaded(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def logits_of(loss_model: CausalLMWithLoss, batch: dict) -> torch.Tensor:
    """sftune's forward (CausalLMWithLoss.hidden_states, as training runs it) projected to the vocabulary."""
    inputs = {k: v for k, v in batch.items() if k not in ("targets", "source_ids")}
    with torch.no_grad():
        return loss_model.causal_lm.get_output_embeddings()(loss_model.hidden_states(**inputs))


def processor_output(processor, folder, rows: list[dict]) -> dict:
    """The processor's own full output for the rows' conversations and images, padded."""
    from PIL import Image

    texts = [processor.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    images = [[Image.open(folder / p) for p in r["images"]] for r in rows]
    return processor(text=texts, images=images if any(images) else None, add_special_tokens=False,
                     return_tensors="pt", padding=True)


def vision_ids(processor) -> list[int]:
    """Image tokens and vision delimiters: the added tokens of the processor's image replacements and of what the
    chat template writes for an image."""
    from sftune.data.image_tokens import ImagePlaceholders, vision_token_ids
    from sftune.data.template import analyse_template

    processor.tokenizer.chat_template = processor.chat_template
    image_text = analyse_template(processor.tokenizer, None, set(), parts=True).image_text
    return vision_token_ids(processor.tokenizer, ImagePlaceholders(processor).probe_texts + [image_text])


def real_images(inputs, name: str) -> torch.Tensor:
    """An image input without the all-zero images Idefics3 pads each row's images with (rows without images are
    left out of sftune's batches, which the model cannot tell apart: it drops padding images itself)."""
    value = inputs[name]
    if name in ("pixel_values", "pixel_attention_mask") and value.ndim >= 5 - (name == "pixel_attention_mask"):
        flat = value.flatten(0, 1)
        return flat[flat.flatten(1).ne(0).any(1)]
    return value


# ---------------------------------------------------------------- rows and batches exactly as the processor's


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_inputs_and_forward_equal_the_processor_and_model_s_own(family, family_dir, data_dir):
    folder = family_dir(family)
    data_file = write_jsonl(data_dir / "rows.jsonl", image_rows())
    rows, processor, data = prepared(config_for(folder, data_file, assistant_only_loss=True))
    expected = processor_output(processor, data_dir, image_rows())
    assert [len(r["images"]) for r in rows] == [1, 2, 0]
    for row, ids, mask in zip(rows, expected["input_ids"], expected["attention_mask"]):
        assert row["input_ids"].tolist() == ids[mask.bool()].tolist()  # the same tokens, images expanded alike
    trained = [processor.tokenizer.decode(r["input_ids"][r["labels"] != IGNORE_INDEX]) for r in rows]
    end, lead = TURN_ENDS.get(family, "<|im_end|>"), " " if family == "idefics3" else ""  # SmolVLM: "Assistant: a"
    assert trained == [f"{lead}{ANSWERS[0]}{end}", f"{lead}{ANSWERS[1]}{end}{lead}{ANSWERS[2]}{end}",
                       f"{lead}{ANSWERS[3]}{end}"]
    assert not data.stats["template_checks"]["prompt_not_prefix"]["rows"]
    assert data.stats["image_tokens"] == sum(int(np.isin(r["input_ids"], vision_ids(processor)).sum())
                                             for r in rows) or family in ("gemma3", "idefics3")  # + \n delimiters

    # the padded batch: the processor's text inputs and image inputs, made by sftune
    batch, = collator(config_for(folder, data_file, padding_free=False), processor.tokenizer, processor)(rows)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["input_ids"][real], expected["input_ids"][expected["attention_mask"].bool()])
    for name in expected:
        if name in ("input_ids", "attention_mask"):
            continue
        assert name in batch, name
        if name in ("mm_token_type_ids", "token_type_ids"):
            assert torch.equal(batch[name][real], expected[name][expected["attention_mask"].bool()]), name
        else:
            torch.testing.assert_close(real_images(batch, name), real_images(expected, name), rtol=0, atol=1e-6,
                                       msg=name)

    # sftune's forward on its batch equals the model's own forward on the processor's full output
    model = loaded(folder)
    ours = logits_of(CausalLMWithLoss(model), batch)[real]
    with torch.no_grad():
        theirs = model(**expected).logits[expected["attention_mask"].bool()]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_qwen2_5_vl_needs_mm_token_type_ids_which_sftune_builds(family_dir, data_dir):
    """Without mm_token_type_ids Qwen2.5-VL falls back to 1-D positions silently: the logits change."""
    folder = family_dir("qwen2_5_vl")
    data_file = write_jsonl(data_dir / "rows.jsonl", image_rows())
    rows, processor, _ = prepared(config_for(folder, data_file))
    batch, = collator(config_for(folder, data_file, padding_free=False), processor.tokenizer, processor)(rows)
    loss_model = CausalLMWithLoss(loaded(folder))
    with_types = logits_of(loss_model, batch)
    without = logits_of(loss_model, {k: v for k, v in batch.items() if k != "mm_token_type_ids"})
    assert (with_types - without).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_and_delimiters_are_never_trained(family, family_dir, data_dir):
    """Every token trained (no masking asked for): the user's words are, the image and its delimiters are not."""
    rows, processor, _ = prepared(config_for(family_dir(family), write_jsonl(data_dir / "rows.jsonl", image_rows())))
    delimiters = vision_ids(processor)
    # image tokens, and where the family has them the tokens around them (<|vision_start|>, <end_of_image>, ...)
    assert len(delimiters) >= (1 if family == "llava" else 2)
    for row in rows[:2]:
        images = np.isin(row["input_ids"], delimiters)
        assert images.any() and (row["labels"][images] == IGNORE_INDEX).all()
        text = processor.tokenizer.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])
        assert "what is this" in text and ANSWERS[0 if len(row["images"]) == 1 else 1] in text


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_only_loss_on_image_prompts(family, family_dir, data_dir):
    rows = [{"images": [f"img/{i}.png"], "prompt": [user(None, "what is this")], "completion": [assistant(a)]}
            for i, a in enumerate(ANSWERS[:2])]
    prepared_rows, processor, _ = prepared(config_for(family_dir(family),
                                                      write_jsonl(data_dir / "completions.jsonl", rows)))
    trained = [processor.tokenizer.decode(r["input_ids"][r["labels"] != IGNORE_INDEX]) for r in prepared_rows]
    end, lead = TURN_ENDS.get(family, "<|im_end|>"), " " if family == "idefics3" else ""
    assert trained == [f"{lead}{a}{end}" for a in ANSWERS[:2]]


# ---------------------------------------------------------------- image tokens from the size, without pixels


def test_image_token_counts_come_from_the_image_size_without_pixels(family_dir, data_dir, monkeypatch):
    import sftune.data.images

    rows = [{"images": [f"img/{i}.png"], "messages": [user(None, "what is this"), assistant(ANSWERS[i % 4])]}
            for i in range(len(SIZES))]
    data_file = write_jsonl(data_dir / "sizes.jsonl", rows)
    for family, mode in (("qwen2_vl", "repeat"), ("idefics3", "per_size"), ("gemma3", "fixed")):
        config = config_for(family_dir(family), data_file)
        processor = load_processor(config)
        seen_sizes = []
        make_pixels = type(processor.image_processor).__call__

        def spy(self, images, *args, seen=seen_sizes, make_pixels=make_pixels, **kwargs):
            seen.extend(tuple(image.size[::-1]) for group in images for image in
                        (group if isinstance(group, list) else [group]))
            return make_pixels(self, images, *args, **kwargs)

        monkeypatch.setattr(type(processor.image_processor), "__call__", spy)
        monkeypatch.setattr(sftune.data.images, "load_image", lambda ref: pytest.fail("an image was decoded"))
        data = prepare_train_data(config, processor.tokenizer, processor=processor)
        monkeypatch.undo()
        from sftune.data.image_tokens import ImagePlaceholders

        assert ImagePlaceholders(processor).mode == mode
        if mode != "per_size":  # no image of the data became pixels: only the blank probes did
            assert not set(seen_sizes) & set(SIZES) and set(seen_sizes) <= set(PROBE_SIZES) | {(48, 64)}
        prepared_rows = sorted(data.train_rows, key=lambda r: r["index"])
        expected = processor_output(processor, data_dir, rows)
        for row, ids, mask in zip(prepared_rows, expected["input_ids"], expected["attention_mask"]):
            assert row["input_ids"].tolist() == ids[mask.bool()].tolist()
        counts = {len(r["input_ids"]) for r in prepared_rows}
        assert len(counts) > 1 or mode == "fixed"  # the sizes gave different numbers of image tokens


def test_max_length_never_cuts_a_dynamic_resolution_image(family_dir, data_dir):
    data_file = write_jsonl(data_dir / "rows.jsonl", image_rows())
    folder = family_dir("qwen2_5_vl")
    rows, processor, _ = prepared(config_for(folder, data_file))
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    last_image_token = int(np.flatnonzero(rows[1]["input_ids"] == image_id)[-1])
    assert len(rows[0]["input_ids"]) <= last_image_token
    kept, _, data = prepared(config_for(folder, data_file, max_length=last_image_token))
    assert data.stats["rows_dropped"] == {"image_beyond_max_length": 1}
    assert [len(r["images"]) for r in kept] == [1, 0]


# ---------------------------------------------------------------- training, saving, reloading


@pytest.mark.parametrize("family", FAMILIES)
def test_training_and_the_saved_model_reloads_with_the_auto_classes(family, family_dir, data_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = family_dir(family)
    data_file = write_jsonl(data_dir / "rows.jsonl", image_rows())
    config = config_for(folder, data_file, tmp_path, max_steps=5, logging_steps=1, learning_rate=3e-3,
                        per_device_train_batch_size=3, assistant_only_loss=True)
    result = train(config)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 5 and losses[-1] < losses[0]

    out = result.output_dir
    if family.startswith("qwen"):  # the video processor needs torchvision: AutoProcessor fails for that alone
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(out)
        saved = json.loads((out / "processor_config.json").read_text())
        assert saved["processor_class"] == type(result.processor).__name__
        assert saved["video_processor"]["video_processor_type"].endswith("VideoProcessor")
        processor = load_processor(config_for(out, data_file))
    else:
        processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == type(result.processor).__name__
    assert processor.chat_template == result.processor.chat_template
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = processor_output(processor, data_dir, image_rows()[:2])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, result.model(**inputs).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- packing and padding-free with images


def packing_rows() -> list[dict]:
    """Short conversations with one or two images each: several documents fit a row of 256 tokens."""
    rows = []
    for i in range(6):
        images = [f"img/{i}.png"] + ([f"img/{(i + 2) % 6}.png"] if i % 2 else [])
        parts = [None] * len(images) + ["what is this"]
        rows.append({"images": images, "messages": [user(*parts), assistant(ANSWERS[i % 4])]})
    return rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2_vl", "llava", "idefics3"])
def test_packed_image_rows_equal_each_document_alone(family, family_dir, data_dir):
    folder = family_dir(family)
    data_file = write_jsonl(data_dir / "packing.jsonl", packing_rows())
    config = config_for(folder, data_file, packing=True, padding_free=False)
    rows, processor, _ = prepared(config)
    row = max(rows, key=lambda r: len(r["seq_lengths"]))
    assert len(row["seq_lengths"]) >= 2 and len(row["images"]) >= 3
    batch, = collator(config, processor.tokenizer, processor)([row])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    model = loaded(folder)
    packed = logits_of(CausalLMWithLoss(model), batch)[0]

    # each document alone, through the model's own forward on the processor's output for that conversation
    source = packing_rows()
    starts = np.concatenate([[0], np.cumsum(row["seq_lengths"])])
    for number, index in enumerate(np.asarray(row["index"]).tolist()):
        expected = processor_output(processor, data_dir, [source[index]])
        document = slice(int(starts[number]), int(starts[number + 1]))
        assert batch["input_ids"][0, document].tolist() == expected["input_ids"][0].tolist()
        with torch.no_grad():
            alone = model(**expected).logits[0]
        torch.testing.assert_close(packed[document], alone, rtol=0, atol=1e-5)

    if family.startswith("qwen"):  # the documents' own multimodal positions matter: plain positions differ
        from sftune.data.vision_inputs import multimodal_position_ids

        positions = multimodal_position_ids(model.model, batch["input_ids"], batch["position_ids"],
                                            batch["mm_token_type_ids"], batch["image_grid_thw"])
        assert not torch.equal(positions[1], positions[0])  # M-RoPE rows differ from text positions at images
        naive = {**batch, "position_ids": batch["position_ids"][None].expand(4, -1, -1)}
        assert (logits_of(CausalLMWithLoss(model), naive)[0] - packed).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "idefics3"])
def test_padding_free_image_rows_give_the_padded_loss(family, family_dir, data_dir):
    folder = family_dir(family)
    data_file = write_jsonl(data_dir / "rows.jsonl", image_rows())
    rows, processor, _ = prepared(config_for(folder, data_file))
    loss_model = CausalLMWithLoss(loaded(folder))

    def loss(padding_free: bool) -> tuple[float, int]:
        batches = collator(config_for(folder, data_file, padding_free=padding_free), processor.tokenizer,
                           processor)(rows)
        with torch.no_grad():
            outs = [loss_model(**{k: v for k, v in b.items() if k != "source_ids"}) for b in batches]
        return sum(float(o["loss_sum"]) for o in outs), len(batches)

    (free, parts), (padded, one) = loss(True), loss(False)
    assert parts == 3 and one == 1  # padding-free: one row at a time, no padding
    assert free == pytest.approx(padded, abs=1e-4)


def test_gemma3_image_packing_is_refused_because_its_masks_leak(family_dir, data_dir):
    folder = family_dir("gemma3")
    data_file = write_jsonl(data_dir / "packing.jsonl", packing_rows())
    with pytest.raises(ConfigError, match="token_type_ids.*let packed documents see each other's images"):
        prepared(config_for(folder, data_file, packing=True))

    # why: a joined row of two documents with images, through transformers' Gemma 3, is not each document alone
    rows, processor, _ = prepared(config_for(folder, data_file))
    joined = {"input_ids": np.concatenate([rows[0]["input_ids"], rows[1]["input_ids"]]),
              "labels": np.concatenate([rows[0]["labels"], rows[1]["labels"]]),
              "seq_lengths": np.array([len(rows[0]["input_ids"]), len(rows[1]["input_ids"])]),
              "index": np.array([0, 1]), "source": np.array([0, 0]), "images": rows[0]["images"] + rows[1]["images"]}
    config = config_for(folder, data_file, padding_free=True, attn_implementation="sdpa")
    loss_model = CausalLMWithLoss(loaded(folder))
    from sftune.data.vision_batches import image_position_batch
    from sftune.data.vision_inputs import vision_inputs_of

    vision = vision_inputs_of(processor)
    together = logits_of(loss_model, image_position_batch([joined], 0, join=True, vision=vision))[0]
    second = logits_of(loss_model, collator(config, processor.tokenizer, processor)([rows[1]])[0])[0]
    assert (together[len(rows[0]["input_ids"]):] - second).abs().max() > 1e-3


# ---------------------------------------------------------------- text rows on a vision-language checkpoint


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_text_rows_on_a_vision_checkpoint_pack_and_train_like_text(family, family_dir, tmp_path, capsys):
    from conftest import conversations

    folder = family_dir(family)
    data_file = write_jsonl(tmp_path / "chat.jsonl", conversations(12, seed=5))
    config = config_for(folder, data_file, packing=True, padding_free=False)
    rows, processor, _ = prepared(config)
    row = max(rows, key=lambda r: len(r["seq_lengths"]))
    assert len(row["seq_lengths"]) >= 3 and not row.get("images")
    batch, = collator(config, processor.tokenizer, processor)([row])
    loss_model = CausalLMWithLoss(loaded(folder))
    packed = logits_of(loss_model, batch)[0]
    starts = np.concatenate([[0], np.cumsum(row["seq_lengths"])])
    for a, b in zip(starts[:-1], starts[1:]):
        alone = {"input_ids": batch["input_ids"][:, a:b], "attention_mask": torch.ones(1, int(b - a), dtype=torch.long)}
        alone.update({k: batch[k][:, a:b] for k in ("mm_token_type_ids", "token_type_ids") if k in batch})
        with torch.no_grad():
            expected = loss_model.causal_lm(**alone).logits[0]
        torch.testing.assert_close(packed[a:b], expected, rtol=0, atol=1e-5)

    capsys.readouterr()
    result = train(config_for(folder, data_file, tmp_path, max_steps=2, logging_steps=1,
                              per_device_train_batch_size=4))
    assert "each row runs as a micro-batch of its own" in capsys.readouterr().err  # padding_free, chosen
    assert len([e for e in result.history if "loss" in e]) == 2


# ---------------------------------------------------------------- loading without torchvision, refusals


def test_a_video_processor_checkpoint_loads_for_images_without_torchvision(family_dir, capsys):
    from transformers import AutoProcessor, LlavaProcessor

    from sftune.run import setup_logging

    setup_logging()
    folder = family_dir("qwen2_5_vl")
    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(folder)  # what a user gets from transformers on this machine
    capsys.readouterr()
    processor = load_processor(config_for(folder, "unused"))
    assert capsys.readouterr().err.count("videos are unavailable") == 1
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and not hasattr(processor, "video_processor")
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"

    llava = load_processor(config_for(family_dir("llava"), "unused"))  # no video processor: AutoProcessor as is
    assert type(llava) is LlavaProcessor and "videos are unavailable" not in capsys.readouterr().err


def test_a_video_processor_that_fails_for_another_reason_is_not_worked_around(family_dir, monkeypatch):
    """Where torchvision is installed, the processor loads through AutoProcessor alone: its errors are the user's."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    with pytest.raises(UserError, match="could not load the processor of .*Torchvision"):
        load_processor(config_for(family_dir("qwen2_vl"), "unused"))


def test_a_model_input_sftune_cannot_build_is_refused_by_name(family_dir):
    from sftune.data.vision_inputs import vision_inputs_of

    processor = load_processor(config_for(family_dir("llava"), "unused"))
    plain = type(processor).__call__

    def with_extra(self, *args, **kwargs):  # a processor whose model also takes a text input of its own
        out = plain(self, *args, **kwargs)
        out["image_row_ids"] = out["input_ids"] * 0 + 7
        return out

    extended = type("LlavaProcessor", (type(processor),), {"__call__": with_extra})
    processor.__class__ = extended
    with pytest.raises(UserError, match="needs the model input\\(s\\) image_row_ids, which sftune cannot build"):
        vision_inputs_of(processor)


# ---------------------------------------------------------------- data parallel with mixed batches


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_two_processes_one_with_images_one_without_equal_one_process(family, family_dir, data_dir, tmp_path):
    """Each step's two rows go one to each process; some steps have an image on one process only, some none."""
    from safetensors.torch import load_file

    rows = [image_rows()[0]] + [{"images": [], "messages": [user(f"hello {w}"), assistant(ANSWERS[i])]}
                                for i, w in enumerate(["there", "you", "friend"])]
    data_file = write_jsonl(data_dir / f"mixed-{family}.jsonl", rows)
    common = ["--model_name_or_path", str(family_dir(family)), "--dataset_name", str(data_file), "--max_steps", "4",
              "--logging_steps", "1", "--learning_rate", "3e-3", "--max_length", "256", "--save_strategy", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "sftune", "train", *common, "--output_dir", str(tmp_path / "ddp"),
                          "--per_device_train_batch_size", "1", "--num_processes", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "(1 x 1 accumulation x 2 processes)" in ddp.stderr
    single = train(config_for(family_dir(family), data_file, tmp_path, max_steps=4, logging_steps=1,
                              learning_rate=3e-3, per_device_train_batch_size=2, save_strategy="no"))
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([line["loss"] for line in lines], [e["loss"] for e in single.history if "loss" in e],
                               rtol=0, atol=1e-5)
    parallel, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(single.output_dir / "model.safetensors")
    assert parallel.keys() == one.keys()
    for name in parallel:  # the vision tower too: updated alike, and left alone in steps without images
        torch.testing.assert_close(parallel[name], one[name], rtol=0, atol=1e-5, msg=name)
