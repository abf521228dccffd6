"""``PretrainedModel``: the one load/save base of every gpstoken model (as diffusers' ModelMixin).

A model folder holds ``config.json`` and ``model.safetensors`` (float32, the config also in its metadata;
``gpstoken.checkpoint``). A subclass declares

  config_class          the config dataclass (``from_dict`` / ``to_json`` / ``name``; its ``format`` field,
                        the module's CONFIG_FORMAT, tells configs of different models apart)
  config_metadata_key   the safetensors metadata key holding the config (fixed: released files use it)
  kind                  the word used in messages ("model", "generator")
  official_converter    the command that converts an official file, named in hints

and builds from a config with ``cls(config)``. ``from_pretrained`` takes a local folder or weights file,
or a Hugging Face Hub id (``owner/name``, optional ``subfolder``) that ``huggingface_hub`` resolves into
its cache; nothing is fetched unless a hub id is given, and ``HF_HUB_OFFLINE`` keeps it to the cache.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write_text,
    describe_mismatch,
    load_tensors,
    read_json,
    save_tensors,
)

# owner/name as the Hub spells repository ids; a weights or config file name is never taken for one, so
# a mistyped local file keeps its "no such file" error.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag


def is_hub_id(path: str | os.PathLike) -> bool:
    """True when ``path`` is no local file or folder and reads as a Hub repository id ``owner/name``."""
    text = os.fspath(path)
    return (
        not Path(text).exists()
        and bool(_HUB_ID.match(text))
        and ".." not in text
        and not text.endswith((".safetensors", ".json"))
    )


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; read it per call so a later setting counts
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


class HubFiles:
    """Files of one Hub repository (at ``revision``, under ``subfolder``), fetched into the hub cache.

    ``get`` returns the cached path, or None when the repository has no such file (or, offline, the cache
    lacks it); every miss is remembered so the final error names what was looked for.
    """

    def __init__(
        self,
        repo_id: str,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ):
        try:
            import huggingface_hub  # noqa: F401  (optional: only hub ids need it)
        except ImportError:
            raise CheckpointError(
                f"{repo_id}: no such local folder or file; to load it as a Hugging Face Hub id, "
                "`pip install huggingface_hub` (or gpstoken[hub])"
            ) from None
        self.repo_id = repo_id
        self.subfolder = subfolder or None
        self.revision = revision
        self.offline = bool(local_files_only) or hub_offline()
        # HF_HUB_CACHE, like HF_HUB_OFFLINE, is read by huggingface_hub at import; pass the current one on
        self.cache_dir = cache_dir if cache_dir is not None else os.environ.get("HF_HUB_CACHE")
        self.missed: list[str] = []
        self.unreachable = False  # a cache miss while the Hub could not be reached

    def where(self, subfolder: str | None = None) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f" (subfolder {subfolder})" if subfolder else "")

    def get(self, filename: str, subfolder: str | None | bool = True) -> Path | None:
        """The cached file ``filename`` (in ``self.subfolder``, or in ``subfolder`` when given; None: root)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        sub = self.subfolder if subfolder is True else (subfolder or None)
        name = f"{sub}/{filename}" if sub else filename
        if self.unreachable:  # huggingface_hub retries for ~20 s per file; one such wait is enough
            self.missed.append(name)
            return None
        try:
            return Path(
                hf_hub_download(
                    self.repo_id,
                    filename,
                    subfolder=sub,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=self.offline,
                )
            )
        except LocalEntryNotFoundError:  # not cached, and offline or the Hub could not be reached
            self.missed.append(name)
            self.unreachable = not self.offline
            return None
        except EntryNotFoundError:  # the Hub answered: no such file in the repository
            self.missed.append(name)
            return None
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
            raise CheckpointError(
                f"{self.repo_id}: no such local folder or file, and not a readable Hugging Face Hub repository "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from None
        except Exception as err:  # noqa: BLE001  (network and HTTP errors have many types; each becomes one line)
            raise CheckpointError(f"{self.where()}: could not fetch {name} ({type(err).__name__}: {_first_line(err)})") from None

    def not_found(self, wanted: str) -> CheckpointError:
        """The error for a repository that holds none of the files tried."""
        tried = ", ".join(self.missed)
        if self.offline:
            cache = self.cache_dir or "the default hub cache"
            return CheckpointError(
                f"{self.where(self.subfolder)}: {wanted} is not in the local hub cache ({cache}; offline, "
                f"HF_HUB_OFFLINE is set; looked for {tried}): run once online, or pass a local folder"
            )
        if self.unreachable:
            return CheckpointError(
                f"{self.where(self.subfolder)}: could not reach the Hugging Face Hub and the local hub cache lacks "
                f"{wanted} (looked for {tried}); check the connection, or pass a local folder"
            )
        return CheckpointError(f"{self.where(self.subfolder)}: the repository has no {wanted} (looked for {tried})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


class PretrainedModel(nn.Module):
    """Base of the gpstoken models: ``save_pretrained``, ``from_pretrained``, strict ``load_weights``."""

    config_class: ClassVar[type]
    config_metadata_key: ClassVar[str]
    kind: ClassVar[str] = "model"
    official_converter: ClassVar[str] = ""
    config: Any

    # ----------------------------------------------------------------- hooks for subclasses
    @classmethod
    def looks_official(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """True when ``tensors`` have the official code's names (the error then says how to convert)."""
        return False

    @classmethod
    def _official_hint(cls, tensors: dict[str, torch.Tensor], always: bool = False) -> str:
        if not cls.official_converter:
            return ""
        if cls.looks_official(tensors):
            return f"\nThis looks like an official GPSToken checkpoint: convert it first with `{cls.official_converter}`."
        return f"; an official file needs `{cls.official_converter}` first" if always else ""

    @classmethod
    def _from_hub_fallback(cls, hub: HubFiles) -> PretrainedModel:
        """A model from a Hub repository without a gpstoken folder; the base knows no other layout."""
        raise hub.not_found(f"gpstoken {cls.kind} folder ({CONFIG_FILE} + {WEIGHTS_FILE})")

    # ----------------------------------------------------------------- save
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (float32) into ``folder``, each atomically."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"{folder}: exists and is not a folder")
        config_json = self.config.to_json()
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        # weights first: a folder whose config.json is older than its weights is caught on load
        save_tensors(folder / WEIGHTS_FILE, state, metadata={self.config_metadata_key: config_json})
        atomic_write_text(folder / CONFIG_FILE, config_json + "\n")
        return folder

    # ----------------------------------------------------------------- load
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ):
        """Load a model folder written by ``save_pretrained`` (or its ``model.safetensors`` alone), or a
        Hugging Face Hub id ``owner/name``.

        ``subfolder``: a folder inside ``path`` or inside the Hub repository. ``revision``, ``cache_dir``,
        ``local_files_only``: as ``huggingface_hub.hf_hub_download`` (hub ids only); ``HF_HUB_OFFLINE=1``
        also keeps loading to the cache. Returns the model in eval mode on ``device``.
        """
        local = Path(path) / subfolder if subfolder else Path(path)
        if not local.exists() and is_hub_id(path):
            hub = HubFiles(os.fspath(path), subfolder, revision, cache_dir, local_files_only)
            model = cls._from_hub(hub)
        else:
            model = cls._from_local(local)
        return model.to(device).eval()

    @classmethod
    def _from_hub(cls, hub: HubFiles) -> PretrainedModel:
        weights = hub.get(WEIGHTS_FILE)
        if weights is None:
            return cls._from_hub_fallback(hub)
        config = hub.get(CONFIG_FILE)
        # both files land in one snapshot folder; without a config.json the weights carry theirs
        return cls._from_local(weights.parent if config is not None and config.parent == weights.parent else weights)

    @classmethod
    def _from_local(cls, path: Path) -> PretrainedModel:
        if not path.exists():
            raise CheckpointError(f"{path}: no such {cls.kind} folder or file")
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        tensors, metadata = load_tensors(weights)
        embedded = metadata.get(cls.config_metadata_key)
        if path.is_dir() and (path / CONFIG_FILE).exists():
            config = cls._parse_config(read_json(path / CONFIG_FILE), path)
            if embedded is not None and cls._parse_embedded(embedded, weights) != config:
                raise CheckpointError(
                    f"{path}: {CONFIG_FILE} and {WEIGHTS_FILE} come from different saves (the config stored in the "
                    "weights differs); re-save the model or restore the matching config"
                )
        elif embedded is not None:
            config = cls._parse_embedded(embedded, weights)
        else:
            raise CheckpointError(
                f"{weights}: has no {cls.kind} config (no {CONFIG_FILE} beside it and none in its metadata)"
                + cls._official_hint(tensors, always=True)
            )
        model = cls(config)
        model.load_weights(tensors, source=str(weights))
        return model

    @classmethod
    def _parse_config(cls, data: dict, where: Path):
        try:
            return cls.config_class.from_dict(data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: bad {cls.kind} config ({err})") from None

    @classmethod
    def _parse_embedded(cls, text: str, weights: Path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{weights}: the config in its metadata is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{weights}: the config in its metadata is not a JSON object")
        return cls._parse_config(data, weights)

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load a state dict strictly; CheckpointError lists missing, unexpected and mis-shaped tensors
        and refuses non-finite values."""
        expected = {k: v.shape for k, v in self.state_dict().items()}
        problem = describe_mismatch(expected, tensors, f"{source} ({self.config.name} config)")
        if problem:
            raise CheckpointError(problem + self._official_hint(tensors))
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{source}: non-finite values in {', '.join(bad[:5])}")
        self.load_state_dict(tensors, strict=True)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
