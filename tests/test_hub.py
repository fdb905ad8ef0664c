"""Pretrained weights by name (``hf-hub:``, ``timm:``) from a huggingface_hub cache built here: no network."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.utils._http
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from backbones import create_backbone
from backbones.hub import resolve_pretrained
from engine.distillation import build_teacher
from tasks.classification import ClassificationModule

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache, offline (``HF_HUB_OFFLINE=1``); huggingface_hub reads both at import, so
    the values it read are replaced too."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo: str, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Files laid out as huggingface_hub caches a download: ``models--org--name/snapshots/<commit>/<file>``
    and ``refs/main`` naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    for name, state in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, snapshot / name)
        else:
            torch.save(state, snapshot / name)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def source() -> ClassificationModule:
    torch.manual_seed(0)
    return ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=5).eval()


def timm_names(module: ClassificationModule) -> dict[str, torch.Tensor]:
    """Our classifier's weights under timm's names, as timm's Hub repos hold them."""
    state = {k.removeprefix("backbone."): v for k, v in module.state_dict().items() if k.startswith("backbone.")}
    state.update({f"head.{k.removeprefix('head.fc.')}": v for k, v in module.state_dict().items() if k.startswith("head.fc.")})
    return state


def assert_same_logits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_hf_hub_name_loads_from_the_offline_cache(hub_cache: Path, source) -> None:
    snapshot = put_in_cache(hub_cache, "someone/tiny-vit", {"model.safetensors": timm_names(source)})
    ours = ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=5, pretrained="hf-hub:someone/tiny-vit"
    )
    report = ours.load_report
    assert report.format == "timm-vit" and not report.missing and not report.unexpected
    assert "hf-hub:someone/tiny-vit" in report.path and str(snapshot / "model.safetensors") in report.path
    assert_same_logits(ours, source)


def test_a_named_file_and_the_repos_only_weights_file(hub_cache: Path, source) -> None:
    put_in_cache(hub_cache, "lab/release", {"weights/vit_tiny_ep300.pth": {"model": timm_names(source)}})
    named = ClassificationModule(
        backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=5, pretrained="hf-hub:lab/release/weights/vit_tiny_ep300.pth"
    )
    assert_same_logits(named, source)
    # no model.safetensors or pytorch_model.bin: the repo's one weights file is taken
    assert resolve_pretrained("hf-hub:lab/release").name == "vit_tiny_ep300.pth"
    put_in_cache(hub_cache, "lab/two", {"a.pth": {"w": torch.zeros(1)}, "b.pth": {"w": torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"several weights files \(a.pth, b.pth\): name one"):
        resolve_pretrained("hf-hub:lab/two")


def test_timm_name_resolves_to_timms_hub_repo(hub_cache: Path, source) -> None:
    """``timm:<model>.<tag>`` is ``timm/<model>.<tag>`` on the Hub, as timm's pretrained config says; without a
    tag, timm's default tag; the teacher takes names too."""
    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    put_in_cache(hub_cache, repo, {"model.safetensors": timm_names(source)})
    for name in ("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", "timm:vit_tiny_patch16_224"):
        assert resolve_pretrained(name).parent.parent.parent.name == f"models--{repo.replace('/', '--')}"
    backbone = create_backbone("vit_tiny_patch16", pretrained="timm:vit_tiny_patch16_224", **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[0], source.backbone(x)[0])
    teacher = build_teacher("vit_tiny_patch16", num_classes=5, pretrained="timm:vit_tiny_patch16_224", kwargs=TINY)
    assert_same_logits(teacher.network, source)


def test_a_name_neither_cached_nor_reachable_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ClassificationModule(backbone="vit_tiny_patch16", backbone_kwargs=TINY, num_classes=5, pretrained="hf-hub:someone/absent")
    message = str(err.value)
    assert str(hub_cache / "models--someone--absent") in message  # where it looked
    assert "HF_HUB_OFFLINE" in message and "file path" in message  # why, and how to fix it
    with pytest.raises(ValueError, match="hf-hub:<org>/<repo>"):
        resolve_pretrained("hf-hub:just-a-name")


def test_online_with_the_hub_unreachable_the_cache_serves(hub_cache: Path, source, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline, but no connection (a closed local port stands for the Hub): the cached file is used, as
    huggingface_hub does; an uncached name says the Hub could not be reached."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda seconds: None)  # its retries, without waiting
    put_in_cache(hub_cache, "someone/tiny-vit", {"pytorch_model.bin": timm_names(source)})
    assert resolve_pretrained("hf-hub:someone/tiny-vit").name == "pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match="could not be reached"):
        resolve_pretrained("hf-hub:someone/absent/model.safetensors")


def test_paths_are_not_names(tmp_path: Path) -> None:
    path = tmp_path / "timm:weights.pth"  # an existing file wins over the name syntax
    path.write_bytes(b"")
    assert resolve_pretrained(path) == path and resolve_pretrained("plain/file.pth") == Path("plain/file.pth")
