"""Packing plans equal TRL's on its own test cases; packed documents never attend to one another; batches carry
per-source ids; epoch order can group rows by length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_model, build_tokenizer, collator

from sftune import SFTConfig
from sftune.data.collate import pad_batch, position_batch
from sftune.data.order import epoch_order
from sftune.data.pack import plan_packing
from sftune.data.rows import Documents, RowStore
from sftune.training.loss import CausalLMWithLoss


def pack(sequences: list[list[int]], capacity: int, strategy: str) -> tuple[list[list[int]], list[list[int]]]:
    docs = Documents([np.array(s, dtype=np.int32) for s in sequences], [np.array(s, dtype=np.int32) for s in sequences],
                     np.zeros(len(sequences), dtype=np.int32), np.arange(len(sequences)))
    store = RowStore.from_plan(docs, plan_packing(docs.lengths(), capacity, strategy))
    rows = store.rows()
    return [r["input_ids"].tolist() for r in rows], [r["seq_lengths"].tolist() for r in rows]


# Inputs and expected outputs of TRL's pack_dataset tests (tests/test_data_utils.py) and docstring, by strategy.
TRL_CASES = [
    ("wrapped", [[1, 2, 3], [4, 5, 6, 7], [8]], 3, [[1, 2, 3], [4, 5, 6], [7, 8]], None),
    ("bfd", [[1, 2, 3], [4, 5, 6, 7], [8]], 4, [[4, 5, 6, 7], [1, 2, 3, 8]], [[4], [3, 1]]),
    ("bfd", [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], 4, [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7, 12]],
     [[4], [4], [2, 1]]),
    ("bfd", [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]], 4, [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]],
     [[4], [3, 1], [2]]),
    ("bfd_split", [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], 4, [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7, 5, 12]],
     [[4], [4], [2, 1, 1]]),
    ("bfd_split", [[1, -2, 3, -4, 5, -6], [7, -8, 9], [-10, 11, -12], [13, -14, 15, -16]], 4,
     [[1, -2, 3, -4], [13, -14, 15, -16], [7, -8, 9], [-10, 11, -12], [5, -6]], [[4], [4], [3], [3], [2]]),
    ("bfd_split", [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10], [11, 12, 13]], 5, [[1, 2, 3, 4, 5], [7, 8, 9, 10, 6], [11, 12, 13]],
     [[5], [4, 1], [3]]),
    ("bfd_split", [[1, 2], [], [3, 4, 5], [], [6]], 4, [[3, 4, 5, 6], [1, 2]], [[3, 1], [2]]),
    ("bfd_split", [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]], 4, [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]],
     [[4], [3, 1], [2, 1]]),
]


@pytest.mark.parametrize("strategy,sequences,capacity,expected_rows,expected_lengths", TRL_CASES)
def test_packing_equals_trl(strategy, sequences, capacity, expected_rows, expected_lengths):
    rows, lengths = pack(sequences, capacity, strategy)
    assert rows == expected_rows
    if expected_lengths is not None:
        assert lengths == expected_lengths
    else:  # TRL's wrapped rows have no seq_lengths; ours keep the document boundaries inside each row
        assert lengths == [[3], [3], [1, 1]]


def test_packing_keeps_every_token_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    for strategy in ("bfd_split", "wrapped"):
        plan = plan_packing(lengths, 256, strategy).rows()
        assert sum(e - s for row in plan for _, s, e in row) == lengths.sum()
        assert all(sum(e - s for _, s, e in row) <= 256 for row in plan)
    bfd = plan_packing(lengths, 256, "bfd").rows()
    assert sorted(d for row in bfd for d, _, _ in row) == list(range(500))
    assert len(bfd) <= np.minimum(lengths, 256).sum() / 256 * 1.05  # best fit leaves little room


# ---------------------------------------------------------------- no attention across documents


DOC_LENGTHS = (5, 9, 3, 7)


def documents(vocab: int, sources=(0, 1, 0, 1)) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i, (n, source) in enumerate(zip(DOC_LENGTHS, sources)):
        ids = rng.integers(3, vocab, size=n).astype(np.int32)
        labels = ids.copy()
        labels[:2] = -100  # a prompt
        rows.append({"input_ids": ids, "labels": labels, "index": i, "source": source})
    return rows


def packed_rows(docs: list[dict], capacity: int = 16) -> list[dict]:
    store = RowStore.from_plan(
        Documents([d["input_ids"] for d in docs], [d["labels"] for d in docs],
                  np.array([d["source"] for d in docs], dtype=np.int32), np.array([d["index"] for d in docs])),
        plan_packing([len(d["input_ids"]) for d in docs], capacity, "bfd"),
    )
    return store.rows()


TINY_MODELS = {
    "llama": lambda vocab: build_model(vocab),
    "qwen3": lambda vocab: _tiny_qwen3(vocab),
}


def _tiny_qwen3(vocab: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", list(TINY_MODELS))
@pytest.mark.parametrize("join", [False, True])
def test_packed_logits_equal_each_document_alone(attention, architecture, join):
    model = TINY_MODELS[architecture](64).float().eval()
    model.set_attn_implementation(attention)
    docs = documents(64)
    rows = packed_rows(docs)
    assert len(rows) == 2 and all(len(r["seq_lengths"]) == 2 for r in rows)
    batch = position_batch(rows, pad_token_id=0, join=join)
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows if not join else [None]):
            members = rows if join else [row]
            offset = 0
            for member in members:
                for length, index in zip(member["seq_lengths"], member["index"]):
                    alone = model(input_ids=torch.from_numpy(docs[index]["input_ids"].astype(np.int64))[None]).logits[0]
                    packed = logits[r, offset:offset + length]
                    assert (packed - alone).abs().max().item() < 1e-5
                    offset += length


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_unpacked_loss(attention):
    model = build_model(64).float()
    model.set_attn_implementation(attention)
    wrapped = CausalLMWithLoss(model)

    def loss_model(batch):
        batch.pop("source_ids")  # the loop takes these out for its per-source report
        return wrapped(**batch)

    docs = documents(64)
    packed = loss_model(position_batch(packed_rows(docs), pad_token_id=0, join=False))
    joined = loss_model(position_batch(packed_rows(docs), pad_token_id=0, join=True))
    padded = loss_model(pad_batch(docs, pad_token_id=0))
    separate = [loss_model(pad_batch([d], pad_token_id=0)) for d in docs]
    total = sum(s["loss_sum"] for s in separate)
    tokens = sum(int(s["num_tokens"]) for s in separate)
    assert tokens == int(packed["num_tokens"]) == int(joined["num_tokens"]) == int(padded["num_tokens"])
    for result in (packed, joined, padded):
        torch.testing.assert_close(result["loss_sum"] / tokens, total / tokens, rtol=0, atol=1e-5)


def test_first_token_of_a_document_is_never_a_target_of_the_previous():
    docs = documents(64)
    batch = position_batch(packed_rows(docs), pad_token_id=0, join=True)
    targets, positions = batch["targets"][0], batch["position_ids"][0]
    last_of_document = torch.nonzero(torch.diff(positions) != 1).flatten()
    assert (targets[last_of_document] == -100).all() and targets[-1] == -100


def test_flash_attention_gets_one_joined_row_with_restarting_positions():
    """FlashAttention-2 is not installable here: check the batch is what transformers' varlen path reads."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    config = SFTConfig(packing=True, attn_implementation="flash_attention_2")
    rows = packed_rows(documents(64))
    batch, = collator(config, build_tokenizer())(rows)
    assert batch["input_ids"].shape == (1, sum(DOC_LENGTHS)) and "attention_mask" not in batch
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    lengths = [int(n) for row in rows for n in row["seq_lengths"]]
    assert cu_seqlens.tolist() == [0, *np.cumsum(lengths).tolist()] and int(max_length) == max(lengths)


