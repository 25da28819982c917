"""Where a :class:`GenerativeRecommender` comes from (``from_pretrained``): a saved folder, a Hub
repo id, or a train run's out_dir.

A run's out_dir (train_decoder.py, train_actionpiece.py, train_grpo.py) serves its
``recommender/`` export when that was made from the run's current ``best.pt``, else a
recommender rebuilt from ``best.pt`` alone: its weights and the recommender record it carries
(modules/recommender/record.py: model config, tokenizer reference, decoding settings, item
table), with the run's ``result.json`` for the model card. A best.pt from before checkpoints
carried the record raises :class:`RecordMissingError` saying how to get one.

A run whose out_dir holds one folder per stage (train_joint.py: ``joint/``, ``finetune/``;
:data:`STAGED_RUNS`) is served from its ``recommender/`` export only while that export belongs
to the stages' current ``best.pt`` files, and a stage folder (``<out_dir>/finetune``) serves the
same export; anything else (a later run that has not finished, a stage copied elsewhere) raises
:class:`StaleExportError` saying why and what to load instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from modules.recommender.core import GenerativeRecommender, build_model
from modules.recommender.folder import CONFIG_FILE, RUN_EXPORT, WEIGHTS_FILE, load_folder
from modules.recommender.record import EXACT, checkpoint_id, load_referenced_tokenizer, record_of, run_info

# Train scripts whose out_dir holds one folder per stage, each with its own best.pt, and the
# export (out_dir/recommender) made from the last stage's best.pt: script -> stage folders in
# order. A later stage's best.pt names the weights it started from in its identity, as
# f"{previous stage}_weights" (train_joint.py's ``joint_weights``).
STAGED_RUNS = {"train_joint": ("joint", "finetune")}


class StaleExportError(ValueError):
    """A staged run's ``recommender/`` export is missing or does not belong to the run's current
    checkpoints (a later run in the same out_dir has not finished), or a stage folder was given
    whose run has no such export: nothing can be served without guessing."""


def open_recommender(cls, path_or_hub_id: str | Path, *, revision: str | None = None,
                     cache_dir: str | Path | None = None, local_files_only: bool = False,
                     token: str | bool | None = None) -> GenerativeRecommender:
    """``GenerativeRecommender.from_pretrained`` (on the CPU; the caller moves it)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
            return load_folder(cls, path)
        if (path / "best.pt").is_file():
            return from_run(cls, path)
        if _staged_script(path) is not None:  # a run whose best.pt files are its stages' (train_joint.py)
            return from_staged_run(cls, path)
        raise FileNotFoundError(f"{path}: neither a saved recommender ({CONFIG_FILE} + {WEIGHTS_FILE}) nor "
                                "a train run directory (best.pt)")
    if str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") != 1:
        raise FileNotFoundError(f"recommender not found: {path_or_hub_id} (a folder, a train run's out_dir "
                                "or a Hub repo id 'user/name')")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(str(path_or_hub_id), revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token)
    return load_folder(cls, Path(folder))


def from_run(cls, run_dir: str | Path) -> GenerativeRecommender:
    """The recommender of a train run's out_dir: its ``recommender/`` export when it was made from
    the current ``best.pt``, else rebuilt from ``best.pt`` (:func:`rebuild`)."""
    run_dir = Path(run_dir)
    best_path = run_dir / "best.pt"
    if not best_path.is_file():
        raise FileNotFoundError(f"{best_path} not found: not a finished train run directory")
    state = torch.load(best_path, map_location="cpu", weights_only=False, mmap=True)
    stage_of = _stage_of(run_dir, state)
    if stage_of is not None:
        return _from_stage(cls, run_dir, *stage_of)
    export = run_dir / RUN_EXPORT
    if (export / CONFIG_FILE).is_file():
        made_from = json.loads((export / CONFIG_FILE).read_text()).get("checkpoint")
        if made_from == checkpoint_id(state):
            return load_folder(cls, export)
        print(f"[recommender] {export} was not made from the current {best_path}: rebuilding from it",
              file=sys.stderr)
    return rebuild(cls, run_dir, state)


