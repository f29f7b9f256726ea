"""What each of the 2 CPU processes of tests/core/test_distributed.py runs (gloo backend, one process per rank).

`run` is the spawned entry point. It plays the scenarios below in order on every rank and writes what the test
needs to compare into `<out>/rank<r>/`: a JSON file of small results and safetensors files of adapter tensors. The
shared data and the single-process references live here too, so the test and the ranks build exactly the same things.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from conftest import clip_batches, tiny_clip
from safetensors.torch import save_file
from torch import nn

WORLD = 2
LR = 0.1
EPOCHS = 2
BATCH = 4
RLP_CTX = [5, 6, 7, 5]  # the context tokens of the RLP prompts ("a photo of a" in a made-up vocabulary)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"

# ------------------------------------------------------------------------------------------------ shared data


def probe_batches() -> list[dict[str, torch.Tensor]]:
    """8 global probe batches of 4; shards are slices of this list."""
    return clip_batches(n=8, batch_size=4, seed=3)


def clip_samples() -> list[dict[str, torch.Tensor]]:
    """16 image-caption samples (one dict per sample) for LoRSU training."""
    return [
        {"pixel_values": b["pixel_values"][i], "input_ids": b["input_ids"][i]}
        for b in clip_batches(n=4, batch_size=BATCH, seed=5)
        for i in range(BATCH)
    ]


def rlp_samples() -> list[dict[str, torch.Tensor]]:
    """16 samples whose captions all carry the RLP context: ``[SOS] ctx class . [EOS]``."""
    g = torch.Generator().manual_seed(7)
    samples = []
    for i in range(16):
        ids = torch.tensor([0, *RLP_CTX, 90 + i % 8, 8, 2])
        samples.append({"pixel_values": torch.randn(3, 16, 16, generator=g), "input_ids": ids})
    return samples


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Stack the samples and ask CLIP for its contrastive loss (``return_loss=True``)."""
    from peft_lorsu.trainer import ImageTextCollator

    return ImageTextCollator()(samples)


def probe_samples() -> list[dict[str, torch.Tensor]]:
    """The samples of :func:`probe_batches` in order: batching them by 4 gives those batches back."""
    return [{k: v[i] for k, v in b.items()} for b in probe_batches() for i in range(BATCH)]


def example_script():
    """examples/accelerate/train_clip.py as a module."""
    import importlib.util

    path = EXAMPLES / "train_clip.py"
    spec = importlib.util.spec_from_file_location("train_clip_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_env(config_file: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file <config_file>`` gives the processes it starts."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def lorsu_model(config):
    """A fresh tiny CLIP with a LoRSU adapter; the same seed on every rank gives the same initial U."""
    from peft import get_peft_model

    model = tiny_clip()
    torch.manual_seed(1)
    return get_peft_model(model, copy.deepcopy(config))


def rlp_model():
    from peft import get_peft_model

    from peft_lorsu.rlp import RLPConfig

    model = tiny_clip()
    torch.manual_seed(1)
    # dropout off: every rank draws its own mask, so DDP training could not equal the one-process reference
    return get_peft_model(model, RLPConfig(init_token_ids=RLP_CTX, rank=1, dropout=0.0))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as save_pretrained would write them (contiguous CPU copies)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous().clone() for k, v in get_peft_model_state_dict(model).items()}


