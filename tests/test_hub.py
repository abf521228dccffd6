"""Hugging Face Hub ids in ``from_pretrained``, offline: every test serves files from a hub cache folder it
builds (``models--owner--name/refs/main`` + ``snapshots/<commit>/...``, the layout huggingface_hub reads),
with HF_HUB_OFFLINE=1 and the network refused, so nothing is ever downloaded."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from official_layout import official_state_dict
from safetensors.torch import save_file

from gpstoken.checkpoint import CheckpointError
from gpstoken.config import preset
from gpstoken.convert import convert_official
from gpstoken.generation.config import preset as sit_preset
from gpstoken.generation.models import SiT
from gpstoken.modeling import is_hub_id
from gpstoken.tokenizer import GPSTokenizer, official_size

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache, repo_id: str):
    """The snapshot folder of ``repo_id`` at ``main`` in the hub cache ``cache`` (created)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """(cache, attempts): an empty hub cache, HF_HUB_OFFLINE=1 and HF_HUB_CACHE set after huggingface_hub
    was imported (so they count only if read per call), and a network that refuses every look-up and
    connection, each recorded in ``attempts`` (which must stay empty)."""
    import huggingface_hub  # noqa: F401  (imported first on purpose: its constants are read at import)

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("tests never use the network")

    def no_dns(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "tests never use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    yield cache, attempts
    assert attempts == [], f"network connections attempted: {attempts}"


def _randomized_tokenizer(name: str = "tiny") -> GPSTokenizer:
    torch.manual_seed(0)
    model = GPSTokenizer(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # no parameter keeps its (often zero) init
    return model


def _equal_states(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_file_from_the_hub_cache_is_converted_on_load(offline_cache, tmp_path):
    cache, _ = offline_cache
    cfg = preset("tiny")
    official = official_state_dict(cfg)
    snapshot = hub_snapshot(cache, "xtudbxk/GPSToken")
    (snapshot / "GPSToken-Tiny").mkdir()
    save_file(official, str(snapshot / "GPSToken-Tiny" / "gpstoken_tiny.safetensors"))

    model = GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-Tiny")
    assert model.config == cfg and not model.training
    local = convert_official(snapshot / "GPSToken-Tiny" / "gpstoken_tiny.safetensors", "tiny", tmp_path / "converted")
    assert _equal_states(model, local), "hub load differs from converting the same file locally"
    # nothing is written into the cache beside the official file
    assert sorted(p.name for p in (snapshot / "GPSToken-Tiny").iterdir()) == ["gpstoken_tiny.safetensors"]


def test_official_file_at_the_repository_root_is_found_for_a_size_subfolder(offline_cache, tmp_path):
    cache, _ = offline_cache
    snapshot = hub_snapshot(cache, "xtudbxk/GPSToken")
    save_file(official_state_dict(preset("tiny")), str(snapshot / "gpstoken_tiny.safetensors"))
    model = GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-Tiny")
    local = convert_official(snapshot / "gpstoken_tiny.safetensors", "tiny", tmp_path / "converted")
    assert _equal_states(model, local)


def test_gpstoken_folder_in_a_hub_repository_loads_for_every_model(offline_cache, tmp_path):
    cache, _ = offline_cache
    snapshot = hub_snapshot(cache, "someone/gpstoken-models")
    tokenizer = _randomized_tokenizer()
    tokenizer.save_pretrained(snapshot / "tokenizer")
    texture = SiT(sit_preset("tiny/texture", num_tokens=16, num_classes=10))
    texture.save_pretrained(snapshot / "texture")

    loaded = GPSTokenizer.from_pretrained("someone/gpstoken-models", subfolder="tokenizer")
    assert loaded.config == tokenizer.config and _equal_states(loaded, tokenizer)
    sit = SiT.from_pretrained("someone/gpstoken-models", subfolder="texture")
    assert sit.config == texture.config and _equal_states(sit, texture)
    # a repository holding only the weights file: the config comes from its metadata
    lone = hub_snapshot(cache, "someone/lone-weights")
    (lone / "model.safetensors").write_bytes((snapshot / "tokenizer" / "model.safetensors").read_bytes())
    assert _equal_states(GPSTokenizer.from_pretrained("someone/lone-weights"), tokenizer)
    # strict loading holds for hub files as for local ones
    (snapshot / "tokenizer" / "config.json").write_text(GPSTokenizer("tiny").config.to_json().replace('"depth": 4', '"depth": 3'))
    with pytest.raises(CheckpointError, match="different saves"):
        GPSTokenizer.from_pretrained("someone/gpstoken-models", subfolder="tokenizer")


def test_offline_cache_miss_is_one_clear_error(offline_cache):
    cache, _ = offline_cache
    # the example, with nothing cached: the error names the official file the subfolder implies
    with pytest.raises(CheckpointError) as err:
        GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-M128")
    message = str(err.value)
    assert "\n" not in message, message
    assert "not in the local hub cache" in message and "HF_HUB_OFFLINE" in message, message
    assert "GPSToken-M128/gpstoken_m128.safetensors" in message and "GPSToken-M128/model.safetensors" in message, message
    assert str(cache) in message, message
    # a repository that names no size cannot be resolved to an official file
    with pytest.raises(CheckpointError, match="name its size"):
        GPSTokenizer.from_pretrained("xtudbxk/GPSToken")
    with pytest.raises(CheckpointError, match=r"no generator folder|gpstoken generator folder"):
        SiT.from_pretrained("xtudbxk/GPSToken", subfolder="texture")


def test_local_files_only_keeps_loading_to_the_cache(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-M128", local_files_only=True)


def test_hub_ids_need_huggingface_hub_only_when_given(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(CheckpointError, match="pip install huggingface_hub") as err:
        GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-M128")
    assert "\n" not in str(err.value)
    # local folders never touch it
    _randomized_tokenizer().save_pretrained(tmp_path / "m")
    GPSTokenizer.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no such model folder"):
        GPSTokenizer.from_pretrained(tmp_path / "missing")


def test_local_paths_and_subfolders_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _randomized_tokenizer()
    model.save_pretrained(tmp_path / "runs" / "m")
    assert not is_hub_id("runs/m")  # exists locally
    assert _equal_states(GPSTokenizer.from_pretrained("runs/m"), model)
    assert _equal_states(GPSTokenizer.from_pretrained("runs", subfolder="m"), model)
    assert is_hub_id("xtudbxk/GPSToken")
    for local in ("out/model.safetensors", "a/b/c", "/abs/path", "../x/y", "single", "m/config.json"):
        assert not is_hub_id(local), local


def test_official_size_from_names():
    assert official_size("GPSToken-M128") == "m128"
    assert official_size("gpstoken_l256") == "l256"
    assert official_size("GPSToken-S64") == "s64"
    assert official_size("GPSToken") is None
    assert official_size("m128-vs-l256") is None  # two sizes: ambiguous
    assert official_size("GPSToken-M1280") is None


def test_unreachable_hub_is_told_apart_from_a_missing_file(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the fixture refuses every connection
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # skip huggingface_hub's retry back-off
    _, attempts = offline_cache
    with pytest.raises(CheckpointError, match="could not reach the Hugging Face Hub") as err:
        GPSTokenizer.from_pretrained("xtudbxk/GPSToken", subfolder="GPSToken-M128")
    assert "\n" not in str(err.value)
    assert attempts, "the online path should have tried the network"
    assert "gpstoken_m128.safetensors" in str(err.value)  # still named, though not fetched after the first failure
    attempts.clear()  # expected here; the fixture checks that no other test tries
