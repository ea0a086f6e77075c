"""sftune: supervised fine-tuning of language models, fully or with adapters."""

from sftune.config import SFTConfig, load_config
from sftune.errors import ConfigError, DataError, UserError
from sftune.paths import VERSION as __version__


def train(config: SFTConfig, train_dataset=None, eval_dataset=None, formatting_func=None):
    """Fine-tune as `config` says and save the result to `config.output_dir`. Returns a TrainResult.

    `train_dataset` / `eval_dataset` (a datasets.Dataset or a list of dicts) replace the config's datasets, and
    `formatting_func` turns each raw row into text (a str) or into a row of any supported format (a dict).
    """
    from sftune.run import train as _train  # torch and transformers load only when training

    return _train(config, train_dataset=train_dataset, eval_dataset=eval_dataset, formatting_func=formatting_func)


__all__ = ["SFTConfig", "load_config", "train", "UserError", "ConfigError", "DataError", "__version__"]
