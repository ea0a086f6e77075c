"""`sftune <command>`: parse the command line, then call one function. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sftune import config as cfg
from sftune.errors import EXIT_INTERNAL_ERROR, ConfigError, TrainingInterrupted, UserError, message_of_unexpected

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises our one-line error instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped as in the schema; only flags actually given reach the config."""
    groups: dict[str, Any] = {}
    for group, name, default, label, help_text in cfg.field_help():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if cfg.field_is_bool(name) else {}
        shown = "unset" if default is None else default
        groups[group].add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=label,
            help=f"{help_text} (default: {shown})".replace("%", "%%"), **extra,
        )
    # TRL's other keys and the older names: flags too (a TRL command line runs), listed in one short section.
    from sftune.config.trl import compatibility_help, other_names

    trl = parser.add_argument_group("accepted for TRL compatibility", compatibility_help().replace("%", "%%"))
    for name in other_names():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        if any(flag in parser._option_string_actions for flag in flags):  # TRL's `debug` is sftune's --debug here
            continue
        trl.add_argument(*flags, dest=name, default=argparse.SUPPRESS, nargs="?", const="true", help=argparse.SUPPRESS)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sftune", description="Supervised fine-tuning of language models.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser(
        "train", help="Fine-tune a model.", allow_abbrev=False, usage="sftune train [CONFIG] [--KEY VALUE ...]",
        description="Fine-tune a model. Settings come from defaults, then CONFIG (YAML), then flags.",
    )
    train.add_argument("config", nargs="?", help="YAML file with settings; flags override it.")
    train.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    train.add_argument(
        "--num_processes", "--num-processes", type=int, default=None, metavar="N",
        help="Train data-parallel in N processes through `accelerate launch` (one per GPU; on a machine without "
        "GPUs, N CPU processes over gloo); also a key of CONFIG, as in TRL's files (default: 1).",
    )
    train.add_argument(
        "--accelerate_config", "--accelerate-config", metavar="NAME|FILE",
        help="As in TRL: an accelerate config file, or one of TRL's names (single_gpu, multi_gpu, zero1, zero2, "
        "zero3, fsdp1, fsdp2), for DeepSpeed or FSDP through `accelerate launch`; also a key of CONFIG.",
    )
    train.add_argument(
        "--dry_run", "--dry-run", action="store_true",
        help="Check everything a run checks before training (config, output folder, files, tokenizer, template on "
        "a sample of rows) and print the resolved config and the plan (precision, batching, steps, rows and "
        "trained tokens per step, checkpoints, what is saved); trains and writes nothing.",
    )
    _add_config_flags(train)

    inspect = commands.add_parser(
        "inspect", help="Show what training will see: data statistics, template checks, data problems, examples.",
        allow_abbrev=False,
        usage="sftune inspect [CONFIG] [--json] [--html FILE] [--jsonl FILE] [--num_examples N] [--KEY VALUE ...]",
        description="Prepare the data as `sftune train` would (using the same cache), print its statistics, "
        "template checks and the data doctor's findings (duplicates, train/eval overlap, empty and repetitive "
        "replies, lengths per source, with example rows), and show examples with the trained tokens highlighted.",
    )
    inspect.add_argument("config", nargs="?", help="YAML file with settings; flags override it.")
    inspect.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    inspect.add_argument("--jsonl", metavar="FILE", help="Write every prepared example (before packing), in dataset "
                         "order, as one JSON object per line: index, input_ids, labels.")
    inspect.add_argument("--num_examples", "--num-examples", type=int, default=3, metavar="N",
                         help="Examples to show (default: 3).")
    inspect.add_argument("--json", action="store_true", dest="as_json",
                         help="Print the statistics, with the data doctor's under 'doctor', as one JSON object.")
    inspect.add_argument("--html", metavar="FILE", help="Also write the statistics, findings, length histograms and "
                         "highlighted examples as one self-contained HTML page (no network needed to view it).")
    _add_config_flags(inspect)

    estimate = commands.add_parser(
        "estimate", help="Predict a run's peak memory and time before training it.", allow_abbrev=False,
        usage="sftune estimate [CONFIG] [--json] [--no_calibrate] [--device NAME] [--KEY VALUE ...]",
        description="Cost the run CONFIG describes: peak memory (weights, gradients, optimizer state, activations "
        "of the largest micro-batch the prepared data makes, the loss's buffers, allocator overhead), time per "
        "optimizer step, steps and total time. By default a few real optimizer steps of the run's model on its "
        "largest micro-batch calibrate the activation and time terms on this machine.",
    )
    estimate.add_argument("config", nargs="?", help="YAML file with settings; flags override it.")
    estimate.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    estimate.add_argument("--json", action="store_true", dest="as_json",
                          help="Print one JSON object: peak_memory_mb, step_seconds, steps, total_seconds, parts_mb.")
    estimate.add_argument("--no_calibrate", "--no-calibrate", action="store_true",
                          help="The formula alone: no model is loaded and nothing runs.")
    estimate.add_argument("--device", metavar="NAME",
                          help="Cost the run for another device, uncalibrated: cpu, cuda, h100-80gb, h200, a100-80gb, "
                          "a100-40gb, l4-24gb, rtx4090-24gb (default: this machine's).")
    _add_config_flags(estimate)

    demo = commands.add_parser(
        "demo", help="Teach SmolLM2-135M-Instruct a new identity (downloads it once, ~100 MB).", allow_abbrev=False,
        usage="sftune demo [--KEY VALUE ...]",
        description="Fine-tune SmolLM2-135M-Instruct on a small identity dataset shipped with sftune, "
        "and show its answer to 'Who are you?' before and after. Flags override the demo's settings.",
    )
    demo.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    _add_config_flags(demo)

    merge = commands.add_parser(
        "merge", help="Fold a trained LoRA adapter into its base model.", allow_abbrev=False,
        usage="sftune merge RUN_DIR --output DIR [--overwrite]",
        description="Load the base model of the adapter in RUN_DIR (unquantized, in the run's dtype), merge the "
        "adapter into its weights and write a standalone model with the tokenizer to DIR, a new folder.",
    )
    merge.add_argument("run_dir", metavar="RUN_DIR", help="A run folder holding adapter_config.json.")
    merge.add_argument("--output", required=True, metavar="DIR", help="New folder for the merged model.")
    merge.add_argument("--overwrite", action="store_true",
                       help="Replace DIR if it holds files (the old content is removed once the new model is in place).")
    merge.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")

    chat = commands.add_parser(
        "chat", help="Talk to a trained model: a run's output_dir (full model or adapter) or a merged model.",
        allow_abbrev=False, usage="sftune chat RUN_DIR [--prompt TEXT] [--system TEXT] [--max_new_tokens N] "
        "[--temperature T]",
        description="Load the model in RUN_DIR (an adapter on the base model its run names) and chat with it: "
        "interactive, with the conversation's history and the reply printed as it is generated, or one answer "
        "to --prompt. Replies end at the end-of-turn token the model was trained to write.",
    )
    chat.add_argument("run_dir", metavar="RUN_DIR", help="A run's output_dir, or a folder written by sftune merge.")
    chat.add_argument("--prompt", metavar="TEXT", help="Answer this one message and exit.")
    chat.add_argument("--system", metavar="TEXT", help="System message that opens the conversation.")
    chat.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256, metavar="N",
                      help="Longest reply in tokens (default: 256).")
    chat.add_argument("--temperature", type=float, default=0.7, metavar="T",
                      help="Sampling temperature; 0 answers greedily, the same every time (default: 0.7).")
    chat.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")

    push = commands.add_parser(
        "push", help="Upload a finished run to the Hugging Face Hub (again, after a failed push).",
        allow_abbrev=False, usage="sftune push RUN_DIR [--hub_model_id ID] [--hub_private_repo true|false]",
        description="Upload a run's output_dir (model or adapter, tokenizer, model card, loss plot, metrics, config; "
        "not checkpoints) to the repository its config names. The token comes from HF_TOKEN or `hf auth login`.",
    )
    push.add_argument("run_dir", metavar="RUN_DIR", help="A run's output_dir.")
    push.add_argument("--hub_model_id", "--hub-model-id", metavar="ID",
                      help="Repository 'name' or 'owner/name' (default: the run's hub_model_id, else the "
                      "folder's name).")
    push.add_argument("--hub_private_repo", "--hub-private-repo", choices=["true", "false"],
                      help="Create the repository as private or public (default: the run's setting).")
    push.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = _build_parser()
    args, extras = parser.parse_known_args(argv)
    flags = [arg[2:].split("=", 1)[0].replace("-", "_") for arg in extras if arg.startswith("--")]
    if flags:
        raise ConfigError(_unknown_flags_message(flags, getattr(args, "config", None)))
    if extras:
        raise ConfigError(f"unexpected argument '{extras[0]}' (see `sftune {args.command or ''} --help`)")
    if args.command is None:
        parser.print_help()
        raise SystemExit(EXIT_USER_ERROR)
    reserved = {"command", "config", "debug", "num_processes", "accelerate_config", "dry_run", "run_dir", "output", "jsonl", "num_examples",
                "overwrite", "prompt", "system", "max_new_tokens", "temperature", "as_json", "html", "no_calibrate",
                "device"}
    overrides = {k: v for k, v in vars(args).items() if k not in reserved}
    return args, overrides


