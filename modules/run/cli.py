"""Command line and gin: parse a script's .gin files and ``--gin`` bindings, the resolved
config, and the one-JSON-line result every script ends with."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import gin

from modules import distributed


def parse_gin_cli(argv: list[str] | None, description: str = "",
                  skip_unknown: list[str] | None = None) -> argparse.Namespace:
    """``script.py a.gin b.gin --gin 'f.x = 1' --gin ...`` -> parsed and applied to gin.
    ``skip_unknown``: names of other scripts' train functions whose bindings are ignored (gin's
    ``skip_unknown``), e.g. train_grpo.py reading an SFT recipe for its data settings; any other
    unknown name is still an error."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", help=".gin files, applied in order")
    ap.add_argument("--gin", action="append", default=[], metavar="BINDING",
                    help="a gin binding applied after the files, e.g. --gin 'train.max_steps = 10'")
    args = ap.parse_args(argv)
    for path in args.configs:
        if not Path(path).is_file():
            ap.error(f"config file not found: {path}")
    # `include 'configs/x.gin'` resolves from the repo root whatever the working directory.
    gin.add_config_file_search_path(str(Path(__file__).resolve().parents[2]))
    try:
        gin.parse_config_files_and_bindings(args.configs, args.gin, skip_unknown=skip_unknown or False)
    except Exception as e:  # noqa: BLE001 - gin raises ValueError, SyntaxError or tokenize errors
        where = ", ".join(args.configs + [f"--gin {b!r}" for b in args.gin])
        raise SystemExit(f"error in gin config ({where}):\n  {e}") from None
    return args


def resolved_config() -> str:
    """The full gin configuration in force (saved in checkpoints and W&B runs)."""
    return gin.config_str()


def print_result(result: dict, out_dir: str | Path | None = None) -> None:
    """The last stdout line of every script: one JSON object. With ``out_dir``, also written
    (atomically) to ``out_dir/result.json`` with the command line and the resolved config, so
    that a reported figure can be traced to what produced it (README rows: results/).
    Under torchrun only rank 0 prints and writes (the others hold the same figures).
    A ``ranks`` entry (``modules.intervals.RunRanks``, from ``modules.reporting.test_report``)
    is written to ``out_dir/result.ranks.npz`` (atomically, before the JSON, which names it
    under ``ranks_file``) and left out of the JSON and the printed line."""
    if not distributed.is_main():
        return
    from modules.intervals import RANKS_SUFFIX, RunRanks

    ranks = result.get("ranks")
    if isinstance(ranks, RunRanks):
        result = {k: v for k, v in result.items() if k != "ranks"}
    if out_dir is not None:
        path = Path(out_dir) / "result.json"
        record = {**result, "command": " ".join(["python", *sys.argv]), "config": resolved_config()}
        if isinstance(ranks, RunRanks):
            record["ranks_file"] = ranks.save(path.with_name(path.stem + RANKS_SUFFIX)).name
        if distributed.world_size() > 1:
            record["processes"] = distributed.world_size()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
        os.replace(tmp, path)
    sys.stdout.flush()
    print(json.dumps(result, default=float), flush=True)
