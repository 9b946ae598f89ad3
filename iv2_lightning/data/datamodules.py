"""LightningDataModules: the embedded synthetic data, annotation files over real media, streaming shards.

All three yield :class:`~iv2_lightning.data.batch.VideoBatch` and share one base for batch size,
workers, tokenizer and the skipped-sample log. Constructor arguments are typed so LightningCLI
configs can set them (a wrong key or type fails at parse time naming the key).

The data tells the model what it is (the CLI links these into the stage, so a config says each once):
the clip geometry (``num_frames``, ``image_size``), the ``tokenizer``, the audio length
(``max_audio_frames``), the batch fields it yields (:attr:`VideoDataModuleBase.batch_fields`, which
the stage's batch contract is checked against) and, for zero-shot classification, its class names
as text prompts (:meth:`VideoDataModuleBase.class_prompts`): the class names belong to the dataset,
as in CLIP-style zero-shot action recognition (InternVideo2, arXiv 2403.15377, evaluates it so).
"""

from __future__ import annotations

import io
import json
import logging
import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from iv2_lightning.data.batch import MODALITIES, SkippedSample, VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.datasets import OnError, SkipLog, VideoTextDataset, collect_skipped
from iv2_lightning.data.resumable import ResumableLoader
from iv2_lightning.data.synthetic import SyntheticVideoDataset
from iv2_lightning.data.synthetic.dataset import check_label
from iv2_lightning.data.synthetic.text import attribute_prompts, sequence_prompts
from iv2_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform
from iv2_lightning.data.video_io import VideoDecodeError, read_clip
from iv2_lightning.features.tokenizers import build_tokenizer

log = logging.getLogger(__name__)

Modality = Literal["audio", "caption", "speech", "label", "qa"]
ALL_MODALITIES: list[Modality] = list(MODALITIES)
#: the prompts a class name goes into when a VideoTextDataModule gets none: the bare name (what short
#: captions look like) and CLIP's "a photo of {}" phrased for video; their text embeddings are averaged
DEFAULT_PROMPT_TEMPLATES = ("{}", "a video of {}")
#: the Lightning trainer stage that reads each split (the keys of ``skip_logs``)
STAGE_OF_SPLIT = {"train": "train", "val": "validate", "test": "test", "predict": "predict"}


def batch_fields_for(modalities: list[str] | None) -> list[str]:
    """The batch fields a DataModule with these ``modalities`` yields (None: every modality): the
    video, then the modalities (names as in a stage's ``batch_contract``; ``qa`` = dialogue turns).
    The CLI computes the model's ``data_fields`` with it from the data's ``modalities``."""
    return ["video", *(ALL_MODALITIES if modalities is None else modalities)]


def prompts_for(label_names: list[str], templates: list[str]) -> dict[str, list[str]]:
    """``{class name: [each template with "{}" replaced by the name]}`` in label order; fails naming a
    template without ``"{}"``, and on empty or repeated names."""
    if not templates:
        raise ValueError("prompt_templates is empty; give at least one template holding '{}'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt_templates {bad} hold no '{{}}' where the class name goes")
    if not label_names or any(not str(n).strip() for n in label_names):
        raise ValueError(f"label_names must be non-empty class names; got {label_names}")
    repeated = sorted({n for n in label_names if label_names.count(n) > 1})
    if repeated:
        raise ValueError(f"label_names repeats {repeated}; each class needs its own name")
    return {name: [t.replace("{}", name) for t in templates] for name in label_names}


