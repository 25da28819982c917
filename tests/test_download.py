import contextlib
import gzip
import hashlib
import json
import random
import socket
import zipfile
from pathlib import Path

import pytest

from data import download
from data.download import DownloadError, fetch, sha256_file, verify_sha256
from tests.http_server import serve


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def files(tmp_path) -> dict[str, bytes]:
    """Real-format files to serve: a gzip of JSON lines (reviews-like) and a zip archive."""
    root = tmp_path / "srv"
    root.mkdir()
    rng = random.Random(0)
    lines = [json.dumps({"user_id": f"u{rng.randrange(500)}", "item_id": f"B{rng.randrange(10**9):09d}",
                         "rating": rng.randint(1, 5), "text": "".join(rng.choices("abcde fgh", k=80))})
             for _ in range(3000)]
    (root / "reviews.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    with zipfile.ZipFile(root / "meta.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.jsonl", "\n".join(lines[:500]))
        z.writestr("README.txt", "sidrec test fixture\n")
    out = {p.name: p.read_bytes() for p in root.iterdir()}
    assert len(out["reviews.jsonl.gz"]) > 50_000  # big enough for multi-chunk, multi-cut transfers
    return out


@pytest.fixture
def server(tmp_path, files):
    """Factory: server(**faults) -> base URL of a local server over the fixture files."""
    with contextlib.ExitStack() as stack:
        yield lambda **faults: stack.enter_context(serve(tmp_path / "srv", **faults))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name))


def test_success_verified_no_part(server, files, tmp_path):
    url = server()
    dest = tmp_path / "out" / "reviews.jsonl.gz"
    data = files["reviews.jsonl.gz"]
    got = fetch(url + "reviews.jsonl.gz", dest, sha256=sha(data), size=len(data), chunk_size=4096)
    assert got == dest and dest.read_bytes() == data
    assert leftovers(dest) == ["reviews.jsonl.gz"]
    assert gzip.decompress(dest.read_bytes()).count(b"\n") == 3000
    assert url.requests[0].range is None and url.requests[0].user_agent == download.USER_AGENT


def test_zip_roundtrip_without_checksum(server, files, tmp_path):
    url = server()
    dest = fetch(url + "meta.zip", tmp_path / "meta.zip", progress=False)
    with zipfile.ZipFile(dest) as z:
        assert z.testzip() is None and z.read("README.txt") == b"sidrec test fixture\n"


def test_second_call_does_not_hit_network(server, files, tmp_path):
    url = server()
    dest = tmp_path / "reviews.jsonl.gz"
    digest = sha(files["reviews.jsonl.gz"])
    fetch(url + "reviews.jsonl.gz", dest, sha256=digest)
    assert url.count("reviews.jsonl.gz") == 1
    fetch(url + "reviews.jsonl.gz", dest, sha256=digest)
    fetch(url + "reviews.jsonl.gz", dest)
    assert url.count("reviews.jsonl.gz") == 1


def test_existing_dest_with_wrong_sha256_is_redownloaded(server, files, tmp_path):
    url = server()
    dest = tmp_path / "reviews.jsonl.gz"
    dest.write_bytes(b"stale")
    data = files["reviews.jsonl.gz"]
    fetch(url + "reviews.jsonl.gz", dest, sha256=sha(data))
    assert dest.read_bytes() == data and url.count("reviews.jsonl.gz") == 1


@pytest.mark.parametrize("reset", [False, True], ids=["close", "tcp-reset"])
def test_truncated_once_resumes_with_range(server, files, tmp_path, reset):
    url = server(truncate={"reviews.jsonl.gz": (20_000, 1)}, truncate_reset=reset)
    dest = tmp_path / "reviews.jsonl.gz"
    data = files["reviews.jsonl.gz"]
    fetch(url + "reviews.jsonl.gz", dest, sha256=sha(data), chunk_size=4096)
    assert dest.read_bytes() == data and leftovers(dest) == ["reviews.jsonl.gz"]
    reqs = url.for_path("reviews.jsonl.gz")
    assert len(reqs) == 2 and reqs[0].range is None
    if not reset:  # a FIN delivers all 20000 bytes; an RST may discard some of them in flight
        assert reqs[1].range == "bytes=20000-" and reqs[1].status == 206


def test_truncated_several_times_resumes_each_time(server, files, tmp_path):
    url = server(truncate={"reviews.jsonl.gz": (10_000, 3)})
    dest = tmp_path / "reviews.jsonl.gz"
    data = files["reviews.jsonl.gz"]
    fetch(url + "reviews.jsonl.gz", dest, sha256=sha(data), retries=3)
    assert dest.read_bytes() == data
    assert [r.range for r in url.requests] == [None, "bytes=10000-", "bytes=20000-", "bytes=30000-"]


def test_truncated_every_time_raises_keeps_part_and_rerun_resumes(server, files, tmp_path):
    data = files["reviews.jsonl.gz"]
    dest = tmp_path / "reviews.jsonl.gz"
    url = server(truncate={"reviews.jsonl.gz": 1000})
    with pytest.raises(DownloadError, match=rf"got 3000 of {len(data)} bytes.*re-running"):
        fetch(url + "reviews.jsonl.gz", dest, sha256=sha(data), retries=2)
    assert not dest.exists() and leftovers(dest) == ["reviews.jsonl.gz.part"]
    assert url.count("reviews.jsonl.gz") == 3

    healthy = server()
    fetch(healthy + "reviews.jsonl.gz", dest, sha256=sha(data))
    assert dest.read_bytes() == data and leftovers(dest) == ["reviews.jsonl.gz"]
    assert [r.range for r in healthy.requests] == ["bytes=3000-"]


def test_checksum_mismatch(server, files, tmp_path):
    url = server(corrupt={"meta.zip"})
    dest = tmp_path / "meta.zip"
    with pytest.raises(DownloadError, match="sha256") as e:
        fetch(url + "meta.zip", dest, sha256=sha(files["meta.zip"]))
    assert url + "meta.zip" in str(e.value) and sha(files["meta.zip"]) in str(e.value)
    assert leftovers(dest) == []


def test_size_mismatch(server, files, tmp_path):
    url = server()
    dest = tmp_path / "meta.zip"
    with pytest.raises(DownloadError, match="size"):
        fetch(url + "meta.zip", dest, size=len(files["meta.zip"]) + 1)
    assert leftovers(dest) == []


def test_404(server, tmp_path):
    url = server()
    dest = tmp_path / "missing.gz"
    with pytest.raises(DownloadError, match="404") as e:
        fetch(url + "missing.gz", dest)
    assert url + "missing.gz" in str(e.value)
    assert leftovers(dest) == [] and url.count("missing.gz") == 1


def test_connection_refused(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "x.gz"
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}"):
        fetch(f"http://127.0.0.1:{port}/x.gz", dest, retries=1, timeout=5)
    assert leftovers(dest) == []


def test_stale_oversized_part_is_restarted(server, files, tmp_path):
    url = server()
    dest = tmp_path / "meta.zip"
    data = files["meta.zip"]
    Path(str(dest) + ".part").write_bytes(b"\0" * (len(data) + 10))  # server answers 416
    fetch(url + "meta.zip", dest, sha256=sha(data))
    assert dest.read_bytes() == data and [r.status for r in url.requests] == [416, 200]


def test_verify_helpers(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a": 1}\n')
    assert sha256_file(p) == sha(b'{"a": 1}\n')
    verify_sha256(p, sha(b'{"a": 1}\n').upper())
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        verify_sha256(p, sha(b"other"))
