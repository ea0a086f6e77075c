"""Vision-language SFT end to end on the tiny LLaVA: image rows, their masks, truncation, errors, training, reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, collator, random_images, write_jsonl
from vision_families import assistant, user

from sftune import SFTConfig, train
from sftune.cli import main
from sftune.data.images import load_image
from sftune.data.prepare import prepare_train_data
from sftune.data.render import IGNORE_INDEX
from sftune.errors import ConfigError, DataError
from sftune.model.load import load_processor

QUESTION = "what is this"
ANSWERS = ["a cat on the mat", "a dog in the rain", "a red house", "blue river and green tree"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A data folder with six small PNG images under img/."""
    folder = tmp_path_factory.mktemp("vision-data")
    (folder / "img").mkdir()
    for i, image in enumerate(random_images(6)):
        image.save(folder / "img" / f"{i}.png")
    return folder


def image_rows() -> list[dict]:
    """Two single-image rows, one row with an image in each of two turns, one prompt/completion row."""
    return [
        {"images": ["img/0.png"], "messages": [user(None, QUESTION), assistant(ANSWERS[0])]},
        {"images": ["img/1.png"], "messages": [user(None, QUESTION), assistant(ANSWERS[1])]},
        {"images": ["img/2.png", "img/3.png"], "messages": [user(None, QUESTION), assistant(ANSWERS[2]),
                                                            user("and this", None), assistant(ANSWERS[3])]},
    ]


def config_for(model_dir, data, tmp_path=None, **overrides) -> SFTConfig:
    settings = dict(model_name_or_path=str(model_dir), dataset_name=str(data), max_length=128,
                    output_dir=str(tmp_path / "run") if tmp_path else "unused", report_to="none")
    settings.update(overrides)
    return SFTConfig(**settings)


def prepared(config: SFTConfig, train_dataset=None):
    processor = load_processor(config)
    return prepare_train_data(config, processor.tokenizer, train_dataset, processor=processor), processor


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])


def test_image_tokens_and_padding_never_carry_loss(tiny_llava_dir, image_dir):
    data_file = write_jsonl(image_dir / "rows.jsonl", image_rows())
    data, processor = prepared(config_for(tiny_llava_dir, data_file))
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = sorted(data.train_rows, key=lambda r: r["index"])
    assert [len(r["images"]) for r in rows] == [1, 1, 2]
    assert rows[2]["images"] == [str(image_dir / "img" / "2.png"), str(image_dir / "img" / "3.png")]
    assert data.stats["images"] == 4 and not data.stats["template_checks"]["prompt_not_prefix"]["rows"]
    for row in rows:
        images = row["input_ids"] == image_id
        assert images.sum() == 4 * len(row["images"])  # 28 px images in 14 px patches: 4 tokens each
        assert (row["labels"][images] == IGNORE_INDEX).all()
        assert (row["labels"][~images] == row["input_ids"][~images]).all()  # every other token is trained

    # the collator pads (no target, no attention) and makes the pixels of the batch's images, in order
    batch, = collator(config_for(tiny_llava_dir, data_file, padding_free=False), processor.tokenizer, processor)(rows)
    assert batch["pixel_values"].shape[0] == 4
    expected = processor.image_processor([load_image(p) for r in rows for p in r["images"]], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["targets"][padding] == IGNORE_INDEX).all()
    assert not (batch["targets"] == image_id).any()