class VideoDataModuleBase(L.LightningDataModule):
    """What every video DataModule shares: loaders, collate (tokenizer), skipped-sample log.

    ``max_audio_frames``: the kaldi fbank frames (10 ms each) of sound kept per clip. A longer track
    is cropped to the window of that many frames centred on the sampled video frames, not resampled
    (:func:`~iv2_lightning.data.video_io.audio_window` says why); the CLI links it into the stage,
    whose audio encoder then accepts exactly that length. The default 1024 (10.24 s) is the official
    recipe's "at most 10 s" and the audio encoder's own default.
    """

    def __init__(
        self,
        num_frames: int = 8,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        modalities: list[Modality] | None = None,
        tokenizer: str = "byte",
        max_text_length: int = 32,
        max_audio_frames: int = 1024,
        pin_memory: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.modalities = list(ALL_MODALITIES if modalities is None else modalities)
        self.tokenizer_name = tokenizer
        self.tokenizer = build_tokenizer(tokenizer)
        self.max_text_length = max_text_length
        if isinstance(max_audio_frames, bool) or max_audio_frames < 1:
            raise ValueError(f"max_audio_frames must be an integer >= 1; got {max_audio_frames!r}")
        self.max_audio_frames = max_audio_frames
        self.pin_memory = pin_memory
        self.mean, self.std = tuple(mean), tuple(std)
        # the collate checks the modality names and drops the switched-off ones from every sample
        self.collate = VideoCollate(
            self.tokenizer,
            max_text_length=max_text_length,
            max_audio_frames=max_audio_frames,
            modalities=self.modalities,
        )
        # one log per trainer stage ("train", "validate", "test", "predict"); rows dropped at load go to "train"
        self.skip_logs: dict[str, SkipLog] = defaultdict(SkipLog)
        self.datasets: dict[str, Dataset] = {}
        self._train_loader: ResumableLoader | None = None
        self._resume_position: dict[str, int] | None = None

    @property
    def batch_fields(self) -> list[str]:
        """The fields this data's batches carry (``video`` and the switched-on modalities); the
        stage checks its batch contract against them when a fit starts."""
        return batch_fields_for(self.modalities)

    def class_prompts(self) -> dict[str, list[str]] | None:
        """``{class name: text prompts}`` in label order for zero-shot classification, or None when
        the data has no class names."""
        return None

    def transform(self, train: bool) -> VideoTransform:
        return VideoTransform(self.image_size, train=train, mean=self.mean, std=self.std)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} data; set it in the config")
        kwargs = dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(self.datasets[split]) > self.batch_size,
        )
        trainer = self.trainer
        distributed = trainer is not None and (
            trainer.world_size > 1 or getattr(trainer._accelerator_connector, "is_distributed", False)
        )
        if split == "train" and not distributed:
            # resumable mid-epoch (data/resumable.py); under a distributed strategy (DDP, DeepSpeed, even
            # on one device) Lightning puts its DistributedSampler into a plain DataLoader, which
            # resumes exactly from epoch-end checkpoints only
            loader = ResumableLoader(self.datasets[split], shuffle=shuffle, epoch_fn=self._epoch, **kwargs)
            if self._resume_position is not None:
                loader.resume_at(self._resume_position)
                self._resume_position = None
            self._train_loader = loader
            return loader
        return DataLoader(self.datasets[split], shuffle=shuffle, **kwargs)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """Where the training loader stands when a checkpoint is written in the middle of an epoch
        (epoch, seed of its order, batches the training loop consumed); nothing at an epoch's end."""
        trainer, loader = self.trainer, self._train_loader
        if loader is None or trainer is None or trainer.state.fn != "fit":
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        total = trainer.num_training_batches
        if not 0 < done < total:
            return {}
        position = loader.position(done)
        return {"train_position": position} if position is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:
            self._train_loader.resume_at(position)
        else:
            self._resume_position = dict(position)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # no validation data (no val_annotations, val_size 0): a fit trains without validating,
        # which Lightning does for an empty list of loaders
        if "val" not in self.datasets:
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test", shuffle=False)

    def on_after_batch_transfer(self, batch: VideoBatch, dataloader_idx: int) -> VideoBatch:
        skipped = collect_skipped(batch.meta)
        if skipped:
            trainer = getattr(self, "trainer", None)
            stage = trainer.state.stage.value if trainer is not None and trainer.state.stage else "train"
            self.skip_logs["validate" if stage == "sanity_check" else stage].add(skipped)
        return batch


