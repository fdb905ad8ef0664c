"""The ViT-ResNAS super-network: sub-networks through masks equal their extracted networks, the analytical
MACs/params counter equals the flop counter, the Supernet contract (genes, reductions, latency parts, the found
network's description), multi-architectural sampling, warm-up, draws and bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from backbones import create_backbone
from backbones.base import Supernet
from backbones.vit_resnas_supernet import ViTResNASSupernet, count_macs_params
from tasks.classification import ClassificationModule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "img_size": 56, "stem_channels": 8, "head_dims": (8, 8, 8),
    "embed_dim_choices": ((32, 24, 16), (48, 40, 32), (64, 56, 48)), "head_choices": ((2, 1), (3, 2), (2, 1)),
    "mlp_hidden_choices": ((64, 48, 32), (96, 64), (128, 96)), "depths": (3, 3, 3),
    "skippable": ((1,), (1, 2), (1,)), "examples_per_subnet": 2, "max_groups": 4, "num_warmup_epochs": 4,
}


@pytest.fixture(scope="module")
def supernet() -> ViTResNASSupernet:
    torch.manual_seed(0)
    return create_backbone("vit_resnas_supernet_tiny", **TINY).eval()


def configs(net: ViTResNASSupernet) -> list[dict]:
    drawn = net.sample_subnet(torch.Generator().manual_seed(1))
    return [net.space.extreme(largest=True), net.space.extreme(largest=False), *drawn]


def test_extracted_subnetwork_gives_the_supernetwork_outputs(supernet: ViTResNASSupernet) -> None:
    x = torch.randn(3, 3, 56, 56)
    for config in configs(supernet):
        supernet.set_subnet(config)
        net = supernet.extract(config).eval()
        width = config["embed_dims"][-1]
        with torch.no_grad():
            tokens, ref = supernet.forward_tokens(x), net.forward_tokens(x)
            assert (tokens[..., :width] - ref).abs().max() <= 1e-5
            assert not tokens[..., width:].any()  # inactive channels stay zero
            for mine, theirs in zip(supernet(x), net(x)):
                assert (mine[:, : theirs.shape[1]] - theirs).abs().max() <= 1e-5
        assert [len(s.blocks) for s in net.stages] == [sum(k) for k in config["keep"]]
    supernet.set_subnet(None)


def test_macs_and_params_match_the_flop_counter(supernet: ViTResNASSupernet) -> None:
    x = torch.randn(1, 3, 56, 56)
    for config in configs(supernet):
        net = supernet.extract(config).eval()
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            net.forward_tokens(x)
        assert supernet.macs_params(config) == (counter.get_total_flops() // 2, sum(p.numel() for p in net.parameters()))


def test_genes_reductions_and_description_follow_the_supernet_contract(supernet: ViTResNASSupernet) -> None:
    assert isinstance(supernet, Supernet)
    names = [name for name, _ in supernet.search_space()]
    assert names[:4] == ["embed_dims[0]", "embed_dims[1]", "embed_dims[2]", "num_heads[0][0]"] and "keep[1][2]" in names
    for config in configs(supernet):
        assert supernet.subnet(supernet.subnet_genes(config)) == config
    largest, smallest = supernet.extreme_subnet(largest=True), supernet.extreme_subnet(largest=False)
    moves = supernet.reductions(largest)
    assert {m.action.split()[0] for m in moves} == {"narrow", "skip", "heads", "MLP"} and not supernet.reductions(smallest)
    for move in moves:  # one step smaller, in the space
        assert supernet.macs_params(move.config)[0] < supernet.macs_params(largest)[0]
        supernet.subnet_genes(move.config)
    described = supernet.describe(smallest)
    net = create_backbone(described["backbone"], **described["backbone_kwargs"])
    assert [len(s.blocks) for s in net.stages] == [2, 1, 2] and net.embed_dims == (16, 32, 48)
    keys = [part.key for part in supernet.latency_parts(smallest, batch_size=1)]
    assert keys == ["stem:16", "block0:16:1:32", "block0:16:1:32", "reduce1:16:32", "block1:32:2:64", "reduce2:32:48",
                    "block2:48:1:96", "block2:48:1:96"]
    module, args = supernet.latency_parts(smallest, batch_size=2)[4].build()
    assert module(*args).shape == (2, 1 + 2 * 2, 32)  # a class token and the 2 x 2 grid of stage 1


@pytest.mark.parametrize("name", ["vit_resnas_tiny", "vit_resnas_small"])
def test_published_networks_lie_in_their_search_space(name: str) -> None:
    """The searched networks are sub-networks of their super-network, with the same count at 224²."""
    with torch.device("meta"):
        published = create_backbone(name)
        space = create_backbone(name.replace("resnas_", "resnas_supernet_"), depth=7)
    arch = {"embed_dims": list(published.embed_dims),
            "num_heads": [[b.attn.num_heads for b in s.blocks] for s in published.stages],
            "mlp_hidden_dims": [[b.mlp.fc1.out_features for b in s.blocks] for s in published.stages]}
    config = {"embed_dims": arch["embed_dims"], "num_heads": [], "mlp_hidden_dims": [], "keep": []}
    for s, depth in enumerate(space.space.depths):  # skip the last skippable blocks the published stage lacks
        missing = depth - len(arch["num_heads"][s])
        skipped = set(space.space.skippable[s][::-1][:missing])
        heads, hidden = iter(arch["num_heads"][s]), iter(arch["mlp_hidden_dims"][s])
        config["keep"].append([j not in skipped for j in range(depth)])
        config["num_heads"].append([next(heads) if j not in skipped else space.space.num_heads[s][0] for j in range(depth)])
        config["mlp_hidden_dims"].append([next(hidden) if j not in skipped else space.space.mlp_hidden_dims[s][0]
                                          for j in range(depth)])
    macs, params = space.macs_params(config)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        published.forward_tokens(torch.empty(1, 3, 224, 224, device="meta"))
    assert (macs, params) == (counter.get_total_flops() // 2, sum(p.numel() for p in published.parameters()))
    assert count_macs_params({"embed_dims": published.embed_dims, **arch}) == (macs, params)


def test_groups_of_one_batch_run_different_subnetworks(supernet: ViTResNASSupernet) -> None:
    small, large = supernet.space.extreme(largest=False), supernet.space.extreme(largest=True)
    x = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        supernet.set_subnet(None)
        full = supernet.forward_tokens(x)
        supernet.set_subnet([small, large])  # examples 0-1 run the smallest network, 2-3 the largest
        mixed = supernet.forward_tokens(x)
        supernet.set_subnet(small)
        alone = supernet.forward_tokens(x[:2])
    assert (mixed[2:] - full[2:]).abs().max() <= 1e-5
    assert (mixed[:2] - alone).abs().max() <= 1e-5 and (mixed[:2] - full[:2]).abs().max() > 1e-2
    supernet.set_subnet(None)


def test_draws_depend_on_the_generator_alone_and_widen_over_the_warmup(supernet: ViTResNASSupernet) -> None:
    draw = lambda seed: supernet.sample_subnet(torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(5) == draw(5) and draw(5) != draw(6)
    assert len(draw(5)) == TINY["max_groups"] and len({str(c) for c in draw(5)}) > 1
    supernet.epoch = 0
    assert all(c == supernet.space.extreme(largest=True) for c in draw(7))
    supernet.epoch = 2  # half-way: 2 of 3 widths, 1 of 2 head choices, 1 of 2 keep choices
    assert {c["embed_dims"][0] for c in draw(7) + draw(8) + draw(9)} <= {32, 24}
    assert all(all(all(k) for k in c["keep"]) for c in draw(7))
    supernet.epoch = None


def test_a_config_outside_the_search_space_names_the_key_and_the_choices(supernet: ViTResNASSupernet) -> None:
    config = supernet.space.extreme(largest=True)
    config["num_heads"][1][2] = 5
    with pytest.raises(ValueError, match=r"num_heads\[1\]\[2\] = 5 .*allowed values \(3, 2\)"):
        supernet.set_subnet(config)
    config = supernet.space.extreme(largest=True)
    config["keep"][0][0] = False
    with pytest.raises(ValueError, match=r"keep\[0\]\[0\]"):
        supernet.extract(config)
    with pytest.raises(ValueError, match="narrow"):
        create_backbone("vit_resnas_supernet_tiny", **{**TINY, "embed_dim_choices": ((32,), (24,), (64,))})


def test_multi_architecture_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    module = ClassificationModule(backbone="vit_resnas_supernet_tiny", backbone_kwargs={**TINY, "num_warmup_epochs": 0},
                                  num_classes=3, pool="avg", lr=2e-3)
    x, y = torch.randn(8, 3, 56, 56), torch.arange(8) % 3
    opt = torch.optim.AdamW(module.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        module.backbone.set_subnet(module.backbone.sample_subnet(torch.Generator().manual_seed(step)))
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.distributed
def test_supernet_draws_are_the_same_on_two_ddp_processes_and_after_a_restart(tmp_path: Path, synthetic_cache: str) -> None:
    import json

    from cli_runs import finish, run_task, write_shapes
    from dynamic_probe import read_records

    root = write_shapes(tmp_path / "shapes", train_per_class=8, val_per_class=2)
    kwargs = json.dumps({**TINY, "num_warmup_epochs": 1})

    def args(out: Path, *extra: str) -> list[str]:
        return [
            "fit", "--seed_everything=2", "--model.backbone=vit_resnas_supernet_tiny", f"--model.backbone_kwargs={kwargs}",
            "--model.pool=avg", f"--data.root={root}", "--data.image_size=56", "--data.batch_size=8",
            "--data.num_workers=0", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
            f"--trainer.default_root_dir={out}", "--checkpoint.every_n_train_steps=2",
            "--trainer.callbacks+=tests.dynamic_probe.RecordSubnets", f"--trainer.callbacks.path={out / 'draws'}",
            "--trainer.callbacks.attribute=active", *extra,
        ]

    ddp, full, broken = tmp_path / "ddp", tmp_path / "full", tmp_path / "broken"
    run_task("classification", args(ddp, "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=4"),
             cache=synthetic_cache)
    assert read_records(ddp / "draws", 0) == read_records(ddp / "draws", 1)
    kill = ["--trainer.callbacks+=tests.fault_injection.KillAtStep", "--trainer.callbacks.step=4"]
    finish(run_task("classification", args(broken, *kill), cache=synthetic_cache, wait=False), expect_rc=-9)
    run_task("classification", [*args(broken), "--ckpt_path=last"], cache=synthetic_cache)
    run_task("classification", args(full), cache=synthetic_cache)
    drawn = read_records(full / "draws")
    assert len(drawn) == 6 and read_records(broken / "draws") == drawn
    assert len(set(drawn.values())) > 1 and drawn == read_records(ddp / "draws", 0)  # one global batch, one draw