def test_source_ids_align_with_targets():
    docs = documents(64, sources=(0, 1, 2, 1))
    for batch in (position_batch(packed_rows(docs), 0, join=False), position_batch(packed_rows(docs), 0, join=True),
                  pad_batch(docs, 0)):
        targets, sources = batch["targets"], batch["source_ids"]
        assert ((sources == -1) == (targets == -100)).all()
        assert sorted(set(sources[targets != -100].tolist())) == [0, 1, 2]
    padded = pad_batch(docs, 0)
    for i, doc in enumerate(docs):
        trained = padded["targets"][i] != -100
        assert (padded["source_ids"][i][trained] == doc["source"]).all()


def test_collator_choice():
    tokenizer = build_tokenizer()
    docs = documents(64)
    padded, = collator(SFTConfig(padding_free=False), tokenizer)(docs)
    assert "attention_mask" in padded and padded["input_ids"].shape == (4, max(DOC_LENGTHS))
    # unset padding_free: padded batches for sdpa on a GPU, one row per micro-batch on CPU (the plan decides)
    gpu_padded, = collator(SFTConfig(), tokenizer, device_type="cuda")(docs)
    assert "attention_mask" in gpu_padded
    assert len(collator(SFTConfig(), tokenizer)(docs)) == len(docs)
    flash = SFTConfig(padding_free=True, attn_implementation="flash_attention_2")
    free, = collator(flash, tokenizer)(docs)
    assert "attention_mask" not in free and free["input_ids"].shape == (1, sum(DOC_LENGTHS))
    assert free["position_ids"][0].tolist() == [p for n in DOC_LENGTHS for p in range(n)]
    # on sdpa/eager a joined row would cost attention over its whole length: each row is a batch of its own
    for attention in (None, "sdpa", "eager"):
        rows = collator(SFTConfig(padding_free=True, attn_implementation=attention), tokenizer)(docs)
        assert [b["input_ids"].shape for b in rows] == [(1, n) for n in DOC_LENGTHS]
        assert all("attention_mask" not in b and b["position_ids"][0].tolist() == list(range(b["input_ids"].shape[1]))
                   for b in rows)
    packed, = collator(SFTConfig(packing=True), tokenizer)(packed_rows(docs))
    assert packed["input_ids"].shape == (2, 16) and (packed["position_ids"][:, 0] == 0).all()


def test_group_by_length_sorts_within_windows():
    rng = np.random.default_rng(0)
    rows = [{"input_ids": np.zeros(int(n))} for n in rng.integers(1, 100, size=1000)]
    plain = SFTConfig(seed=3, per_device_train_batch_size=4)
    assert epoch_order(rows, plain, 0).tolist() == np.random.default_rng([3, 0]).permutation(1000).tolist()
    grouped = epoch_order(rows, SFTConfig(seed=3, per_device_train_batch_size=4, group_by_length=True), 0)
    assert sorted(grouped.tolist()) == list(range(1000))
    lengths = np.array([len(rows[i]["input_ids"]) for i in grouped])
    for start in range(0, 1000, 200):
        window = lengths[start:start + 200]
        assert (np.diff(window) <= 0).all()
    assert set(grouped[:200].tolist()) == set(np.random.default_rng([3, 0]).permutation(1000)[:200].tolist())