class SyntheticVideoDataModule(VideoDataModuleBase):
    """The embedded synthetic multimodal clips (no download): see :mod:`iv2_lightning.data.synthetic`.

    A clip's sound lasts as long as its frames (``num_frames / fps`` s: 98 fbank frames at the
    defaults), so ``max_audio_frames`` crops nothing unless it is smaller (the collate then keeps
    the first frames). ``label``: which attribute of the first object the labels are (``direction``,
    the default, ``shape`` or ``color``); :meth:`class_prompts` gives that attribute's prompts, so
    the same stage measures zero-shot shape or colour by changing this one field.

    ``windows > 1``: long clips of ``windows * num_frames`` frames whose object turns at every window
    boundary (:func:`~iv2_lightning.data.synthetic.dataset.generate_clip`); with ``label: sequence``
    the label is the ordered direction sequence (12 classes for 2 windows), which the mean of
    per-window features cannot read (it sees the set of directions, not their order).

    ``cache``: keep each rendered clip (uint8 frames and fbank, about 150 kB at 8 x 64² with sound)
    in memory after its first use, so later epochs only normalise it. A clip is a pure function of
    (seed, split, index), so the batches are the same with and without it. With ``num_workers > 0``
    each worker holds its own cache (the workers persist between epochs)."""

    def __init__(
        self,
        num_frames: int = 8,
        image_size: int = 64,
        batch_size: int = 16,
        num_workers: int = 0,
        train_size: int = 2000,
        val_size: int = 256,
        test_size: int = 256,
        seed: int = 0,
        max_objects: int = 1,
        fps: float = 8.0,
        modalities: list[Modality] | None = None,
        tokenizer: str = "byte",
        max_text_length: int = 64,
        max_audio_frames: int = 1024,
        pin_memory: bool = False,
        cache: bool = False,
        label: Literal["direction", "shape", "color", "sequence"] = "direction",
        windows: int = 1,
    ) -> None:
        super().__init__(
            num_frames=num_frames,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            modalities=modalities,
            tokenizer=tokenizer,
            max_text_length=max_text_length,
            max_audio_frames=max_audio_frames,
            pin_memory=pin_memory,
        )
        self.cache = cache
        if cache and num_workers > 0:
            warnings.warn(
                "SyntheticVideoDataModule: cache=true with num_workers > 0 keeps each clip in the loader worker "
                "that rendered it, so memory grows through the first epoch (measured: about 0.3 MB a clip at "
                "8 x 64² with sound, benchmarks/loader_memory.py); for long epochs set cache: false",
                stacklevel=2,
            )
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.seed = seed
        self.max_objects = max_objects
        self.fps = fps
        check_label(label, windows)  # at construction, naming the field, not at setup
        self.label = label
        self.windows = windows

    def make_dataset(self, split: str) -> SyntheticVideoDataset:
        return SyntheticVideoDataset(
            split=split,
            size=self.sizes[split],
            num_frames=self.num_frames,
            image_size=self.image_size,
            seed=self.seed,
            fps=self.fps,
            max_objects=self.max_objects,
            with_audio="audio" in self.modalities,
            with_speech="speech" in self.modalities,
            transform=self.transform(train=False),
            cache=self.cache,
            label=self.label,
            windows=self.windows,
        )

    def class_prompts(self) -> dict[str, list[str]]:
        """The prompts of the ``label`` attribute (labels are its value indices, in the same order)."""
        if self.label == "sequence":
            return sequence_prompts(self.windows)
        return attribute_prompts(self.label)

    def setup(self, stage: str | None = None) -> None:
        for split, size in self.sizes.items():
            if size > 0 and split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)


