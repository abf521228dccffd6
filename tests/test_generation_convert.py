"""Official generator files: a state dict laid out as the official SiT-*-gs (key names and shapes written here
from the facts file, section 6, not produced by our model) converts, loads and matches a reference forward
written here from the SiT equations; the restricted unpickler admits numpy-only pickles and refuses code."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gpstoken.checkpoint import CheckpointError
from gpstoken.generation import SiT
from gpstoken.generation.convert import (
    convert_official_generator,
    convert_official_layout_bank,
    restricted_pickle_load,
)
from gpstoken.generation.layouts import LayoutBank


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def official_shapes(depth, hidden, channels, tokens, classes, cond=5, learn_sigma=True, freq=256, mlp=4):
    d = hidden
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, channels, 1, 1),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, freq),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (channels * (2 if learn_sigma else 1), d),
        "final_layer.linear.bias": (channels * (2 if learn_sigma else 1),),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    if cond:
        shapes.update({
            "cond_embedder.0.weight": (d, cond),
            "cond_embedder.0.bias": (d,),
            "cond_embedder.2.weight": (d, d),
            "cond_embedder.2.bias": (d,),
        })  # fmt: skip
    for i in range(depth):
        b = f"blocks.{i}"
        shapes.update({
            f"{b}.attn.qkv.weight": (3 * d, d),
            f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d),
            f"{b}.attn.proj.bias": (d,),
            f"{b}.mlp.fc1.weight": (mlp * d, d),
            f"{b}.mlp.fc1.bias": (mlp * d,),
            f"{b}.mlp.fc2.weight": (d, mlp * d),
            f"{b}.mlp.fc2.bias": (d,),
            f"{b}.adaLN_modulation.1.weight": (6 * d, d),
            f"{b}.adaLN_modulation.1.bias": (6 * d,),
        })  # fmt: skip
    return shapes


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.05) for k, s in shapes.items()}


def reference_forward(sd, x, t, y, cond, heads):
    """The official SiT-*-gs forward from its equations: latent (B, C, L, 1) through a 1x1 conv, layout MLP
    added in place of pos_embed, adaLN-Zero blocks with explicit softmax attention, learn_sigma dropped."""
    b, n, c = x.shape
    latent = x.permute(0, 2, 1)[..., None]  # (B, C, L, 1) as the official code feeds it
    h = F.conv2d(latent, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"])  # (B, D, L, 1)
    h = h.flatten(2).transpose(1, 2)  # (B, L, D)
    e = F.linear(F.silu(F.linear(cond, sd["cond_embedder.0.weight"], sd["cond_embedder.0.bias"])), sd["cond_embedder.2.weight"], sd["cond_embedder.2.bias"])
    h = h + e
    half = sd["t_embedder.mlp.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    arg = t[:, None] * freqs[None]
    temb = torch.cat([torch.cos(arg), torch.sin(arg)], 1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    cvec = temb + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(cvec), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        s1, c1, g1, s2, c2, g2 = [mod[:, k * d : (k + 1) * d, None].transpose(1, 2) for k in range(6)]
        a = ln(h) * (1 + c1) + s1
        qkv = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (B, H, L, d/H)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        att = (w @ v).transpose(1, 2).reshape(b, n, d)
        h = h + g1 * F.linear(att, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = ln(h) * (1 + c2) + s2
        u = F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        h = h + g2 * F.linear(u, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    mod = F.linear(F.silu(cvec), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod[:, None, :d], mod[:, None, d:]
    out = F.linear(ln(h) * (1 + scale) + shift, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    return out[..., :c]  # learn_sigma: the first C channels


SMALL = dict(depth=2, hidden=384, channels=21, tokens=8, classes=10)  # width 384 -> 6 heads (SiT-S)


def write_ema_file(path, ema, seed=1):
    """An ema-pytorch wrapper save: ema_model.*, online_model.* (different values), step, initted."""
    online = random_state({k: v.shape for k, v in ema.items()}, seed + 100)
    tensors = {f"ema_model.{k}": v for k, v in ema.items()}
    tensors.update({f"online_model.{k}": v for k, v in online.items()})
    tensors["step"] = torch.tensor(1234)
    tensors["initted"] = torch.tensor(True)
    save_file(tensors, str(path))


def test_official_layout_converts_loads_and_matches_reference_forward(tmp_path):
    ema = random_state(official_shapes(**SMALL), seed=1)
    write_ema_file(tmp_path / "generator.safetensors", ema)
    out = convert_official_generator(tmp_path / "generator.safetensors", tmp_path / "converted")
    model = SiT.from_pretrained(out)
    cfg = model.config
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.in_channels, cfg.num_tokens, cfg.num_classes) == (2, 384, 6, 21, 8, 10)
    assert cfg.learn_sigma and cfg.role == "texture" and cfg.cond_mode == "input"
    assert cfg.mean[0] == -0.0211 and cfg.std[2] == 0.2533 and cfg.mean[20] == 0.3222  # official yaml values
    assert cfg.cond_mean is None  # the official model reads raw g_init

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 21, generator=g)
    t = torch.tensor([0.0, 0.37, 1.0])
    y = torch.tensor([0, 9, 10])  # 10 = null class
    cond = torch.rand(3, 8, 5, generator=g) * 0.6 + 0.01
    with torch.no_grad():
        got = model(x, t, y, cond)
        expected = reference_forward(ema, x, t, y, cond, heads=6)
    assert expected.abs().max() > 1e-2  # a non-trivial output
    # float32, SDPA vs explicit softmax: measured max difference 3e-7 (outputs up to 1.7)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_official_stats_come_from_the_yaml(tmp_path):
    ema = random_state(official_shapes(**SMALL), seed=2)
    save_file({f"ema_model.{k}": v for k, v in ema.items()}, str(tmp_path / "g.safetensors"))
    means = [0.5 + i for i in range(21)]
    stds = [1.0 + 0.1 * i for i in range(21)]
    (tmp_path / "gpstoken_generator.yaml").write_text(
        f"pretrained_gpstoken_means: {means}\npretrained_gpstoken_stds: {stds}\n\nmodel:\n  name: SiT-XL/2-gs\n"
    )
    out = convert_official_generator(tmp_path / "g.safetensors", tmp_path / "c", config=tmp_path / "gpstoken_generator.yaml")
    cfg = SiT.from_pretrained(out).config
    assert list(cfg.mean) == means and list(cfg.std) == pytest.approx(stds)


def test_other_architectures_and_damaged_files_are_refused(tmp_path):
    shapes = official_shapes(**SMALL)
    # an image-latent SiT (patch size 2)
    latent = dict(shapes, **{"x_embedder.proj.weight": (384, 4, 2, 2)})
    save_file({f"ema_model.{k}": v for k, v in random_state(latent, 3).items()}, str(tmp_path / "p2.safetensors"))
    with pytest.raises(CheckpointError, match="patch size 2x2"):
        convert_official_generator(tmp_path / "p2.safetensors", tmp_path / "out")
    # a width outside SiT's table
    odd = official_shapes(depth=1, hidden=96, channels=21, tokens=8, classes=10)
    save_file({f"ema_model.{k}": v for k, v in random_state(odd, 4).items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="width 96 is not in SiT's size table"):
        convert_official_generator(tmp_path / "w.safetensors", tmp_path / "out")
    # a wrong shape and a missing tensor are listed by name
    bad = random_state(shapes, 5)
    bad["blocks.1.mlp.fc2.weight"] = torch.zeros(384, 100)
    del bad["blocks.0.attn.proj.bias"]
    save_file({f"ema_model.{k}": v for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        convert_official_generator(tmp_path / "bad.safetensors", tmp_path / "out")
    assert "blocks.1.mlp.fc2.weight" in str(err.value) and "blocks.0.attn.proj.bias" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    # not a generator at all, and pickles are never read
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an official SiT generator"):
        convert_official_generator(tmp_path / "other.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        convert_official_generator(tmp_path / "generator.pt", tmp_path / "out")


# ----------------------------------------------------------------------------- restricted unpickler
def _initg(seed=0):
    rng = np.random.default_rng(seed)

    def layout(cols):
        g = np.zeros((16, cols), np.float32)
        g[:, :2] = rng.uniform(0.02, 0.3, (16, 2))
        g[:, 3:5] = rng.uniform(-1, 1, (16, 2))
        g[:, 5:] = 7.0  # extra official columns are ignored
        return g

    return {0: [layout(6), layout(6)], 3: [layout(5)]}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_loads_numpy_only_pickles(protocol):
    data = _initg()
    loaded = restricted_pickle_load(pickle.dumps(data, protocol=protocol))
    assert sorted(loaded) == [0, 3]
    for c in data:
        for a, b in zip(loaded[c], data[c]):
            np.testing.assert_array_equal(a, b)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_restricted_unpickler_refuses_a_payload_that_calls_a_function(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({0: [np.zeros((16, 5), np.float32)], 1: _RunsCode(marker)})
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "control")))  # the payload does run under plain pickle
    assert (tmp_path / "control").exists()
    (tmp_path / "initg.pickle").write_bytes(payload)
    with pytest.raises(CheckpointError, match="refused global builtins.exec"):
        convert_official_layout_bank(tmp_path / "initg.pickle", tmp_path / "bank.safetensors")
    assert not marker.exists() and not (tmp_path / "bank.safetensors").exists()
    with pytest.raises(CheckpointError, match="object array"):
        restricted_pickle_load(pickle.dumps(np.array([1, "a"], dtype=object)))


def test_initg_pickle_converts_to_a_layout_bank(tmp_path):
    data = _initg(1)
    (tmp_path / "initg.pickle").write_bytes(pickle.dumps(data))
    bank = convert_official_layout_bank(tmp_path / "initg.pickle", tmp_path / "bank.safetensors", num_classes=4)
    loaded = LayoutBank.load(tmp_path / "bank.safetensors")
    assert loaded.num_tokens == 16 and len(loaded) == 3 and loaded.num_classes == 4
    for c in data:
        np.testing.assert_array_equal(loaded.layouts[c].numpy(), np.stack([a[:, :5] for a in data[c]]))
    picks = loaded.sample([3, 0, 0], np.random.default_rng(0))
    np.testing.assert_array_equal(picks[0].numpy(), data[3][0][:, :5])
    assert any(np.array_equal(picks[1].numpy(), a[:, :5]) for a in data[0])
    with pytest.raises(ValueError, match="no layouts for class 2"):
        bank.sample([2], np.random.default_rng(0))


def test_cli_converters(tmp_path, capsys):
    import argparse

    from gpstoken.generation.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    ema = random_state(official_shapes(**SMALL), seed=7)
    write_ema_file(tmp_path / "generator.safetensors", ema)
    args = parser.parse_args(["convert-official-generator", str(tmp_path / "generator.safetensors"), "--out", str(tmp_path / "g")])
    args.run(args)
    assert "depth 2, width 384, 8 tokens x 21 channels" in capsys.readouterr().out
    torch.testing.assert_close(SiT.from_pretrained(tmp_path / "g").state_dict()["blocks.1.mlp.fc1.weight"], ema["blocks.1.mlp.fc1.weight"])
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        args.run(args)
    (tmp_path / "initg.pickle").write_bytes(pickle.dumps(_initg(2)))
    args = parser.parse_args(["convert-official-layouts", str(tmp_path / "initg.pickle"), "--out", str(tmp_path / "b.safetensors"), "--num-classes", "4"])
    args.run(args)
    assert "3 layouts, 2 classes, 16 tokens" in capsys.readouterr().out
