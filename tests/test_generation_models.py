"""SiT generator models: official sizes, shapes, layout-condition modes, files, training signal (tiny
layout / texture / one-stage models overfit a tiny token set under the velocity-matching loss)."""

from __future__ import annotations

import json

import pytest
import torch

from gpstoken.checkpoint import CheckpointError
from gpstoken.generation import SiT, SiTConfig, channel_stats, linear_path, preset, velocity_loss
from gpstoken.generation.transport import texture_targets


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_official_texture_model_has_the_official_parameter_count():
    with torch.device("meta"):  # 676M parameters: count them without allocating
        model = SiT("SiT-XL/2-gs")
    assert sum(p.numel() for p in model.parameters()) == 676_334_634
    cfg = model.config
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.in_channels, cfg.num_tokens, cfg.out_channels) == (28, 1152, 16, 21, 128, 42)
    assert model.y_embedder.embedding_table.weight.shape == (1001, 1152)  # null class 1000


def test_layout_model_is_about_33m_parameters():
    with torch.device("meta"):
        n = sum(p.numel() for p in SiT("SiT-S/layout").parameters())
    assert 32.5e6 < n < 33.5e6, n  # paper: 33M


def _tiny(name, **kw) -> SiT:
    torch.manual_seed(0)
    return SiT(preset(name, num_tokens=16, num_classes=4, **kw))


def _randomize(model: SiT) -> SiT:
    with torch.no_grad():
        for p in model.parameters():
            if (p == 0).all():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny/layout", "tiny/texture", "tiny/onestage"])
def test_forward_shapes_and_time_forms(name):
    model = _randomize(_tiny(name))
    c = model.config.in_channels
    x = torch.randn(3, 16, c)
    y = torch.tensor([0, 1, 3])
    cond = torch.rand(3, 16, 5) * 0.3 + 0.01 if model.config.cond_channels else None
    out = model(x, torch.full((3,), 0.3), y, cond)
    assert out.shape == (3, 16, c)
    torch.testing.assert_close(model(x, 0.3, y, cond), out)  # a scalar t is the same t for every row
    torch.testing.assert_close(model(x, torch.tensor(0.3), y, cond), out)


def test_fresh_model_predicts_zero_velocity_adaln_zero():
    model = _tiny("tiny/texture").eval()
    out = model(torch.randn(2, 16, 21), torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 16, 5))
    assert torch.count_nonzero(out) == 0


def test_layout_condition_modes_input_and_blocks():
    base = _randomize(_tiny("tiny/texture"))
    blocks = SiT(base.config.replace(cond_mode="blocks"))
    blocks.load_state_dict(base.state_dict())
    blocks.eval()
    x, t, y = torch.randn(2, 16, 21), torch.rand(2), torch.tensor([0, 2])
    cond = torch.rand(2, 16, 5) * 0.3 + 0.01
    a, b = base(x, t, y, cond), blocks(x, t, y, cond)
    assert not torch.allclose(a, b)
    # input mode: pos_embed is unused when a layout is given (official), so changing it changes nothing
    with torch.no_grad():
        base.pos_embed.add_(1.0)
    torch.testing.assert_close(base(x, t, y, cond), a)
    # every output token depends on the layout in both modes
    cond2 = cond.clone()
    cond2[:, 3] += 0.1
    assert (base(x, t, y, cond2) - a).abs().amax(dim=(0, 2)).gt(0).all()


def test_label_dropout_only_in_training():
    model = _randomize(_tiny("tiny/layout", class_dropout=0.5))
    x, t, y = torch.randn(64, 16, 5), torch.full((64,), 0.5), torch.zeros(64, dtype=torch.long)
    null = torch.full_like(y, 4)
    cond_out, null_out = model(x, t, y), model(x, t, null)
    model.train()
    torch.manual_seed(1)
    out = model(x, t, y)
    dropped = (out - null_out).abs().amax(dim=(1, 2)) < 1e-6
    kept = (out - cond_out).abs().amax(dim=(1, 2)) < 1e-6
    assert (dropped | kept).all() and 10 < int(dropped.sum()) < 54, int(dropped.sum())


