"""FSDP on two CPU processes (gloo): the tiny stage 2 trains under the strategy of
``configs/strategy/fsdp.yaml``, Lightning's full checkpoint holds the trained weights, ``iv2 export``
reads it and ``init_from`` loads the export unchanged.

Lightning 2.6 runs its ``FSDPStrategy`` only on CUDA, for two reasons, both in Lightning:

* ``trainer/connectors/accelerator_connector.py`` (``_check_strategy_and_fallback``) refuses an
  ``FSDPStrategy`` with ``accelerator="cpu"``: "The strategy `fsdp` requires a GPU accelerator, but
  received `accelerator='cpu'`". It checks ``type(strategy) is FSDPStrategy``, so a subclass passes
  (Lightning PR #19781).
* ``FSDPStrategy._setup_model`` passes ``device_id=self.root_device.index``, None for the CPU, and
  torch's FSDP then looks for an accelerator: "FSDP needs a non-CPU accelerator device, but no
  accelerator device is detected." (``torch/distributed/fsdp/_init_utils.py``,
  ``_init_device_handle``; Lightning issue #21778).

torch's FSDP itself trains on the CPU with gloo when it is given ``device_id=cpu``: the test-only
subclass below passes that and changes nothing else. The stage config's norm clipping stays on:
Lightning's ``FSDPPrecision.clip_grad_by_norm`` refuses it ("`gradient_clip_algorithm='norm'` is
currently not supported for `FSDPPrecision`"), so ``BaseStage.configure_gradient_clipping`` clips
through ``FullyShardedDataParallel.clip_grad_norm_`` instead, and this test runs that path.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from gloo_helpers import free_port, join_gloo
from safetensors.torch import load_file

from iv2_lightning.export import export_main
from iv2_lightning.lightning_cli import make_cli
from iv2_lightning.models.weights import SHARED_MODULES, unwrap_stage_keys

pytestmark = pytest.mark.slow  # one spawn of two ranks, shared by the tests

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
DATA_ARGS = (
    "--data.init_args.batch_size=2",
    "--data.init_args.num_workers=0",
    "--data.init_args.image_size=32",
)
FSDP_WRAPPED = "_fsdp_wrapped_module."


def _shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shared modules' tensors, named relative to the stage's torch model (as exports are)."""
    state = unwrap_stage_keys({k.replace(FSDP_WRAPPED, ""): v for k, v in state.items()})
    return {k: v.detach().clone() for k, v in state.items() if k.split(".", 1)[0] in SHARED_MODULES}