def _launch_settings(args: argparse.Namespace, config: cfg.SFTConfig) -> tuple[int, str | None]:
    """(processes, accelerate config) of `sftune train`: the flags, else the config's launch keys (TRL's files
    have them); a process that accelerate already started launches nothing more."""
    if LAUNCHED_ARGV in os.environ or "LOCAL_RANK" in os.environ:  # started by sftune's launch, or accelerate's
        return 1, None
    launch = config.launch_settings
    accelerate_config = launch.get("accelerate_config")
    if args.accelerate_config is not None:
        accelerate_config = cfg.check_launch_value("accelerate_config", args.accelerate_config)
    return args.num_processes or launch.get("num_processes", 1), accelerate_config


def _unknown_flags_message(flags: list[str], config_path: str | None) -> str:
    """Every unknown flag, and every bad key of the config file too, in one line: one run shows them all."""
    problems = [cfg.unknown_key_message(name) for name in flags]
    message = cfg.join_problems(problems)
    if config_path is not None:
        try:
            cfg.load_config(config_path)
        except ConfigError as err:
            message += f"; and {err}"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args, overrides = _parse(argv)
        if args.command in ("train", "demo"):
            from sftune.training.interrupt import set_resume_command

            typed = json.loads(os.environ.get(LAUNCHED_ARGV, "null")) or argv  # as the user typed it
            set_resume_command(lambda output_dir: resume_command(typed, output_dir))
        if args.command == "train":
            config = cfg.load_config(args.config, overrides)  # a bad config fails here, before any launch
            os.environ.update(config.launch_settings.get("env", {}))  # before torch loads (CUDA_VISIBLE_DEVICES)
            num_processes, accelerate_config = _launch_settings(args, config)
            if args.dry_run:
                from sftune.dry_run import dry_run

                dry_run(config, num_processes=num_processes, accelerate_config=accelerate_config)
                return 0
            if num_processes > 1 or accelerate_config not in (None, "single_gpu"):
                from sftune.launch import launch_data_parallel
                from sftune.preflight import check_before_loading

                check_before_loading(config)  # once, before N processes import torch
                child_argv = _without_flag(_without_flag(argv, "num_processes"), "accelerate_config")
                return launch_data_parallel(num_processes, child_argv, accelerate_config,
                                            child_env={LAUNCHED_ARGV: json.dumps(argv)})
            from sftune.run import train

            train(config)  # checks the output folder and the local paths before torch loads
        elif args.command == "inspect":
            from sftune.preflight import check_input_paths

            config = cfg.load_config(args.config, overrides)
            config.check_ready_to_train()
            check_input_paths(config)
            from sftune.inspect import inspect_data

            inspect_data(config, args.jsonl, args.num_examples, as_json=args.as_json, html=args.html)
        elif args.command == "estimate":
            from sftune.preflight import check_input_paths

            config = cfg.load_config(args.config, overrides)
            config.check_ready_to_train()
            check_input_paths(config)
            from sftune.estimate import estimate_run
            from sftune.run import setup_logging

            setup_logging()
            estimate_run(config, args.device, calibrate=not args.no_calibrate).print(as_json=args.as_json)
        elif args.command == "demo":
            from sftune.demo import run_demo

            run_demo(overrides)
        elif args.command == "merge":
            from sftune.preflight import check_merge_folders

            check_merge_folders(args.run_dir, args.output, args.overwrite)  # before torch loads
            from sftune.model.adapters import merge_adapter
            from sftune.run import setup_logging

            setup_logging()
            merge_adapter(args.run_dir, args.output, overwrite=args.overwrite)
        elif args.command == "chat":
            from sftune.chat import run_chat
            from sftune.logs import setup_logging

            setup_logging()
            run_chat(args.run_dir, args.prompt, args.system, args.max_new_tokens, args.temperature)
        elif args.command == "push":
            from sftune.export.hub import push_saved_run
            from sftune.logs import setup_logging

            setup_logging()  # sftune's log only: a push loads no model
            private = None if args.hub_private_repo is None else args.hub_private_repo == "true"
            push_saved_run(args.run_dir, args.hub_model_id, private)
        return 0
    except UserError as err:
        if debug:
            raise
        print(f"sftune: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as stop:
        from sftune.training.interrupt import resume_hint

        print(f"sftune: {stop}; {resume_hint(Path(stop.checkpoint).parent)}", file=sys.stderr)
        return 128 + stop.signal_number
    except KeyboardInterrupt:
        print("sftune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one boundary: a line that says what happened, never a raw traceback
        if debug:
            raise
        message, users_to_fix = message_of_unexpected(err)
        print(f"sftune: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR if users_to_fix else EXIT_INTERNAL_ERROR


# The command line of `sftune train --num_processes N`, handed to the processes it starts (for the resume hint).
LAUNCHED_ARGV = "SFTUNE_LAUNCHED_ARGV"


def resume_command(argv: list[str], output_dir: Path) -> str:
    """The command that continues the interrupted run: the one typed, set to resume. `sftune demo` picks a new
    folder each time, so its command names the run's folder."""
    kept = _without_flag(argv, "resume_from_checkpoint")
    if next((arg for arg in kept if not arg.startswith("-")), None) == "demo":
        kept = _without_flag(kept, "output_dir") + ["--output_dir", str(output_dir)]
    return shlex.join(["sftune", *kept, "--resume_from_checkpoint", "true"])


def _without_flag(argv: list[str], name: str) -> list[str]:
    """`argv` without `--name VALUE` / `--name=VALUE` (either spelling of the name)."""
    spellings = (f"--{name}", f"--{name.replace('_', '-')}")
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in spellings:
            skip = True
        elif not arg.startswith(tuple(f"{spelling}=" for spelling in spellings)):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
