#!/usr/bin/env bash
# The one script a GPU session runs: GPU tests and the training-step benchmark, each part a separate process
# with its own time limit, results appended to $OUT/results.jsonl, the table printed last whatever failed.
#   bash benchmarks/gpu_run.sh [small|large|tests|levers|short|final|all]   (default: all)
#     small : matmul/attention rates, 1.3B (ours: default + levers; peer), ZeRO-2 / persistence levers
#     large : 14B ours (default config + checkpointing levers) and the 14B peer
#     tests : pytest -m gpu
#     loader: the data loader on this host's CPU (pixels, bf16, 1/2/4/8 workers, finished on CPU and on the GPU);
#             needs the DATA wheels too (benchmarks/offline_wheels.sh)
#     levers: 1.3B under ZeRO-2: checkpointing modes, flash vs auto, compile
#     short : 14B ZeRO-2 eager, 1.3B peer, tests, 1.3B ZeRO-2 compiled (the second call of 2026-11-25)
#     final : 14B ZeRO-2 compiled, 14B and 1.3B peers, GPU tests (the measurements still open)
#     release: the shipped experiment configs (ZeRO-2, compiled blocks, stored latents; 14B selective_self +
#              activation offload) for both presets and both peers; release-small / release-large: one preset
#     fa4   : FlashAttention-4 kernel rates, the attention GPU tests, the 1.3B step with it when it is >5% faster
#     fa4-model: FlashAttention-4 ops/compile GPU tests, then both shipped configs with attn=fa4
#     cross : attention rates at the self- and cross-attention shapes, then the 14B shipped config with a
#             profiled extra step (where the step's kernel time goes)
#     autotune: the shipped configs with the blocks compiled in max-autotune mode (PRESETS=1.3b or 14b picks one;
#              ATTN=auto by default). At 14B the autotuning did not finish in 380 s (H200, 2026-12-04)
#     fp8   : FP8 base matmuls (model.base_matmul): their GPU tests (FP8TESTS=0 skips), then the shipped config of
#             PRESET (default 14b) for each of BASES (default "fp8 bf16"), on the same instance
#     peers : the peer baselines (PRESETS, default both)
#     vae   : the condition encode per VAE setting (padded first convolution, frames per causal call), its kernels
#             (benchmarks/vae_kernels.py) and its GPU tests
#     vae-conv: the VAE encoder's convolutions on the Triton kernel: its GPU tests, its rate per shape against cuDNN,
#             the condition encode per VAE setting; with KERNELS="triton cudnn" the shipped 1.3B config with each
#     ckpt-blocks: the 1.3B shipped config with fewer checkpointed blocks (CKPTS, e.g. "selective selective@20 none";
#             VFPC frames per VAE call)
#     block : one DiT block's kernel time per part (benchmarks/block_kernels.py) per branch-LoRA kernel
#             (LORA_KERNELS, default "fused bmm"); NOLORA=1 adds the block without LoRA, CDT=1 Inductor's
#             coordinate-descent tuning
#     lora-kernel: the shipped configs (PRESETS) with each branch-LoRA kernel (LORA_KERNELS, default "fused,bmm")
#             on one engine, then the peer (PEERS=0 skips it)
#     release-profile: both presets' shipped configs, each with a profiled extra step (no peers)
#     profile: VAE settings; 1.3B and 14B (selective + offload) step profiles
#     units : the 14B config by checkpointing unit and with the last 4 blocks' activations kept on the GPU (UNITS
#             overrides the variants, e.g. "unit=sublayer_ffn+offload=1@36+attn=fa4"; STEPS timed steps, default 5:
#             four 14B variants take ~330 s), then the 14B peer (PEERS=0 skips it)
#     offload-order: the activation offload's stream-ordered release at 14B: its GPU tests, sublayer_ffn and sublayer
#             with 36 blocks moved (allocator retries in the note), the 14B peer, the peak with UMT5 on the GPU
#             (PARTS picks, default "tests units peer umt5"; ~12 min in all: two calls, e.g. PARTS="tests units";
#             UNITS overrides the units' variants)
#     offload: activation offload at 14B (full / selective_self), VAE settings, 1.3B optimizer-step profile
#     mix   : the step over the UMC task mix, measured (vae=mix: each step draws its task as the trainer does; the
#             row's step s is its encoding steps'), the 1.3B worst case beside it (vae=latents), and the peers (PARTS
#             picks of "1.3b 1.3b-peer 14b 14b-peer"; ~15 min in all: three calls on one instance, e.g.
#             PARTS="1.3b 1.3b-peer", PARTS=14b-peer, then PARTS=14b; T13 / T14 the ours parts' limits. On a fresh
#             H200 the 1.3B part did not finish in 200 s (DeepSpeed's ops and the first compiles), 193 s with
#             them cached; the 14B part 319 s after it)
# Needs deepspeed/diffusers/omegaconf on PYTHONPATH: benchmarks/offline_wheels.sh makes the wheels, PERF_NOTES.md installs them.
set -u
OUT=${OUT:-/tmp/one4d-bench}
mkdir -p "$OUT"
R="$OUT/results.jsonl"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
B="python3 benchmarks/train_step.py --results $R"
WHAT=${1:-all}

