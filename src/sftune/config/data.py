"""The data group: which datasets, in which format, how rows become token sequences (templates, truncation,
packing), and which tokens carry the loss (loss_mask, resolved once from TRL's three flags)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from sftune.config.fields import Problems, opt
from sftune.errors import ConfigError, did_you_mean


@dataclass
class DataSettings:
    dataset_name: str | None = opt(
        None,
        "Training data: a Hub dataset id, a local .json/.jsonl/.parquet/.csv/.arrow file, or a folder of them.",
        "data",
    )
    dataset_config: str | None = opt(None, "Hub dataset configuration (subset) name.", "data")
    dataset_train_split: str = opt("train", "Split of the dataset to train on.", "data")
    dataset_text_field: str = opt("text", "Column holding plain text, for text datasets.", "data")
    max_length: int | None = opt(
        1024, "Longest sequence in tokens; longer rows are truncated (unset: no limit).", "data"
    )

    datasets: list[dict] | None = opt(
        None,
        "Several training datasets at once, instead of dataset_name: a list of mappings with 'path' and optionally "
        "'name' (subset), 'data_dir', 'data_files', 'split', 'test_split', 'columns', 'format', and 'weight' or "
        "'fraction'. Weights set each source's share of the training rows by sampling (by rows, not tokens); TRL's "
        "fractions set the shares by taking each source's first rows, as many as fit without repeating any; "
        "with neither, every row is used once. 'columns': a list keeps those columns (TRL), a mapping renames them.",
        "data",
    )
    dataset_test_split: str | None = opt(
        None, "Split of the dataset(s) to evaluate on, e.g. 'test' (unset: no eval split; unlike TRL's default, "
        "which evaluates on 'test' when eval_strategy is set).", "data"
    )
    eval_ratio: float = opt(
        0.0, "Fraction of the training rows held out for evaluation (seeded), when there is no eval split.", "data"
    )
    test_split_size: float | None = opt(
        None, "TRL's name for eval_ratio: the fraction of the training rows held out for evaluation.", "data"
    )
    dataset_kwargs: dict | None = opt(
        None, "TRL's dataset options: {skip_prepare_dataset: true} trains on pre-tokenized rows (input_ids, and "
        "optionally labels) as they are, with no template.", "data"
    )
    dataset_format: Literal["auto", "text", "prompt_completion", "messages", "sharegpt", "alpaca", "tokenized"] = opt(
        "auto", "Format of the rows; 'auto' detects it from the columns of each dataset.", "data"
    )
    dataset_columns: dict[str, str] | None = opt(
        None, "Rename columns before format detection: {their_name: our_name}, e.g. {dialog: messages}.", "data"
    )
    chat_template_path: str | None = opt(
        None, "A .jinja chat template to use instead of the tokenizer's own; it is saved with the model.", "data"
    )
    eos_token: str | None = opt(
        None, "Token that ends a sequence and stops generation (unset: the tokenizer's EOS).", "data"
    )
    loss_mask: Literal["completion", "all", "assistant", "last_assistant"] | None = opt(
        None,
        "Which tokens carry loss: completion (prompt/completion rows train the completion, other rows every "
        "token), all, assistant (the assistant turns of conversations), last_assistant (the last assistant turn). "
        "Unset: from TRL's flags below (completion when none is set); the run's saved config holds the result.",
        "data",
    )
    completion_only_loss: bool | None = opt(
        None, "TRL's flag: false trains every token (loss_mask: all); unset or true, prompt/completion rows train "
        "only the completion.", "data"
    )
    assistant_only_loss: bool = opt(
        False, "TRL's flag: train only on assistant turns (content and end-of-turn token) of conversations "
        "(loss_mask: assistant).", "data"
    )
    last_assistant_only_loss: bool = opt(
        False, "Train only on the last assistant turn of each conversation (loss_mask: last_assistant).", "data"
    )
    split_assistant_turns: bool = opt(
        False, "Train each assistant turn as an example of its own: the conversation up to that turn, only that "
        "turn trained. Templates that keep only the latest turns' reasoning (Qwen3's <think>) then train every turn "
        "with its own reasoning, as inference renders it; the history is repeated in each example (more compute). "
        "Needs assistant_only_loss.", "data"
    )
    truncation_mode: Literal["keep_start", "keep_end"] = opt(
        "keep_start", "Which end of a row longer than max_length is kept.", "data"
    )
    packing: bool = opt(
        False, "Pack several rows into each max_length sequence; packed rows never attend to one another.", "data"
    )
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = opt(
        "bfd",
        "bfd: best-fit decreasing, rows kept whole; bfd_split: long rows split across sequences; "
        "wrapped: rows cut to fill every sequence exactly.",
        "data",
    )
    padding_free: bool | None = opt(
        None,
        "No padding: with FlashAttention each batch is joined into one sequence (documents told apart by "
        "position_ids); on sdpa/eager each row runs as a micro-batch of its own (same update, no padding compute). "
        "Unset: on with FlashAttention and on CPU, off for vision-language models, for sdpa/eager on a GPU "
        "(rows one at a time would underfeed it) and under FSDP/DeepSpeed.",
        "data",
    )
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = opt(
        "random", "Order of the training rows in each epoch: random (seeded shuffle), sequential (as prepared), or "
        "group_by_length (shuffled, then rows of similar length batched together: less padding; without packing). "
        "group_by_length: true is accepted too.", "data"
    )
    dedupe: Literal["exact", "near"] | None = opt(
        None,
        "Remove duplicate rows the data doctor finds (`sftune inspect` reports them either way): 'exact' (same "
        "text once whitespace is ignored) or 'near' (also same up to case and punctuation, or MinHash "
        "similarity >= 0.8); the first of each group stays, eval rows that repeat a training row go. Unset: "
        "nothing is removed.",
        "data",
    )
    dataset_num_proc: int | None = opt(
        None, "Processes that tokenize the data (unset: one per CPU core for datasets over 2,000 rows).", "data"
    )

    # TRL training keys (issue 15)
    pad_to_multiple_of: int | None = opt(
        None, "Pad every batch's sequence length up to a multiple of this (padded batches: the padded width; "
        "packed and padding-free rows: each row's length). Padding is never trained or attended to. Unset: no "
        "extra padding.", "data",
    )
    eval_packing: bool | None = opt(
        None, "Pack the eval rows too (unset: as packing). Packed eval rows are kept apart by position_ids.", "data"
    )
    shuffle_dataset: bool = opt(
        False, "Shuffle the training documents once, before packing and batching (seeded by data_seed). Every "
        "epoch's order is shuffled anyway; this changes which documents are packed together and the order a "
        "sequential sampler sees.", "data",
    )
    data_seed: int | None = opt(
        None, "Seed of every random choice about the data (eval_ratio hold-out, mixture draws, packing and "
        "shuffling, each epoch's order), apart from seed, which then only drives initialisation, dropout and "
        "NEFTune noise. Unset: seed.", "data",
    )

    def _resolved_loss_mask(self) -> str:
        """loss_mask as set, or from TRL's three flags: the one setting every reader of "which tokens are trained"
        uses. Flags that contradict a set loss_mask are an error, so a saved config always agrees with itself."""
        if self.assistant_only_loss and self.last_assistant_only_loss:
            raise ConfigError("config keys 'assistant_only_loss' and 'last_assistant_only_loss' are both true: "
                              "keep one of them (or set loss_mask: assistant | last_assistant)")
        from_flags = loss_mask_of_flags(self)
        if self.loss_mask is None:
            return from_flags or "completion"
        if from_flags is not None and from_flags != self.loss_mask:
            flags = {"last_assistant": "last_assistant_only_loss: true", "assistant": "assistant_only_loss: true",
                     "all": "completion_only_loss: false", "completion": "completion_only_loss: true"}[from_flags]
            raise ConfigError(f"config key 'loss_mask' = {self.loss_mask!r} contradicts {flags}: keep one of them")
        return self.loss_mask

    def _check_data(self, problems: Problems) -> None:
        problems.need(self.max_length is None or self.max_length >= 2, "max_length",
                      "must be >= 2, or unset for no limit")
        problems.need(0.0 <= self.eval_ratio < 1.0, "eval_ratio", "must be in [0, 1)")
        problems.need(self.dataset_num_proc is None or self.dataset_num_proc >= 1, "dataset_num_proc", "must be >= 1")
        problems.need(not self.packing or self.max_length is not None, "packing", "needs max_length (the packed length)")
        problems.need(not self.eval_packing or self.max_length is not None, "eval_packing",
                      "needs max_length (the packed length)")
        problems.need(self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1, "pad_to_multiple_of",
                      "must be >= 1, or unset for no extra padding")
        problems.need(self.data_seed is None or self.data_seed >= 0, "data_seed", "must be >= 0, or unset to use seed")
        problems.need(not self.split_assistant_turns or self.loss_mask == "assistant", "split_assistant_turns",
                      "needs assistant_only_loss: true (loss_mask: assistant): only then is each turn trained")
        if self.dataset_name is not None and self.datasets is not None:
            problems.add("config keys 'dataset_name' and 'datasets' are both set: keep one of them")
        if self.dataset_test_split is not None and self.eval_ratio > 0:
            problems.add("config keys 'dataset_test_split' and 'eval_ratio' are both set: keep one of them")
        if self.test_split_size is not None:
            problems.need(0.0 < self.test_split_size < 1.0, "test_split_size",
                          "must be a fraction in (0, 1) (sftune holds out that share of each dataset's rows)")
            for other in ("eval_ratio", "dataset_test_split"):
                if getattr(self, other):
                    problems.add(f"config keys 'test_split_size' and '{other}' are both set: keep one of them")
        if self.dataset_kwargs is not None:
            unknown = [key for key in self.dataset_kwargs if key != "skip_prepare_dataset"]
            if unknown:
                problems.add(f"config key 'dataset_kwargs' has '{unknown[0]}': sftune takes only skip_prepare_dataset "
                             "there (sftune prepares every other format by itself)")
            elif self.skips_preparation and self.dataset_format not in ("auto", "tokenized"):
                problems.add(f"config key 'dataset_kwargs' skips preparation, but dataset_format is "
                             f"{self.dataset_format!r}: rows must be pre-tokenized (dataset_format: tokenized)")
        if self.datasets is not None:
            try:
                check_dataset_entries(self.datasets)
            except ConfigError as err:
                problems.add(str(err))


    @property
    def skips_preparation(self) -> bool:
        """TRL's dataset_kwargs {skip_prepare_dataset: true}: the rows are pre-tokenized and used as they are."""
        return bool((self.dataset_kwargs or {}).get("skip_prepare_dataset"))

    @property
    def held_out_ratio(self) -> float:
        """The share of each dataset's training rows held out for evaluation: eval_ratio, or TRL's test_split_size."""
        return self.eval_ratio or self.test_split_size or 0.0


