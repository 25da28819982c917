"""Streamed, resumable, verified, atomic HTTP downloads (stdlib urllib + tqdm).

`fetch(url, dest)` writes into `dest.part` beside `dest`, resumes an existing `.part` with an HTTP
Range request, retries transfers that end early, checks size/sha256, and only then renames the
`.part` onto `dest`. So `dest` either does not exist or is complete (and verified when a checksum
was given). Two processes fetching the same `dest` at once are not supported.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

USER_AGENT = "sidrec-download/1.0 (+python-urllib)"
# Seconds to wait before retry k (k * RETRY_BACKOFF_S); tests set it to 0.
RETRY_BACKOFF_S = 0.5
# Errors after which the same request is worth resuming: the server or network dropped us mid-way.
_TRANSIENT = (http.client.IncompleteRead, ConnectionError, TimeoutError)


class DownloadError(RuntimeError):
    """A download failed or its result did not match the expected size/checksum."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise DownloadError unless the file's sha256 equals `expected` (hex, any case)."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise DownloadError(f"{path}: sha256 mismatch: expected {expected.lower()}, got {actual}")


def _is_valid(path: Path, sha256: str | None, size: int | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or sha256_file(path) == sha256.lower()


def _transfer(url: str, part: Path, *, progress: bool, timeout: float,
              chunk_size: int) -> tuple[int | None, Exception | None]:
    """One request appending to (or restarting) `part`. Returns the full size the server
    announced (None without Content-Length) and the error that cut the body short, if any."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
            if m is None or int(m[1]) != offset:
                # A range we did not ask for: appending it would corrupt the file, so start over.
                part.unlink()
                raise ConnectionResetError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m[2]) if m[2] != "*" else (offset + int(length) if length else None)
        else:  # 200: the server ignored Range (or there was none), so the body is the whole file
            offset = 0
            total = int(length) if length else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], disable=None if progress else True,
        ) as bar:
            error = None
            try:
                while chunk := resp.read(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
            except _TRANSIENT as e:  # keep what arrived; the caller resumes from there
                error = e
            f.flush()
            os.fsync(f.fileno())
    return total, error


def fetch(url: str, dest: str | Path, *, sha256: str | None = None, size: int | None = None,
          progress: bool = True, retries: int = 3, timeout: float = 60.0,
          chunk_size: int = 1 << 20) -> Path:
    """Download `url` to `dest` and return `dest`.

    An existing `dest` matching the given size/sha256 (if any) is returned without network
    access; one that does not match is deleted and downloaded again. Transfers that end early
    are resumed with a Range request up to `retries` times; if the file is still incomplete a
    DownloadError is raised and `dest.part` is kept so that calling again resumes. A size or
    sha256 mismatch after the transfer deletes the `.part` and raises DownloadError.
    """
    dest = Path(dest)
    if dest.exists():
        if _is_valid(dest, sha256, size):
            return dest
        dest.unlink()  # a stale/corrupt file must not survive a failed re-download
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and size is not None and part.stat().st_size > size:
        part.unlink()

    got, expected, problem = 0, size, None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * attempt)
        try:
            total, error = _transfer(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
        except urllib.error.HTTPError as e:
            if e.code == 416 and part.exists():  # .part is as long as the file or longer: start over
                part.unlink()
                problem = "HTTP 416 for the resumed range"
                continue
            if e.code in (404, 410):
                part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            raise DownloadError(f"{url}: cannot connect: {e.reason}") from e
        except _TRANSIENT as e:  # dropped before the response headers arrived
            total, error = None, e
        except http.client.HTTPException as e:  # malformed response: retrying will not fix it
            raise DownloadError(f"{url}: bad HTTP response: {type(e).__name__}: {e}") from e
        got = part.stat().st_size if part.exists() else 0
        expected = total if total is not None else expected  # the server's word, else size
        problem = f"{type(error).__name__}: {error}" if error else "connection closed early"
        if (got >= expected) if expected is not None else (error is None):
            break
    else:
        raise DownloadError(
            f"{url}: incomplete download after {retries + 1} attempts: got {got} of "
            f"{expected if expected is not None else 'unknown'} bytes ({problem}); "
            f"the partial file {part} is kept, re-running fetch() resumes it"
        )

    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url}: size mismatch: expected {size} bytes, got {got}")
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256.lower():
            part.unlink()
            raise DownloadError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {actual}")
    os.replace(part, dest)  # .part was fsynced by _transfer; the rename is atomic on one filesystem
    return dest
