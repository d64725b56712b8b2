"""source: pin the version of the data `prepare.source` names, so that the data is a DVC
dependency wherever it lives.

DVC can hash a file or folder inside the project, but `prepare.source` may also be a folder
inside an installed package (`pkg:`), an object store or web URL (`s3://`, `gs://`, `http(s)://`,
any fsspec URI), a path outside the project or a Hugging Face dataset (`hf:`). This stage is
marked `always_changed` in dvc.yaml: it runs on every `dvc repro`, looks at the source without
reading it as data, and writes a small manifest (`paths.source_version`, `data/source.json`):

- a local file or folder (in the project or outside it), or a `pkg:` folder: every file's
  relative path and sha256, folded into one digest (plus the package's name and version);
- a remote fsspec URI: every object's version as the store reports it (ETag, generation,
  version id, checksum), folded into one digest, without downloading the data; an object with
  no such field (a web server that sends no ETag, a store that only knows modification times)
  is read once and hashed;
- `hf:NAME`: the dataset's commit on the Hub (needs a network; recorded as unresolved offline).

prepare depends on the manifest, so DVC reruns prepare only when the data changed, and
downstream stages only when the prepared data then changed. The manifest holds no absolute path,
time or host name: the same data gives the same bytes on every machine. Hidden files and folders
(names starting with `.`) are left out, as prepare never reads them.

Run: `python -m components.source` (or `dvc repro source`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from components.config import Params
from components.data.files import atomic_write_bytes, describe
from components.data.locations import (
    RemoteWaits,
    remote_options,
    remote_problem,
    resolve_location,
    walk_local,
)
from components.stage import StageError, stage_main

# fsspec info keys that name an object's version or content (S3, GCS, Azure, HTTP, others).
# Modification times are not among them: a second's resolution misses a quick rewrite of the
# same size, so an object with only a time is hashed instead.
VERSION_KEYS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash",
                "content_md5", "Content-MD5", "Digest", "checksum", "crc32c")


def _sha256(fh) -> str:
    """sha256 of a binary stream (local or fsspec), read in chunks by `hashlib.file_digest`."""
    return hashlib.file_digest(fh, "sha256").hexdigest()


def _digest(entries: list[tuple[str, ...]]) -> str:
    """One sha256 over sorted (name, version...) rows: independent of listing order."""
    h = hashlib.sha256()
    for row in sorted(entries):
        h.update(("\0".join(row) + "\n").encode())
    return h.hexdigest()


def _hidden(parts: tuple[str, ...] | list[str]) -> bool:
    return any(p.startswith(".") for p in parts)


def local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative posix name, path) of the files prepare may read under `root` (or `root` itself
    when it is a file): `locations.walk_local`, the same walk prepare's folder reader uses."""
    if root.is_file():
        return [(root.name, root)]
    return walk_local(root).files


def local_manifest(location: str) -> dict:
    root = Path(location)
    if not root.exists():
        raise StageError(f"prepare.source: {location} does not exist (a local path is read "
                         "relative to the project folder; check the spelling or use a URI)")
    files = local_files(root)
    entries = []
    for name, path in files:
        with open(path, "rb") as fh:
            entries.append((name, _sha256(fh)))
    return {"files": len(entries), "bytes": sum(p.stat().st_size for _, p in files),
            "sha256": _digest(entries), "hashed": "content (sha256 of every file)"}


def _version_of(info: dict) -> tuple[str, list[str]]:
    keys = [k for k in VERSION_KEYS if info.get(k) not in (None, "")]
    return "|".join(f"{k}={info[k]}" for k in keys), keys


def remote_manifest(url: str, timeout_s: float) -> dict:
    import fsspec

    # Every wait bounded by timeout_s (a listing's or a read's, while no data comes) and said.
    waits = RemoteWaits(url, timeout_s, "source")
    try:
        fs, path = fsspec.core.url_to_fs(url, **remote_options(url, timeout_s))
        listing = (waits.watched(fs, "find", path, detail=True)
                   if waits.call(fs, "isdir", path) else {path: waits.call(fs, "info", path)})
    except Exception as err:  # timeouts, refused connections, auth, missing: name the URL
        where = f"prepare.source: {url}"
        message = remote_problem(where, err, timeout_s) or (
            f"{where} does not exist; check the URL (the server answered: not found)"
            if isinstance(err, FileNotFoundError) else
            f"{where}: cannot list it ({describe(err)})")
        raise StageError(message) from err
    base = PurePosixPath(path)
    entries, used, content_hashed = [], set(), 0
    for name, info in sorted(listing.items()):
        if info.get("type") == "directory":
            continue
        rel = PurePosixPath(name).relative_to(base).as_posix() if name != path else base.name
        if _hidden(PurePosixPath(rel).parts):
            continue
        version, keys = _version_of(info)
        used.update(keys)
        if not version:  # nothing tells versions apart: read it once and hash it
            try:
                with waits.open(fs, name, sequential=True) as fh:
                    version, content_hashed = f"sha256={_sha256(fh)}", content_hashed + 1
            except Exception as err:
                where = f"prepare.source: {url}"
                raise StageError(remote_problem(where, err, timeout_s) or (
                    f"{where}: cannot read {name} to hash it ({describe(err)})")) from err
        entries.append((rel, str(info.get("size")), version))
    if not entries:
        raise StageError(f"prepare.source: {url} holds no files")
    return {"files": len(entries),
            "bytes": sum(int(size) for _, size, _ in entries if size.isdigit()),
            "sha256": _digest(entries),
            "hashed": (f"object versions ({', '.join(sorted(used))})" if used else "")
            + (f"; content of {content_hashed} objects without a version field"
               if content_hashed else "")}


def hf_manifest(name: str, timeout_s: float) -> dict:
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(name, timeout=timeout_s).sha
    except Exception as err:  # offline, not installed, private: still run, but say so
        print(f"source: hf:{name}: the dataset's Hub commit is unknown ({type(err).__name__}); "
              "prepare will not rerun when the dataset changes on the Hub")
        return {"revision": None}
    return {"revision": sha}


def manifest(source: str, timeout_s: float = 60.0) -> dict:
    """What identifies the data `source` names, as JSON-ready data (no absolute paths)."""
    if not source.strip():
        raise StageError("prepare.source is empty: name a file, folder, URI, pkg: or hf: source")
    out: dict = {"source": source}
    if source.startswith("hf:"):
        return {**out, "kind": "hf", **hf_manifest(source[3:], timeout_s)}
    if source.startswith("pkg:"):
        from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

        module = source[4:].split("/", 1)[0]
        dist = (packages_distributions().get(module) or [module])[0]
        try:
            version = distribution(dist).version
        except PackageNotFoundError:
            version = None
        return {**out, "kind": "pkg", "package": dist, "version": version,
                **local_manifest(resolve_location(source))}
    if "://" in source and not source.startswith("file://"):
        return {**out, "kind": "remote", **remote_manifest(source, timeout_s)}
    return {**out, "kind": "local", **local_manifest(source.removeprefix("file://"))}


def run(params: Params) -> dict:
    timeout = getattr(params.prepare, "timeout_s", 60.0)
    record = manifest(params.prepare.source, timeout)
    atomic_write_bytes(params.paths.source_version,
                       (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    print(f"source: {record['source']}: {record.get('files', '?')} files, "
          f"sha256 {str(record.get('sha256') or record.get('revision'))[:12]}")
    return record


def main() -> None:
    stage_main("source", run)


if __name__ == "__main__":
    main()