def data_seed_of(config: Any) -> int:
    """The seed of the data's random choices: data_seed, or seed when it is unset."""
    return config.seed if config.data_seed is None else config.data_seed


def eval_rows_packed(config: DataSettings) -> bool:
    """Whether eval rows are packed: eval_packing, or packing when it is unset (TRL's rule)."""
    return config.packing if config.eval_packing is None else config.eval_packing


def loss_mask_of_flags(config: DataSettings) -> str | None:
    """The loss_mask TRL's three flags ask for; None when they are all at their defaults."""
    if config.last_assistant_only_loss:
        return "last_assistant"
    if config.assistant_only_loss:
        return "assistant"
    if config.completion_only_loss is None:
        return None
    return "completion" if config.completion_only_loss else "all"


DATASET_ENTRY_KEYS = ("path", "name", "data_dir", "data_files", "split", "test_split", "weight", "fraction", "columns",
                      "format")


def check_dataset_entries(entries: list[dict]) -> None:
    """Each entry of `datasets`: a mapping with a 'path'; weights given for all entries or for none."""
    if not entries:
        raise ConfigError("config key 'datasets' is an empty list: give at least one dataset, or unset it")
    formats = typing.get_args(typing.get_type_hints(DataSettings)["dataset_format"])
    for i, entry in enumerate(entries):
        where = f"config key 'datasets[{i}]'"
        for key in entry:
            if key not in DATASET_ENTRY_KEYS:
                hint = did_you_mean(str(key), DATASET_ENTRY_KEYS) or f" (known: {', '.join(DATASET_ENTRY_KEYS)})"
                raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{where}: needs 'path' (a Hub dataset id, a file or a folder)")
        for share in ("weight", "fraction"):
            value = entry.get(share)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{where}.{share} = {value!r}: must be a number > 0")
        if entry.get("weight") is not None and entry.get("fraction") is not None:
            raise ConfigError(f"{where}: 'weight' (sampled shares) and 'fraction' (TRL's first-rows shares) are both "
                              "set: keep one of them")
        data_dir, data_files = entry.get("data_dir"), entry.get("data_files")
        if data_dir is not None and not isinstance(data_dir, str):
            raise ConfigError(f"{where}.data_dir: expected a folder name")
        if data_files is not None and not (isinstance(data_files, str) or _all_text(data_files)):
            raise ConfigError(f"{where}.data_files: expected a file, a list of files, or a mapping of split to files")
        columns = entry.get("columns")
        if columns is not None and not isinstance(columns, (dict, list)):
            raise ConfigError(f"{where}.columns: expected a mapping {{their_name: our_name}} or a list of columns")
        if entry.get("format", "auto") not in formats:
            raise ConfigError(f"{where}.format = {entry['format']!r}: expected one of {', '.join(formats)}")
    for share in ("weight", "fraction"):
        given = [entry.get(share) is not None for entry in entries]
        if any(given) and not all(given):
            raise ConfigError(f"config key 'datasets': give every dataset a '{share}', or none (then every row is "
                              "used once)")


def _all_text(files: object) -> bool:
    """A list of file names, or a mapping of split to a file name or a list of them."""
    if isinstance(files, list):
        return all(isinstance(name, str) for name in files)
    if isinstance(files, dict):
        return all(isinstance(value, str) or (isinstance(value, list) and _all_text(value))
                   for value in files.values())
    return False