def test_assistant_only_and_completion_only_masks(tiny_llava_dir, image_dir):
    data_file = write_jsonl(image_dir / "rows.jsonl", image_rows())
    data, processor = prepared(config_for(tiny_llava_dir, data_file, assistant_only_loss=True))
    rows = sorted(data.train_rows, key=lambda r: r["index"])
    assert [trained_text(processor.tokenizer, r) for r in rows] == [
        f"{ANSWERS[0]}<|im_end|>", f"{ANSWERS[1]}<|im_end|>", f"{ANSWERS[2]}<|im_end|>{ANSWERS[3]}<|im_end|>"]
    assert data.stats["turns_checked"] == 4 and not data.stats["template_checks"]["stop_not_trained"]["rows"]

    # conversational prompt/completion rows with images: only the completion is trained (the default)
    completion_rows = [{"images": [f"img/{i}.png"], "prompt": [user(QUESTION, None)],
                        "completion": [assistant(ANSWERS[i])]} for i in range(2)]
    data_file = write_jsonl(image_dir / "completions.jsonl", completion_rows)
    data, processor = prepared(config_for(tiny_llava_dir, data_file))
    rows = sorted(data.train_rows, key=lambda r: r["index"])
    assert [trained_text(processor.tokenizer, r) for r in rows] == [f"{a}<|im_end|>" for a in ANSWERS[:2]]
    assert all((r["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 4 for r in rows)

    # plain-text contents with an `images` column: the image goes in front of the first user message's text
    plain = [{"images": ["img/4.png"], "messages": [{"role": "user", "content": QUESTION},
                                                    {"role": "assistant", "content": ANSWERS[0]}]}]
    data, processor = prepared(config_for(tiny_llava_dir, write_jsonl(image_dir / "plain.jsonl", plain),
                                          assistant_only_loss=True))
    row = data.train_rows[0]
    assert processor.tokenizer.decode(row["input_ids"]).startswith(f"<|im_start|>user\n{IMAGE_TOKEN * 4}{QUESTION}")
    assert trained_text(processor.tokenizer, row) == f"{ANSWERS[0]}<|im_end|>"


def test_a_row_too_long_for_its_images_is_dropped_and_counted(tiny_llava_dir, image_dir, caplog):
    rows = image_rows()[:2] + [{"images": ["img/4.png", "img/5.png", "img/0.png"],
                                "messages": [user(" ".join(ANSWERS * 3), None, None, None), assistant(ANSWERS[0])]}]
    data_file = write_jsonl(image_dir / "long.jsonl", rows)
    full, processor = prepared(config_for(tiny_llava_dir, data_file))
    lengths = {r["index"]: len(r["input_ids"]) for r in full.train_rows}
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    long_row = next(r for r in full.train_rows if r["index"] == 2)
    last_image_token = int(np.flatnonzero(long_row["input_ids"] == image_id)[-1])
    assert max(lengths[0], lengths[1]) <= last_image_token  # the short rows fit, the long row's last image does not

    with caplog.at_level("INFO", logger="sftune"):
        data, _ = prepared(config_for(tiny_llava_dir, data_file, max_length=last_image_token))
    assert sorted(r["index"] for r in data.train_rows) == [0, 1]
    assert data.stats["rows_dropped"] == {"image_beyond_max_length": 1}
    assert "1 dropped (1 image beyond max length)" in caplog.text

    with pytest.raises(DataError, match=r"3 have images whose tokens do not fit in max_length=8 .*raise max_length "
                                        r"\(dataset: .*long.jsonl\)"):
        prepared(config_for(tiny_llava_dir, data_file, max_length=8))


def test_missing_image_and_cutting_packing_are_clear_errors(tiny_llava_dir, image_dir, tmp_path, capsys):
    rows = image_rows()
    rows[1]["images"] = ["img/missing.png"]
    data_file = write_jsonl(image_dir / "missing.jsonl", rows)
    with pytest.raises(DataError, match=r"missing.jsonl row 2: field 'images' item 1: image file 'img/missing.png' "
                                        r"does not exist \(relative paths are read from the data file's folder"):
        prepared(config_for(tiny_llava_dir, data_file))
    argv = ["train", "--model_name_or_path", str(tiny_llava_dir), "--dataset_name", str(data_file),
            "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img/missing.png" in err[0] and "row 2" in err[0]

    good_file = write_jsonl(image_dir / "rows.jsonl", image_rows())
    for strategy in ("bfd_split", "wrapped"):  # packing that cuts documents would cut images from their tokens
        with pytest.raises(ConfigError, match=f"packing_strategy: {strategy} cuts documents, but the data has "
                                              "images.*use packing_strategy: bfd"):
            prepared(config_for(tiny_llava_dir, good_file, packing=True, packing_strategy=strategy))


def test_training_lowers_the_loss_and_the_saved_model_reloads(tiny_llava_dir, image_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    data_file = write_jsonl(image_dir / "rows.jsonl", image_rows())
    # one batch of all rows, every step: the loss must fall
    config = config_for(tiny_llava_dir, data_file, tmp_path, max_steps=6, logging_steps=1, learning_rate=3e-3,
                        per_device_train_batch_size=3, assistant_only_loss=True)
    result = train(config)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]

    out = result.output_dir
    assert (out / "processor_config.json").is_file() and (out / "chat_template.jinja").is_file()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == result.processor.chat_template
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    data, _ = prepared(config, None)  # from the cache
    batch, = collator(SFTConfig(padding_free=False), processor.tokenizer, processor)(data.train_rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, result.model(**inputs).logits, rtol=0, atol=1e-5)


def test_pil_images_through_the_python_api(tiny_llava_dir, tmp_path):
    import datasets

    images = random_images(2, seed=3)
    dataset = datasets.Dataset.from_list([
        {"images": [image], "messages": [user(None, QUESTION), assistant(answer)]}
        for image, answer in zip(images, ANSWERS)])
    config = config_for(tiny_llava_dir, "", dataset_name=None)
    data, processor = prepared(config, dataset)
    assert not data.stats.get("cached")
    rows = sorted(data.train_rows, key=lambda r: r["index"])
    for row, image in zip(rows, images):  # written into the cache entry, losslessly, and referred to as files
        assert isinstance(row["images"][0], str)
        assert np.array_equal(np.asarray(load_image(row["images"][0]).convert("RGB")), np.asarray(image))
    again, _ = prepared(config, dataset)
    assert again.stats.get("cached")
    assert [r["images"] for r in sorted(again.train_rows, key=lambda r: r["index"])] == [r["images"] for r in rows]
    batch, = collator(SFTConfig(padding_free=False), processor.tokenizer, processor)(rows)
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch["pixel_values"], expected)


def test_a_changed_image_file_prepares_the_data_again(tiny_llava_dir, image_dir, tmp_path):
    import shutil

    shutil.copytree(image_dir / "img", tmp_path / "img")
    data_file = write_jsonl(tmp_path / "rows.jsonl", image_rows())
    config = config_for(tiny_llava_dir, data_file)
    prepared(config)
    assert prepared(config)[0].stats.get("cached")
    random_images(1, seed=9)[0].save(tmp_path / "img" / "3.png")  # the data file is the same; an image is not
    assert not prepared(config)[0].stats.get("cached")


def test_inspect_shows_the_image_tokens_of_each_row(tiny_llava_dir, image_dir):
    import io

    from sftune.inspect import inspect_data

    rows = image_rows() + [{"messages": [user("hello there"), assistant(ANSWERS[0])]}]
    out = io.StringIO()
    inspect_data(config_for(tiny_llava_dir, write_jsonl(image_dir / "inspect.jsonl", rows)), num_examples=4, out=out)
    text = out.getvalue()
    assert "images: 4 in the kept rows, 16 image tokens (4.0 per image)" in text
    assert "inspect.jsonl row 1, 1 image: 4 image tokens ---" in text
    assert "inspect.jsonl row 3, 2 images: 4 + 4 image tokens ---" in text
    assert "inspect.jsonl row 4, no images ---" in text


@pytest.mark.parametrize("padding_free", [False, True])
def test_pad_to_multiple_of_pads_image_batches_too(tiny_llava_dir, image_dir, padding_free):
    """pad_to_multiple_of (issue 15) in the vision collator: every batch's length is a multiple, and the padding
    adds no target."""
    data_file = write_jsonl(image_dir / "rows.jsonl", image_rows())
    data, processor = prepared(config_for(tiny_llava_dir, data_file))
    rows = sorted(data.train_rows, key=lambda r: r["index"])
    plain = collator(config_for(tiny_llava_dir, data_file, padding_free=padding_free), processor.tokenizer,
                     processor)(rows)
    padded = collator(config_for(tiny_llava_dir, data_file, padding_free=padding_free, pad_to_multiple_of=64),
                      processor.tokenizer, processor)(rows)
    assert all(b["input_ids"].shape[1] % 64 == 0 for b in padded)
    assert [b["input_ids"].shape[1] for b in plain] != [b["input_ids"].shape[1] for b in padded]
    for before, after in zip(plain, padded):
        width = before["targets"].shape[1]
        assert torch.equal(after["targets"][:, :width], before["targets"])
        assert (after["targets"][:, width:] == IGNORE_INDEX).all()
        torch.testing.assert_close(after["pixel_values"], before["pixel_values"])
