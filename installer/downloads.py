"""Download plans read from the Hugging Face Hub, and the downloads themselves (only the files needed)."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import silent_tqdm
from huggingface_hub.utils.sha import git_hash

from common.errors import UserError
from common.layout import RootLayout
from installer.checks import existing_ancestor
from presets.catalog import Preset
from sidecar.delta.adapter_files import NPZ_FILE, PT_FILE
from sidecar.delta.config import CONFIG_FILE

# Room for the settings, logs and the converted adapter on top of the downloads.
HEADROOM_BYTES = 256 * 1024**2


class DownloadError(UserError, RuntimeError):
    """A plan or a download that failed, with what to do about it."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of a repo: its path in the repo, size and hashes as the Hub reports them."""

    name: str
    size: int
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1, for small files
    present: bool = False  # already complete at the destination


@dataclass(frozen=True)
class RepoPlan:
    """The files to fetch from one repo, pinned to the commit the plan was made at."""

    role: str
    repo: str
    revision: str
    commit: str
    dest: Path
    files: tuple[PlannedFile, ...]

    @property
    def total_bytes(self) -> int:
        """Size of every planned file."""
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """Size of the files still to download."""
        return sum(f.size for f in self.files if not f.present)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of this part of the plan."""
        return {
            "role": self.role,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "dest": str(self.dest),
            "files": [{"name": f.name, "size": f.size, "present": f.present} for f in self.files],
            "total_bytes": self.total_bytes,
            "missing_bytes": self.missing_bytes,
        }


@dataclass(frozen=True)
class DownloadPlan:
    """Everything an install will download, and whether it fits on the disk."""

    repos: tuple[RepoPlan, ...]
    free_bytes: int
    endpoint: str = field(default="")

    @property
    def total_bytes(self) -> int:
        """Size of every planned file, present or not."""
        return sum(r.total_bytes for r in self.repos)

    @property
    def missing_bytes(self) -> int:
        """What still has to come over the network."""
        return sum(r.missing_bytes for r in self.repos)

    @property
    def needed_bytes(self) -> int:
        """Free space the install needs: the missing files plus some headroom."""
        return self.missing_bytes + HEADROOM_BYTES if self.missing_bytes else 0

    @property
    def fits(self) -> bool:
        """True when the free disk space covers what the install needs."""
        return self.needed_bytes <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the plan."""
        return {
            "endpoint": self.endpoint,
            "repos": [r.to_dict() for r in self.repos],
            "total_bytes": self.total_bytes,
            "missing_bytes": self.missing_bytes,
            "free_bytes": self.free_bytes,
            "fits": self.fits,
        }

    def describe(self) -> list[str]:
        """Lines for a person: each repo, revision, file with size, destination; total vs free."""
        lines = [f"Download plan (from {self.endpoint}):"]
        for repo in self.repos:
            lines.append(f"  {repo.role}: {repo.repo} @ {repo.revision} (commit {repo.commit[:12]})")
            lines.append(f"    into {repo.dest}")
            for f in repo.files:
                note = "  (already downloaded)" if f.present else ""
                lines.append(f"    {human_bytes(f.size):>10}  {f.name}{note}")
        lines.append(
            f"  total {human_bytes(self.total_bytes)}, to download {human_bytes(self.missing_bytes)}, "
            f"free disk {human_bytes(self.free_bytes)}"
        )
        return lines


def hub_endpoint() -> str:
    """The Hub to talk to: $HF_ENDPOINT as it is now (the library reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def plan_downloads(preset: Preset, root: Path) -> DownloadPlan:
    """Ask the Hub which files the preset needs, their sizes and hashes; downloads nothing."""
    layout = RootLayout.of(root)
    endpoint = hub_endpoint()
    repos: list[RepoPlan] = []
    if preset.model.repo is not None:
        patterns = preset.model_files
        repos.append(
            _plan_repo(
                "model",
                preset.model.repo,
                preset.model.revision,
                layout.model_dir(preset.model.repo),
                lambda names: select_model_files(names, patterns),
                endpoint,
            )
        )
    if preset.adapter is not None and preset.adapter.repo is not None:
        repos.append(
            _plan_repo(
                "adapter",
                preset.adapter.repo,
                preset.adapter.revision,
                layout.adapter_dir(preset.adapter.repo),
                select_adapter_files,
                endpoint,
            )
        )
    free = shutil.disk_usage(existing_ancestor(layout.root)).free
    return DownloadPlan(tuple(repos), free, endpoint)


def select_model_files(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    """The repo files matching the preset's patterns; a model needs config.json and weights."""
    chosen = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns)]
    if "config.json" not in chosen:
        raise DownloadError("the model repo has no config.json: is it an MLX model repo?")
    if not any(n.endswith(".safetensors") for n in chosen):
        raise DownloadError("the model repo has no *.safetensors weights: is it an MLX model repo?")
    return chosen


