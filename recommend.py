"""Recommend with a trained model: a train run's out_dir, a saved recommender folder or a Hub id.

    python recommend.py runs/beauty/gpt_e3 --history B004756YJA B004ZT0SSG B0020YLEYK
    python recommend.py user/repo --users histories.jsonl --json

``--users FILE``: JSON lines, one user each: a list of raw item ids (oldest first), or an object
``{"history": [...], "user": <dense user id, optional>}``. Prints a table per user on a terminal;
``--json``: one JSON object per user (``items``: raw item ids best first, ``scores``, ``titles``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from modules.recommender import GenerativeRecommender, UnknownItemError


def read_users(path: str) -> tuple[list[list[str]], list[int] | None]:
    histories, users = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if isinstance(obj, dict):
            if "history" not in obj:
                raise SystemExit(f"{path}:{n}: field 'history' missing")
            history, user = obj["history"], obj.get("user")
        else:
            history, user = obj, None
        if not isinstance(history, list):
            raise SystemExit(f"{path}:{n}: a history must be a list of raw item ids")
        histories.append([str(i) for i in history])
        users.append(user)
    if any(u is not None for u in users):
        if any(u is None for u in users):
            raise SystemExit(f"{path}: give field 'user' on every line or on none")
        return histories, [int(u) for u in users]
    return histories, None


def clip(text: str | None, width: int) -> str:
    text = "(no title)" if text is None else " ".join(str(text).split())
    return text if len(text) <= width else text[: max(1, width - 3)] + "..."


def print_table(rec: GenerativeRecommender, histories, results, out=None) -> None:
    out = out or sys.stdout
    width = shutil.get_terminal_size((100, 20)).columns
    id_w = max([len("item")] + [len(i) for r in results for i in r.items])
    title_w = max(20, width - id_w - 20)
    for u, (history, r) in enumerate(zip(histories, results)):
        print(f"user {u}: {len(history)} items in the history, last: "
              f"{clip(rec.titles[rec.index[history[-1]]] if history and history[-1] in rec.index else None, title_w)}",
              file=out)
        print(f"  {'rank':>4}  {'item':<{id_w}}  {'score':>8}  title", file=out)
        for rank, (item, score, title) in enumerate(zip(r.items, r.scores, r.titles), 1):
            print(f"  {rank:>4}  {item:<{id_w}}  {score:>8.3f}  {clip(title, title_w)}", file=out)
        print(file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="train run out_dir, recommender folder (save_pretrained) or Hub repo id")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--history", nargs="+", metavar="ID", help="one user's raw item ids, oldest first")
    src.add_argument("--users", metavar="FILE", help="JSON lines of histories (see above)")
    ap.add_argument("-k", "--k", type=int, default=10, help="items per user (default 10)")
    ap.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    ap.add_argument("--skip-unknown", action="store_true", help="ignore unknown item ids instead of failing")
    ap.add_argument("--beam-size", type=int, default=None, help="beams per search (default: the run's)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--json", action="store_true", help="one JSON object per user instead of a table")
    args = ap.parse_args(argv)

    histories, users = ([args.history], None) if args.history else read_users(args.users)
    # e.g. no such folder, a train run whose export belongs to an earlier run (StaleExportError), or a
    # best.pt written before checkpoints carried their recommender record (RecordMissingError)
    try:
        rec = GenerativeRecommender.from_pretrained(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = rec.recommend(histories, k=args.k, exclude_seen=args.exclude_seen, users=users,
                                on_unknown="skip" if args.skip_unknown else "raise", beam_size=args.beam_size)
    except (UnknownItemError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print_table(rec, histories, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
