"""Vision encoders as the frozen model (`data.source: images`): ViT, CLIP (vision tower, or both
towers for zero-shot logits), SigLIP and DINOv2 through `transformers`.

The token axis is the encoder's: CLS (for the families that have one) + one token per patch;
`data.positions` chooses which reach the SAEs (all | cls | patches). Hook sites are the text
models' (`blocks.<L>.resid_post`, `mlp_out`, `attn_out`, `attn_z`, ...; layouts in
framework/hooks.py), so everything downstream is unchanged: many SAEs per forward, the early
stop after the last site, data-parallel ranks (each reads every world-th image), exact resume
(the position is epoch + image index), SAELens exports with the hook name, and the eval's FVU /
L0 / dead fraction. The downstream metric replaces the LM's CE: the change of the encoder's
final embedding (and, for CLIP models with a text tower and `eval.zero_shot_labels`, of the
zero-shot logits) when the SAE reconstruction is spliced in at the chosen positions, against
zero ablation of the same positions.

Images come through `datasets` (its `Image` feature decodes them): files, folders or globs of
image files, or a hub dataset name with an image column (`data.image_field`) when online.
Every 20th image (in sorted order, or stream order for a hub dataset) is held out for
evaluation. Preprocessing is the model's own image processor (`AutoImageProcessor`; the tiny
test models get one built in code). `data.llm_batch_size` is the images per forward.
"""

from __future__ import annotations

import glob
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from framework import hooks
from framework.activations import ActivationSource, Batch, check_position_kind
from framework.errors import ConfigError
from framework.schema import DataConfig, RunConfig, did_you_mean
from framework.registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
EVAL_EVERY = 20  # image i (in reading order) is held out when i % EVAL_EVERY == 0
POSITIONS = ("all", "cls", "patches")


@dataclass(frozen=True)
class VisionFamily:
    has_cls: bool  # token 0 is a CLS token
    tiny_processor: Callable[[], object]  # the image processor of the tiny test model


def _vit_processor():
    from transformers import ViTImageProcessor  # noqa: PLC0415

    return ViTImageProcessor(size={"height": 32, "width": 32})


def _clip_processor():
    from transformers import CLIPImageProcessor  # noqa: PLC0415

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


VISION_FAMILIES: Registry[VisionFamily] = Registry("vision model type")
VISION_FAMILIES.register("vit")(VisionFamily(True, _vit_processor))
VISION_FAMILIES.register("dinov2")(VisionFamily(True, _vit_processor))
VISION_FAMILIES.register("clip")(VisionFamily(True, _clip_processor))
VISION_FAMILIES.register("clip_vision_model")(VisionFamily(True, _clip_processor))
VISION_FAMILIES.register("siglip")(VisionFamily(False, _vit_processor))  # mean/MAP pooling: no CLS token
VISION_FAMILIES.register("siglip_vision_model")(VisionFamily(False, _vit_processor))


# --------------------------------------------------------------------------- config checks


def validate(cfg: RunConfig) -> None:
    """data.source=images: checks that need no model (called from config.validate)."""
    from framework import kinds, llm  # noqa: PLC0415

    data = cfg.data
    llm.check_model_name(cfg.model.name)
    if data.positions not in POSITIONS:
        raise ConfigError(f"data.positions: '{data.positions}' is not one of {list(POSITIONS)}"
                          f"{did_you_mean(data.positions, POSITIONS)}")
    model_type = llm.model_type_hint(cfg.model.name)
    if model_type is not None and model_type not in VISION_FAMILIES:
        raise ConfigError(f"model.name: '{cfg.model.name}' (model type '{model_type}') is not a vision encoder, but "
                          f"data.source=images; vision model types: {sorted(VISION_FAMILIES)}")
    if model_type in VISION_FAMILIES and data.positions == "cls" and not VISION_FAMILIES[model_type].has_cls:
        raise ConfigError(f"data.positions: 'cls', but '{cfg.model.name}' ({model_type}) has no CLS token; use all or "
                          "patches")
    if cfg.model.shard:
        raise ConfigError("model.shard: ZeRO-3 sharding of the frozen model is for LLMs; vision encoders load whole")
    for i, s in enumerate(cfg.saes):
        if s.kind in kinds.SAE_KINDS and kinds.SAE_KINDS[s.kind].needs_lm_grad:
            raise ConfigError(f"saes.{i}.kind: {s.kind} needs a causal LM's next-token loss; a vision encoder has none")
    if cfg.eval.zero_shot_labels and model_type is not None and model_type != "clip":
        raise ConfigError(f"eval.zero_shot_labels: zero-shot logits need a CLIP model with its text tower (model type "
                          f"'clip'), not '{model_type}'")
    image_files(data)


