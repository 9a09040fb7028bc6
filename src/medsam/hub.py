"""Official weights by name: a registry of download locations, a checked cache, resumable
downloads and an offline mode.

``medsam.load_model("sam2.1_hiera_tiny")`` (or ``--checkpoint sam2.1_hiera_tiny``) finds the file
in the cache or downloads it. Files go to ``$MEDSAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/medsam/models``, else ``~/.cache/medsam/models``.

Checksums: an entry carries the SHA-256 its publisher's file has where that is published and
agreed on by independent sources; a file that does not match is refused and deleted. Where no
checksum is known, the first complete download's SHA-256 is pinned next to the file
(``NAME.sha256``) and every later use or download must match it.

Downloads go to ``FILE.part`` and continue from where they stopped (an HTTP Range request) when
run again; the file appears under its name only once complete and checked. ``offline=True`` or
``MEDSAM_OFFLINE=1`` only looks in the cache. ``MEDSAM_MODELS_MIRROR=URL`` fetches every file as
``URL/FILENAME`` instead (an institutional mirror).

Python's own HTTP client is used: pooch (the field's downloader) does not resume partial
downloads or pin unknown checksums, and huggingface_hub serves only part of the registry.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .io.checksum import sha256_file

CHUNK = 1 << 20


class HubError(ValueError):
    """A named model that cannot be had: unknown, offline and not cached, a failed download,
    or a file whose checksum does not match; the message says which and what to do."""


@dataclass(frozen=True)
class RegistryEntry:
    """One published checkpoint. ``url`` None: the publisher offers no direct link (the file
    is put into the cache by hand, see ``page``). ``arch``: the architecture name to load it
    with where its tensors do not say (:func:`medsam.load_model`)."""

    name: str
    filename: str
    url: str | None
    family: str
    page: str
    sha256: str | None = None
    arch: str | None = None


_FB = "https://dl.fbaipublicfiles.com"
_SAM_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
_SAM2_PAGE = "https://github.com/facebookresearch/sam2#model-description"

REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            "sam_vit_b",
            "sam_vit_b_01ec64.pth",
            f"{_FB}/segment_anything/sam_vit_b_01ec64.pth",
            "SAM",
            _SAM_PAGE,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        ),
        RegistryEntry(
            "sam_vit_l",
            "sam_vit_l_0b3195.pth",
            f"{_FB}/segment_anything/sam_vit_l_0b3195.pth",
            "SAM",
            _SAM_PAGE,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        ),
        RegistryEntry(
            "sam_vit_h",
            "sam_vit_h_4b8939.pth",
            f"{_FB}/segment_anything/sam_vit_h_4b8939.pth",
            "SAM",
            _SAM_PAGE,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        ),
        RegistryEntry(
            "medsam_vit_b",
            "medsam_vit_b.pth",
            None,
            "MedSAM",
            "https://github.com/bowang-lab/MedSAM#model-training (Google Drive folder)",
        ),
        RegistryEntry(
            "lite_medsam",
            "lite_medsam.pth",
            None,
            "LiteMedSAM",
            "https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM (Google Drive folder)",
        ),
        *(
            RegistryEntry(
                f"sam2.1_hiera_{size}",
                f"sam2.1_hiera_{size}.pt",
                f"{_FB}/segment_anything_2/092824/sam2.1_hiera_{size}.pt",
                "SAM2.1",
                _SAM2_PAGE,
            )
            for size in ("tiny", "small", "base_plus", "large")
        ),
        *(
            RegistryEntry(
                f"sam2_hiera_{size}",
                f"sam2_hiera_{size}.pt",
                f"{_FB}/segment_anything_2/072824/sam2_hiera_{size}.pt",
                "SAM2",
                _SAM2_PAGE,
            )
            for size in ("tiny", "small", "base_plus", "large")
        ),
        RegistryEntry(
            "MedSAM2_latest",
            "MedSAM2_latest.pt",
            "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
            "MedSAM2",
            "https://huggingface.co/wanglab/MedSAM2",
            arch="medsam2",
        ),
        RegistryEntry(
            "sam_med3d_turbo",
            "sam_med3d_turbo.pth",
            "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
            "SAM-Med3D",
            "https://github.com/uni-medical/SAM-Med3D",
        ),
    )
}


def cache_dir() -> Path:
    """Where named models are kept (see the module docstring)."""
    explicit = os.environ.get("MEDSAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medsam" / "models"


def is_offline() -> bool:
    return os.environ.get("MEDSAM_OFFLINE", "") not in ("", "0")


def entry(name: str) -> RegistryEntry:
    """The registry entry of ``name``; :class:`HubError` naming the known ones otherwise."""
    if name not in REGISTRY:
        raise HubError(f"unknown model name {name!r}; known: {', '.join(REGISTRY)} (or give a file path)")
    return REGISTRY[name]


def sha256_of(path: Path) -> str:
    return sha256_file(path)


def expected_sha256(item: RegistryEntry, folder: Path) -> str | None:
    """The registry's checksum, else the one pinned at the first download, else None."""
    if item.sha256:
        return item.sha256
    pin = folder / f"{item.name}.sha256"
    return pin.read_text().split()[0] if pin.is_file() else None