def test_save_and_load_roundtrip(tmp_path):
    model = _randomize(_tiny("tiny/texture", mean=tuple(range(21)), std=(2.0,) * 21))
    model.save_pretrained(tmp_path / "m")
    loaded = SiT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x, t, y, cond = torch.randn(2, 16, 21), torch.rand(2), torch.tensor([1, 2]), torch.rand(2, 16, 5) + 0.01
    torch.testing.assert_close(loaded(x, t, y, cond), model(x, t, y, cond), rtol=0, atol=0)
    torch.testing.assert_close(loaded.denormalize(x), x * 2 + torch.arange(21.0))
    # a lone weights file carries its config
    assert SiT.from_pretrained(tmp_path / "m" / "model.safetensors").config == model.config


def test_load_errors_are_clear(tmp_path):
    model = _tiny("tiny/layout")
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(CheckpointError, match="no such generator"):
        SiT.from_pretrained(tmp_path / "missing")
    other = _tiny("tiny/onestage")
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="different saves"):
        SiT.from_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "b" / "config.json").read_text())
    data["hidden"] = 65
    (tmp_path / "b" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError):
        SiT.from_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="a texture model has"):
        SiTConfig(role="texture", cond_channels=0)
    with pytest.raises(ValueError, match="class ids must be in"):
        model(torch.zeros(1, 16, 5), 0.5, torch.tensor([7]))


def test_channel_stats_and_linear_path_closed_forms():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 16, 3, generator=g) * torch.tensor([0.1, 2.0, 5.0]) + torch.tensor([1.0, -2.0, 0.0])
    mean, std = channel_stats(data)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), data.reshape(-1, 3).double().mean(0))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), data.reshape(-1, 3).double().std(0, unbiased=False))
    x0, x1, t = torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt, target = linear_path(x0, x1, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[3], x1[3])
    torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1])
    torch.testing.assert_close(target, x1 - x0)
    g_init, gg, f = torch.rand(2, 4, 5), torch.rand(2, 4, 5), torch.rand(2, 4, 16)
    torch.testing.assert_close(texture_targets(g_init, gg, f), torch.cat([gg - g_init, f], -1))


@pytest.mark.parametrize("name", ["tiny/layout", "tiny/texture", "tiny/onestage"])
def test_tiny_model_overfits_a_tiny_token_set(name):
    torch.manual_seed(0)
    tokens = 8
    model = SiT(preset(name, num_tokens=tokens, num_classes=4, class_dropout=0.0))
    c = model.config.in_channels
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(4, tokens, c, generator=gen)
    labels = torch.arange(4)
    cond = torch.rand(4, tokens, 5, generator=gen) * 0.3 + 0.01 if model.config.cond_channels else None
    # fixed evaluation draws: 16 (t, noise) pairs per sample
    reps = 16
    ev_x1, ev_y = data.repeat(reps, 1, 1), labels.repeat(reps)
    ev_cond = None if cond is None else cond.repeat(reps, 1, 1)
    ev_t, ev_noise = torch.rand(4 * reps, generator=gen), torch.randn(4 * reps, tokens, c, generator=gen)

    def evaluate():
        model.eval()
        with torch.no_grad():
            return float(velocity_loss(model, ev_x1, ev_y, ev_cond, t=ev_t, noise=ev_noise))

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    batch_cond = None if cond is None else cond.repeat(4, 1, 1)
    for _ in range(200):
        loss = velocity_loss(model, data.repeat(4, 1, 1), labels.repeat(4), batch_cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    # measured: 2.11 -> 0.30 (layout), 2.06 -> 0.39 (texture), 2.07 -> 0.28 (one-stage)
    assert after < before / 3, f"{name}: loss {before:.3f} -> {after:.3f}"