class VideoTextDataModule(VideoDataModuleBase):
    """Clips listed in annotation files (JSONL / JSON / CSV, see :mod:`iv2_lightning.data.annotations`).

    ``max_audio_frames``: a clip's sound longer than that many fbank frames is cropped to the window
    centred on its sampled frames, and only that window is decoded (see the base class).
    ``label_names``: the class names in label order; rows may then give ``label`` by name, and
    :meth:`class_prompts` puts each name into every ``prompt_templates`` entry (each holds ``{}``
    where the name goes; default :data:`DEFAULT_PROMPT_TEMPLATES`, ``["{}", "a video of {}"]``).
    Without ``label_names`` there are no class prompts, and ``prompt_templates`` is refused.
    ``num_mel_bins``: mel bins of the kaldi fbank (128, as BEATs was pretrained; InternVideo2's
    audio loader uses 64, ``dataset/av_utils.py``).
    """

    def __init__(
        self,
        train_annotations: str | None = None,
        val_annotations: str | None = None,
        test_annotations: str | None = None,
        predict_annotations: str | None = None,
        root: str | None = None,
        num_frames: int = 8,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        modalities: list[Modality] | None = None,
        tokenizer: str = "byte",
        max_text_length: int = 32,
        max_audio_frames: int = 1024,
        caption_source: Literal["caption", "fused"] = "caption",
        on_error: OnError = "skip",
        train_crop_scale: tuple[float, float] = (0.5, 1.0),
        flip: bool = False,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        pin_memory: bool = False,
        seed: int = 0,
        label_names: list[str] | None = None,
        prompt_templates: list[str] | None = None,
        num_mel_bins: int = 128,
    ) -> None:
        super().__init__(
            num_frames=num_frames,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            modalities=modalities,
            tokenizer=tokenizer,
            max_text_length=max_text_length,
            max_audio_frames=max_audio_frames,
            pin_memory=pin_memory,
            mean=mean,
            std=std,
        )
        if label_names is None and prompt_templates is not None:
            raise ValueError("prompt_templates needs label_names (the class names to put into them)")
        self.label_names = None if label_names is None else list(label_names)
        self.prompt_templates = list(
            DEFAULT_PROMPT_TEMPLATES if prompt_templates is None else prompt_templates
        )
        # built now, so that a template without "{}" fails when the config is read, not at validation
        self._class_prompts = (
            None if self.label_names is None else prompts_for(self.label_names, self.prompt_templates)
        )
        self.files = {
            "train": train_annotations,
            "val": val_annotations,
            "test": test_annotations,
            "predict": predict_annotations,
        }
        if not any(self.files.values()):
            raise ValueError("VideoTextDataModule needs at least one of train/val/test/predict_annotations")
        self.root = root
        self.caption_source = caption_source
        self.on_error = on_error
        self.train_crop_scale = train_crop_scale
        self.flip = flip
        self.seed = seed
        if isinstance(num_mel_bins, bool) or num_mel_bins < 1:
            raise ValueError(f"num_mel_bins must be an integer >= 1; got {num_mel_bins!r}")
        self.num_mel_bins = num_mel_bins

    def class_prompts(self) -> dict[str, list[str]] | None:
        """Each of ``label_names`` in every prompt template, in label order (None without names)."""
        return None if self._class_prompts is None else {k: list(v) for k, v in self._class_prompts.items()}

    def transform(self, train: bool) -> VideoTransform:
        return VideoTransform(
            self.image_size,
            train=train,
            scale=self.train_crop_scale,
            flip=self.flip,
            mean=self.mean,
            std=self.std,
        )

    def setup(self, stage: str | None = None) -> None:
        for split, path in self.files.items():
            if path and split not in self.datasets:
                ds = VideoTextDataset(
                    path,
                    root=self.root,
                    num_frames=self.num_frames,
                    train=split == "train",
                    transform=self.transform(split == "train"),
                    modalities=self.modalities,
                    caption_source=self.caption_source,
                    on_error=self.on_error,
                    seed=self.seed,
                    max_audio_frames=self.max_audio_frames,
                    label_names=self.label_names,
                    num_mel_bins=self.num_mel_bins,
                )
                self.skip_logs[STAGE_OF_SPLIT[split]].add_rows(ds.row_errors)
                self.datasets[split] = ds


# -- streaming shards (LitData) -----------------------------------------------------------------


def shard_item(row: dict[str, Any]) -> dict[str, Any]:
    """One annotation row → one LitData item: the encoded media bytes plus the text (no decoding)."""
    path = Path(row["path"])
    return {
        "media": path.read_bytes(),
        "name": str(row["video"]),
        "meta": json.dumps({k: v for k, v in row.items() if k not in ("path",)}, ensure_ascii=False),
    }


