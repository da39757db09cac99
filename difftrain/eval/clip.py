"""CLIP image/text features (Radford et al. 2021) and CLIP score (Hessel et al. 2021) for evaluation.

``clip:FOLDER`` is a Hugging Face transformers CLIP folder (``CLIPModel`` weights, ``config.json``,
tokenizer files and ``preprocessor_config.json``, as on the hub; a tokenizer in ``tokenizer/`` also works);
``clip:open_clip:ARCH:FILE`` an open_clip architecture with weights from FILE (needs the optional
``open_clip`` package: ``pip install difftrain[clip]``). Preprocessing is a batched torch version of
``CLIPImageProcessor`` driven by the checkpoint's own ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difftrain.eval.extractor_base import Extractor, load_weights_file, weights_fingerprint


class ClipExtractor(Extractor):
    """CLIP (Radford et al. 2021): features are the L2-normalised image embeddings; :meth:`text_features`
    gives the normalised caption embeddings. Subclasses provide ``_image`` and ``_text``."""

    name = "clip"

    def extract(self, images):
        return {"features": F.normalize(self._image(images).float(), dim=-1)}

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self._text(list(captions)).float(), dim=-1)


_RESAMPLE = {0: "NEAREST_EXACT", 2: "BILINEAR", 3: "BICUBIC"}  # PIL resample codes of preprocessor_config.json


class HFClipExtractor(ClipExtractor):
    """A transformers ``CLIPModel``. The images are preprocessed in torch, batched, on the model's device,
    as transformers' ``CLIPImageProcessor`` does (parameters from the checkpoint's
    ``preprocessor_config.json``): gray to RGB, resize (shortest edge, antialiased, on uint8 with
    torchvision's v2 kernels, which match PIL's to +-1 level), center crop, rescale, normalise."""

    def __init__(self, model: nn.Module, tokenizer, pre: dict):
        super().__init__()
        self.model, self.tokenizer, self.pre = model, tokenizer, pre
        self.dim = model.config.projection_dim
        self.max_length = model.config.text_config.max_position_embeddings
        tensors = {f"{n}.{k}": v for n in ("vision_model", "visual_projection")
                   for k, v in getattr(model, n).state_dict().items()}
        self.fingerprint = weights_fingerprint(tensors, f"clip-hf|{json.dumps(pre, sort_keys=True)}")
        self._freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        p = self.pre
        x = images.permute(0, 3, 1, 2).contiguous()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h, w = x.shape[-2:]
        if p.get("do_resize", True):
            size = p["size"]
            if "shortest_edge" in size:
                s = size["shortest_edge"]
                new = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
            else:
                new = (size["height"], size["width"])
            mode = InterpolationMode[_RESAMPLE[p.get("resample", 3)]]
            x = tvF.resize(x, list(new), interpolation=mode, antialias=True)
        if p.get("do_center_crop", True):
            ch, cw = p["crop_size"]["height"], p["crop_size"]["width"]
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                x = F.pad(x, ((max(cw - w, 0)) // 2, (max(cw - w, 0) + 1) // 2,
                              (max(ch - h, 0)) // 2, (max(ch - h, 0) + 1) // 2))
                h, w = x.shape[-2:]
            top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
            x = x[..., top:top + ch, left:left + cw]
        x = x.float()
        if p.get("do_rescale", True):
            x = x * p.get("rescale_factor", 1 / 255)
        if p.get("do_normalize", True):
            x = (x - x.new_tensor(p["image_mean"]).view(1, -1, 1, 1)) / x.new_tensor(p["image_std"]).view(1, -1, 1, 1)
        return x

    def _image(self, images):
        out = self.model.vision_model(pixel_values=self.preprocess(images).to(self.model.dtype))
        return self.model.visual_projection(out.pooler_output)

    def _text(self, captions):
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return self.model.text_projection(out.pooler_output)


def _clip_preprocess_config(root: Path, model) -> dict:
    """The checkpoint's image preprocessing (CLIP's defaults where a key or the file is missing)."""
    n = model.config.vision_config.image_size
    pre = {"do_resize": True, "size": {"shortest_edge": n}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": n, "width": n}, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711]}
    for f in (root / "preprocessor_config.json", root / "feature_extractor" / "preprocessor_config.json"):
        if f.is_file():
            cfg = json.loads(f.read_text())
            pre.update({k: cfg[k] for k in pre if cfg.get(k) is not None})
            break
    if pre["resample"] not in _RESAMPLE:
        raise ValueError(f"{root}: image resample mode {pre['resample']} is not supported (nearest, bilinear, bicubic)")
    for k in ("size", "crop_size"):  # old configs store an int
        if isinstance(pre[k], int):
            pre[k] = {"shortest_edge": pre[k]} if k == "size" else {"height": pre[k], "width": pre[k]}
    return pre


def build_hf_clip(path: str) -> HFClipExtractor:
    import transformers as tf

    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"clip:{path}: no config.json in '{root}' (expected a transformers CLIPModel folder)")
    model_type = json.loads((root / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(f"clip:{path}: model_type is {model_type!r}, expected 'clip' (a CLIPModel checkpoint)")
    model = tf.CLIPModel.from_pretrained(str(root), local_files_only=True, dtype=torch.float32,
                                         use_safetensors=True)  # never a pickle .bin
    tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    tokenizer = tf.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return HFClipExtractor(model, tokenizer, _clip_preprocess_config(root, model))


class OpenClipExtractor(ClipExtractor):
    """An open_clip model with its own eval transform (PIL, per image) and tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, transform, arch: str):
        super().__init__()
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        with torch.no_grad():
            self.dim = int(model.encode_text(tokenizer(["a"])).shape[-1])
        self.fingerprint = weights_fingerprint(model.visual.state_dict(), f"open_clip|{arch}|{transform!r}")
        self._freeze()

    def _image(self, images):
        from PIL import Image

        arr = images.cpu().numpy()
        pics = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arr]
        return self.model.encode_image(torch.stack([self.transform(p) for p in pics]).to(self.device))

    def _text(self, captions):
        return self.model.encode_text(self.tokenizer(captions).to(self.device))


