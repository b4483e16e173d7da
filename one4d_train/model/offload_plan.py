"""`model.activation_checkpointing_unit: auto`: the fastest checkpointing unit whose offloaded activations fit the
host memory left to each GPU process of the node.

Finer units keep more per block and re-run less in backward (model/checkpointing.py); with activation offload what
they keep goes to page-locked host memory, one step's worth per GPU process (14B at 2 x 18,018 tokens, measured:
`block` 31.4 GB, `sublayer` 60.9 GB, `sublayer_ffn` ~101 GB, 90.5 GB with the last 4 blocks kept on the GPU). On a
node that has the memory, `sublayer_ffn` is the fastest (14B on one H100 with FlashAttention-4: 7.72 s against
`sublayer`'s 7.83 s, benchmarks/PERF_NOTES.md); where it lacks the memory, a fixed finer unit stops the job at its
first step (offload.HostMemoryError). `auto` picks before the first step from a prediction of the bytes.

Prediction, per offloaded block, in block inputs (batch x 2 branches x tokens x dim elements): the checkpointed
regions' inputs (block 1; sublayer 3: the input and the residual stream after each attention; sublayer_ffn 3 plus
the FFN's pre-activation, ffn_dim / dim of them) and the attention outputs the mode keeps (selective_self 1,
selective 3). Against the 14B measurements it is 2-6% low (other saved tensors of 40-50 MB a block): MARGIN covers
them, and the offload's own check (HostMemoryError) stays as the backstop. What each process takes from host memory
after the choice (data workers, a text encoder built there at the start) is counted against its share first.

In a distributed job every rank reports its host and the memory it sees; each node's share is the least its ranks
saw, divided by its ranks, and the job takes the coarsest of the nodes' choices, so every rank runs one unit.
"""
from __future__ import annotations

import os
import re
import socket

from one4d_train.model import host_memory
from one4d_train.model.config import CHECKPOINT_UNITS
from one4d_train.model.state_dict import model_folder_files

MARGIN = 1.10  # the prediction was 2-6% below the measured bytes at 14B (with it: 3-8% above)
RESERVE = 4 << 30  # host memory left per process to the rest of it (the offload's own 2 GiB reserve included)
WORKER_RESERVE = 1 << 30  # per data-loader worker of the process (decoded clips in flight)
KEPT_ATTENTION_OUTPUTS = {"none": 0, "full": 0, "selective_self": 1, "selective": 3}
FASTEST_FIRST = ("sublayer_ffn", "sublayer", "block")
assert sorted(FASTEST_FIRST) == sorted(CHECKPOINT_UNITS)


def block_inputs_saved(mode: str, unit: str, dim: int, ffn_dim: int) -> float:
    """What one checkpointed block saves (and the offload moves) in `mode` by `unit`, in block inputs."""
    regions = {"block": 1.0, "sublayer": 3.0, "sublayer_ffn": 3.0 + ffn_dim / dim}[unit]
    return regions + KEPT_ATTENTION_OUTPUTS[mode]


def offloaded_bytes(cfg, dim: int, ffn_dim: int, num_layers: int, tokens: int, element_size: int,
                    unit: str) -> int:
    """Predicted host memory per GPU process for one step of ModelConfig `cfg` by `unit`, `tokens` rows per block
    input (batch x both branches x tokens per modality), with MARGIN."""
    moved = num_layers if cfg.activation_offload_blocks < 0 else min(cfg.activation_offload_blocks, num_layers)
    per_block = block_inputs_saved(cfg.activation_checkpointing, unit, dim, ffn_dim) * tokens * dim * element_size
    return int(MARGIN * moved * per_block)


def local_processes(environ: dict[str, str] | None = None) -> int:
    """GPU processes on this node, from the launcher (where no process group tells it, see `per_node`): torchrun's
    LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, Open MPI's, else Slurm's tasks per node (the step's
    first; the most any node has, where they differ), else 1."""
    env = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE",
                 "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = [int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", env.get(name, ""))]
        if counts:
            return max(1, max(counts))
    return 1


def block_because(cfg, num_layers: int) -> str | None:
    """Why `auto` is the block whatever the memory (a finer unit would gain nothing), or None where memory decides."""
    if cfg.activation_checkpointing == "none":
        return "nothing is checkpointed (model.activation_checkpointing=none)"
    if not cfg.activation_offload or cfg.activation_offload_blocks == 0:
        return "nothing is offloaded: what a finer unit keeps would stay on the GPU"
    if not cfg.compile:
        return "without model.compile, backward recomputes each sub-layer whole: a finer unit only costs memory"

    def count(n: int) -> int:
        return num_layers if n < 0 else min(n, num_layers)
    if count(cfg.activation_checkpointing_blocks) < count(cfg.activation_offload_blocks):
        return ("offloaded blocks past model.activation_checkpointing_blocks keep every activation, which the "
                "prediction does not count")
    return None


