"""Pretrained weights by name: ``hf-hub:<org>/<repo>[/<file>]`` and ``timm:<model>.<tag>``, through huggingface_hub.

A name is resolved to a file in huggingface_hub's cache (``HF_HUB_CACHE``, by default ``$HF_HOME/hub``):
downloaded once when the Hub is reachable, read from the cache afterwards, and from the cache alone under
``HF_HUB_OFFLINE=1``, so one config serves a machine with internet and one without. Without a file name a repo
gives its ``model.safetensors`` or ``pytorch_model.bin`` (what timm and transformers publish), or else its only
weights file. ``timm:<model>[.<tag>]`` finds its repo the way timm does, from the model's pretrained config
(``timm/<model>.<tag>``, the default tag when none is given). Anything else is a file path, returned as it is.
"""

from __future__ import annotations

from pathlib import Path

HF_PREFIX = "hf-hub:"
TIMM_PREFIX = "timm:"
DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".pyth", ".npz", ".ckpt")


def is_hub_name(spec: str | Path) -> bool:
    """Whether ``spec`` names weights on the Hub rather than a file (an existing file of that name wins)."""
    text = str(spec)
    return text.startswith((HF_PREFIX, TIMM_PREFIX)) and not Path(text).is_file()


def resolve_pretrained(spec: str | Path) -> Path:
    """The local file behind ``spec``: a path as it is, a Hub name downloaded into (or found in) the cache.

    Raises:
        FileNotFoundError: the name is neither in the cache nor reachable; the message names the cache folder it
            looked in and how to fix it.
        ValueError: the name is malformed, or the Hub answered that the repo, revision or file does not exist.
    """
    if not is_hub_name(spec):
        return Path(spec)
    text = str(spec)
    if text.startswith(HF_PREFIX):
        repo, revision, filename = _split_hf_name(text)
    else:
        repo, revision, filename = _timm_repo(text)
    return _fetch(text, repo, revision, filename)


def _split_hf_name(spec: str) -> tuple[str, str | None, str | None]:
    """``hf-hub:org/repo[@revision][/path/in/repo]`` -> repo id, revision, file."""
    parts = spec.removeprefix(HF_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"pretrained {spec!r}: expected hf-hub:<org>/<repo>[/<file>], e.g. hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]) or None


def _timm_repo(spec: str) -> tuple[str, str | None, str | None]:
    """The Hub repo (and file) of a timm pretrained name, from timm's pretrained config; ``timm/<name>`` for a
    tagged name this timm does not know yet (published after its release)."""
    import timm

    name = spec.removeprefix(TIMM_PREFIX)
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # an architecture this timm does not have
        cfg = None
    if cfg is None:
        if "." not in name:
            raise ValueError(
                f"pretrained {spec!r}: timm {timm.__version__} has no pretrained weights for {name!r}; name them as "
                "timm:<model>.<tag> (see timm.list_pretrained()) or hf-hub:<org>/<repo>"
            )
        return f"timm/{name}", None, None
    if not cfg.hf_hub_id:
        raise ValueError(
            f"pretrained {spec!r}: timm publishes these weights only at {cfg.url}, not on the Hugging Face Hub; "
            "download the file and give its path"
        )
    repo, _, revision = cfg.hf_hub_id.partition("@")
    return repo, revision or None, cfg.hf_hub_filename or None


def _fetch(spec: str, repo: str, revision: str | None, filename: str | None) -> Path:
    """``filename`` (or the default names, then the repo's only weights file) from the cache or the Hub."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # huggingface_hub >= 1.0 raises this for a file missing on the Hub; before, EntryNotFoundError
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError:
        RemoteEntryNotFoundError = EntryNotFoundError

    candidates = (filename,) if filename else DEFAULT_FILES
    cached = [n for n in candidates if isinstance(try_to_load_from_cache(repo, n, revision=revision), str)]
    candidates = (*cached, *(n for n in candidates if n not in cached))  # a cached name first: no wait for the others
    reached_hub, local_only = False, False
    for name in candidates:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, local_files_only=local_only))
        except LocalEntryNotFoundError:  # not cached, and offline or the Hub unreachable: the rest from the cache only
            local_only = True
            continue
        except (RemoteEntryNotFoundError, EntryNotFoundError):  # the Hub says the repo has no such file
            reached_hub = True
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise ValueError(
                f"pretrained {spec!r}: the Hugging Face Hub has no repo {repo!r}"
                f"{f' at revision {revision!r}' if revision else ''} (or it is private or gated: log in with "
                f"`hf auth login`): {type(err).__name__}"
            ) from err
    weights = [] if filename else _weights_files(repo, revision, offline=local_only)
    if len(weights) == 1:
        try:
            return Path(hf_hub_download(repo, weights[0], revision=revision, local_files_only=local_only))
        except LocalEntryNotFoundError:
            pass
    if len(weights) > 1:
        raise ValueError(f"pretrained {spec!r}: {repo} holds several weights files ({', '.join(weights)}): name one, "
                         f"hf-hub:{repo}/<file>")
    where = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    wanted = " or ".join(candidates)
    if reached_hub:
        raise ValueError(
            f"pretrained {spec!r}: the Hub repo {repo} has no {wanted}; name the file: hf-hub:{repo}/<file>"
        )
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
    raise FileNotFoundError(
        f"pretrained {spec!r}: {wanted} of {repo} is not in the Hugging Face cache ({where}) and {offline}. "
        "Run once with internet access (HF_HUB_OFFLINE unset) to fill the cache, point HF_HUB_CACHE or HF_HOME at "
        "the cache that holds it, or give the checkpoint's file path instead."
    )


def _weights_files(repo: str, revision: str | None, *, offline: bool) -> list[str]:
    """The repo's weights files (a ``.pth`` release, ``open_clip_model.safetensors``), listed from the Hub when
    reachable, else from the cached snapshot."""
    from huggingface_hub import constants, list_repo_files

    names: list[str] = []
    if not offline and not constants.HF_HUB_OFFLINE:
        try:
            names = list_repo_files(repo, revision=revision)
        except Exception:  # noqa: BLE001  the Hub went away in between (httpx or OS errors): the cache decides
            names = []
    if not names:
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        ref = folder / "refs" / (revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else (revision or "")
        snapshot = folder / "snapshots" / commit
        if commit and snapshot.is_dir():
            names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    return sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