def _streaming_dataset_class():
    from litdata import StreamingDataset  # imported lazily: litdata is only needed for shards

    class StreamingVideoDataset(StreamingDataset):
        """LitData shards of encoded clips; decoding happens here, in ``__getitem__`` (in the workers)."""

        def __init__(
            self,
            input_dir: str,
            num_frames: int,
            transform: VideoTransform,
            train: bool,
            modalities: list[str],
            shuffle: bool,
            seed: int,
            on_error: str,
            max_audio_frames: int | None = None,
        ) -> None:
            super().__init__(input_dir, shuffle=shuffle, seed=seed, drop_last=shuffle)
            self.num_frames = num_frames
            self.video_transform = transform
            self.train = train
            self.modalities = set(modalities)
            self.on_error = on_error
            self.item_seed = seed
            self.max_audio_frames = max_audio_frames

        def __getitem__(self, index: Any) -> VideoSample | SkippedSample:
            item = super().__getitem__(index)
            meta = json.loads(item["meta"])
            idx = int(meta.get("index", 0))
            rng = random.Random(hash((self.item_seed, self.current_epoch, idx)) if self.train else idx)
            try:
                clip = read_clip(
                    io.BytesIO(item["media"]),
                    num_frames=self.num_frames,
                    sampling="rand" if self.train else "middle",
                    size=self.video_transform.size,
                    start=meta.get("start"),
                    end=meta.get("end"),
                    audio="audio" in self.modalities,
                    rng=rng,
                    max_audio_frames=self.max_audio_frames,
                )
            except (VideoDecodeError, OSError, ValueError, RuntimeError) as err:
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                if self.on_error == "raise":
                    raise VideoDecodeError(item["name"], reason) from err
                return SkippedSample(item["name"], reason)
            captions = meta.get("caption") or []
            captions = [captions] if isinstance(captions, str) else captions
            caption = (rng.choice(captions) if self.train else captions[0]) if captions else None
            return VideoSample(
                video=self.video_transform(clip.video, rng),
                sample_id=idx,
                caption=caption,  # switched-off modalities are dropped by the collate
                audio=clip.audio,
                speech=meta.get("asr"),
                label=meta.get("label"),
                qa=[tuple(p) for p in meta.get("qa") or []],
                meta={"path": item["name"], "frame_times": list(clip.frame_times), "index": idx},
            )

    return StreamingVideoDataset


class StreamingVideoDataModule(VideoDataModuleBase):
    """Shards written by ``iv2 prepare`` read with LitData's ``StreamingDataset`` /
    ``StreamingDataLoader``: balanced across ranks, resumable mid-epoch (the loader's state is part
    of the Lightning checkpoint through :meth:`state_dict`)."""

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        test_dir: str | None = None,
        num_frames: int = 8,
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        modalities: list[Modality] | None = None,
        tokenizer: str = "byte",
        max_text_length: int = 32,
        max_audio_frames: int = 1024,
        on_error: OnError = "skip",
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(
            num_frames=num_frames,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            modalities=modalities,
            tokenizer=tokenizer,
            max_text_length=max_text_length,
            max_audio_frames=max_audio_frames,
            pin_memory=pin_memory,
        )
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        if not any(self.dirs.values()):
            raise ValueError("StreamingVideoDataModule needs at least one of train_dir/val_dir/test_dir")
        self.on_error = on_error
        self.seed = seed
        self.loaders: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        cls = _streaming_dataset_class()
        for split, path in self.dirs.items():
            if path and split not in self.datasets:
                if not Path(path).is_dir() or not (Path(path) / "index.json").is_file():
                    raise FileNotFoundError(
                        f"{split}_dir {path} holds no LitData shards (index.json); run `iv2 prepare`"
                    )
                self.datasets[split] = cls(
                    path,
                    self.num_frames,
                    self.transform(split == "train"),
                    split == "train",
                    self.modalities,
                    shuffle=split == "train",
                    seed=self.seed,
                    on_error=self.on_error,
                    max_audio_frames=self.max_audio_frames,
                )

    def _loader(self, split: str, shuffle: bool):
        from litdata import StreamingDataLoader

        if split not in self.datasets:
            raise RuntimeError(f"StreamingVideoDataModule has no {split!r} shards; set {split}_dir")
        if split not in self.loaders:
            self.loaders[split] = StreamingDataLoader(
                self.datasets[split],
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                collate_fn=self.collate,
                pin_memory=self.pin_memory,
            )
        return self.loaders[split]

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self.loaders["train"].state_dict()} if "train" in self.loaders else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_loader" in state_dict:
            self.setup("fit")
            self._loader("train", shuffle=True).load_state_dict(state_dict["train_loader"])


__all__ = [
    "DEFAULT_PROMPT_TEMPLATES",
    "StreamingVideoDataModule",
    "SyntheticVideoDataModule",
    "VideoDataModuleBase",
    "VideoTextDataModule",
    "batch_fields_for",
    "prompts_for",
    "shard_item",
]
