"""Segment and inpaint images with a trained model: the user-facing API.

    from ldmseg.segmenter import Segmenter
    seg = Segmenter.from_pretrained("runs/quickstart/models/ldm")
    results = seg.segment([image_a, image_b], sampler="dpmsolver++", steps=10)
    results[0].id_map          # (H, W) int64 at the image's own size, 0 = void, segments 1..K

Each image is resized (aspect kept) and padded to the training resolution, encoded by the frozen
image encoder, its mask latent is sampled (:func:`~ldmseg.diffusion.sampling.sample_latents`),
decoded to per-slot logits, taken back to the original size (padding cropped) and post-processed
(:func:`~ldmseg.postprocess.postprocess`).

Seeds: ``seed`` is an int (every image uses it, so an image's result never depends on its position
in the list or the batch size) or one int per image; sample k of an image uses seed + k.

Several samples per image (``num_samples > 1``: the keyword, else the model's
``sampling.num_samples``) make one map by ``sampling.fusion`` (:mod:`ldmseg.agreement`). ``vote``
(the default): segments matched across the samples at IoU > 0.5, each pixel where most samples
put it; ``uncertainty`` is the per-pixel fraction of samples outvoted and a segment's ``score``
one minus its mean uncertainty. ``medoid``: the sample that agrees most with the others (two maps
agree at a pixel when the segments covering it match with IoU > 0.5, or both are void there);
``uncertainty`` is the fraction of the other samples that disagree with it. Either way each
segment gets a ``stability``: the fraction of the samples that reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldmseg.agreement import choose_medoid, consensus_map, segment_agreement, segment_stability
from ldmseg.checkpoint import LoadedModel, load_model
from ldmseg.config import Config, SamplingConfig, sampling_fields, with_sampling
from ldmseg.data.encoding import ids_to_bits, image_to_tensor
from ldmseg.data.resize import resize_pad, ResizeInfo, restore_size
from ldmseg.data.slots import SLOT_ORDERS, raster_slot_lut, remap_ids
from ldmseg.data.ids import encode_panoptic_png
from ldmseg.diffusion.sampling import decode_latents, sample_latents
from ldmseg.postprocess import postprocess

KNOWN_SLOTS = ("given", "predicted")


@dataclass
class SegmentResult:
    """One image's prediction at its original size.

    ``id_map`` (H, W) int64, 0 = void; ``segments`` one dict per segment ``{"id", "area",
    "score", ...}``; ``uncertainty`` (H, W) float32 in [0, 1] when several samples were drawn,
    else None.
    """

    id_map: np.ndarray
    segments: list[dict]
    uncertainty: np.ndarray | None = None


def prepare_image(image: np.ndarray, cfg: Config) -> tuple[np.ndarray, ResizeInfo]:
    """(H, W, 3) uint8 RGB → the (R, R, 3) uint8 input of a model of config ``cfg`` and its geometry
    (``data.resolution`` R, ``data.resize_mode``); see :meth:`Segmenter.prepare`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"each image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} "
                         f"dtype {image.dtype}")
    image_r, _, _, info = resize_pad(image, None, cfg.data.resolution, cfg.data.resize_mode)
    return image_r, info


