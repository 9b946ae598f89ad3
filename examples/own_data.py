"""Bring your own data: train InternVideo2 stage 2 (ContrastiveStage) on your clips and captions, then
score zero-shot classification against your own class names and text-to-video retrieval.

    python examples/own_data.py annotations.jsonl dog cat     (or set IV2_ANNOTATIONS, IV2_CLASSES=dog,cat)

One JSON row per clip: {"video": "clips/a.mp4", "caption": "a dog runs", "label": "dog"} (paths are
relative to the annotation file); the class names give the labels their order. IV2_STEPS: train steps.
"""

import os
import sys

import lightning as L

from iv2_lightning.data import VideoTextDataModule
from iv2_lightning.stages import ContrastiveStage

annotations = sys.argv[1] if len(sys.argv) > 1 else os.environ["IV2_ANNOTATIONS"]
classes = sys.argv[2:] or os.environ["IV2_CLASSES"].split(",")
data = VideoTextDataModule(
    train_annotations=annotations,
    test_annotations=annotations,  # score held-out clips in a real run
    label_names=classes,  # zero-shot prompts: each name in each template
    prompt_templates=["{}", "a video of {}"],
    modalities=["audio", "caption", "label"],
    num_frames=8,
    image_size=64,
    batch_size=4,
)
model = ContrastiveStage(  # what `iv2 fit` links from the data into the model
    num_frames=data.num_frames,
    image_size=data.image_size,
    max_audio_frames=data.max_audio_frames,
    data_fields=data.batch_fields,
)
steps = int(os.environ.get("IV2_STEPS", "200"))
trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False)
trainer.fit(model, data)
scores = trainer.test(model, data, verbose=False)[0]
print(f"zero-shot accuracy {scores['test/zs_acc']:.1f}%, text-to-video R@1 {scores['test/t2v_r1']:.1f}%")
