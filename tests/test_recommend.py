"""modules/recommender.py and recommend.py on tiny runs of the fixture: round trips (folder, run dir,
Hub push, Hub cache), recommendations equal to the evaluation's rankings, unknown ids, exclude_seen,
the command line."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_actionpiece
import train_decoder
import train_joint
import train_rqvae
from data.prepare import load_dataset
from modules.beam_search import beam_search
from modules.evaluation import ranking_metrics
from modules.recommender import GenerativeRecommender, RecordMissingError, StaleExportError, UnknownItemError
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

import recommend

REPO = Path(__file__).resolve().parents[1]
KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
SHORT = ["max_steps = 20", "eval_every = 10", "warmup_steps = 5", "precision = 'fp32'", "seed = 3"]


class StubHfApi:
    """Records what push_to_hub would send: the repo and every file of the uploaded folder."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        StubHfApi.calls.append(("create_repo", repo_id))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        StubHfApi.calls.append(("upload_folder", repo_id, files))
        return f"https://huggingface.co/{repo_id}/commit/0"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short run each of T5 (TIGER), GPT (pushed to a stub Hub), SASRec and ActionPiece (pushed)."""
    root = tmp_path_factory.mktemp("rec")
    data = write_p5_dataset(root / "data")
    base = dataset_bindings(data, root / "cache")
    run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [f"train_rqvae.out_dir = '{root / 'rq'}'"])
    out, pushed = {}, {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("huggingface_hub.hub_mixin.HfApi", StubHfApi)
        for arch, mode in (("t5", "sliding"), ("gpt", "all_positions")):
            extra = [f"train_decoder.push_to_hub = 'user/{arch}'"] if arch == "gpt" else []
            StubHfApi.calls = []
            out[arch] = run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
                f"train_decoder.tokenizer = '{root / 'rq'}'", f"train_decoder.out_dir = '{root / arch}'",
                f"train_decoder.architecture = '{arch}'", f"train_decoder.train_mode = '{mode}'",
                *[f"train_decoder.{b}" for b in SHORT], *extra])
            if extra:
                pushed[arch] = StubHfApi.calls
        out["sasrec"] = run_script(train_decoder.main, "configs/tiny/sasrec_tiny.gin", base + [
            f"train_decoder.out_dir = '{root / 'sasrec'}'", *[f"train_decoder.{b}" for b in SHORT]])
        StubHfApi.calls = []
        out["actionpiece"] = run_script(train_actionpiece.main, "configs/tiny/actionpiece_tiny.gin", base + [
            f"train_actionpiece.out_dir = '{root / 'actionpiece'}'", "train_actionpiece.push_to_hub = 'user/ap'",
            *[f"train_actionpiece.{b}" for b in SHORT]])
        pushed["actionpiece"] = StubHfApi.calls
    dataset = load_dataset(source="p5", path=str(data), items=str(data / "items.item"), min_count=1,
                           cache_dir=str(root / "cache"), verbose=False)
    return root, out, pushed, dataset


def histories_of(dataset, split="test"):
    ex = dataset.eval_examples(split)
    raw = dataset.items["raw_id"].to_list()
    return ex, [[raw[i] for i in row if i >= 0] for row in ex.history]


def ranked(recs, width=10):
    out = np.full((len(recs), width), -1, dtype=np.int64)
    for u, r in enumerate(recs):
        out[u, : len(r.item_ids)] = r.item_ids[:width]
    return out


@pytest.mark.parametrize("arch", ["t5", "gpt", "sasrec", "actionpiece"])
def test_save_load_round_trip(runs, arch, tmp_path):
    root, _, _, dataset = runs
    ex, histories = histories_of(dataset)
    rec = GenerativeRecommender.from_pretrained(root / arch, device="cpu")
    assert rec.config.get("checkpoint")  # the run's export, made from its best.pt
    before = rec.recommend(histories[:40], k=10, users=ex.user[:40])
    rec.save_pretrained(tmp_path / "saved")
    assert folder_files(tmp_path / "saved") == folder_files(root / arch / "recommender")
    again = GenerativeRecommender.from_pretrained(tmp_path / "saved", device="cpu")
    after = again.recommend(histories[:40], k=10, users=ex.user[:40])
    assert [r.to_dict() for r in after] == [r.to_dict() for r in before]
    assert all(len(r.items) == 10 for r in before) or arch == "actionpiece"
    # A run dir without the export (e.g. a run from before it existed): rebuilt from best.pt + gin config.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("best.pt", "result.json"):
        shutil.copy(root / arch / name, bare / name)
    if arch == "actionpiece":  # the vocabulary it learned lives in the run dir, which best.pt names
        shutil.copytree(root / arch / "tokenizer", bare / "tokenizer")
    rebuilt = GenerativeRecommender.from_pretrained(bare, device="cpu")
    assert rebuilt.config["run"]["test"] == rec.config["run"]["test"]
    assert [r.to_dict() for r in rebuilt.recommend(histories[:40], k=10, users=ex.user[:40])] == \
        [r.to_dict() for r in before]


@pytest.mark.parametrize("arch", ["t5", "gpt", "sasrec", "actionpiece"])
def test_recommend_equals_evaluation(runs, arch):
    """recommend on every test user's history scores exactly what the run reported as its test
    metrics (ActionPiece: the lenient ranking, tuples that are no item dropped)."""
    root, results, _, dataset = runs
    ex, histories = histories_of(dataset)
    rec = GenerativeRecommender.from_pretrained(root / arch, device="cpu")
    recs = rec.recommend(histories, k=10, users=ex.user)
    got = ranking_metrics(ranked(recs), ex.target)
    reported = results[arch]["test_lenient" if arch == "actionpiece" else "test"]
    assert {k: got[k] for k in KEYS} == pytest.approx(reported, abs=1e-12)
    assert all(0 <= i < dataset.num_items for r in recs for i in r.item_ids)
    if arch in ("t5", "gpt"):  # the evaluator's own beam search, item for item and score for score
        model = rec.model
        user = torch.as_tensor(ex.user) if rec.layout.num_user_buckets else None
        ids, mask = rec.layout.encode_history(torch.as_tensor(ex.history), rec.item_codes, user)
        out = beam_search(model, ids, mask, rec.trie, rec.layout, beam_size=rec.config["beam_size"], top_k=10)
        assert np.array_equal(ranked(recs), out.items.numpy())
        assert np.allclose([r.scores for r in recs], out.scores.numpy(), atol=0)


@pytest.mark.parametrize("arch", ["t5", "sasrec", "actionpiece"])
def test_exclude_seen_and_unknown_ids(runs, arch):
    root, _, _, dataset = runs
    ex, histories = histories_of(dataset)
    rec = GenerativeRecommender.from_pretrained(root / arch, device="cpu")
    recs = rec.recommend(histories, k=10, exclude_seen=True)
    assert all(not set(r.items) & set(h) for r, h in zip(recs, histories))
    assert all(len(r.items) == 10 for r in recs) or arch == "actionpiece"
    assert all(r.titles == [rec.titles[i] for i in r.item_ids] and r.titles[0].endswith(f"no. {int(r.items[0]) - 1}")
               for r in recs if r.items)
    with pytest.raises(UnknownItemError, match=r"user 1: 'nope', 'B0GUS'"):
        rec.recommend([histories[0], ["nope", histories[1][0], "B0GUS"]], k=5)
    skipped = rec.recommend([["nope", *histories[2]]], k=5, on_unknown="skip")
    assert [r.to_dict() for r in skipped] == [r.to_dict() for r in rec.recommend([histories[2]], k=5)]
    with pytest.raises(ValueError, match="history of user 0 is empty"):
        rec.recommend([["nope"]], on_unknown="skip")


@pytest.mark.parametrize("arch", ["gpt", "actionpiece"])
def test_push_sends_what_save_pretrained_writes(runs, arch, tmp_path, monkeypatch):
    root, _, pushed, _ = runs
    repo = {"gpt": "user/gpt", "actionpiece": "user/ap"}[arch]
    # the train script's push: the run's export, file for file
    assert pushed[arch][0] == ("create_repo", repo) and pushed[arch][1][:2] == ("upload_folder", repo)
    assert pushed[arch][1][2] == folder_files(root / arch / "recommender")
    # push_to_hub of a loaded recommender: what its save_pretrained writes
    rec = GenerativeRecommender.from_pretrained(root / arch, device="cpu")
    StubHfApi.calls = []
    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", StubHfApi)
    rec.push_to_hub("someone/else")
    rec.save_pretrained(tmp_path / "saved")
    assert [c[:2] for c in StubHfApi.calls] == [("create_repo", "someone/else"), ("upload_folder", "someone/else")]
    files = StubHfApi.calls[1][2]
    assert files == folder_files(tmp_path / "saved")
    assert {"config.json", "model.safetensors", "items.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    script = {"gpt": "train_decoder", "actionpiece": "train_actionpiece"}[arch]
    assert "How it was made" in card and f"{script}.max_steps = 20" in card  # the command and gin config
    assert "ndcg@10" in card and "from_pretrained" in card and "p5-data" in card


def bare_run(src: Path, dest: Path, edit=None) -> Path:
    """``dest``: a run folder holding a copy of ``src``'s best.pt (``edit`` applied to it) and
    result.json, without the export, so that from_pretrained rebuilds it from best.pt."""
    dest.mkdir()
    state = torch.load(src / "best.pt", weights_only=False)
    if edit is not None:
        edit(state)
    torch.save(state, dest / "best.pt")
    shutil.copy(src / "result.json", dest / "result.json")
    return dest


@pytest.mark.parametrize("arch", ["t5", "actionpiece"])
def test_checkpoint_record_is_all_a_rebuild_reads(runs, arch, tmp_path, monkeypatch):
    """best.pt carries the recommender record (model config, tokenizer reference, decoding
    settings, item table); the export's config.json is the same config plus the run; a run
    folder without the export is rebuilt from best.pt alone (the dataset is not read)."""
    root, _, _, dataset = runs
    ex, histories = histories_of(dataset)
    record = torch.load(root / arch / "best.pt", weights_only=False)["recommender"]
    exported = json.loads((root / arch / "recommender" / "config.json").read_text())
    assert {k: v for k, v in exported.items() if k not in ("format_version", "run", "checkpoint")} == \
        json.loads(json.dumps(record["config"]))
    assert record["config"]["tokenizer"]["kind"] == {"t5": "semantic_ids", "actionpiece": "actionpiece"}[arch]
    assert record["config"]["batch_size"] == {"t5": 256, "actionpiece": 64}[arch]  # the runs' eval_batch_size
    assert record["items"]["raw_id"] == dataset.items["raw_id"].to_list()

    def no_dataset(*args, **kwargs):
        raise AssertionError("a rebuild read the dataset")

    monkeypatch.setattr("data.prepare.load_dataset", no_dataset)
    rebuilt = GenerativeRecommender.from_pretrained(bare_run(root / arch, tmp_path / "bare"), device="cpu")
    served = GenerativeRecommender.from_pretrained(root / arch, device="cpu")
    assert [r.to_dict() for r in rebuilt.recommend(histories[:30], k=10, users=ex.user[:30])] == \
        [r.to_dict() for r in served.recommend(histories[:30], k=10, users=ex.user[:30])]
    # An export written before config.json held the tokenizer reference (same format_version 1)
    # loads as it is: a folder is served with its own tokenizer/.
    earlier = tmp_path / "earlier"
    shutil.copytree(root / arch / "recommender", earlier)
    config = json.loads((earlier / "config.json").read_text())
    del config["tokenizer"]
    (earlier / "config.json").write_text(json.dumps(config))
    assert [r.to_dict() for r in GenerativeRecommender.from_pretrained(earlier, device="cpu").recommend(
        histories[:30], k=10, users=ex.user[:30])] == [r.to_dict() for r in rebuilt.recommend(
            histories[:30], k=10, users=ex.user[:30])]


def test_checkpoint_without_record_says_what_is_missing_and_how_to_get_it(runs, tmp_path, capsys):
    """A best.pt from before checkpoints carried the record (only the gin config and the layout),
    one whose record lacks a decoding setting, and one whose tokenizer was replaced since: each a
    clear error naming the folder, never a recommender built on guessed settings."""
    root, _, _, dataset = runs
    _, histories = histories_of(dataset)

    def old(state):
        record = state.pop("recommender")
        state.update(layout=record["config"]["layout"], architecture="t5")

    folder = bare_run(root / "t5", tmp_path / "old", old)
    with pytest.raises(RecordMissingError, match=re.escape(f"{folder}: best.pt has no recommender record") +
                       r".*earlier version of train_decoder\.py.*run the run's command again with the current code "
                       + re.escape(f"and out_dir = '{folder}'") + r".*or retrain it"):
        GenerativeRecommender.from_pretrained(folder, device="cpu")
    assert recommend.main([str(folder), "--history", *histories[0], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no recommender record" in err and "Traceback" not in err
    incomplete = bare_run(root / "t5", tmp_path / "incomplete", lambda s: s["recommender"]["config"].pop("beam_size"))
    with pytest.raises(RecordMissingError, match=r"incomplete recommender record \(missing beam_size\)"):
        GenerativeRecommender.from_pretrained(incomplete, device="cpu")

    def replaced(state):
        state["recommender"]["config"]["tokenizer"]["fingerprint"] = "0" * 16

    with pytest.raises(ValueError, match="is not the one the run used"):
        GenerativeRecommender.from_pretrained(bare_run(root / "t5", tmp_path / "replaced", replaced), device="cpu")


def test_hub_cache_and_command_line(runs, tmp_path, capsys):
    """from_pretrained('user/gpt') offline from a Hub cache laid out as huggingface_hub lays it out,
    through recommend.py in a subprocess (--users, --json); the table on a run dir via main(argv)."""
    root, _, pushed, dataset = runs
    ex, histories = histories_of(dataset)
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--user--gpt"
    for name, data in pushed["gpt"][1][2].items():
        (repo / "snapshots" / rev / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / rev / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    users = tmp_path / "users.jsonl"
    users.write_text("\n".join(json.dumps({"history": h, "user": int(u)}) for h, u in zip(histories[:5], ex.user)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "recommend.py", "user/gpt", "--users", str(users), "--json", "-k", "5",
                           "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    rec = GenerativeRecommender.from_pretrained(root / "gpt", device="cpu")
    expected = rec.recommend(histories[:5], k=5, users=ex.user[:5])
    assert lines == [r.to_dict() for r in expected]
    assert set(lines[0]) == {"items", "scores", "titles"}

    assert recommend.main([str(root / "gpt"), "--history", *histories[0], "-k", "3", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for item, title in zip(expected[0].items[:3], expected[0].titles[:3]):
        assert item in table and title in table
    assert recommend.main([str(root / "gpt"), "--history", "nope", "--device", "cpu"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_serving_doc_example_runs(runs, tmp_path):
    """The Python example of docs/10-serving-hub.md (serving a trained model; it was the README's
    "Use a trained model" section), on the tiny GPT run and the fixture's ids."""
    root, _, _, dataset = runs
    section = (REPO / "docs" / "10-serving-hub.md").read_text()
    code = section[section.index("```python\n") + 10: section.index("```\n", section.index("```python"))]
    raw = dataset.items["raw_id"].to_list()
    for beauty, fixture in zip(["B004756YJA", "B004ZT0SSG", "B0020YLEYK"], raw[:3]):
        assert beauty in code
        code = code.replace(beauty, fixture)
    code = code.replace("runs/beauty/gpt_e3", str(root / "gpt")).replace("exported/gpt_e3", str(tmp_path / "exp"))
    exec(compile(code, "docs/10-serving-hub.md", "exec"), {})
    assert (tmp_path / "exp" / "model.safetensors").is_file()
    assert "python recommend.py runs/beauty/gpt_e3 --history" in section