def cached_path(name: str) -> Path | None:
    """The cached, checked file of ``name``, or None when it is not in the cache. A cached file
    that fails its checksum is refused (:class:`HubError`), not silently replaced.

    The file is hashed once: a passed check leaves ``NAME.verified`` beside it with the checksum
    and the file's size, modification and change times and inode, and while they all still match
    the file is not read again. Any write to the file changes its change time, which no tool can
    set back.
    """
    item = entry(name)
    folder = cache_dir()
    path = folder / item.filename
    if not path.is_file():
        return None
    want = expected_sha256(item, folder)
    if want is not None and _verified(item, folder, path, want):
        return path
    digest = sha256_of(path)
    if want is not None and digest != want:
        raise HubError(
            f"{path}: its SHA-256 does not match {item.name}'s ({want[:12]}...): delete it and fetch it again"
        )
    if want is None:  # put there by hand: pin it now
        _pin(item, folder, digest)
    _stamp_verified(item, folder, path, digest)
    return path


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _stamp(item: RegistryEntry, path: Path, digest: str) -> dict[str, object]:
    """The ``NAME.verified`` record of ``path`` checked against ``digest``."""
    return {"sha256": digest, "file": item.filename, "stat": _file_stamp(path)}


def _verified(item: RegistryEntry, folder: Path, path: Path, want: str) -> bool:
    """Whether ``path`` passed its check against ``want`` and has not changed since."""
    try:
        stamp = json.loads((folder / f"{item.name}.verified").read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp == _stamp(item, path, want))


def _stamp_verified(item: RegistryEntry, folder: Path, path: Path, digest: str) -> None:
    from .io.atomic import write_text

    stamp = _stamp(item, path, digest)
    try:
        write_text(folder / f"{item.name}.verified", json.dumps(stamp))
    except OSError:  # a read-only shared cache: the file is hashed at every load instead
        pass


def _pin(item: RegistryEntry, folder: Path, digest: str) -> None:
    from .io.atomic import write_text

    write_text(folder / f"{item.name}.sha256", f"{digest}  {item.filename}\n")


def fetch(name: str, *, offline: bool | None = None, progress: bool = True) -> Path:
    """The local file of the named model: from the cache, else downloaded, checked and cached."""
    item = entry(name)
    found = cached_path(name)
    if found is not None:
        return found
    folder = cache_dir()
    offline = is_offline() if offline is None else offline
    if offline:
        raise HubError(
            f"{name} is not in the cache ({folder / item.filename}) and offline mode is on: fetch it "
            f"once with network access, or copy {item.filename} there"
        )
    mirror = os.environ.get("MEDSAM_MODELS_MIRROR")
    url = f"{mirror.rstrip('/')}/{item.filename}" if mirror else item.url
    if url is None:
        raise HubError(
            f"{item.family}'s {item.filename} has no direct download link: get it from {item.page} and "
            f"put it in {folder}, or pass its path"
        )
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{item.filename}.part"
    _download(url, part, progress=progress, label=item.filename)
    digest = sha256_of(part)
    want = expected_sha256(item, folder)
    if want is not None and digest != want:
        part.unlink()
        raise HubError(
            f"{url}: the downloaded file's SHA-256 {digest[:12]}... does not match {item.name}'s "
            f"{want[:12]}...: refused and deleted"
        )
    if want is None:
        _pin(item, folder, digest)
    path = folder / item.filename
    os.replace(part, path)
    _stamp_verified(item, folder, path, digest)  # hashed once: the first load_model(NAME) does not again
    return path


def _download(url: str, part: Path, *, progress: bool, label: str) -> None:
    """Append ``url``'s bytes to ``part``, continuing after the bytes it already holds."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is whole
            return
        raise HubError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise HubError(f"{url}: download failed ({exc}); run again to continue where it stopped") from None
    from tqdm import tqdm

    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length and length.isdigit() else None
        bar = tqdm(
            total=total,
            initial=have if resumed else 0,
            unit="B",
            unit_scale=True,
            desc=label,
            leave=False,
            disable=not progress,
        )
        try:
            with bar, open(part, "ab" if resumed else "wb") as out:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
        except (urllib.error.URLError, OSError) as exc:
            raise HubError(f"{url}: download interrupted ({exc}); run again to continue where it stopped") from None
    if total is not None and part.stat().st_size < total:
        raise HubError(f"{url}: download interrupted; run again to continue where it stopped")


def resolve_checkpoint(checkpoint: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """A checkpoint argument as a file: an existing path as is, a registry name fetched.
    Returns (path, the entry's ``arch`` or None)."""
    path = Path(checkpoint)
    if path.exists() or str(checkpoint) not in REGISTRY:
        return path, None
    item = REGISTRY[str(checkpoint)]
    return fetch(item.name), item.arch