def rebuild(cls, run_dir: Path, state: dict) -> GenerativeRecommender:
    """The recommender of ``run_dir``'s best.pt ``state`` from what it carries: the weights and the
    recommender record (the tokenizer it references is loaded and checked; the architectures that
    score every item need none); :class:`RecordMissingError` when it has no record."""
    path = run_dir / "best.pt"
    record = record_of(path, state)
    config = record["config"]
    model = build_model(config["architecture"], config["model_config"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit the model config of its recommender record: {e}") from None
    tok = None if config["architecture"] in EXACT else load_referenced_tokenizer(config["tokenizer"], path)
    result_path = run_dir / "result.json"
    run = (run_info(json.loads(result_path.read_text())) if result_path.is_file()
           else {"dataset": config.get("dataset"), "config": state.get("config")})
    return cls.from_record(record, model, tok, run=run, checkpoint_id=checkpoint_id(state))


def from_staged_run(cls, run_dir: str | Path) -> GenerativeRecommender:
    """The recommender of a run with one folder per stage (:data:`STAGED_RUNS`, e.g. a
    train_joint.py out_dir): its ``recommender/`` export, only when made from the last stage's
    current ``best.pt`` and that stage from the earlier stages' current ones; else
    :class:`StaleExportError` (such a run's recommender cannot be rebuilt from one stage: its
    tokenizer is the run's final one, which only the finished run exports)."""
    run_dir = Path(run_dir)
    script = _staged_script(run_dir)
    if script is None:
        raise FileNotFoundError(f"{run_dir}: no stage folder of a staged train run "
                                f"({', '.join(f'{k}.py: {v}' for k, v in STAGED_RUNS.items())})")
    problem = _staged_export_problem(run_dir, STAGED_RUNS[script])
    if problem is not None:
        export = run_dir / RUN_EXPORT
        old = (f"; the earlier export can still be loaded as it is: from_pretrained('{export}')"
               if (export / CONFIG_FILE).is_file() else "")
        raise StaleExportError(f"{run_dir} ({script}.py run): {problem}. Finish the run (run its command again "
                               f"with out_dir = '{run_dir}') to export its recommender{old}")
    return load_folder(cls, run_dir / RUN_EXPORT)


def _from_stage(cls, stage_dir: Path, script: str, stage: str) -> GenerativeRecommender:
    """``stage_dir`` is one stage of a staged run: the run's export when ``stage_dir`` is its
    last stage, sits in the run's out_dir and the export belongs to it; else a clear error."""
    stages = STAGED_RUNS[script]
    run_dir = stage_dir.parent
    what = (f"{stage_dir} is the '{stage}' stage of a {script}.py run: its best.pt is not a recommender "
            f"on its own (the run's final tokenizer is exported with it in <out_dir>/{RUN_EXPORT})")
    if stage != stages[-1]:
        raise StaleExportError(f"{what}; the run serves its last stage, '{stages[-1]}': load the run's out_dir "
                               f"({run_dir}) once it has finished")
    if stage_dir.name != stage:
        raise StaleExportError(f"{what}; it is not in its run's out_dir (folder named '{stage_dir.name}', "
                               f"not '{stage}'): load the run's out_dir instead")
    problem = _staged_export_problem(run_dir, stages)
    if problem is not None:
        raise StaleExportError(f"{what}; {run_dir} cannot serve it: {problem}. Finish the run (run its command "
                               f"again with out_dir = '{run_dir}') to export its recommender")
    return load_folder(cls, run_dir / RUN_EXPORT)


def _staged_script(run_dir: Path) -> str | None:
    """The staged train script (:data:`STAGED_RUNS`) whose out_dir layout ``run_dir`` has: a
    stage folder with a checkpoint, or a ``recommender/`` export next to a stage folder."""
    for script, stages in STAGED_RUNS.items():
        if any((run_dir / stage / name).is_file() for stage in stages for name in ("best.pt", "last.pt")):
            return script
    return None


def _stage_of(run_dir: Path, state: dict) -> tuple[str, str] | None:
    """(script, stage) when the best.pt ``state`` in ``run_dir`` belongs to a stage of a staged
    run: its gin config binds that script, or its identity names an earlier stage's weights."""
    from modules.training import config_bindings

    bindings = config_bindings(state.get("config") or "")
    identity = state.get("identity") or {}
    for script, stages in STAGED_RUNS.items():
        if any(k.startswith(f"{script}.") for k in bindings) or any(f"{s}_weights" in identity for s in stages):
            stage = run_dir.name if run_dir.name in stages else \
                next((s for prev, s in zip(stages, stages[1:]) if f"{prev}_weights" in identity), stages[0])
            return script, stage
    return None


def _staged_export_problem(run_dir: Path, stages: Sequence[str]) -> str | None:
    """Why ``run_dir/recommender`` is not the staged run's current recommender (None: it is).
    The export must have been made from the last stage's ``best.pt`` (:func:`checkpoint_id`), and
    each stage's ``best.pt`` must have started from the previous stage's current one (its
    identity's ``<previous>_weights`` fingerprint): a later run that started over and stopped
    before the end leaves a missing or another ``best.pt`` behind."""
    from modules.training import fingerprint

    export = run_dir / RUN_EXPORT
    if not (export / CONFIG_FILE).is_file():
        return f"no {RUN_EXPORT}/ export: the run has not finished"
    states = []
    for stage in stages:
        path = run_dir / stage / "best.pt"
        if not path.is_file():
            return (f"{path} is missing: {export} is from an earlier run, and the run in {run_dir} has not "
                    f"finished its '{stage}' stage")
        states.append(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
    made_from = json.loads((export / CONFIG_FILE).read_text(encoding="utf-8")).get("checkpoint")
    last = run_dir / stages[-1] / "best.pt"
    if made_from != checkpoint_id(states[-1]):
        return f"{export} was not made from the current {last} (an earlier run's export)"
    for prev, stage, prev_state, state in zip(stages, stages[1:], states, states[1:]):
        started = (state.get("identity") or {}).get(f"{prev}_weights")
        if started is not None and started != fingerprint(*prev_state["model"].values()):
            return (f"{run_dir / stage / 'best.pt'} did not start from the current {run_dir / prev / 'best.pt'}: "
                    f"a later run replaced the '{prev}' stage and has not finished")
    return None


__all__ = ["STAGED_RUNS", "StaleExportError", "from_run", "from_staged_run", "open_recommender", "rebuild"]