def _cpu_fsdp_strategy(**init_args):
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFSDPStrategy(FSDPStrategy):
        # test only: give torch's FSDP the CPU as its device (see the module docstring)
        def _setup_model(self, model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )

    return CPUFSDPStrategy(**init_args)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import lightning as L
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from iv2_lightning.estimate import parse_config
    from iv2_lightning.models.layers import Block

    join_gloo(rank, port, WORLD)
    try:
        # the stage and data of configs/stage2/tiny.yaml, every modality, as `iv2 fit` builds them
        cli = make_cli(
            ["--config", str(ROOT / "configs/stage2/tiny.yaml"), "--trainer.logger=false", *DATA_ARGS],
            run=False,
        )
        fragment = parse_config([ROOT / "configs/stage2/tiny.yaml", ROOT / "configs/strategy/fsdp.yaml"])
        init_args = fragment["trainer"]["strategy"]["init_args"]
        init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
        losses: list[float] = []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        trainer = L.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy=_cpu_fsdp_strategy(**init_args),
            precision=fragment["trainer"]["precision"],
            gradient_clip_val=fragment["trainer"]["gradient_clip_val"],  # clipped by the wrapper (docstring)
            max_steps=2,
            max_epochs=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out_dir,
            callbacks=[Losses()],
        )
        initial = _shared(cli.model.state_dict())
        trainer.fit(cli.model, cli.datamodule)
        wrapped = trainer.strategy.model

        def full() -> dict[str, torch.Tensor]:
            with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
                return _shared(dict(cli.model.named_parameters()))

        before_save = full()
        # outside the forward pass each parameter is a (possibly empty) view of this rank's shard
        local = sum(p.numel() for p in wrapped.parameters())
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
            whole = sum(p.numel() for p in wrapped.parameters())
        trainer.save_checkpoint(f"{out_dir}/fsdp.ckpt")  # the full state dict, written by rank 0
        torch.save(
            {
                "losses": losses,
                "global_step": trainer.global_step,
                "initial": initial,
                "before_save": before_save,
                "after_save": full(),
                "root_is_fsdp": isinstance(wrapped, FullyShardedDataParallel),
                "wrapped_blocks": sum(
                    isinstance(m, FullyShardedDataParallel) and isinstance(m.module, Block)
                    for m in wrapped.modules()
                ),
                "blocks": sum(isinstance(m, Block) for m in cli.model.modules()),
                "local_numel": local,
                "full_numel": whole,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    mp = pytest.importorskip("torch.multiprocessing")
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_fsdp_trains_the_tiny_stage2_on_two_cpu_ranks(ranks):
    """Every block is its own FSDP unit (fsdp.yaml's auto-wrap policy) inside a root unit; each rank
    holds about half the parameters; the two steps train, and both ranks gather the same weights."""
    _, (r0, r1) = ranks
    for r in (r0, r1):
        assert r["global_step"] == 2 and len(r["losses"]) == 2
        assert all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert r["root_is_fsdp"] and r["wrapped_blocks"] == r["blocks"] > 0
    # every parameter lives in exactly one place of one rank's shard
    assert r0["full_numel"] == r1["full_numel"] == r0["local_numel"] + r1["local_numel"]
    assert max(r0["local_numel"], r1["local_numel"]) < 0.51 * r0["full_numel"]
    assert r0["before_save"].keys() == r0["initial"].keys() and len(r0["initial"]) > 100
    for k, v in r0["before_save"].items():
        assert torch.equal(v, r1["before_save"][k]), k
    changed = [k for k, v in r0["before_save"].items() if not torch.equal(v, r0["initial"][k])]
    assert len(changed) > len(r0["initial"]) // 2


def test_the_full_checkpoint_holds_the_trained_weights_and_saving_leaves_them_intact(ranks):
    """Lightning writes a full (unsharded) state dict; on the CPU, gathering it must neither change nor
    free the live weights (cf. Lightning issue #21804: offload_to_cpu on CPU tensors)."""
    out, (r0, _) = ranks
    ckpt = torch.load(out / "fsdp.ckpt", weights_only=True)
    saved = _shared(ckpt["state_dict"])
    assert saved.keys() == r0["before_save"].keys()
    for k, v in r0["before_save"].items():
        assert v.dtype == torch.float32  # FSDP keeps fp32 weights; bf16 is only the compute copy
        assert torch.equal(saved[k], v), k
        assert torch.equal(r0["after_save"][k], v), k


def test_export_an_fsdp_checkpoint_then_init_from_it(ranks, tmp_path, capsys):
    out, (r0, _) = ranks
    weights = tmp_path / "weights.safetensors"
    assert export_main([str(out / "fsdp.ckpt"), str(weights)]) == 0
    assert "from lightning" in capsys.readouterr().out
    exported = load_file(str(weights))
    trained = r0["before_save"]
    assert exported.keys() == trained.keys()
    assert {k.split(".", 1)[0] for k in exported} >= {
        "video_encoder",
        "text_encoder",
        "audio_encoder",
        "fusion",
    }
    for k, v in trained.items():
        assert torch.equal(exported[k], v), k
    loaded = make_cli(
        [
            "--config",
            str(ROOT / "configs/stage2/tiny.yaml"),
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.init_from={weights}",
            *DATA_ARGS,
        ],
        run=False,
    ).model
    state = _shared(loaded.state_dict())
    assert state.keys() == trained.keys()
    for k, v in state.items():
        assert torch.equal(v, trained[k]), k