def batched(samples: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """The global batches of ``samples``, in order."""
    return [collate(samples[i : i + BATCH]) for i in range(0, len(samples), BATCH)]


def _train_shard(model: nn.Module, rank: int) -> None:
    """One rank's part of a data-parallel SGD run on :func:`clip_samples`: batches ``rank, rank + WORLD, ...``."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for _ in range(EPOCHS):
        for batch in batched(clip_samples())[rank::WORLD]:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


def reference_train(model: nn.Module, samples: list[dict[str, torch.Tensor]], world: int = WORLD) -> None:
    """The single-process equivalent of DDP over ``world`` ranks with SGD: one step per ``world`` batches.

    Rank ``r`` of a data-parallel run gets batches ``r, r + world, ...``; DDP averages the ranks' gradients, which is
    the gradient of the mean of their losses (CLIP's contrastive loss does not split over a batch, so this is not the
    loss of one batch of ``world * BATCH``).
    """
    batches = batched(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    model.train()
    for _ in range(EPOCHS):
        for step in range(0, len(batches), world):
            loss = sum(model(**b).loss for b in batches[step : step + world]) / world
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------------------------ scenarios


def _probe_config(**kwargs):
    from peft_lorsu import LoRSUConfig

    return LoRSUConfig(r=4, lora_alpha=4, top_k_heads=2, sparsity=0.1, **kwargs)


def selection(config) -> dict[str, Any]:
    return {
        "heads": config.selected_heads,
        "scores": config.head_scores,
        "fc1": {k: v.tolist() for k, v in config.fc1_indices.items()},
    }


def scenario_probe(rank: int) -> dict[str, Any]:
    """The probe on even shards, uneven shards, with the global stopping rule, through DDP, and with a failure."""
    from peft_lorsu import probe_lorsu

    batches = probe_batches()
    out: dict[str, Any] = {}
    even = batches[rank::WORLD]
    out["even"] = selection(probe_lorsu(tiny_clip(), _probe_config(), even, show_progress=False))
    # rank 0 has 5 batches, rank 1 has 3: rank 1 waits for rank 0 to finish; all 8 batches count
    uneven = batches[:5] if rank == 0 else batches[5:]
    out["uneven"] = selection(probe_lorsu(tiny_clip(), _probe_config(), uneven, show_progress=False))
    # 12 samples wanted: the first step brings 8 (4 per rank), the second 16, then all ranks stop together
    seen: list[int] = []

    def counting_loss(model, batch):
        seen.append(batch["pixel_values"].shape[0])
        return model(**batch, return_loss=True).loss

    config = probe_lorsu(tiny_clip(), _probe_config(probe_samples=12), even, counting_loss, show_progress=False)
    out["early_stop"] = {**selection(config), "local_batches": len(seen)}
    # a DDP-wrapped model: the probe must bypass DDP's gradient averaging and not trip over its frozen parameters
    ddp = nn.parallel.DistributedDataParallel(tiny_clip())
    out["ddp"] = selection(probe_lorsu(ddp, _probe_config(), even, show_progress=False))

    # a failure on rank 1 at its second batch must reach rank 0 instead of leaving it blocked in a collective
    def failing_loss(model, batch):
        seen.append(1)
        if rank == 1 and len(seen) == 2:
            raise ValueError("synthetic failure on rank 1")
        return model(**batch, return_loss=True).loss

    seen.clear()
    try:
        probe_lorsu(tiny_clip(), _probe_config(), even, loss_fn=failing_loss, show_progress=False)
        out["failure"] = None
    except Exception as exc:  # the test checks which error each rank saw
        out["failure"] = f"{type(exc).__name__}: {exc}"
    return out


def _train_accelerate(model: nn.Module, samples: list[dict[str, torch.Tensor]], save_dir: Path) -> dict[str, Any]:
    """The example script's plain accelerate loop with SGD: saves on the main process, reloaded on every rank."""
    from accelerate import Accelerator
    from peft import PeftModel

    accelerator = Accelerator()
    initial = adapter_state(model)
    trained = example_script().train(
        accelerator, model, samples, save_dir, collate, EPOCHS, LR, BATCH, optimizer="sgd", shuffle=False
    )
    return {
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        **_after_training(trained, initial, save_dir, lambda: PeftModel.from_pretrained(tiny_clip(), save_dir)),
    }


def _train_trainer(model: nn.Module, samples: list[dict[str, torch.Tensor]], save_dir: Path) -> dict[str, Any]:
    """HF Trainer with the model's own CLIP loss, SGD, no clipping; save_model writes on the main process only."""
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    initial = adapter_state(model)
    # the one-process reference reads the samples in order: transformers >= 5 says so with train_sampling_strategy,
    # 4.x has no such argument and its Trainer always shuffles (SequentialTrainer below)
    sequential = "train_sampling_strategy" in TrainingArguments.__dataclass_fields__
    args = TrainingArguments(
        output_dir=str(save_dir.parent / f"{save_dir.name}-run"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        **({"train_sampling_strategy": "sequential"} if sequential else {}),
        label_names=[],
        remove_unused_columns=False,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer_cls = Trainer if sequential else _sequential_trainer(Trainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=samples, data_collator=collate)
    result = trainer.train()
    trainer.save_model(str(save_dir))
    trainer.accelerator.wait_for_everyone()
    model.eval()
    return {
        "steps": result.global_step,
        "world_size": args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        **_after_training(model, initial, save_dir, lambda: PeftModel.from_pretrained(tiny_clip(), save_dir)),
    }


def _sequential_trainer(trainer_cls: type) -> type:
    """transformers 4.x: a Trainer reading the training set in order (what 5.x's train_sampling_strategy selects)."""

    class SequentialTrainer(trainer_cls):
        def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler:
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

    return SequentialTrainer


def _after_training(
    model: nn.Module, initial: dict[str, torch.Tensor], save_dir: Path, load: Callable[[], nn.Module]
) -> dict[str, Any]:
    trained = adapter_state(model)
    loaded = adapter_state(load())
    return {
        "trained": trained,
        "initial": initial,
        "unchanged": sorted(k for k, v in trained.items() if v.is_floating_point() and torch.equal(v, initial[k])),
        "loaded_equals_trained": sorted(loaded) == sorted(trained)
        and all(torch.equal(loaded[k], trained[k]) for k in trained),
        "saved_files": sorted(os.listdir(save_dir)),
    }


def scenario_fsdp2(rank: int, config, save_dir: Path) -> dict[str, Any]:
    """FSDP2 (fully_shard) on CPU: one unit per CLIPEncoderLayer, SGD, full state dict saved from rank 0."""
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from peft_lorsu import HeadLoRALinear, probe_lorsu
    from peft_lorsu.distributed import fully_shard_clip

    model = lorsu_model(config)
    initial = adapter_state(model)
    fully_shard_clip(model)
    heads = [m for m in model.modules() if isinstance(m, HeadLoRALinear) and m.heads.get("default") is not None]
    factor = {
        "owners": sum(1 for m in heads if m.factor_owner["default"] is m),
        "readers": sum(1 for m in heads if m.factor_owner["default"] is not m),
        "shared_factor_is_dtensor": all(isinstance(m.factor("default"), DTensor) for m in heads),
        "values_are_dtensors": all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lorsu_values" in n),
    }
    _train_shard(model, rank)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(save_dir, state_dict=full)
    torch.distributed.barrier()
    loaded = adapter_state(PeftModel.from_pretrained(tiny_clip(), save_dir))
    try:  # the probe refuses a sharded model (it would score shards)
        probe_lorsu(model, _probe_config(), probe_batches()[rank::WORLD], show_progress=False)
        probe_error = None
    except ValueError as exc:
        probe_error = str(exc)
    return {
        "factor": factor,
        "initial": initial,
        "loaded": loaded,
        "saved_files": sorted(os.listdir(save_dir)),
        "probe_error": probe_error,
    }


def scenario_fsdp1(rank: int, config) -> dict[str, Any]:
    """FSDP1 (FullyShardedDataParallel, use_orig_params) on CPU with the CLIPEncoderLayer auto-wrap policy."""
    import functools

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from peft_lorsu.distributed import clip_encoder_layer_classes, fsdp_ignored_parameters

    model = lorsu_model(config)
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=clip_encoder_layer_classes(model))
    sharded = FullyShardedDataParallel(
        model,
        auto_wrap_policy=policy,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        ignored_states=list(fsdp_ignored_parameters(model)),
    )
    units = sum(isinstance(m, FullyShardedDataParallel) for m in sharded.modules())
    _train_shard(sharded, rank)
    # cpu_offload=True (rank-0-only gathering) crashes FSDP1 on CPU in torch 2.13; every rank gathers instead
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    trained = {k: v for k, v in full.items() if "lorsu_" in k}
    return {"units": units, "trained": trained}


def scenario_example_fsdp2(config, save_dir: Path) -> dict[str, Any]:
    """The example script's FSDP2 branch (what it runs under fsdp.yaml), driven on CPU with ``fsdp=True``.

    accelerate turns FSDP on only for GPU-like devices (on CPU it silently keeps DDP), so the test asks for the
    script's FSDP branch explicitly; that branch uses accelerate for the data only.
    """
    from accelerate import Accelerator
    from peft import PeftModel

    model = lorsu_model(config)
    trained = example_script().train(
        Accelerator(), model, clip_samples(), save_dir, collate, EPOCHS, LR, BATCH, "sgd", shuffle=False, fsdp=True
    )
    loaded = adapter_state(PeftModel.from_pretrained(tiny_clip(), save_dir))
    return {"sharded": type(trained).__name__, "loaded": loaded, "saved_files": sorted(os.listdir(save_dir))}


# ------------------------------------------------------------------------------------------------ entry point


def _write(out: Path, name: str, result: Any) -> None:
    """Tensors (at any depth) into ``<name>.<key path>.safetensors``, the rest into ``<name>.json``."""

    def split(value: Any, path: str) -> Any:
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            save_file({k: v.contiguous() for k, v in value.items()}, str(out / f"{name}.{path}.safetensors"))
            return f"<tensors {path}>"
        if isinstance(value, dict):
            return {k: split(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return value

    (out / f"{name}.json").write_text(json.dumps(split(result, ""), indent=1, sort_keys=True))


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    """Spawned entry point of one rank: set up gloo as ``accelerate launch --cpu`` would, then play every scenario."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(out_dir) / "shared"
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        _write(out, "probe", scenario_probe(rank))

        from accelerate import Accelerator

        # the example's probe: shard_batches gives rank r batches r, r + 2, ... of probe_batches()
        config = example_script().probe(Accelerator(), tiny_clip(), _probe_config(), probe_samples(), BATCH, collate)
        _write(out, "example_probe", selection(config))
        model = lorsu_model(config)
        if rank == 0:
            model.save_pretrained(shared / "lorsu-initial")
        torch.distributed.barrier()
        _write(out, "lorsu_accelerate", _train_accelerate(model, clip_samples(), shared / "lorsu-accelerate"))
        _write(out, "lorsu_trainer", _train_trainer(lorsu_model(config), clip_samples(), shared / "lorsu-trainer"))

        try:
            import peft_lorsu.rlp  # noqa: F401

            rlp_error = None
        except Exception:  # reported to the test, which skips the RLP checks with this reason
            rlp_error = traceback.format_exc(limit=1)
        if rlp_error is None:
            _write(out, "rlp_accelerate", _train_accelerate(rlp_model(), rlp_samples(), shared / "rlp-accelerate"))
            _write(out, "rlp_trainer", _train_trainer(rlp_model(), rlp_samples(), shared / "rlp-trainer"))
        (out / "rlp_import.json").write_text(json.dumps({"error": rlp_error}))

        _write(out, "fsdp2", scenario_fsdp2(rank, config, shared / "lorsu-fsdp2"))
        _write(out, "fsdp1", scenario_fsdp1(rank, config))
        _write(out, "example_fsdp2", scenario_example_fsdp2(config, shared / "lorsu-example-fsdp2"))
        torch.distributed.barrier()  # nobody tears the group down while another rank still talks to it
    finally:
        torch.distributed.destroy_process_group()