def choose_unit(cfg, dim: int, ffn_dim: int, num_layers: int, tokens: int, element_size: int,
                available: int | None, processes: int, other: int = 0) -> tuple[str, str]:
    """(unit, why) for `activation_checkpointing_unit: auto`: the first of FASTEST_FIRST whose predicted offload
    fits `available` bytes of host memory (host_memory.available_bytes(), None: unknown) shared by `processes`, each
    of which takes `other` bytes more besides the offload."""
    if cfg.activation_checkpointing_unit != "auto":
        return cfg.activation_checkpointing_unit, "as configured"
    why = block_because(cfg, num_layers)
    if why:
        return "block", why
    if available is None:
        return "block", "host memory could not be read: the unit that moves least"
    share = available // processes - RESERVE - other
    for unit in FASTEST_FIRST:
        need = offloaded_bytes(cfg, dim, ffn_dim, num_layers, tokens, element_size, unit)
        if need <= share:
            return unit, (f"{need / 1e9:.1f} GB of saved activations per GPU process predicted, "
                          f"{available / 1e9:.1f} GB of host memory left for {processes} process(es), "
                          f"{other / 1e9:.1f} GB each besides")
    need = offloaded_bytes(cfg, dim, ffn_dim, num_layers, tokens, element_size, "block")
    return "block", (f"even block's {need / 1e9:.1f} GB per GPU process exceed the {share / 1e9:.1f} GB each of "
                     f"{processes} process(es) has: the offload stops at the first step unless memory frees up")


def coarsest(units: list[str]) -> str:
    """The unit that moves least of `units` (the one every rank of a job can run)."""
    return max(units, key=FASTEST_FIRST.index)


def per_node(seen: list[tuple[str, int | None]]) -> dict[str, tuple[int | None, int]]:
    """host -> (the least host memory its ranks saw, None where one could not read it; its ranks), from every rank's
    (host name, available bytes)."""
    nodes: dict[str, tuple[int | None, int]] = {}
    for host, available in seen:
        least, ranks = nodes.get(host, (available, 0))
        nodes[host] = (None if least is None or available is None else min(least, available), ranks + 1)
    return nodes


def seen_here() -> tuple[str, int | None]:
    """What each rank reports: its host's name and the host memory this process can still take."""
    return socket.gethostname(), host_memory.available_bytes()


def this_node() -> dict[str, tuple[int | None, int]]:
    """per_node's answer for a process alone (no process group): the launcher's count of GPU processes on its node."""
    host, available = seen_here()
    return {host: (available, local_processes())}


def plan(cfg, wan_cfg, tokens: int, nodes: dict[str, tuple[int | None, int]],
         other: int = 0) -> tuple[str, dict[str, tuple[str, str]]]:
    """(the unit every rank runs: the coarsest of the nodes' choices, host -> (its choice, why)) for ModelConfig
    `cfg` on backbone `wan_cfg` at `tokens` rows per block input, `nodes` as per_node gives them."""
    picks = {host: choose_unit(cfg, wan_cfg.dim, wan_cfg.ffn_dim, wan_cfg.num_layers, tokens, element_size(cfg),
                               least, ranks, other)
             for host, (least, ranks) in nodes.items()}
    return coarsest([unit for unit, _ in picks.values()]), picks


def resolve_unit(cfg, wan_cfg, tokens: int, other: int = 0) -> tuple[str, str]:
    """plan's (unit, why) for this process alone (the benchmark's; the trainer plans over its process group)."""
    unit, picks = plan(cfg, wan_cfg, tokens, this_node(), other)
    return unit, next(iter(picks.values()))[1]


def element_size(cfg) -> int:
    return 2 if cfg.compute_dtype == "bf16" else 4


def weights_bytes(path: str) -> int:
    """The size of the weight files of a model at `path` (state_dict.model_folder_files: a file, or a folder's
    *.safetensors/*.bin), what the model takes in host memory when it lives there (stored in the dtype it runs in,
    as Wan's UMT5 is); 0 where it cannot be read (model_file_problems names that)."""
    try:
        return sum(os.path.getsize(f) for f in model_folder_files(path) if os.path.basename(f) != "config.json")
    except OSError:
        return 0