def build_open_clip(arch: str, path: str) -> OpenClipExtractor:
    try:
        import open_clip
    except ImportError:
        raise ImportError(f"clip:open_clip:{arch}:{path} needs the optional package open_clip "
                          "(pip install open_clip_torch)") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"clip:open_clip:{arch}: weight file '{path}' does not exist")
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(load_weights_file(path), strict=True)
    return OpenClipExtractor(model.float(), open_clip.get_tokenizer(arch), transform, arch)


def build_clip(arg: str) -> ClipExtractor:
    """The extractor of spec ``clip:ARG``: ``ARG`` = a transformers CLIP folder or ``open_clip:ARCH:FILE``."""
    if not arg:
        raise ValueError("extractor 'clip' needs a checkpoint: clip:FOLDER or clip:open_clip:ARCH:FILE")
    if arg.startswith("open_clip:"):
        arch, _, path = arg[len("open_clip:"):].partition(":")
        return build_open_clip(arch, path)
    return build_hf_clip(arg)


def clip_score(extractor: ClipExtractor, images, captions: list[str]) -> torch.Tensor:
    """CLIPScore (Hessel et al. 2021) as commonly reported: per image ``100 * max(cos(image, text), 0)``,
    float32 [N] on the extractor's device."""
    if not isinstance(extractor, ClipExtractor):
        raise TypeError(f"clip_score needs a clip extractor, got '{getattr(extractor, 'name', extractor)}'")
    if len(images) != len(captions):
        raise ValueError(f"clip_score: {len(images)} images but {len(captions)} captions")
    img = extractor(images)["features"]
    txt = extractor.text_features(captions)
    return 100.0 * (img * txt).sum(-1).clamp(min=0)