def image_files(data: DataConfig) -> tuple[list[Path], list[str]]:
    """Local image files (sorted) and hub dataset names; text files or missing paths fail."""
    if not data.paths:
        raise ConfigError("data.paths: give image files, folders or globs (or a hub dataset with an image column)")
    files, hub = [], []
    for item in data.paths:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"data.paths: folder '{item}' holds no image files ({sorted(IMAGE_SUFFIXES)})")
        else:
            found = [p] if p.is_file() else sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        if found:
            bad = [f for f in found if f.suffix.lower() not in IMAGE_SUFFIXES]
            if bad:
                raise ConfigError(f"data.paths: '{bad[0]}' is not an image file ({sorted(IMAGE_SUFFIXES)}); "
                                  "data.source=images reads images")
            files += found
        elif "/" in item and not item.startswith((".", "/", "~")) and not any(c in item for c in "*?["):
            hub.append(item)
        else:
            raise ConfigError(f"data.paths: '{item}' matches no image file")
    return files, hub


# --------------------------------------------------------------------------- loading


def model_family(model: nn.Module) -> VisionFamily:
    model_type = model.config.model_type
    if model_type not in VISION_FAMILIES:
        raise ConfigError(f"model.name: model type '{model_type}' is not a vision encoder; supported: "
                          f"{sorted(VISION_FAMILIES)}")
    return VISION_FAMILIES[model_type]


def load_vision(cfg) -> tuple[nn.Module, object, object | None]:
    """(frozen model, image processor, tokenizer or None): the tokenizer only for CLIP models
    with a text tower (zero-shot labels)."""
    from framework.llm import TINY_MODELS, byte_tokenizer, resolve_device  # noqa: PLC0415

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.name in TINY_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.train.seed)
            model = TINY_MODELS[cfg.model.name]().to(dtype)
        processor = model_family(model).tiny_processor()
        tokenizer = byte_tokenizer() if model.config.model_type == "clip" else None
    else:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer  # noqa: PLC0415

        kwargs = {"dtype": dtype, **({"device_map": cfg.model.device_map} if cfg.model.device_map else {})}
        model = AutoModel.from_pretrained(cfg.model.name, **kwargs)
        model_family(model)
        processor = AutoImageProcessor.from_pretrained(cfg.model.name)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.name) if model.config.model_type in ("clip", "siglip") else None
    model.eval().requires_grad_(False)
    if not cfg.model.device_map:
        model = model.to(resolve_device(cfg.model.device))
    return model, processor, tokenizer