def select_adapter_files(names: list[str]) -> list[str]:
    """The adapter config plus the MLX tensors if the repo has them, else the PyTorch file to convert."""
    if CONFIG_FILE not in names:
        raise DownloadError(f"the adapter repo has no {CONFIG_FILE}: is it a δ-mem adapter?")
    for weights in (NPZ_FILE, PT_FILE):
        if weights in names:
            return [CONFIG_FILE, weights]
    raise DownloadError(f"the adapter repo has neither {NPZ_FILE} nor {PT_FILE}: is it a δ-mem adapter?")


def download(plan: DownloadPlan, *, progress: bool = True) -> None:
    """Fetch every file of the plan that is not complete yet; each is checked against its Hub hash."""
    tqdm_class = None if progress else silent_tqdm
    for repo in plan.repos:
        for planned in repo.files:
            _fetch_verified(repo, planned, plan.endpoint, tqdm_class)


def human_bytes(size: int) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as disk tools show them)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _plan_repo(
    role: str,
    repo: str,
    revision: str,
    dest: Path,
    select: Callable[[list[str]], list[str]],
    endpoint: str,
) -> RepoPlan:
    _refuse_offline(repo)
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:
        raise DownloadError(_hub_failure(repo, revision, endpoint, exc)) from exc
    siblings = {s.rfilename: s for s in info.siblings or []}
    try:
        names = select(sorted(siblings))
    except DownloadError as exc:
        raise DownloadError(f"{repo}@{revision}: {exc}") from None
    if not info.sha:
        raise DownloadError(
            f"{endpoint} did not say which commit {repo}@{revision} is: is it a Hub endpoint?"
        )
    files = []
    for name in names:
        sibling = siblings[name]
        if sibling.size is None:
            raise DownloadError(f"{endpoint} did not report the size of {repo}/{name}: is it a Hub endpoint?")
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        target = dest / name
        present = target.is_file() and target.stat().st_size == sibling.size
        files.append(PlannedFile(name, sibling.size, sha256, sibling.blob_id, present))
    return RepoPlan(role, repo, revision, info.sha, dest, tuple(files))


def _fetch_verified(repo: RepoPlan, planned: PlannedFile, endpoint: str, tqdm_class: Any) -> None:
    target = repo.dest / planned.name
    # A damaged local copy is replaced once; a second mismatch means the source itself is bad.
    for attempt in (1, 2):
        try:
            hf_hub_download(
                repo.repo,
                planned.name,
                revision=repo.commit,
                local_dir=repo.dest,
                endpoint=endpoint,
                tqdm_class=tqdm_class,
            )
        except Exception as exc:
            raise DownloadError(
                f"downloading {repo.repo}/{planned.name} failed: "
                + _hub_failure(repo.repo, repo.revision, endpoint, exc)
            ) from exc
        problem = file_mismatch(target, planned)
        if problem is None:
            return
        target.unlink(missing_ok=True)
        if attempt == 2:
            raise DownloadError(
                f"{target} {problem} after downloading it twice: the mirror may be serving a bad file; "
                "check HF_ENDPOINT and run the command again"
            )


def file_mismatch(path: Path, planned: PlannedFile) -> str | None:
    """Why a local file differs from what the Hub listed (size, then hash), or None when it matches."""
    size = path.stat().st_size
    if size != planned.size:
        return f"has {size} bytes instead of {planned.size}"
    if planned.sha256 is not None:
        with path.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != planned.sha256:
                return "does not match its sha256 on the Hub"
    elif planned.blob_id is not None:
        if git_hash(path.read_bytes()) != planned.blob_id:
            return "does not match its git hash on the Hub"
    return None


def _refuse_offline(repo: str) -> None:
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    if offline_env or constants.is_offline_mode():
        raise DownloadError(
            f"HF_HUB_OFFLINE is set, so {repo} cannot be fetched: unset it, or install from local "
            "directories with --preset custom --model-path DIR [--adapter-path DIR]"
        )


def _hub_failure(repo: str, revision: str, endpoint: str, exc: BaseException) -> str:
    rerun = "run the command again (finished files are kept)"
    if isinstance(exc, GatedRepoError):
        return f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN (or run 'hf auth login')"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo} was not found on {endpoint} (or is private): check the name, or set HF_TOKEN"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}: check the name of the branch, tag or commit"
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to download"
    if isinstance(exc, HfHubHTTPError):
        return f"{endpoint} answered with an error ({exc}): {rerun} later"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full: free some space, then {rerun}"
    if isinstance(exc, OSError):
        return f"{exc}: {rerun}"
    # The HTTP client's own errors: refused or reset connections, timeouts, cut-off bodies.
    return (
        f"cannot reach {endpoint} ({type(exc).__name__}: {exc}): check the network (or HF_ENDPOINT) "
        f"and {rerun}"
    )
