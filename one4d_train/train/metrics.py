"""Step timing (data wait vs compute), throughput and MFU."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

H100_DENSE_BF16 = 989e12


def peak_flops(configured: float, device: torch.device) -> float | None:
    """Per-device peak for MFU: the configured value, else the H100 datasheet on CUDA, else none (MFU not logged)."""
    if configured > 0:
        return configured
    return H100_DENSE_BF16 if device.type == "cuda" else None


class StepTimer:
    """Accumulates time spent waiting for data and total time since the last `window()` call."""

    def __init__(self):
        self.data_s, self.start, self.steps = 0.0, time.perf_counter(), 0

    def timed_next(self, fetch):
        t = time.perf_counter()
        out = fetch()
        self.data_s += time.perf_counter() - t
        return out

    def step_done(self) -> None:
        self.steps += 1

    @contextmanager
    def paused(self):
        """Time spent inside (checkpoints, evaluation) is left out of the window: not a step's, so not in
        samples/s, step time or MFU."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t

    def window(self) -> tuple[float, float, int]:
        """(elapsed seconds, data-wait seconds, steps) since the previous window; starts a new one."""
        now = time.perf_counter()
        out = (now - self.start, self.data_s, self.steps)
        self.data_s, self.start, self.steps = 0.0, now, 0
        return out


# the CUDA caching allocator's counters: a retry is an allocation that found no free block at the GPU's ceiling, had
# the allocator wait for every stream's outstanding work and release its free cache before trying again (at 14B, two
# a step came with a forward ~0.2 s longer: model/offload.py)
ALLOC_COUNTERS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free")


def alloc_counters(device: torch.device) -> dict[str, int]:
    """The allocator's counters so far on `device` (none off CUDA)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: int(stats.get(k, 0)) for k in ALLOC_COUNTERS}


def alloc_retries(device: torch.device) -> int:
    """The allocator's retries so far (0 off CUDA)."""
    return alloc_counters(device).get("num_alloc_retries", 0)


def throughput(elapsed: float, data_s: float, steps: int, global_batch: int, world_size: int, flops_per_sample: float,
               tokens_per_sample: int, peak: float | None, device: torch.device) -> dict[str, float]:
    samples_s = steps * global_batch / max(elapsed, 1e-9)
    out = {"samples_per_s": samples_s, "tokens_per_s": samples_s * tokens_per_sample,
           "data_wait_frac": data_s / max(elapsed, 1e-9), "step_time_s": elapsed / max(steps, 1)}
    if peak:
        out["mfu"] = flops_per_sample * samples_s / (peak * world_size)
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def format_line(step: int, total: int, losses: dict[str, float], lr: float, grad_norm: float | None,
                perf: dict[str, float], skipped: int) -> str:
    branches = ", ".join(f"{k.removeprefix('loss_')} {v:.4g}" for k, v in sorted(losses.items()) if k != "loss")
    parts = [f"step {step}/{total}", f"loss {losses.get('loss', float('nan')):.4g}" + (f" ({branches})" if branches else ""),
             f"lr {lr:.3g}", f"gnorm {grad_norm:.3g}" if grad_norm is not None else "gnorm -",
             f"{perf['samples_per_s']:.3g} samples/s", f"{perf['tokens_per_s']:.3g} tok/s"]
    if "mfu" in perf:
        parts.append(f"mfu {100 * perf['mfu']:.1f}%")
    parts.append(f"data {100 * perf['data_wait_frac']:.0f}%")
    if "peak_mem_gib" in perf:
        parts.append(f"mem {perf['peak_mem_gib']:.1f} GiB")
    if "host_offload_gib" in perf:
        parts.append(f"host offload {perf['host_offload_gib']:.1f} GiB")
    if perf.get("alloc_retries"):  # GPU memory at its ceiling: a setting that needs less would run faster
        parts.append(f"{perf['alloc_retries']:.0f} allocator retries")
    if skipped:  # steps, not samples: the data line counts those
        parts.append(f"{skipped} steps skipped")
    return " | ".join(parts)


class AllocRetries:
    """The CUDA allocator's retries per log window (`window(total)` with the count so far -> the window's), and once
    a run, from the second window on (the first holds compilation and warm-up), the warning that names the settings
    holding less on the GPU."""

    def __init__(self):
        self.seen, self.windows, self.warned = 0, 0, False

    def window(self, total: int) -> int:
        new, self.seen = total - self.seen, total
        return new

    def warning(self, retries: int, steps: int) -> str | None:
        """For the window just logged (`retries` summed over ranks, in `steps` steps): the warning, or None."""
        self.windows += 1
        if not retries or self.windows == 1 or self.warned:
            return None
        self.warned = True
        return (f"GPU memory at its ceiling: the CUDA allocator retried {retries} times in the last {steps} steps, "
                f"each a wait for every stream (slower steps, not wrong ones); settings that hold less on the GPU: "
                f"more blocks checkpointed (model.activation_checkpointing_blocks), more blocks' activations moved to "
                f"host memory (model.activation_offload, model.activation_offload_blocks), the text encoder in host "
                f"memory (model.text_encoder_device=cpu)")


def data_skips_line(skipped: int, short: int) -> str:
    """The log line of the samples the loaders skipped so far (all ranks), `short` of them clips shorter than the
    frame window, told apart from the corrupt ones: those are a setting's doing (data.num_frames), not damage."""
    kinds = [f"{short} shorter than the frame window"] if short else []
    if skipped > short:
        kinds.append(f"{skipped - short} corrupt or undecodable")
    return (f"data: {skipped} samples skipped so far (all ranks): {', '.join(kinds)}; each is logged with its shard, "
            "key and reason by the readers")
