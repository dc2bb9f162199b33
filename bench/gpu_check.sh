#!/usr/bin/env bash
# Verify the GPU path in at most ~5 minutes on one GPU -> one JSON file:
#   bf16 train steps of the prior / decoder / upsampler bench configs, eager and torch.compile'd (s/step, MFU, peak
#   memory, compile speed-up: bench/train_step.py compare=compile), sampling latency of the 64 px decoder and a 256 px
#   upsampler (bench/sample.py, bf16), and, where 2 GPUs exist, a 2-process FSDP2 smoke run of train/train.py
#   (trainer=fsdp, bf16 params, a sharded checkpoint, resumed for one more step).
#
#   bash bench/gpu_check.sh [--out bench/gpu_check.json] [--device cuda|cpu] [--tiny]
#
# --device cpu --tiny runs the same steps with tiny configs on CPU (what a machine without a GPU can check of this
# script). A step that fails or times out is recorded with its exit code and the end of its log; the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=bench/gpu_check.json DEVICE=cuda TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--out FILE] [--device cuda|cpu] [--tiny]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

if [ "$TINY" = 1 ]; then
  PRIOR=(config=tiny batch=8) DECODER=(config=tiny32 batch=4) UPSAMPLER=(config=tiny_sr32_64 batch=2)
  STEPS=(steps=3 warmup=1) SAMPLE=(decoder_config=tiny32 upsampler_config=tiny_sr32_64 batch=2 steps=3)
  T_TRAIN=240 T_SAMPLE=120
else
  PRIOR=(config=bench batch=64) DECODER=(config=bench batch=32) UPSAMPLER=(config=bench batch=16)
  STEPS=(steps=10 warmup=3) SAMPLE=(decoder_config=bench upsampler_config=sr64_256 batch=4 steps=25)
  T_TRAIN=75 T_SAMPLE=45
fi
PRECISION=bf16
[ "$DEVICE" = cpu ] && [ "$TINY" = 1 ] && PRECISION=fp32  # bf16 autocast on a small CPU measures nothing useful

# step NAME TIMEOUT CMD...: run it, keep its JSON ($WORK/NAME.json, written by --out) or its failure
step() {
  local name=$1 limit=$2; shift 2
  echo "[gpu_check] $name: $*" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"wall_s\": $((SECONDS - t0))}" >"$WORK/$name.status"
  [ $rc -eq 0 ] || { echo "[gpu_check] $name failed (rc $rc):" >&2; tail -5 "$WORK/$name.log" >&2; }
}

for stage in prior decoder upsampler; do
  declare -n cfg=${stage^^}
  step "train_$stage" "$T_TRAIN" "$PY" bench/train_step.py stage=$stage "${cfg[@]}" "${STEPS[@]}" device=$DEVICE \
    precision=$PRECISION compare=compile --out "$WORK/train_$stage.json"
done
# the 256 -> 1024 SR at paper width (254 M params) on the paper's quarter-size crops: step time and peak memory
step train_sr256_1024 "$T_TRAIN" "$PY" bench/train_step.py stage=upsampler config=sr256_1024 crop=256 batch=4 \
  "${STEPS[@]}" device=$DEVICE precision=$PRECISION --out "$WORK/train_sr256_1024.json"
step sample "$T_SAMPLE" "$PY" bench/sample.py stages=decoder,upsampler samplers=ddim "${SAMPLE[@]}" device=$DEVICE \
  precision=$PRECISION --out "$WORK/sample.json"

GPUS=0
[ "$DEVICE" = cuda ] && GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -ge 2 ] || { [ "$DEVICE" = cpu ] && [ "$TINY" = 1 ]; }; then
  ACC=$([ "$DEVICE" = cpu ] && echo cpu || echo gpu)
  DTYPE=$([ "$DEVICE" = cpu ] && echo null || echo bfloat16)
  "$PY" -m dalle2.data.synthetic --out "$WORK/data" --num-train 256 --num-val 32 --image-size 32 >/dev/null 2>&1
  FSDP=("$PY" train/train.py experiment=decoder_tiny data=builtin "data.train_urls='$WORK/data/train/{00000..00000}.tar'"
        data.val_urls=null data.image_size=32 data.batch_size=8 data.num_workers=1 model.clip_dim=32 model.cond_dim=32
        model.model_channels=16 model.head_channels=16 "clip_ckpt=$WORK/clip.ckpt" "~callbacks.sample_grid"
        trainer=fsdp trainer.accelerator=$ACC trainer.devices=2 trainer.strategy.param_dtype=$DTYPE
        trainer.enable_progress_bar=false callbacks.model_checkpoint.every_n_train_steps=4 logger=csv
        "hydra.run.dir=$WORK/fsdp_run")
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from helpers.tiny_runs import tiny_clip_ckpt; tiny_clip_ckpt('$WORK/clip.ckpt')"
  step fsdp_train 150 "${FSDP[@]}" trainer.max_steps=4
  step fsdp_resume 90 "${FSDP[@]}" trainer.max_steps=5 ckpt_path=last logger.csv.name=csv_resumed
  [ -f "$WORK/fsdp_run/checkpoints/last.ckpt/meta.pt" ] && echo '{"sharded_checkpoint": true}' >"$WORK/fsdp_ckpt.json"
fi

"$PY" - "$WORK" "$OUT" "$DEVICE" "$TINY" "$GPUS" <<'EOF'
import json, pathlib, sys, time
work, out, device, tiny, gpus = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
result = {"check": "gpu_check", "device": device, "tiny": tiny, "gpus": gpus, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "steps": {}}
for status in sorted(work.glob("*.status")):
    name = status.stem
    entry = json.loads(status.read_text())
    data = work / f"{name}.json"
    if data.is_file():
        entry["result"] = json.loads(data.read_text())
    elif entry["rc"] != 0:
        entry["log_tail"] = (work / f"{name}.log").read_text()[-2000:]
    result["steps"][name] = entry
for name, s in result["steps"].items():  # the headline figures
    r = s.get("result") or {}
    if name.startswith("train_") and "variants" in r:
        # train_step.py compare=compile: "variants" keyed by the flag's value ("False" eager, "True" compiled)
        result[name] = {"compile_speedup": r.get("speedup_on_vs_off"), "peak_memory_gib": r.get("peak_memory_gib"),
                        **{("compiled" if key in ("True", "true", "1") else "eager"):
                           {k: v.get(k) for k in ("s_per_step", "samples_per_s", "tflops_per_s", "mfu")}
                           for key, v in r["variants"].items()}}
result["sharded_checkpoint"] = (work / "fsdp_ckpt.json").is_file()
result["ok"] = all(s["rc"] == 0 for s in result["steps"].values())
pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
print(f"[gpu_check] wrote {out}", file=sys.stderr)
sys.exit(0 if result["ok"] else 1)
EOF