def image_embedding(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's final image embedding: the projected one for CLIP, else the pooled output
    (ViT pooler / DINOv2 normalised CLS / SigLIP attention pooling)."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixels)
    else:
        out = model(pixel_values=pixels)
    if torch.is_tensor(out):
        return out.float()
    for key in ("image_embeds", "pooler_output"):
        if out.get(key) is not None:
            return out[key].float()
    return out["last_hidden_state"][:, 0].float()


# --------------------------------------------------------------------------- the source


class ImageSource(ActivationSource):
    """Activations of a frozen vision encoder on images; rows = the chosen token positions of
    every image, aligned across sites."""

    def __init__(self, data_cfg: DataConfig, model: nn.Module, processor, sites: list[str], device: torch.device,
                 seed: int, rank: int = 0, world: int = 1, tokenizer=None, zero_shot_labels: list[str] = ()):
        super().__init__(data_cfg, device, rank, world)
        self.model, self.processor, self.tokenizer, self.seed = model, processor, tokenizer, seed
        self.family = model_family(model)
        if data_cfg.positions == "cls" and not self.family.has_cls:
            raise ConfigError(f"data.positions: 'cls', but model type '{model.config.model_type}' has no CLS token")
        self.specs = [hooks.parse_site(s) for s in sites]
        for spec in self.specs:
            hooks.resolve(model, spec)
        self.files, hub = image_files(data_cfg)
        self.hub = hub
        self.zero_shot_labels = list(zero_shot_labels)
        self.position = {"epoch": 0, "index": 0}
        self.dims = self._probe_dims()

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _probe_dims(self) -> dict[str, int]:
        from PIL import Image  # noqa: PLC0415

        acts = self.capture(self.pixels([Image.new("RGB", (32, 32))]))
        self.tokens_per_image = next(iter(acts.values())).shape[1]
        return {k: v.shape[-1] for k, v in acts.items()}

    def pixels(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return pixels.to(self.model_device, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def capture(self, pixels: torch.Tensor) -> Batch:
        """site -> [images, tokens, d], running the encoder only as deep as needed."""
        with hooks.capture(self.model, self.specs) as store:
            hooks.run_until_captured(lambda: image_embedding(self.model, pixels))
        return dict(store)

    def keep_mask(self, tokens: int) -> torch.Tensor:
        """Which token positions reach the SAEs (data.positions)."""
        keep = torch.ones(tokens, dtype=torch.bool)
        if self.family.has_cls:
            if self.data_cfg.positions == "cls":
                keep[1:] = False
            elif self.data_cfg.positions == "patches":
                keep[0] = False
        return keep

    # -- image streams -------------------------------------------------------------------
    def _dataset(self):
        """Local files as a `datasets` table whose `Image` feature decodes them on access."""
        from datasets import Dataset, Image  # noqa: PLC0415

        return Dataset.from_dict({"image": [str(f) for f in self.files]}).cast_column("image", Image())

    def _hub_rows(self) -> Iterator:
        from datasets import load_dataset  # noqa: PLC0415

        for name in self.hub:
            for row in load_dataset(name, split=self.data_cfg.split, streaming=True):
                if self.data_cfg.image_field not in row:
                    raise ConfigError(f"data.image_field: hub dataset '{name}' has no column "
                                      f"'{self.data_cfg.image_field}' (columns: {sorted(row)})")
                yield row[self.data_cfg.image_field]

    def images(self, split: str) -> Iterator:
        """Images of a split for this rank; the train split loops over epochs (seeded order per
        epoch) and continues from, and advances, `self.position`."""
        if self.hub:
            yield from self._hub_images(split)
            return
        ds = self._dataset()
        held = [i for i in range(len(ds)) if i % EVAL_EVERY == 0]
        train = [i for i in range(len(ds)) if i % EVAL_EVERY != 0]
        if split == "eval":
            for i in held[self.rank::self.world]:
                yield ds[i]["image"]
            return
        if not train:
            raise ConfigError(f"data.paths: {len(ds)} image(s) leave none for training (every {EVAL_EVERY}th, from "
                              "the first, is held out); give at least 2")
        epoch, start = self.position["epoch"], self.position["index"]
        while True:
            order = list(train)
            if self.data_cfg.shuffle_files:
                random.Random(self.seed + epoch).shuffle(order)
            first = start + (self.rank - start) % self.world
            for j in range(first, len(order), self.world):
                self.position = {"epoch": epoch, "index": j + 1}
                yield ds[order[j]]["image"]
            epoch, start = epoch + 1, 0

    def _hub_images(self, split: str) -> Iterator:
        want_eval = split == "eval"
        start = self.position["index"] if not want_eval else 0
        for i, image in enumerate(self._hub_rows()):
            if (i % EVAL_EVERY == 0) != want_eval or i % self.world != self.rank or i < start:
                continue
            if not want_eval:
                self.position = {"epoch": 0, "index": i + 1}
            yield image

    def pixel_batches(self, split: str) -> Iterator[torch.Tensor]:
        batch = []
        for image in self.images(split):
            batch.append(image)
            if len(batch) == self.data_cfg.llm_batch_size:
                yield self.pixels(batch)
                batch = []
        if batch:
            yield self.pixels(batch)

    def _raw(self, split: str) -> Iterator[Batch]:
        for pixels in self.pixel_batches(split):
            acts = self.capture(pixels)
            keep = self.keep_mask(next(iter(acts.values())).shape[1]).to(self.model_device)
            yield {k: v[:, keep].flatten(0, 1) for k, v in acts.items()}

    def position_dict(self) -> dict:
        return {"kind": "images", **self.position}

    def load_position(self, position: dict) -> None:
        check_position_kind(position, "images")
        self.position = {"epoch": position["epoch"], "index": position["index"]}

    # -- the downstream metric -----------------------------------------------------------
    def _text_embeddings(self) -> torch.Tensor | None:
        if not self.zero_shot_labels:
            return None
        prompts = [f"a photo of a {label}" for label in self.zero_shot_labels]
        enc = self.tokenizer(prompts, padding=True, return_tensors="pt")
        if self.tokenizer.eos_token_id is not None and enc["input_ids"][:, -1].ne(self.tokenizer.eos_token_id).any():
            enc = self.tokenizer([p + self.tokenizer.eos_token for p in prompts], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.model_device),
                                               attention_mask=enc["attention_mask"].to(self.model_device))
        out = out if torch.is_tensor(out) else out["pooler_output"]
        return F.normalize(out.float(), dim=-1)

    def _zero_shot(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * F.normalize(embedding, dim=-1) @ text.T

    @torch.no_grad()
    def downstream_metrics(self, trainers: dict, n_tokens: int, reduce) -> dict[str, dict[str, float]]:
        """Per SAE, on held-out images: the final embedding with the reconstruction spliced in
        (cosine to clean, relative error, recovered = 1 - err^2 / err_zero-ablation^2) and, with
        zero-shot labels, KL(clean || spliced) and top-1 agreement of the zero-shot logits."""
        from framework.evaluate import inference_saes  # noqa: PLC0415

        text = self._text_embeddings()
        keys = ["cos", "err2", "clean2", "zero_err2", "kl", "agree"]
        sums = {name: dict.fromkeys(keys, 0.0) for name in trainers}
        seen = images = 0
        with inference_saes(trainers) as saes:
            for pixels in self.pixel_batches("eval"):
                if seen >= n_tokens:
                    break
                keep = self.keep_mask(self.tokens_per_image).to(self.model_device)
                keep = keep[None].expand(pixels.shape[0], -1)
                seen += int(keep.sum())
                images += pixels.shape[0]
                clean = image_embedding(self.model, pixels)
                for name, tr in trainers.items():
                    replacement = hooks.Replacement.of(tr.input_site, tr.output_site, lambda sae=saes[name]: sae.reconstruct)
                    with hooks.splice_prediction(self.model, replacement, keep):
                        spliced = image_embedding(self.model, pixels)
                    with hooks.splice_prediction(self.model, replacement.zero_ablation(), keep):
                        zero = image_embedding(self.model, pixels)
                    s = sums[name]
                    s["cos"] += F.cosine_similarity(clean, spliced, dim=-1).sum().item()
                    s["err2"] += (spliced - clean).pow(2).sum().item()
                    s["clean2"] += clean.pow(2).sum().item()
                    s["zero_err2"] += (zero - clean).pow(2).sum().item()
                    if text is not None:
                        p, q = (F.log_softmax(self._zero_shot(e, text), -1) for e in (clean, spliced))
                        s["kl"] += (p.exp() * (p - q)).sum().item()
                        s["agree"] += (p.argmax(-1) == q.argmax(-1)).sum().item()
        names = list(sums)
        packed = reduce(torch.tensor([images, seen] + [sums[n][k] for n in names for k in keys], dtype=torch.float64,
                                     device=self.device)).tolist()
        images, seen = int(packed[0]), int(packed[1])
        out = {}
        for i, name in enumerate(names):
            s = dict(zip(keys, packed[2 + len(keys) * i: 2 + len(keys) * (i + 1)]))
            n = max(images, 1)
            m = {"embed_cos": s["cos"] / n, "embed_rel_err": (s["err2"] / max(s["clean2"], 1e-30)) ** 0.5,
                 "embed_recovered": 1 - s["err2"] / s["zero_err2"] if s["zero_err2"] > 0 else float("nan"),
                 "splice_images": images, "splice_tokens": seen}
            if text is not None:
                m |= {"zero_shot_kl": s["kl"] / n, "zero_shot_top1_agreement": s["agree"] / n}
            out[name] = m
        return out


def build_image_source(cfg: RunConfig, sites: list[str], device: torch.device, rank: int = 0,
                       world: int = 1) -> ImageSource:
    model, processor, tokenizer = load_vision(cfg)
    return ImageSource(cfg.data, model, processor, sites, device, cfg.train.seed, rank, world, tokenizer,
                       cfg.eval.zero_shot_labels)