def test_train_joint_run_and_its_stages(runs, tmp_path, capsys):
    """A train_joint.py (ETEGRec) out_dir holds one folder per stage and the export of the
    finished run. The fine-tuning stage's folder serves that export (it used to fail with a bare
    TypeError); the first stage, a stage out of its run, and a run whose export belongs to an
    earlier run in the same out_dir (started over, stopped) each get a StaleExportError saying
    why (the latter used to be served the old export silently)."""
    root, _, _, dataset = runs
    out = tmp_path / "joint"
    base = dataset_bindings(root / "data", root / "cache")

    def joint(*extra):  # validations at joint steps 20 and 40, fine-tuning steps 5 and 10
        return run_script(train_joint.main, "configs/tiny/joint_tiny.gin", base + [
            f"train_joint.tokenizer = '{root / 'rq'}'", f"train_joint.out_dir = '{out}'", "train_joint.max_steps = 40",
            "train_joint.finetune_steps = 10", "train_joint.finetune_eval_every = 5", "train_joint.eval_users = 60",
            "train_joint.precision = 'fp32'", *extra])

    joint()
    ex, histories = histories_of(dataset)
    rec = GenerativeRecommender.from_pretrained(out, device="cpu")
    want = [r.to_dict() for r in rec.recommend(histories[:20], k=10, users=ex.user[:20])]
    stage = GenerativeRecommender.from_pretrained(out / "finetune", device="cpu")
    assert stage.config["checkpoint"] == rec.config["checkpoint"]
    assert [r.to_dict() for r in stage.recommend(histories[:20], k=10, users=ex.user[:20])] == want
    assert recommend.main([str(out / "finetune"), "--history", *histories[0], "--device", "cpu"]) == 0
    capsys.readouterr()
    with pytest.raises(StaleExportError, match="'joint' stage of a train_joint.py run.*its last stage, 'finetune'"):
        GenerativeRecommender.from_pretrained(out / "joint", device="cpu")
    shutil.copytree(out / "finetune", tmp_path / "copied")
    with pytest.raises(StaleExportError, match="not in its run's out_dir"):
        GenerativeRecommender.from_pretrained(tmp_path / "copied", device="cpu")
    unfinished = tmp_path / "unfinished"  # a later run that stopped before its fine-tuning validated
    shutil.copytree(out, unfinished)
    (unfinished / "finetune" / "best.pt").unlink()
    with pytest.raises(StaleExportError, match=r"finetune/best.pt is missing.*has not finished its 'finetune' stage"):
        GenerativeRecommender.from_pretrained(unfinished, device="cpu")

    # A later run in the same out_dir: started over (another seed), stopped after its first
    # validation in stage 1. Its joint/best.pt is new; finetune/best.pt and the export are the old run's.
    part = joint("train_joint.resume = False", "train_joint.seed = 7", "train_joint.stop_after_steps = 25")
    assert part["stage"] == "joint" and (out / "joint" / "best.pt").is_file()
    for path in (out, out / "finetune"):
        with pytest.raises(StaleExportError, match="a later run replaced the 'joint' stage and has not finished"):
            GenerativeRecommender.from_pretrained(path, device="cpu")
    assert recommend.main([str(out), "--history", *histories[0], "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Finish the run" in err and "Traceback" not in err
    old = GenerativeRecommender.from_pretrained(out / "recommender", device="cpu")  # on purpose: the old export
    assert [r.to_dict() for r in old.recommend(histories[:20], k=10, users=ex.user[:20])] == want