part() {  # part <seconds> <label> <command...>
  local limit=$1 label=$2; shift 2
  echo "=== $label ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $label rc=$rc ($(date -u +%H:%M:%S))" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, deepspeed, diffusers, peft; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

if [[ $WHAT == small || $WHAT == all ]]; then
  part 60 "matmul + SDPA rates" $B --matmul
  part 210 "1.3b ours ZeRO-3 (levers in place)" $B --preset 1.3b --warmup 2 --steps 10 \
    --variants "ckpt=full+vae=none,ckpt=selective+vae=latents,vae=pixels,vae=none,ckpt=selective_self,ckpt=selective+attn=flash"
  part 75 "1.3b peer" $B --preset 1.3b --peer --warmup 2 --steps 10
fi
if [[ $WHAT == tests || $WHAT == small || $WHAT == all ]]; then
  part ${TTESTS:-120} "pytest -m gpu" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_dlc.py \
    tests/test_attention.py tests/test_backbone.py tests/test_finish.py
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
fi
if [[ $WHAT == small || $WHAT == all ]]; then
  part 55 "1.3b ZeRO-3 persistence 1e10" $B --preset 1.3b --warmup 2 --steps 10 --persistence 10000000000 \
    --lever persist --variants "ckpt=selective+vae=none"
  part 55 "1.3b ZeRO-2" $B --preset 1.3b --warmup 2 --steps 10 --zero-stage 2 --lever zero2 \
    --variants "ckpt=selective+vae=none"
fi
if [[ $WHAT == loader ]]; then
  part ${TLOADER:-420} "data loader" python3 benchmarks/data_loader.py --data /tmp/one4d-bench-data --clips 16 \
    --workers 1 2 4 8 --dtypes bfloat16 --paths pixels --finish cpu device
  grep -E "^ *(pixels|latents) \||finish on|load average" "$LOG" | tee "$OUT/loader.txt"
  exit 0
fi
if [[ $WHAT == levers ]]; then
  part 240 "1.3b ZeRO-2 checkpointing/attention/compile" $B --preset 1.3b --zero-stage 2 --lever zero2 \
    --warmup 2 --steps 10 --variants "ckpt=full+vae=none,ckpt=selective,ckpt=selective+attn=flash,attn=auto+compile=1,ckpt=full+compile=1"
fi
if [[ $WHAT == short ]]; then  # the least that answers the open questions: 14B step, peer, tests, compile
  part 200 "14b ours ZeRO-2" $B --preset 14b --zero-stage 2 --lever zero2 --warmup 2 --steps 10 \
    --variants "ckpt=full+vae=latents"
  part 40 "1.3b peer" $B --preset 1.3b --peer --warmup 2 --steps 6
  part 45 "pytest -m gpu" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "not attention"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  part 110 "1.3b ours ZeRO-2 compiled" $B --preset 1.3b --zero-stage 2 --lever zero2 --warmup 2 --steps 8 \
    --variants "ckpt=selective+compile=1+vae=none"
fi
if [[ $WHAT == final ]]; then  # the open measurements in one call (~9 min): 14B compiled, both peers, GPU tests
  part 20 "matmul + SDPA rates" $B --matmul
  part 260 "14b ours ZeRO-2 compiled" $B --preset 14b --zero-stage 2 --lever zero2 --warmup 2 --steps 10 \
    --variants "ckpt=full+compile=1+vae=latents"
  part 110 "14b peer" $B --preset 14b --peer --warmup 1 --steps 4
  part 75 "1.3b peer" $B --preset 1.3b --peer --warmup 2 --steps 8
  part 120 "pytest -m gpu" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
fi
if [[ $WHAT == release || $WHAT == release-small ]]; then  # the shipped experiment configs vs the peers
  part 20 "matmul + SDPA rates" $B --matmul
  part 240 "1.3b ours (configs/experiment/one4d_1.3b.yaml)" $B --preset 1.3b --warmup 2 --steps 10 --variants "vae=latents"
  part 75 "1.3b peer" $B --preset 1.3b --peer --warmup 2 --steps 10
fi
if [[ $WHAT == release || $WHAT == release-large ]]; then
  part 350 "14b ours (configs/experiment/one4d_14b.yaml)" $B --preset 14b --warmup 2 --steps 10 --variants "vae=latents"
  part 200 "14b peer" $B --preset 14b --peer --warmup 1 --steps 10
fi
if [[ $WHAT == release-profile ]]; then
  part 20 "matmul + SDPA rates" $B --matmul
  part 230 "1.3b ours (configs/experiment/one4d_1.3b.yaml), profiled" $B --preset 1.3b --warmup 2 --steps 8 \
    --profile --variants "vae=latents"
  part 330 "14b ours (configs/experiment/one4d_14b.yaml), profiled" $B --preset 14b --warmup 2 --steps 6 \
    --profile --variants "vae=latents"
fi
if [[ $WHAT == offload ]]; then  # activation offload at 14B, the VAE's settings, where the optimizer step goes
  part 20 "matmul + SDPA rates" $B --matmul
  part 90 "pytest -m gpu (offload, compiled)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k "offload or compiled"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  part 60 "VAE condition encode: settings" $B --vae --vae-levers
  part 80 "1.3b optimizer profile" $B --preset 1.3b --zero-stage 2 --lever zero2 --warmup 2 --steps 3 --profile \
    --variants "ckpt=selective+compile=1+vae=none"
  part 280 "14b offload" $B --preset 14b --zero-stage 2 --lever zero2 --warmup 1 --steps 5 \
    --variants "ckpt=full+compile=1+offload=1+vae=latents,ckpt=selective_self"
fi
if [[ $WHAT == profile ]]; then  # the VAE's settings, where the 1.3B and 14B steps go (profiles in the log)
  part 100 "VAE condition encode: settings" $B --vae --vae-levers
  part 130 "1.3b optimizer profile" $B --preset 1.3b --zero-stage 2 --lever zero2 --warmup 2 --steps 3 --profile \
    --variants "ckpt=selective+compile=1+vae=none"
  part 290 "14b selective + offload, profile" $B --preset 14b --zero-stage 2 --lever zero2 --warmup 1 --steps 4 \
    --profile --variants "ckpt=selective+compile=1+offload=1+vae=latents"
fi
if [[ $WHAT == fa4 ]]; then  # FlashAttention-4 (flash_attn.cute) where installed: kernel rates, tests, in the 1.3B step if faster
  part 150 "matmul + attention rates" $B --matmul
  part 150 "pytest -m gpu (attention backends)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py \
    tests/test_gpu.py -k "backend"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  if python3 -c "import json, sys; r = {x['backend']: x.get('tflops_fwd_bwd', 0) for x in map(json.loads, open('$R'))
if x.get('kind') == 'attention' and x.get('shape', 'self') == 'self'}; sys.exit(0 if r.get('fa4', 0) > 1.05 * r.get('cudnn', 1e9) else 1)"; then
    part 240 "1.3b ours, attn=fa4" $B --preset 1.3b --warmup 2 --steps 10 --variants "vae=latents+attn=fa4"
  fi
fi
if [[ $WHAT == fa4-model ]]; then  # FlashAttention-4 in the shipped configs (compiled blocks, its custom ops)
  part 110 "pytest -m gpu (fa4 ops, compiled blocks)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
    -k "fa4 or compiled_blocks"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  part 240 "14b ours (configs/experiment/one4d_14b.yaml), attn=fa4" $B --preset 14b --warmup 2 --steps 10 \
    --variants "vae=latents+attn=fa4"
  part 130 "1.3b ours (configs/experiment/one4d_1.3b.yaml), attn=fa4" $B --preset 1.3b --warmup 2 --steps 10 \
    --variants "vae=latents+attn=fa4"
fi
if [[ $WHAT == cross ]]; then  # which kernel for the short-key cross-attentions: rates per shape, then the 14B step
  part 120 "matmul + attention rates per shape" $B --matmul
  part ${T14:-300} "14b ours (configs/experiment/one4d_14b.yaml), profiled" $B --preset 14b \
    --warmup 2 --steps 10 --profile --variants "vae=latents"
fi
if [[ $WHAT == autotune ]]; then  # the blocks compiled with max-autotune (branch-LoRA add in a GEMM epilogue)
  for preset in ${PRESETS:-1.3b 14b}; do
    part ${TAUTO:-330} "$preset ours, attn=${ATTN:-auto}, compile=max" $B --preset "$preset" --warmup 2 --steps 8 \
      --variants "vae=latents+attn=${ATTN:-auto}+compile=max"
  done
fi
if [[ $WHAT == fp8 ]]; then  # FP8 base matmuls: their GPU tests, then the shipped config with each base matmul
  if [[ ${FP8TESTS:-1} == 1 ]]; then
    part 150 "pytest -m gpu (fp8)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "fp8"
    tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  fi
  for bm in ${BASES:-fp8 bf16}; do
    part ${T14:-240} "${PRESET:-14b} ours, model.base_matmul=$bm" $B --preset "${PRESET:-14b}" --warmup 2 --steps 10 \
      --variants "vae=latents" --set "model.base_matmul=$bm" --lever "$bm"
  done
fi
if [[ $WHAT == vae ]]; then  # the condition encode per VAE setting, and its GPU tests
  part ${TVAE:-280} "VAE condition encode: settings" $B --vae --vae-levers
  part 200 "VAE kernels: convolution shapes, profile, side-stream overlap" python3 benchmarks/vae_kernels.py --results "$R"
  part 120 "pytest -m gpu (vae)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "vae"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
fi
if [[ $WHAT == vae-conv ]]; then  # the VAE encoder's convolutions on the Triton kernel (model.vae_conv_kernel=triton)
  part 120 "pytest -m gpu (triton vae)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k "triton_vae"
  tail -n 15 "$LOG" | grep -E "passed|failed|error" | tail -3
  part 150 "VAE kernels: Triton vs cuDNN per convolution shape" python3 benchmarks/vae_kernels.py triton --results "$R"
  grep -E "^conv " "$LOG" | tail -7
  part ${TVAE:-200} "VAE condition encode: 8 and 80 frames per call, cuDNN and Triton" $B --vae \
    --vae-levers "${VAELEVERS:-8 frames,80 frames}"
  for kernel in ${KERNELS:-}; do  # e.g. KERNELS="triton cudnn": the shipped 1.3B config with each, one instance;
    # VFPC frames per VAE call for both (the kernel pays at 80: 0.264 s vs 0.359 s for the shipped 8 on cuDNN)
    part ${TCONV:-240} "1.3b ours, model.vae_conv_kernel=$kernel" $B --preset 1.3b --warmup 2 --steps 10 \
      --set "model.vae_conv_kernel=$kernel" --set "model.vae_frames_per_call=${VFPC:-80}" \
      --lever "vae_conv_$kernel" --variants "vae=latents"
  done
fi
if [[ $WHAT == ckpt-blocks ]]; then  # 1.3B: fewer checkpointed blocks (model.activation_checkpointing_blocks), VFPC frames per VAE call
  part ${T13:-420} "1.3b ours, checkpointed blocks ${CKPTS:-selective selective@20 selective@10 none}" $B --preset 1.3b \
    --warmup 2 --steps 10 --set "model.vae_frames_per_call=${VFPC:-4}" \
    --variants "$(for c in ${CKPTS:-selective selective@20 selective@10 none}; do printf 'ckpt=%s+vae=latents,' "$c"; done)"
fi
if [[ $WHAT == peers ]]; then
  for preset in ${PRESETS:-1.3b 14b}; do
    if [[ $preset == 14b ]]; then limit=200 warm=1; else limit=75 warm=2; fi
    part $limit "$preset peer" $B --preset "$preset" --peer --warmup $warm --steps 10
  done
fi
if [[ $WHAT == block ]]; then  # one DiT block's kernels per part (benchmarks/block_kernels.py), with and without LoRA
  K="python3 benchmarks/block_kernels.py --results $R"
  part 150 "one branch-LoRA linear per kernel" python3 benchmarks/lora_linear.py --results $R
  grep -A 40 "bf16 matmul 8192" "$LOG" | grep -B 40 -m1 "^kernels of" | sed 's/^/    /'
  for kernel in ${LORA_KERNELS:-fused bmm}; do
    part 150 "14b block, selective_self, LoRA $kernel" $K --preset 14b --ckpt selective_self --lora-kernel $kernel
    part 150 "1.3b block, selective, LoRA $kernel" $K --preset 1.3b --ckpt selective --lora-kernel $kernel
  done
  if [[ ${NOLORA:-0} == 1 ]]; then
    part 150 "14b block, selective_self, no LoRA" $K --preset 14b --ckpt selective_self --no-lora
    part 150 "1.3b block, selective, no LoRA" $K --preset 1.3b --ckpt selective --no-lora
  fi
  [[ ${CDT:-0} == 1 ]] && part 240 "14b block, coordinate-descent tuning" $K --preset 14b --ckpt selective_self --cdt
fi
if [[ $WHAT == lora-kernel ]]; then  # the shipped configs with the branch LoRA fused into the base GEMMs, then apart
  for preset in ${PRESETS:-1.3b 14b}; do
    if [[ $preset == 14b ]]; then limit=${T14:-480} plimit=200 warm=1; else limit=${T13:-300} plimit=75 warm=2; fi
    part $limit "$preset ours, lora=${LORA_KERNELS:-fused,bmm}" $B --preset "$preset" --warmup 2 --steps ${STEPS:-10} \
      --variants "$(echo "${LORA_KERNELS:-fused,bmm}" | sed 's/\([a-z]*\)/vae=latents+lora=\1/g')"
    [[ ${PEERS:-1} == 1 ]] && part $plimit "$preset peer" $B --preset "$preset" --peer --warmup $warm --steps 10
  done
fi
if [[ $WHAT == units ]]; then  # 14B checkpointing units, the last blocks kept on the GPU, then the peer
  part ${T14:-560} "14b ours, units and kept blocks" $B --preset 14b --warmup 2 --steps ${STEPS:-5} --lever units \
    --variants "${UNITS:-unit=sublayer,unit=sublayer_ffn,unit=sublayer_ffn+offload=1@36,unit=sublayer+offload=1@36}"
  [[ ${PEERS:-1} == 1 ]] && part 300 "14b peer" $B --preset 14b --peer --warmup 2 --steps 10
fi
if [[ $WHAT == offload-order ]]; then  # the activation offload's stream-ordered release (model/offload.py) at 14B
  P=" ${PARTS:-tests units peer umt5} "
  [[ $P == *" tests "* ]] && part ${TTESTS:-240} "pytest -m gpu: offload" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu.py -k "moved_tensor or offload or prefetched_copy"
  [[ $P == *" units "* ]] && part ${T14:-420} "14b ours, sublayer_ffn and sublayer, 36 moved" $B --preset 14b --warmup 2 \
    --steps ${STEPS:-10} --lever order --variants "${UNITS:-unit=sublayer_ffn+offload=1@36+attn=auto,unit=sublayer}"
  [[ $P == *" peer "* ]] && part 300 "14b peer" $B --preset 14b --peer --warmup 2 --steps 10
  [[ $P == *" umt5 "* ]] && part 300 "14b sublayer_ffn + 36, UMT5 on the GPU (its peak)" $B --preset 14b --warmup 1 \
    --steps 3 --lever umt5 --set model.text_encoder_device=device --variants "unit=sublayer_ffn+offload=1@36"
fi
if [[ $WHAT == mix ]]; then  # the task mix measured: training's samples/s against the peer's, per preset
  P=" ${PARTS:-1.3b 1.3b-peer 14b 14b-peer} "
  [[ $P == *" 1.3b "* ]] && part ${T13:-330} "1.3b ours, worst case and task mix" $B --preset 1.3b --warmup 2 --steps 10 \
    --lever mix --variants "vae=latents,vae=mix+n=20"
  [[ $P == *" 1.3b-peer "* ]] && part 90 "1.3b peer" $B --preset 1.3b --peer --warmup 2 --steps 10
  [[ $P == *" 14b "* ]] && part ${T14:-540} "14b ours, task mix" $B --preset 14b --warmup 2 --steps 20 --lever mix \
    --variants "vae=mix"
  [[ $P == *" 14b-peer "* ]] && part 300 "14b peer" $B --preset 14b --peer --warmup 2 --steps 10
fi
if [[ $WHAT == large || $WHAT == all ]]; then
  part ${T14:-300} "14b ours ZeRO-3" $B --preset 14b --warmup 2 --steps 10 ${V14:+--variants "$V14"}
  part ${TP14:-200} "14b peer" $B --preset 14b --peer --warmup ${WP14:-2} --steps ${SP14:-10}
fi

echo
echo "================ TABLE"
python3 benchmarks/train_step.py --report "$R" | tee "$OUT/table.txt"
