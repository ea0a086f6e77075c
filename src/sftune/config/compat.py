"""Other tools' names for sftune's settings: aliases that are mapped, and keys that are refused with what to do
instead. A TRL or transformers user's YAML meets these first."""

# Names other tools use for one of our fields; accepted and mapped, so old YAML files keep working.
ALIASES = {
    "max_seq_length": "max_length",  # TRL before 0.20
    "torch_dtype": "dtype",  # transformers before 5
}

# Keys a TRL / transformers user may bring that sftune does not take, with what to do instead.
NOT_SUPPORTED = {
    "tf32": "not configurable in sftune; remove it",
    "dataset_kwargs": "sftune detects pre-tokenized rows (an input_ids column) by itself; remove it",
    "hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login` instead",
    "push_to_hub_token": "a token in the config would be saved with the run: set HF_TOKEN or run `hf auth login`",
    "hub_strategy": "sftune pushes once, when training ends (checkpoints stay local); remove it",
    "hub_revision": "sftune pushes to the repository's main branch; remove it",
}
