"""The One4D training task: what one step does with a batch of clips.

batch (rgb, xyz, valid, caption/text_emb) -> frozen VAE latents -> UMC task + condition latent per sample
-> one flow-matching time per sample, separate noise per branch -> DLC model -> per-branch flow loss.
The trainer (trainer.py) owns everything generic: DeepSpeed, schedule, checkpoints, tracking.
"""
from __future__ import annotations

import glob
import logging
import math
import os
from pathlib import Path

import deepspeed
import numpy as np
import torch
from torch import nn

from data_pipeline.decode import window_span
from data_pipeline.finish import finish_batch
from data_pipeline.latents import LatentsMismatchError, latents_spec, same_source, text_identity
from data_pipeline.loader import build_loader
from data_pipeline.manifest import TEXT_EMBEDDING_WIDTH
from data_pipeline.reader import list_shards, shard_directory, stored_latents, stored_text
from data_pipeline.shard_index import ShardIndexError, read_index, read_json
from one4d_train.configtools import ConfigError
from one4d_train.diffusion.objective import flow_loss, latent_validity, noisy_pair
from one4d_train.model.adapters import AdapterError, data_window, export_adapters, load_adapters
from one4d_train.model.attention import set_attention_backend
from one4d_train.model.backbone import WanDiT
from one4d_train.model.checkpointing import apply_configured_checkpointing
from one4d_train.model.compile import compile_blocks
from one4d_train.model.config import OFFLOAD_MIN_MIB
from one4d_train.model.control_links import resolve_link_blocks
from one4d_train.model.dlc import share_base_with_zero3
from one4d_train.model.offload import apply_configured_offload
from one4d_train.model.offload_plan import WORKER_RESERVE, block_because, per_node, plan, seen_here, this_node
from one4d_train.model.offload_plan import weights_bytes
from one4d_train.model.attention import attention_problems
from one4d_train.model.fp8 import fp8_problems
from one4d_train.model.encoders import (build_encoders, encoder_dtype, encoder_file_problems, text_encoder_device,
                                         vae_kernel_problems)
from one4d_train.model.flops import model_flops_per_sample
from one4d_train.model.one4d import DTYPES, One4DModel, random_base_state
from one4d_train.model.presets import IMAGE_TOKENS, wan_config
from one4d_train.model.state_dict import checkpoint_fingerprint, open_backbone_checkpoint
from one4d_train.model.text_encoder import batch_text_embeddings
from one4d_train.model.umc import condition_latents, first_observed_frame, fold_frame_mask, rgb_branch_input
from one4d_train.model.umc import sample_umc
from one4d_train.model.vae import latent_shape
from one4d_train.train.distributed import broadcast_from_main, from_every_rank
from one4d_train.train.warm_start import WarmStartError, init_problems, init_source, source_problems

log = logging.getLogger(__name__)
MODEL_FILES = ("checkpoint", "vae", "text_encoder", "tokenizer", "image_encoder", "empty_prompt_embedding")  # model.*


def base_parameter_names(model: nn.Module) -> dict[str, str]:
    """{One4D parameter name: official Wan2.1 name} for the frozen backbone parameters."""
    return {name: name[len("base."):].replace(".base_layer.", ".")
            for name, p in model.named_parameters() if name.startswith("base.") and not p.requires_grad}