def match_known_slots(known_slots: np.ndarray, predicted_slots: np.ndarray, num_slots: int) -> np.ndarray:
    """Give each known segment the slot of the predicted segment it overlaps most.

    Args:
        known_slots: (H, W) int64 slots of the known segments in [0, S), 0 = void or unknown.
        predicted_slots: (H, W) int64 slots of the model's own prediction in [0, S), 0 = void.
        num_slots: S.

    Returns ``lut`` (S,) int64, known slot → new slot, one-to-one on the present known slots and
    ``lut[0] = 0``. Pairs (known, predicted) are taken by decreasing overlap in pixels, each slot at
    most once on either side (ties: lower known slot, then lower predicted slot); known segments
    left without an overlapping free predicted slot get the unused slots in increasing order.
    """
    s = int(num_slots)
    known = np.asarray(known_slots, dtype=np.int64).ravel()
    pred = np.asarray(predicted_slots, dtype=np.int64).ravel()
    if known.shape != pred.shape:
        raise ValueError(f"known_slots and predicted_slots must have the same shape, got {np.shape(known_slots)} "
                         f"and {np.shape(predicted_slots)}")
    overlap = np.bincount(known * s + pred, minlength=s * s).reshape(s, s)
    overlap[0, :] = 0
    overlap[:, 0] = 0
    lut = np.zeros(s, dtype=np.int64)
    taken = np.zeros(s, dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        k, p = divmod(int(flat), s)
        if overlap[k, p] == 0:
            break
        if lut[k] == 0 and not taken[p]:
            lut[k], taken[p] = p, True
    free = iter(np.flatnonzero(~taken[1:]) + 1)
    for k in np.unique(known):
        if k > 0 and lut[k] == 0:
            lut[k] = next(free)
            taken[lut[k]] = True
    return lut


def to_coco_prediction(result: SegmentResult, image_id: int, file_name: str) -> tuple[bytes, dict]:
    """A COCO panoptic prediction: PNG bytes (id = R + 256·G + 256²·B) and its annotation dict.

    Class-agnostic: every segment has ``category_id`` 1 and ``iscrowd`` 0; ``area`` in pixels and
    ``bbox`` ``[x, y, width, height]`` are computed from the map.
    """
    from ldmseg.data.segments import segments_info

    ids = np.asarray(result.id_map, dtype=np.int64)
    info = segments_info(ids)
    return encode_panoptic_png(ids), {"image_id": image_id, "file_name": file_name, "segments_info": info}


class Segmenter:
    """A trained model ready to segment: mask AE, image encoder, denoiser, config, latent scale.

    Attributes: ``cfg`` (:class:`~ldmseg.config.Config`), ``mask_ae``, ``image_encoder``,
    ``denoiser``, ``latent_scale``, ``device``.
    """

    def __init__(self, cfg: Config, mask_ae, image_encoder, denoiser, latent_scale: float,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.mask_ae = mask_ae.to(self.device).eval()
        self.image_encoder = image_encoder.to(self.device).eval()
        self.denoiser = denoiser.to(self.device).eval()
        self.latent_scale = float(latent_scale)

    @classmethod
    def from_pretrained(cls, directory_or_loaded: str | LoadedModel, device: str | torch.device | None = None
                        ) -> "Segmenter":
        """From a model folder (local or fsspec URL) or a :class:`~ldmseg.checkpoint.LoadedModel`.

        ``device=None`` picks CUDA when available, else CPU. The image encoder is rebuilt from the
        config when the folder does not hold one.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = directory_or_loaded
        if not isinstance(loaded, LoadedModel):
            loaded = load_model(directory_or_loaded, device=device)
        missing = [n for n in ("mask_autoencoder", "denoiser") if n not in loaded.components]
        if missing:
            raise ValueError(f"the model holds no {' and no '.join(missing)}; segmenting needs a model saved "
                             "with both mask_autoencoder and denoiser components (the LDM stage's output)")
        image_encoder = loaded.components.get("image_encoder")
        if image_encoder is None:
            from ldmseg.models.image_encoder import ImageEncoder

            image_encoder = ImageEncoder.from_config(loaded.cfg.image_encoder)
        return cls(loaded.cfg, loaded.components["mask_autoencoder"], image_encoder,
                   loaded.components["denoiser"], loaded.latent_scale, device)

    # ------------------------------------------------------------------------------------------

    def sampling_config(self, sampler: str | None = None, steps: int | None = None, **options: Any
                        ) -> SamplingConfig:
        """The model's ``sampling`` config with ``sampler``, ``steps`` and ``options`` applied.

        ``options`` are :class:`~ldmseg.config.SamplingConfig` fields (``mask_th``, ``count_th``,
        ``overlap_th``, ``timestep_spacing``, ``sigma_schedule``, ``eta``, ``self_condition``, ...);
        ``None`` values are ignored. An unknown name is a ``TypeError``, a value of the wrong type
        a :class:`~ldmseg.config.ConfigError`.
        """
        unknown = sorted(set(options) - set(sampling_fields()))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; options are the sampling config's fields: "
                            f"{', '.join(sampling_fields())}")
        return with_sampling(self.cfg, {"sampler": sampler, "steps": steps, **options}).sampling

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, ResizeInfo]:
        """(H, W, 3) uint8 RGB → the (R, R, 3) uint8 model input (resized, aspect kept, padded to the
        training resolution R) and its geometry, for :meth:`segment_prepared`. Needs only the
        config: batch jobs run it on CPU workers, away from the model."""
        return prepare_image(image, self.cfg)

    @torch.no_grad()
    def _sample(self, images_r: list[np.ndarray], seeds: list[int], sampling: SamplingConfig,
                known_latent: torch.Tensor | None = None, known_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(R, R, 3) uint8 images → scaled x̂₀ latents (B, C, h, w)."""
        images = image_to_tensor(np.stack(images_r)).to(self.device)
        image_latent = self.image_encoder.encode(images)
        return sample_latents(self.denoiser, image_latent, diffusion_cfg=self.cfg.diffusion, sampling_cfg=sampling,
                              seeds=seeds, latent_channels=self.mask_ae.latent_channels,
                              known_latent=known_latent, known_mask=known_mask)

    def _logits(self, x0: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
        """One scaled latent (C, h, w) → logits (S, H, W) at the original image size."""
        logits = decode_latents(self.mask_ae, x0[None], self.latent_scale)[0]
        return restore_size(logits, info, kind="logits")

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def segment(
        self,
        images: Sequence[np.ndarray],
        *,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int | Sequence[int] = 0,
        num_samples: int | None = None,
        batch_size: int | None = None,
        **options: Any,
    ) -> list[SegmentResult]:
        """Segment (H, W, 3) uint8 RGB images of any sizes; one :class:`SegmentResult` per image.

        ``sampler`` / ``steps`` default to the model's ``sampling`` config; ``options`` override
        its other fields (thresholds ``mask_th``, ``count_th``, ``overlap_th``, ``timestep_spacing``,
        ``eta``, ``self_condition``, ...; :meth:`sampling_config`); ``num_samples`` (default
        ``sampling.num_samples``) samples per image, the medoid returned; ``batch_size`` (default
        ``sampling.batch_size``) bounds the samples drawn at once.
        """
        if isinstance(images, np.ndarray):
            raise TypeError("images must be a list of (H, W, 3) uint8 arrays; wrap a single image: [image]")
        sampling = self.sampling_config(sampler, steps, num_samples=num_samples, **options)
        seeds = [int(seed)] * len(images) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != len(images):
            raise ValueError(f"pass one seed or one seed per image: got {len(seeds)} seeds for {len(images)} images")
        prepared = [self.prepare(im) for im in images]
        return self.segment_prepared([p[0] for p in prepared], [p[1] for p in prepared], seeds=seeds,
                                     sampling=sampling, batch_size=batch_size)

    @torch.no_grad()
    def segment_prepared(self, images_r: Sequence[np.ndarray], infos: Sequence[ResizeInfo], *, seeds: Sequence[int],
                         sampling: SamplingConfig, num_samples: int | None = None, batch_size: int | None = None
                         ) -> list[SegmentResult]:
        """:meth:`segment` on images already prepared (:meth:`prepare`): ``images_r`` (R, R, 3) uint8 with their
        ``infos``, one seed per image, a full :class:`~ldmseg.config.SamplingConfig`
        (:meth:`sampling_config`). With ``num_samples`` K > 1 (default ``sampling.num_samples``) the map
        is the medoid sample, the result carries the per-pixel ``uncertainty``, and each segment a
        ``stability``: the fraction of the K samples that reproduce it at IoU > 0.5 (:mod:`ldmseg.agreement`)."""
        num_samples = sampling.num_samples if num_samples is None else int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        jobs = [(i, k) for i in range(len(images_r)) for k in range(num_samples)]
        maps: dict[tuple[int, int], tuple[np.ndarray, list[dict]]] = {}
        chunk = max(1, int(batch_size or sampling.batch_size))
        for start in range(0, len(jobs), chunk):
            part = jobs[start:start + chunk]
            x0 = self._sample([images_r[i] for i, _ in part], [int(seeds[i]) + k for i, k in part], sampling)
            for (i, k), z in zip(part, x0):
                maps[i, k] = postprocess(self._logits(z, infos[i]), **sampling.postprocess_options)
        results = []
        for i in range(len(images_r)):
            if num_samples == 1:
                id_map, segments = maps[i, 0]
                results.append(SegmentResult(id_map, segments, None))
                continue
            samples = [maps[i, k][0] for k in range(num_samples)]
            if sampling.fusion == "vote":
                results.append(SegmentResult(*consensus_map(samples)))
                continue
            best, uncertainty = choose_medoid(samples)
            id_map, segments = maps[i, best]
            stability = segment_stability(id_map, samples)
            segments = [{**seg, "stability": stability.get(int(seg["id"]), 0.0)} for seg in segments]
            results.append(SegmentResult(id_map, segments, uncertainty))
        return results

    @torch.no_grad()
    def inpaint(
        self,
        image: np.ndarray,
        partial_id_map: np.ndarray,
        known_mask_pixels: np.ndarray | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        known_slots: str = "given",
        **options: Any,
    ) -> SegmentResult:
        """Complete a partial panoptic map (docs/method.md#inpainting; zero-shot).

        Args:
            image: (H, W, 3) uint8 RGB.
            partial_id_map: (H, W) int segment ids, 0 = void or unknown.
            known_mask_pixels: (H, W) bool, True where the map is given (a known pixel with id 0
                is known void); ``None``: known where ``partial_id_map > 0``.

        The known segments get id slots by a permutation seeded with ``seed`` (beyond S − 1 known
        segments, the smallest are encoded as void but still pasted back; a model trained with
        ``diffusion.slot_order`` ``raster`` or ``grid`` numbers them in that order instead; with
        ``known_slots="predicted"`` the image is first sampled without hints and each known segment
        takes the slot of the predicted segment it overlaps most, :func:`match_known_slots`, at
        twice the sampling cost), the partial map is
        encoded by the mask AE at the training resolution, latent cells whose pixels are all
        known (padding counts as known void, as in training) are kept during sampling, and the
        decoded, post-processed prediction fills the unknown pixels. Known pixels keep their
        given ids; a predicted segment on a known segment's slot takes that segment's id; other
        predicted segments get fresh ids above the largest known id.
        """
        image = np.asarray(image)
        partial = np.asarray(partial_id_map)
        if partial.shape != image.shape[:2] or not np.issubdtype(partial.dtype, np.integer):
            raise ValueError(f"partial_id_map must be an integer (H, W) = {image.shape[:2]} map, got shape "
                             f"{partial.shape} dtype {partial.dtype}")
        partial = partial.astype(np.int64)
        if partial.min(initial=0) < 0:
            raise ValueError("partial_id_map ids must be >= 0 (0 = void or unknown)")
        known_px = partial > 0 if known_mask_pixels is None else np.asarray(known_mask_pixels, dtype=bool)
        if known_px.shape != partial.shape:
            raise ValueError(f"known_mask_pixels must be (H, W) = {partial.shape}, got {known_px.shape}")
        if known_slots not in KNOWN_SLOTS:
            raise ValueError(f"known_slots must be one of {KNOWN_SLOTS}, got {known_slots!r}")
        known_ids = np.where(known_px, partial, 0)
        sampling = self.sampling_config(sampler, steps, **options)
        res, mode = self.cfg.data.resolution, self.cfg.data.resize_mode
        f = self.mask_ae.downsample_factor

        remap = remap_ids(known_ids, self.cfg.data.num_slots, np.random.default_rng(seed))
        image_r, slots_r, valid, info = resize_pad(image, remap.slot_map, res, mode)
        slots = remap.slots  # slot → the known segment's id

        def renumber(lut: np.ndarray) -> None:
            nonlocal slots_r, slots
            slots_r = lut[slots_r]
            slots = {int(lut[s]): sid for s, sid in slots.items() if lut[s] > 0}

        order = self.cfg.diffusion.slot_order
        if order != "random" or known_slots == "predicted":
            # the training order of raster and grid models; reading order as a numbering-free
            # tie-break for matching
            slot_lut = SLOT_ORDERS.get(order, raster_slot_lut)
            renumber(slot_lut(torch.from_numpy(slots_r.astype(np.int64))[None], self.cfg.data.num_slots)[0].numpy())
        if known_slots == "predicted":  # the slots the model itself gives these segments
            free = self._sample([image_r], [int(seed)], sampling)
            predicted = decode_latents(self.mask_ae, free, self.latent_scale)[0].argmax(0).cpu().numpy()
            renumber(match_known_slots(slots_r, predicted, self.cfg.data.num_slots))
        _, known_r, _, _ = resize_pad(None, known_px.astype(np.int64), res, mode)
        known_r = (known_r > 0) | ~valid
        bits = ids_to_bits(torch.from_numpy(slots_r)[None].to(self.device), self.mask_ae.num_bits)
        known_latent = self.mask_ae.encode(bits) * self.latent_scale
        known_cells = torch.from_numpy(known_r).to(self.device, torch.float32)[None, None]
        known_mask = -F.max_pool2d(-known_cells, kernel_size=f, stride=f) > 0.5  # min-pool: all pixels known

        x0 = self._sample([image_r], [int(seed)], sampling, known_latent, known_mask)
        pred, segments = postprocess(self._logits(x0[0], info), **sampling.postprocess_options)

        next_id = int(known_ids.max(initial=0)) + 1
        lut = np.zeros(len(segments) + 1, dtype=np.int64)
        scores = {}
        for seg in segments:
            given = slots.get(seg["slot"])
            if given is None:
                given, next_id = next_id, next_id + 1
            lut[seg["id"]] = given
            scores[given] = seg["score"]
        id_map = np.where(known_px, known_ids, lut[pred])
        ids, areas = np.unique(id_map, return_counts=True)
        given_ids = set(np.unique(known_ids).tolist())
        out = [{"id": int(i), "area": int(a), "score": float(scores.get(int(i), 1.0)), "known": int(i) in given_ids}
               for i, a in zip(ids, areas) if i != 0]
        return SegmentResult(id_map, out, None)
