"""sftune: supervised fine-tuning of language models, fully or with adapters."""

from sftune.config import SFTConfig, load_config
from sftune.errors import ConfigError, DataError, UserError

__version__ = "0.1.0"


def train(config: SFTConfig):
    """Fine-tune as `config` says and save the result to `config.output_dir`. Returns a TrainResult."""
    from sftune.run import train as _train  # torch and transformers load only when training

    return _train(config)


__all__ = ["SFTConfig", "load_config", "train", "UserError", "ConfigError", "DataError", "__version__"]