class One4DTask:
    def __init__(self, cfg):
        self.cfg = cfg
        m = cfg.model
        problems = self.config_problems(cfg)
        if problems:
            raise ConfigError("; ".join(f"key '{key}': {problem}" for key, problem in problems))
        self.dtype = DTYPES[m.compute_dtype]
        self.wan_cfg = wan_config(m.preset, in_dim=36, has_image_input=m.has_image_input)
        self._encoders = None
        self._base_loaded_at_build = False
        self._init_source = None  # the checkpoint or export model.init_adapters started the run from
        self._unit = None  # the checkpointing unit, `auto` resolved (checkpointing_unit)
        self._stored_text = None  # what stored_text read

    # ---- config -----------------------------------------------------------------------------------------
    @staticmethod
    def config_problems(cfg) -> list[tuple[str, str]]:
        """Settings this task cannot train with, by key (checked again when the task is built)."""
        m, t = cfg.model, cfg.train
        p = unset_file_problems(m) + link_problems(m)
        if m.compile and t.zero_stage == 3:
            p.append(("model.compile", "needs train.zero_stage=2: ZeRO-3's parameter-fetch hooks break the compiled "
                      "graphs (slower than eager, see benchmarks/PERF_NOTES.md)"))
        p += vae_kernel_problems(m, _local_device(t.device)) + attention_problems(m.attention)
        p += fp8_problems(m.base_matmul, _local_device(t.device))
        if m.compute_dtype != t.precision:
            p.append(("model.compute_dtype", f"{m.compute_dtype} and train.precision={t.precision} must agree: "
                      "training and evaluation run the base in that one dtype"))
        return p

    @staticmethod
    def ignored_settings(cfg) -> list[tuple[str, str]]:
        """Model settings with no effect in this config (`one4d train` warns about them at the start)."""
        m, notes = cfg.model, []
        layers = wan_config(m.preset).num_layers
        if m.activation_checkpointing == "none" and m.activation_checkpointing_blocks != -1:
            notes.append(("model.activation_checkpointing_blocks", f"{m.activation_checkpointing_blocks}: no block is "
                          "checkpointed (model.activation_checkpointing=none)"))
        elif m.activation_checkpointing_blocks > layers:
            notes.append(("model.activation_checkpointing_blocks", f"{m.activation_checkpointing_blocks}, but preset "
                          f"{m.preset!r} has {layers} blocks: all of them are checkpointed"))
        if not m.activation_offload and m.activation_offload_blocks != -1:
            notes.append(("model.activation_offload_blocks", f"{m.activation_offload_blocks}, but "
                          "model.activation_offload is off: every block's activations stay on the GPU"))
        elif m.activation_offload_blocks == 0:
            notes.append(("model.activation_offload_blocks", "0: no block's activations are moved to host memory "
                          "(as model.activation_offload=false)"))
        elif m.activation_offload_blocks > layers:
            notes.append(("model.activation_offload_blocks", f"{m.activation_offload_blocks}, but preset "
                          f"{m.preset!r} has {layers} blocks: all of them are offloaded"))
        if not m.activation_offload and m.activation_offload_min_mib != OFFLOAD_MIN_MIB:
            notes.append(("model.activation_offload_min_mib", f"{m.activation_offload_min_mib:g}, but "
                          "model.activation_offload is off: nothing is moved to host memory"))
        unit = m.activation_checkpointing_unit
        auto_block = block_because(m, layers) if unit == "auto" else None
        if auto_block:
            notes.append(("model.activation_checkpointing_unit", f"auto is the block here: {auto_block}"))
        elif unit not in ("block", "auto") and (m.activation_checkpointing == "none" or not m.compile):
            why = ("no block is checkpointed (model.activation_checkpointing=none)"
                   if m.activation_checkpointing == "none" else
                   "without model.compile, backward recomputes each sub-layer whole: what the unit keeps only "
                   "costs memory")
            notes.append(("model.activation_checkpointing_unit", f"{unit}, but {why}"))
        if m.design != "dlc" and m.link_blocks:
            notes.append(("model.link_blocks", f"control links are DLC's: model.design={m.design} has none"))
        if not text_identity(m, cfg.seed) and m.text_encoder_device != "auto":  # (the tiny preset has its tower)
            notes.append(("model.text_encoder_device", f"{m.text_encoder_device}, but there is no model.text_encoder "
                          "(text embeddings come from the shards)"))
        if m.lora_kernel == "fused" and (m.lora.dropout > 0 or m.base_matmul == "fp8"):
            why = f"model.lora.dropout={m.lora.dropout:g}" if m.lora.dropout > 0 else "model.base_matmul=fp8"
            notes.append(("model.lora_kernel", f"fused, but {why}: the branch layers run the separate products"))
        return notes

    @classmethod
    def check_config(cls, cfg) -> list[tuple[str, str]]:
        """`one4d train`'s check before any process group: config_problems, then that what the run reads exists:
        the model files, the training shards (index, shard files, a clip as long as the frame window, stored latents
        fitting this config) and the held-out set, whether in-training evaluation (eval.every) or the evaluation
        after the run (slurm/train.sbatch's, `one4d eval` of the run directory, which read the run's config) scores
        it: a typo there surfaced only in the evaluation job, once the training job was over."""
        p = cls.config_problems(cfg) + model_file_problems(cfg)
        shard_problems = _training_shard_problems(cfg)
        p += shard_problems or _resume_problems(cfg)
        if cfg.model.init_adapters and not link_problems(cfg.model) and not _resuming(cfg):
            p += init_problems(cfg, _link_blocks(cfg.model))
        if cfg.eval.dataset or cfg.data.val_shards:
            p += _eval_set_problems(cfg)
        elif cfg.eval.every:
            p.append(("eval.every", f"{cfg.eval.every}, but there is nothing to evaluate on: set data.val_shards=<held-out "
                      "shard directory> (or eval.dataset=<shards | sintel:ROOT | bonn:ROOT | tum:ROOT>), or eval.every=0"))
        return p

    # ---- model ------------------------------------------------------------------------------------------
    def build_model(self, partitioned) -> nn.Module:
        """The frozen base is built partitioned (never whole on a rank under ZeRO-3) and filled from its source;
        the trainable parts are then built replicated around it (the XYZ patch embedding and the ablations'
        widened embedding/head copy the loaded base's values) and partitioned by deepspeed.initialize."""
        set_attention_backend(self.cfg.model.attention)
        if self.cfg.train.zero_stage == 3:
            with partitioned():
                base = WanDiT(self.wan_cfg)
        else:  # replicated base: built on meta, materialised once in the compute dtype on this device
            with torch.device("meta"):
                base = WanDiT(self.wan_cfg).to(self.dtype)
            base.to_empty(device=_local_device(self.cfg.train.device))
        params = dict(base.named_parameters())
        self._load_frozen(params, {n: n for n in params})
        self._base_loaded_at_build = True
        copied = [*base.patch_embedding.parameters(), *base.head.head.parameters()]
        with deepspeed.zero.GatheredParameters(copied, modifier_rank=None):
            model = One4DModel(base, self.cfg.model)
        if self.cfg.train.zero_stage == 3:
            share_base_with_zero3(model)
        if self.cfg.model.init_adapters:
            self._warm_start(model)
        apply_configured_checkpointing(base.blocks, self.cfg.model, self.checkpointing_unit())
        apply_configured_offload(model, self.cfg.model)
        if self.cfg.model.compile:
            compile_blocks(base.blocks)
        return model

    def checkpointing_unit(self) -> str:
        """model.activation_checkpointing_unit, `auto` resolved (model/offload_plan.py) once, by build_model: after
        the base is loaded (its files' page cache is reclaimable), before any step offloads. Collective in a process
        group with `auto`: every rank reports its host and the host memory it sees, and all run the coarsest of the
        nodes' choices, each logged by rank 0."""
        if self._unit is None:
            self._unit = self._resolve_unit()
        return self._unit

    def _resolve_unit(self) -> str:
        m = self.cfg.model
        if m.activation_checkpointing_unit != "auto":
            return m.activation_checkpointing_unit
        tokens = self.tokens_per_sample() * self.cfg.train.micro_batch_size
        nodes = per_node(from_every_rank(seen_here())) if torch.distributed.is_initialized() else this_node()
        unit, picks = plan(m, self.wan_cfg, tokens, nodes, self._host_bytes_besides_offload())
        if _rank() == 0:
            for host, (chosen, why) in sorted(picks.items()):
                log.info("model.activation_checkpointing_unit auto on %s: %s (%s)", host, chosen, why)
            if len(picks) > 1:
                log.info("model.activation_checkpointing_unit auto: every rank runs %s, the coarsest of %d nodes' "
                         "choices", unit, len(picks))
        return unit

    def _host_bytes_besides_offload(self) -> int:
        """Host memory this process takes after the unit is chosen, besides the offload: a reserve per data-loader
        worker, and the text encoder's weights where they live in host memory and are built at the first step. On
        shards that store the empty prompt's embedding too (`one4d encode-latents`) the encoder is built only for a
        caption without a stored embedding, which such shards do not have: not counted."""
        m = self.cfg.model
        other = self.cfg.data.num_workers * WORKER_RESERVE
        if m.text_encoder:
            stored, empty = self.stored_text()
            on_host = text_encoder_device(m, _local_device(self.cfg.train.device), stored).type == "cpu"
            if on_host and not (stored and empty is not None):
                other += weights_bytes(m.text_encoder)
        return other

    def _warm_start(self, model: nn.Module) -> None:
        """model.init_adapters: the source's adapters and links copied into the trainable parameters, which every
        rank holds whole until deepspeed.initialize partitions them and makes the optimizer's fp32 copies; nothing
        where the run resumes (its checkpoint holds its own). Rank 0 decides, resolves the source and checks it again
        for every rank (a run directory's newest checkpoint may change after the start-up checks, and another node's
        listing lag)."""
        found = None
        if _rank() == 0:
            if _resuming(self.cfg):
                found = ("resume",)
            else:
                try:
                    adapters, source = init_source(self.cfg.model.init_adapters)
                    problems = source_problems(self.cfg, adapters, source, model.link_blocks)
                except WarmStartError as exc:
                    problems = [("model.init_adapters", str(exc))]
                found = (("error", "; ".join(f"key '{k}': {v}" for k, v in problems)) if problems
                         else ("source", adapters, source))
        found = broadcast_from_main(found) if torch.distributed.is_initialized() else found
        if found[0] == "resume":
            if _rank() == 0:
                log.info("model.init_adapters=%s is not read: the run resumes from a checkpoint",
                         self.cfg.model.init_adapters)
            return
        if found[0] == "error":
            raise ConfigError(found[1])
        _, adapters, source = found
        load_adapters(model, adapters)
        self._init_source = source
        if _rank() == 0:
            log.info("adapters and control links start from %s", source)

    def run_tags(self) -> dict[str, str]:
        """MLflow tags of the run this task starts: the source of its initial adapters (model.init_adapters), the
        checkpointing unit `auto` resolved to."""
        tags = {"one4d.init_adapters": self._init_source} if self._init_source else {}
        if self.cfg.model.activation_checkpointing_unit == "auto" and self._unit is not None:  # (every rank's)
            tags["one4d.checkpointing_unit"] = self._unit
        return tags

    def _base_source(self):
        """name -> tensor getter for the frozen base: the checkpoint's, or Wan's seeded init of the tiny preset."""
        if self.cfg.model.checkpoint:
            with torch.device("meta"):
                shapes = {k: tuple(p.shape) for k, p in WanDiT(self.wan_cfg).named_parameters()}
            return open_backbone_checkpoint(self.cfg.model.checkpoint, shapes)
        state = random_base_state(self.wan_cfg, self.cfg.seed)
        return state.__getitem__

    def _load_frozen(self, params: dict[str, nn.Parameter], names: dict[str, str]) -> None:
        """Copy the source's tensors into `params` (name -> official name), one parameter at a time, gathered
        from its ZeRO-3 partitions and written by rank 0 (without ZeRO-3 every rank copies its own replica)."""
        partitioned = any(hasattr(p, "ds_id") for p in params.values())
        get = self._base_source() if _rank() == 0 or not partitioned else None
        for name, official in names.items():
            p = params[name]
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if get is not None:
                    p.copy_(get(official).to(p.dtype))

    def identity(self) -> dict:
        """What the adapters and links depend on beyond their shapes, as every checkpoint records it: the frozen base
        (model.checkpoint and its content fingerprint, model/state_dict.py; "random-seed-N" for the seeded random
        base of the tiny preset; checkpoints written before the seed was recorded say "random") and the LoRA scale
        model.lora.alpha (the same weights under another scale are another function, and an export would carry the
        new scale)."""
        if not hasattr(self, "_identity"):
            path = self.cfg.model.checkpoint
            self._identity = {"checkpoint": path, "fingerprint": base_fingerprint(path, self.cfg.seed),
                              "lora_alpha": self.cfg.model.lora.alpha}
        return self._identity

    def load_base_weights(self, model: nn.Module) -> None:
        """Reload the frozen base (ZeRO-3 checkpoints do not hold it); trainable parameters are untouched. The
        call right after engine init finds the weights build_model loaded and reads nothing."""
        if self._base_loaded_at_build:
            self._base_loaded_at_build = False
            return
        self._load_frozen(dict(model.named_parameters()), base_parameter_names(model))

    # ---- data -------------------------------------------------------------------------------------------
    def build_loader(self, rank: int, world_size: int, position: dict | None):
        if not self.cfg.data.shards:
            raise ValueError("data.shards is empty: point it at a shard directory made by `one4d shard`")
        if rank == 0:
            self._warn_about_data()
        return build_loader(self.cfg.data, rank=rank, world_size=world_size, seed=self.cfg.seed,
                            micro_batch_size=self.cfg.train.micro_batch_size, position=position,
                            latents=latents_spec(self.cfg))

    def _warn_about_data(self) -> None:
        """Say, once, how many training clips are shorter than the frame window (short_clip_warning) or smaller than
        its size (upsampled_clip_warning), and how many
        samples of the training and held-out shards store no text embedding where no text encoder is set
        (missing_text_warning: a captioned one stops the run where it is read, an evaluation perhaps hours in)."""
        from one4d_train.eval.pipeline import BENCHMARKS

        held_out = self.cfg.eval.dataset or self.cfg.data.val_shards
        for spec in dict.fromkeys(s for s in (self.cfg.data.shards, held_out) if s):
            if spec.partition(":")[0] in BENCHMARKS:  # no captions
                continue
            try:
                index = read_index(shard_directory(spec))
            except (OSError, ValueError):  # no readable index here: the loader or the evaluation reports it
                continue
            stats = index["statistics"]
            warnings = [missing_text_warning(self.cfg.model, spec, stats, index["totals"]["samples"]),
                        resized_shard_warning(spec, index)]
            if spec == self.cfg.data.shards:
                warnings[:0] = [short_clip_warning(self.cfg.data, spec, stats),
                                upsampled_clip_warning(self.cfg.data, spec, stats)]
            for warning in filter(None, warnings):
                log.warning("data: %s", warning)

    # ---- frozen encoders (outside ZeRO) -----------------------------------------------------------------
    def encoders(self, device: torch.device):
        if self._encoders is None:
            dtype = encoder_dtype(self.cfg.model, device)
            stored, empty = self.stored_text()
            self._encoders = build_encoders(self.cfg.model, self.wan_cfg, device, dtype, self.cfg.seed,
                                            text_stored=stored, stored_empty=empty)
        return self._encoders

    def stored_text(self) -> tuple[bool, torch.Tensor | None]:
        """(whether the training shards store their captions' embeddings from this run's text encoder, the empty
        prompt's embedding stored with them), as `one4d encode-latents` records them in index.json;
        `model.text_encoder_device: auto` then keeps the encoder in host memory. Read and logged once (the
        checkpointing unit's plan and the encoders both ask)."""
        if self._stored_text is None:
            self._stored_text = self._read_stored_text()
        return self._stored_text

    def _read_stored_text(self) -> tuple[bool, torch.Tensor | None]:
        if not self.cfg.data.shards:
            return False, None
        try:
            stored, empty_path = stored_text(self.cfg.data.shards, self.cfg.data)
        except (OSError, ShardIndexError, ValueError):  # no readable index here: the loader reports it
            return False, None
        ours = text_identity(self.cfg.model, self.cfg.seed)
        if not same_source(stored, ours):
            problems = text_encoder_problems(self.cfg, self.cfg.data.shards, {"text_encoder": stored})
            if problems:  # refused before the start (check_config); also where a task is built without those checks
                raise ConfigError("; ".join(f"key '{key}': {problem}" for key, problem in problems))
            return False, None
        log.info("the training shards store text embeddings from %s: with model.text_encoder_device=auto the "
                 "encoder stays in host memory", stored)
        return True, None if empty_path is None else torch.from_numpy(np.load(empty_path, allow_pickle=False))

    # ---- the step ---------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict, step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = finish_batch(batch, self.cfg.data.sample_dtype)  # data.finish_on_device: rgb/xyz made here
        rgb = batch["rgb"].transpose(1, 2)  # [B, 3, T, H, W] in [-1, 1]
        xyz = batch["xyz"].transpose(1, 2) if "xyz" in batch else None
        device = rgb.device
        vae, text, image = self.encoders(device)
        B, _, T = rgb.shape[:3]
        umc_cfg = self.cfg.model.umc
        tasks, frame_mask = sample_umc(B, T, umc_cfg, generator)
        with torch.no_grad():
            if "z_rgb" in batch:  # latents stored by `one4d encode-latents`: only sparse-task conditions are encoded
                z_rgb, z_xyz, z_image = batch["z_rgb"], batch["z_xyz"], batch["z_image"]
            else:
                (z_rgb, z_xyz), z_image = vae.encode_many([rgb, xyz]), None
            z_cond = condition_latents(tasks, frame_mask, rgb, z_rgb, vae.encode, z_image=z_image)
            mask4 = fold_frame_mask(frame_mask.to(device), *z_rgb.shape[-2:]).to(z_rgb)
            context = text(batch["caption"], batch_text_embeddings(batch), dropout=umc_cfg.text_dropout,
                           generator=generator, keys=batch.get("__key__"))
            clip = None if image is None else image.encode(first_observed_frame(rgb, frame_mask))
        valid = (batch["latent_valid"] if "latent_valid" in batch
                 else latent_validity(batch["valid"], self.cfg.flow.xyz_valid_min_fraction))
        out = denoising_loss(model, z_rgb, z_xyz, mask4, z_cond, context, clip, valid, self.cfg.flow, generator,
                             self.dtype)
        out["frac_video_task"] = torch.tensor(sum(t == "video" for t in tasks) / B, device=device)
        return out

    # ---- evaluation during training ---------------------------------------------------------------------
    EVAL_KEYS = ("abs_rel", "delta_1_25", "ate", "rpe_trans", "rpe_rot", "psnr", "ssim")

    def evaluate(self, model: nn.Module, step: int, out_dir: str) -> dict[str, float]:
        """Every rank samples its share of the held-out set (eval.num_samples of data.val_shards / eval.dataset)
        in every eval mode; a rank with no sample left in a round samples a dummy so all ranks run the same
        forwards (ZeRO-3 gathers are collective). Means per mode are all-reduced, with a `<mode>/<metric>_nonfinite`
        count where NaN or inf were left out of one; outputs go to out_dir."""
        from one4d_train.eval.pipeline import Generator, generate, iter_samples, mean_weight, score_and_write

        ecfg = self.cfg.eval
        if not (ecfg.dataset or self.cfg.data.val_shards):
            return {}
        rank, world = _rank(), torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        device = next(model.parameters()).device
        gen = Generator(model, *self.encoders(device), device=device)
        samples = list(iter_samples(self.cfg, strict=False))
        keys = [f"{mode}/{k}" for mode in ecfg.modes for k in self.EVAL_KEYS]
        sums, counts, bad = (torch.zeros(len(keys), dtype=torch.float64) for _ in range(3))
        for first in range(0, len(samples), world):
            i = first + rank
            real = i < len(samples)
            batch = samples[i if real else 0]
            for mode in ecfg.modes:
                pred = generate(gen, batch, mode, ecfg, [ecfg.seed + i])
                if not real:
                    continue
                metrics = score_and_write(pred, batch, ecfg, device, Path(out_dir) / f"rank{rank}-sample{i:04d}" / mode,
                                          f"step {step} | sample {i} | {mode} mode")
                for name in self.EVAL_KEYS:
                    value = metrics.get(name)
                    if value is None:
                        continue
                    j = keys.index(f"{mode}/{name}")
                    weight = mean_weight(name, metrics)
                    if math.isfinite(float(value)):
                        sums[j] += float(value) * weight
                        counts[j] += weight
                    else:
                        bad[j] += 1
        if torch.distributed.is_initialized():
            for t in (sums, counts, bad):
                torch.distributed.all_reduce(t)
        # as `one4d eval`'s means (eval/pipeline.py summarise): the depth scores weighted by scored pixels, NaN and
        # inf left out and counted per metric
        out = {k: float(sums[j] / counts[j]) for j, k in enumerate(keys) if counts[j] > 0}
        out.update({f"{k}_nonfinite": float(bad[j]) for j, k in enumerate(keys) if bad[j] > 0})
        return out

    # ---- accounting -------------------------------------------------------------------------------------
    def tokens_per_sample(self) -> int:
        d = self.cfg.data
        t, h, w = latent_shape(d.num_frames, d.height, d.width)
        pt, ph, pw = self.wan_cfg.patch_size
        return 2 * (t // pt) * (h // ph) * (w // pw)

    def flops_per_sample(self) -> float:
        w = self.wan_cfg
        return model_flops_per_sample(self.cfg.model, w, self.tokens_per_sample() // 2,
                                      image_tokens=IMAGE_TOKENS if w.has_image_input else 0)

    def export(self, trainable_state: dict[str, torch.Tensor], out_dir: str) -> None:
        export_adapters(trainable_state, self.cfg.model, out_dir, base=self.identity(),
                        window=data_window(self.cfg.data))


RANDOM_BASE = "random-seed-"  # the fingerprint of the tiny preset's seeded random base, followed by the seed


def denoising_loss(model: nn.Module, z_rgb: torch.Tensor, z_xyz: torch.Tensor, mask4: torch.Tensor,
                   z_cond: torch.Tensor, context: torch.Tensor, clip: torch.Tensor | None, latent_valid, flow_cfg,
                   generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The step after its conditioning: both branches noised at one timestep, the RGB branch's input with its
    UMC condition, the DLC model in `dtype`, the flow loss over valid XYZ cells. The trainer's and the benchmark's
    (benchmarks/train_step.py) step, so that what is timed is what trains."""
    device = z_rgb.device
    flow = noisy_pair(z_rgb, z_xyz, flow_cfg, generator)
    rgb_in = rgb_branch_input(flow["x_rgb"], mask4, z_cond)
    v_rgb, v_xyz = model(rgb_in.to(dtype), flow["x_xyz"].to(dtype), flow["timestep"].to(device),
                         context.to(device, dtype), None if clip is None else clip.to(device, dtype))
    return flow_loss(v_rgb, v_xyz, flow["target_rgb"], flow["target_xyz"], latent_valid, flow_cfg)


def base_fingerprint(checkpoint: str, seed: int) -> str:
    """What the frozen base is: model.checkpoint's content fingerprint, or the seed of the tiny preset's random base
    (another seed is another base)."""
    return checkpoint_fingerprint(checkpoint) if checkpoint else f"{RANDOM_BASE}{seed}"


def _link_blocks(m) -> list[int]:
    return resolve_link_blocks(m.link_blocks, m.num_links, wan_config(m.preset).num_layers) if m.design == "dlc" else []


def link_problems(m) -> list[tuple[str, str]]:
    """model.link_blocks / model.num_links against the preset's blocks (DLC only); One4DModel raises it only once
    the frozen base is loaded."""
    try:
        _link_blocks(m)
    except ValueError as exc:
        return [("model.link_blocks" if m.link_blocks else "model.num_links", str(exc))]
    return []


def unset_file_problems(m) -> list[tuple[str, str]]:
    """The model files a preset other than tiny needs and the config leaves unset: random weights and towers exist
    only for the tiny preset (model/encoders.py), so a 14B evaluated without model.checkpoint ran a random base."""
    if m.preset == "tiny":
        return []
    needed = ["checkpoint", "vae"] + (["image_encoder"] if m.has_image_input else [])
    p = [(f"model.{k}", f"preset {m.preset!r} needs local files: set it") for k in needed if not getattr(m, k)]
    if not (m.text_encoder or m.empty_prompt_embedding):
        p.append(("model.text_encoder", f"preset {m.preset!r} needs local files: set it (or "
                  "model.empty_prompt_embedding, with text embeddings stored in the shards)"))
    return p


def model_file_problems(cfg, backbone: bool = True) -> list[tuple[str, str]]:
    """The configured model files (backbone, VAE, text and image encoders, tokenizer) exist and fit the backbone,
    read from their headers and configs only: `one4d train`'s and `one4d eval`'s check before any model is built.
    backbone=False leaves the DiT's own weights out (`one4d encode-latents` reads only the encoders)."""
    p = []
    for key in (k for k in MODEL_FILES if backbone or k != "checkpoint"):
        path = getattr(cfg.model, key)
        if path and not os.path.exists(path):
            p.append((f"model.{key}", f"{path}: not found"))
    if backbone and cfg.model.checkpoint and os.path.exists(cfg.model.checkpoint):
        p += _backbone_checkpoint_problems(cfg.model)
    p += encoder_file_problems(cfg.model, wan_config(cfg.model.preset, in_dim=36,
                                                     has_image_input=cfg.model.has_image_input))
    return p


def _backbone_checkpoint_problems(m) -> list[tuple[str, str]]:
    """model.checkpoint against the configured backbone: every file readable, every name and shape matched, from
    the files' headers alone (no tensor data read), so that a truncated shard or weights of another model size or
    kind is reported before any process group rather than when every rank loads the base."""
    with torch.device("meta"):
        base = WanDiT(wan_config(m.preset, in_dim=36, has_image_input=m.has_image_input))
    try:
        open_backbone_checkpoint(m.checkpoint, {k: tuple(p.shape) for k, p in base.named_parameters()})
    except (OSError, ValueError, RuntimeError) as exc:
        return [("model.checkpoint", str(exc))]
    return []


def _shard_spec_problem(spec: str) -> str | None:
    """A shard directory, or a brace/glob pattern of shard files, that names nothing (the reader would look for
    index.json in the folder above a missing directory)."""
    shard_first = "shards are made from a manifest by `one4d shard MANIFEST OUT` (README: the pipeline)"
    if os.path.isdir(spec):
        if os.path.exists(os.path.join(spec, "index.json")):
            return None
        unfinished = _unfinished_run(spec)
        if unfinished:
            return (f"{os.path.join(spec, 'index.json')}: not found: {spec} is the output folder of {unfinished[0]} "
                    "that has not finished (its plan.json is there; index.json comes once every shard is done): "
                    f"{unfinished[1]}")
        return f"{os.path.join(spec, 'index.json')}: not found, so {spec} is no shard directory: {shard_first}"
    pattern = glob.has_magic(spec) or "{" in spec
    folder = (os.path.dirname(spec) or ".") if pattern else spec
    if pattern and not os.path.isdir(folder) or not pattern and not os.path.exists(spec):
        return f"{folder}: no such directory"
    if not pattern:
        return f"{spec} is a file, not a shard directory: {shard_first}"
    return None


def _unfinished_run(folder: str) -> tuple[str, str] | None:
    """(the run whose plan.json `folder` holds, how to finish it), or None where it holds none."""
    try:
        plan = read_json(os.path.join(folder, "plan.json"))
    except (OSError, ValueError):  # no plan (ShardIndexError is a ValueError)
        return None
    if "source_index_sha256" in plan:
        return "a `one4d encode-latents` run", "re-run the same command (every task of its array) to finish it"
    if "manifest_sha256" in plan:
        return "a `one4d shard` run", ("re-run the same command to finish it (a job array: every task, then "
                                       f"`one4d shard --merge {folder}`)")
    return None


def _training_shard_problems(cfg) -> list[tuple[str, str]]:
    spec = cfg.data.shards
    if not spec:
        return [("data.shards", "not set: point it at a shard directory made by `one4d shard` (or a pattern of its "
                 "shard files, like DIR/shard-{000000..000009}.tar)")]
    problem = _shard_spec_problem(spec)
    if problem:
        return [("data.shards", problem)]
    try:
        shards = list_shards(spec)
        missing = [s.path for s in shards if not os.path.isfile(s.path)]
        if missing:
            return [("data.shards", f"{len(missing)} shard file(s) listed in index.json missing: "
                     f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")]
        stored_latents(spec, cfg.data, latents_spec(cfg))
        index = read_index(shard_directory(spec))
        stats = index.get("statistics", {})
    except (OSError, ValueError, LatentsMismatchError) as exc:  # ShardIndexError is a ValueError
        return [("data.shards", str(exc))]
    from data_pipeline.reader import StreamPlan
    from one4d_train.train.distributed import detect

    d = cfg.data
    try:  # the plan's checks (shards for every reader slot, ranks x workers; samples per slot) hold for any rank
        StreamPlan(tuple(shards), seed=cfg.seed, rank=0, world_size=detect().world_size,
                   workers=max(1, d.num_workers), mode=d.mode, epoch_length=d.epoch_length,
                   shuffle_buffer=d.shuffle_buffer)
    except ValueError as exc:
        key = ("data.shards" if "no samples" in str(exc) else "data.epoch_length" if "epoch length" in str(exc)
               else "data.num_workers")
        return [(key, f"{exc} ({spec}, data.mode={d.mode})")]
    return geometry_problems(spec, stats) + index_problems(cfg, spec, index)


def geometry_problems(spec: str, stats: dict) -> list[tuple[str, str]]:
    """A training shard set without a single valid geometry pixel (index.json's statistics.valid_fraction 0, of
    shards written before `one4d shard` rejected such rows): its xyz branch would train on nothing, a loss of 0,
    without a word."""
    if stats.get("valid_fraction") != 0:
        return []
    return [("data.shards", f"{spec}: no pixel of any clip has valid geometry (index.json statistics.valid_fraction "
             "is 0: depth stored as negative z, depth 0 everywhere, or valid masks false everywhere), so the xyz "
             "branch would train on nothing; fix the geometry and re-shard with `one4d shard`, which rejects such "
             "rows naming the reason")]


def index_problems(cfg, spec: str, index: dict | None = None, key: str = "data.shards") -> list[tuple[str, str]]:
    """The config against the index of the shard set `spec` (config key `key`; its index.json, `index` when read
    already): the frame window, the stored text embeddings' width and the text encoder they were made with."""
    if index is None:
        try:
            index = read_index(shard_directory(spec))
        except (OSError, ValueError):  # reported where the shards are checked
            return []
    stats = index.get("statistics", {})
    return (window_problems(cfg.data, spec, stats.get("frames", {}).get("max"))
            + text_width_problems(cfg.model, spec, stats, key) + text_encoder_problems(cfg, spec, index.get("latents")))


def text_encoder_problems(cfg, spec: str, latents: dict | None) -> list[tuple[str, str]]:
    """The text encoder whose caption embeddings `one4d encode-latents` stored in the shard set `spec` (its
    index.json's `latents`) against this run's (model.text_encoder; with the tiny preset and none, the tiny tower of
    `seed`), whether the latents are read (data.use_latents) or not: the captioned samples would be conditioned on
    that encoder, the empty prompt and the captions stored without an embedding on this one. Nothing where no encoder
    is configured (model.empty_prompt_embedding stands in with the stored embeddings)."""
    recorded, ours = (latents or {}).get("text_encoder"), text_identity(cfg.model, cfg.seed)
    if not recorded or not ours or same_source(recorded, ours):
        return []

    def said(identity: str) -> str:
        tiny = identity.startswith("tiny:")
        return f"the tiny preset's random text tower of seed {identity[len('tiny:'):]}" if tiny else identity

    fix = (f"seed={recorded[len('tiny:'):]} with model.text_encoder empty" if recorded.startswith("tiny:")
           else f"model.text_encoder={recorded}")
    return [("model.text_encoder", f"{said(ours)} here, but the caption embeddings stored in {spec} were made by "
             f"{said(recorded)} (index.json latents.text_encoder): its captioned samples would be conditioned on that "
             f"encoder and the empty prompt on this one; set {fix}, or re-run `one4d encode-latents` with this "
             "model.text_encoder on the shards `one4d shard` wrote, into a new folder")]


def text_width_problems(mcfg, spec: str, stats: dict, key: str) -> list[tuple[str, str]]:
    """Stored text embeddings (index.json's statistics) of another width than the backbone's text input: every
    batch holding one would fail at the text conditioning."""
    text = stats.get("text_embeddings") or {}
    dim = wan_config(mcfg.preset).text_dim
    other = [w for w in text.get("widths") or [] if w != dim]
    if not other:
        return []
    alike = (f" (or with {dim}-wide ones)" if dim == TEXT_EMBEDDING_WIDTH else  # what a manifest stores
             f" (or with {dim}-wide ones, as `one4d encode-latents` under model.preset={mcfg.preset} stores them)")
    return [(key, f"{spec} stores text embeddings {' and '.join(map(str, text['widths']))} wide "
             f"({text['samples']} samples), the backbone of model.preset={mcfg.preset} takes {dim}: use a preset "
             f"whose text input is {other[0]} wide, or shards without stored embeddings{alike}")]


def window_problems(data, spec: str, longest: int | None) -> list[tuple[str, str]]:
    """The frame window (data.num_frames x data.frame_stride) against the longest clip of the shard set `spec`: a
    longer window skips every sample, and the loader gives up after epochs of skips with a traceback."""
    span = window_span(data.num_frames, data.frame_stride)
    if longest is not None and longest < span:
        return [("data.num_frames", f"the window needs {span} frames (data.num_frames={data.num_frames}, "
                 f"data.frame_stride={data.frame_stride}), the longest clip of {spec} has {longest}: lower "
                 "data.num_frames or data.frame_stride, or shard longer clips")]
    return []


def missing_text_warning(mcfg, spec: str, stats: dict, total: int) -> str | None:
    """Where no text encoder is set (model.empty_prompt_embedding stands in), the samples of the shard set `spec`
    (index.json's statistics) that store no text embedding, in words: a captioned one stops the run (a config error
    naming it, TextConditioning); index.json does not count the captions, so this is said before."""
    text = stats.get("text_embeddings") or {}
    stored = text.get("samples")
    if mcfg.text_encoder or mcfg.preset == "tiny" or stored is None or stored >= total:
        return None
    return (f"{total - stored} of the {total} samples of {spec} store no text embedding and no model.text_encoder "
            f"is set: those without a caption train with the empty prompt, and the first with one stops the run "
            f"(a config error naming it)")


def short_clip_warning(data, spec: str, stats: dict) -> str | None:
    """The clips of the shard set `spec` (index.json's `statistics`) shorter than the frame window, in words, where
    some but not all are (all: window_problems refuses the config): each is skipped at every epoch, which the
    trainer's data line counts, but the run trains on fewer clips than the shards hold."""
    span = window_span(data.num_frames, data.frame_stride)
    shortest, longest = stats.get("frames", {}).get("min"), stats.get("frames", {}).get("max")
    if shortest is None or shortest >= span or longest is None or longest < span:
        return None
    window = (f"the frame window of {span} frames (data.num_frames={data.num_frames}, "
              f"data.frame_stride={data.frame_stride})")
    lengths = stats.get("clip_frames")
    if lengths is None:  # an index written before clips were counted by length
        which = (f"some clips of {spec} (the shortest has {shortest} frames; this index.json does not count them by "
                 "length) are")
    else:
        which = (f"{sum(c for n, c in lengths.items() if int(n) < span)} of {sum(lengths.values())} clips of {spec} "
                 "are")
    return (f"{which} shorter than {window}: they are skipped at every epoch (logged once per reader slot, and counted "
            "as shorter than the window); lower data.num_frames or data.frame_stride to train on them")


def resized_shard_warning(spec: str, index: dict) -> str | None:
    """The shard files of the set `spec` whose size is not the one its index.json records, in words: damaged or
    rewritten since, their unreadable samples are skipped and counted in training, which nothing said before."""
    folder = shard_directory(spec)
    resized = [f"{e['name']} ({os.path.getsize(folder / e['name'])} bytes, index.json says {e['bytes']})"
               for e in index["shards"] if os.path.isfile(folder / e["name"])
               and os.path.getsize(folder / e["name"]) != e["bytes"]]
    if not resized:
        return None
    return (f"{len(resized)} shard file(s) of {spec} differ in size from index.json, damaged or rewritten since: "
            f"{', '.join(resized[:3])}{' ...' if len(resized) > 3 else ''}; their unreadable samples are skipped and "
            f"counted (`one4d inspect-shards {folder}` names them; `one4d shard` run again rewrites them)")


def upsampled_clip_warning(data, spec: str, stats: dict) -> str | None:
    """The clips of the shard set `spec` (index.json's `statistics.resolutions`) smaller than the window
    data.height x data.width in a side, in words: the loader scales a clip to cover the window before cropping, so
    those train upsampled (blurred frames and pointmaps), which nothing else says."""
    small = {}  # size -> (clips, upsampling factor)
    for size, count in (stats.get("resolutions") or {}).items():
        h, _, w = size.partition("x")
        factor = max(data.height / int(h), data.width / int(w)) if h.isdigit() and w.isdigit() else 0
        if factor > 1:
            small[size] = (count, factor)
    if not small:
        return None
    total = sum((stats.get("resolutions") or {}).values())
    worst = max(small, key=lambda k: small[k][1])
    return (f"{sum(c for c, _ in small.values())} of {total} clips of {spec} are smaller than the window "
            f"{data.height}x{data.width} (data.height x data.width): each is upsampled to cover it, by up to "
            f"{small[worst][1]:.2f}x ({worst}), which blurs its frames and pointmaps; lower data.height/data.width "
            "(multiples of 16) or shard larger clips")


POSITION_KEYS = {"seed": "seed", "mode": "data.mode", "num_workers": "data.num_workers", "shards": "data.shards",
                 "shuffle_buffer": "data.shuffle_buffer", "epoch_length": "data.epoch_length"}


def _resuming(cfg) -> bool:
    """Whether this run resumes from a checkpoint (resume=auto with a complete one, resume=PATH); a resume=PATH that
    is no complete checkpoint is reported under 'resume'."""
    from one4d_train.train import checkpoint as ckpt

    try:
        return ckpt.resolve_resume(cfg.resume, os.path.join(cfg.run_dir, "checkpoints")) is not None
    except FileNotFoundError:
        return True


def _resumed_state(cfg):
    """(checkpoint, this rank's train state, the launch's ranks) of the checkpoint this run resumes from; None for a
    fresh start, or where the resume itself is wrong (reported under 'resume' by train/config.py: no such
    checkpoint, another world size)."""
    from one4d_train.train import checkpoint as ckpt
    from one4d_train.train.distributed import detect

    try:
        path = ckpt.resolve_resume(cfg.resume, os.path.join(cfg.run_dir, "checkpoints"))
    except FileNotFoundError:
        return None
    env = detect()
    state = os.path.join(path or "", "train_state", f"rank-{env.rank:05d}.json")
    if path is None or ckpt.marker_of(path).get("world_size") != env.world_size or not os.path.isfile(state):
        return None
    try:
        return path, ckpt.read_state_json(path, env.rank), env
    except (ckpt.CheckpointDamaged, OSError):  # reported under 'resume' (or set aside by the trainer: resume=auto)
        return None


def _resume_problems(cfg) -> list[tuple[str, str]]:
    """What keeps the checkpoint this run resumes from from continuing under this config, by key, before any
    process group: its data position (the same seed, data.mode, data.num_workers, data.shuffle_buffer and shard
    set; the loader refuses another only once the model is built and the checkpoint loaded, minutes at 14B, with
    the run's config.yaml already rewritten by the refused config), and its frozen base (model.checkpoint's
    content: adapters trained against one base continue on another without any error, and fit neither)."""
    from data_pipeline.loader import PositionError

    resumed = _resumed_state(cfg)
    if resumed is None:
        return []
    path, state, env = resumed
    p = identity_problems(cfg, path, state.get("task_identity"))
    try:
        build_loader(cfg.data, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
                     micro_batch_size=cfg.train.micro_batch_size, position=state.get("loader"),
                     latents=latents_spec(cfg))
    except PositionError as exc:
        named = {POSITION_KEYS[k]: v for k, v in exc.differs.items() if k in POSITION_KEYS}
        if not named or len(named) < len(exc.differs):
            return p + [("resume", f"{path}: {exc}")]
        what = {"data.shards": "another shard set (fingerprint of the names, sample counts and sha256 of its shards)"}
        p += [(key, f"{what.get(key, repr(now))} here, {saved!r} in the data position of {path}: exact resume "
               f"continues the data stream it was written with; resume with {key} as it was, or start a new run "
               "(another run_dir, or resume=never)") for key, (saved, now) in named.items()]
    except (OSError, ValueError):  # a loader this config cannot build at all: the run reports it as before
        pass
    return p


def identity_problems(cfg, path: str, saved: dict | None, action: str = "resume") -> list[tuple[str, str]]:
    """The frozen base and LoRA scale of the checkpoint or export `path` (its task identity, as its train state or
    adapter_config.json's "base" records it) against this config's: a resume, an evaluation or a warm start
    (`action`: "resume", "evaluate", "start from it") on another base or scale runs adapters on weights they do not
    fit, without any error."""
    if not saved:  # written before checkpoints recorded them
        return []
    new_run = ", or start a new run (another run_dir, or resume=never)" if action == "resume" else ""
    p = []
    alpha = saved.get("lora_alpha")
    if alpha is not None and float(alpha) != float(cfg.model.lora.alpha):
        p.append(("model.lora.alpha", f"{cfg.model.lora.alpha} here, but {path} was trained with {alpha}: the same "
                  f"LoRA weights under another scale are another model; {action} with model.lora.alpha as it was{new_run}"))
    ckpt_now = cfg.model.checkpoint
    try:
        now = base_fingerprint(ckpt_now, cfg.seed)
    except (OSError, ValueError):  # an unreadable checkpoint: reported under model.checkpoint by model_file_problems
        return p
    then = saved.get("fingerprint")
    if now != then and not (then == "random" and now.startswith(RANDOM_BASE)):  # "random": recorded without its seed
        def said(checkpoint: str, fingerprint: str) -> str:
            if checkpoint:
                return f"{checkpoint} (content fingerprint {fingerprint})"
            seed = fingerprint[len(RANDOM_BASE):] if str(fingerprint).startswith(RANDOM_BASE) else ""
            return f"the random base of seed {seed}" if seed else "the random base of the seed"
        seed_then = str(then)[len(RANDOM_BASE):] if str(then).startswith(RANDOM_BASE) else ""
        fix = (f"{action} with seed={seed_then}" + (" and model.checkpoint empty" if ckpt_now else "")
               if seed_then else  # the tiny preset's random base: no file to point at, its seed makes it
               f"{action} with model.checkpoint pointing at those weights (any path: the content is compared)")
        p.append(("model.checkpoint", f"{said(ckpt_now, now)} here, but {path} was trained on "
                  f"{said(saved.get('checkpoint', ''), saved.get('fingerprint'))}: its adapters and control links fit "
                  f"that base only; {fix}{new_run}"))
    return p


def _eval_set_problems(cfg) -> list[tuple[str, str]]:
    from one4d_train.eval.pipeline import BENCHMARKS, EvalInputError, eval_dataset

    key = "eval.dataset" if cfg.eval.dataset else "data.val_shards"
    spec = cfg.eval.dataset or cfg.data.val_shards
    problem = None if spec.partition(":")[0] in BENCHMARKS else _shard_spec_problem(spec)
    if problem:
        return [(key, problem)]
    try:
        eval_dataset(cfg)
    except EvalInputError as exc:
        return [(key, str(exc))]
    return [] if spec.partition(":")[0] in BENCHMARKS else index_problems(cfg, spec, key=key)


def _local_device(setting: str) -> torch.device:
    if setting != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))
