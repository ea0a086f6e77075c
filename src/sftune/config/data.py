"""The data group: which datasets, in which format, how rows become token sequences (templates, truncation,
packing), and which tokens carry the loss (loss_mask, resolved once from TRL's three flags)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

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
        "'name' (subset), 'split', 'test_split', 'weight', 'columns', 'format'. Weights set each source's share of "
        "the training rows (by rows, not tokens); without weights every row is used once.",
        "data",
    )
    dataset_test_split: str | None = opt(
        None, "Split of the dataset(s) to evaluate on, e.g. 'test' (unset: no eval split).", "data"
    )
    eval_ratio: float = opt(
        0.0, "Fraction of the training rows held out for evaluation (seeded), when there is no eval split.", "data"
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
    group_by_length: bool = opt(
        False, "Batch rows of similar length together (less padding); without packing only.", "data"
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
        problems.need(not self.split_assistant_turns or self.loss_mask == "assistant", "split_assistant_turns",
                      "needs assistant_only_loss: true (loss_mask: assistant): only then is each turn trained")
        if self.dataset_name is not None and self.datasets is not None:
            problems.add("config keys 'dataset_name' and 'datasets' are both set: keep one of them")
        if self.dataset_test_split is not None and self.eval_ratio > 0:
            problems.add("config keys 'dataset_test_split' and 'eval_ratio' are both set: keep one of them")
        if self.datasets is not None:
            try:
                check_dataset_entries(self.datasets)
            except ConfigError as err:
                problems.add(str(err))


def loss_mask_of_flags(config: DataSettings) -> str | None:
    """The loss_mask TRL's three flags ask for; None when they are all at their defaults."""
    if config.last_assistant_only_loss:
        return "last_assistant"
    if config.assistant_only_loss:
        return "assistant"
    if config.completion_only_loss is None:
        return None
    return "completion" if config.completion_only_loss else "all"


DATASET_ENTRY_KEYS = ("path", "name", "split", "test_split", "weight", "columns", "format")


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
        weight = entry.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise ConfigError(f"{where}.weight = {weight!r}: must be a number > 0")
        columns = entry.get("columns")
        if columns is not None and not isinstance(columns, (dict, list)):
            raise ConfigError(f"{where}.columns: expected a mapping {{their_name: our_name}} or a list of columns")
        if entry.get("format", "auto") not in formats:
            raise ConfigError(f"{where}.format = {entry['format']!r}: expected one of {', '.join(formats)}")
    weighted = [entry.get("weight") is not None for entry in entries]
    if any(weighted) and not all(weighted):
        raise ConfigError("config key 'datasets': give every dataset a 'weight', or none (then every row is used once)")
