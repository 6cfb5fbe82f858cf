#!/usr/bin/env bash
# The GPU path in one short run (target: under 8 minutes on one H200). `make gpu-check` runs it.
#
# 1. Installs vlp with --no-deps over the machine's own stack (torch, lightning, timm, transformers,
#    triton, tensorboard: whatever versions are there; the lock file is NOT assumed) plus the packages that
#    stack lacks (jsonargparse, deepspeed and their small dependencies) from wheels prepared beforehand with
#    `make gpu-wheels` and carried along in $WHEELS (no package registry is reachable there).
# 2. Kernels on CUDA, Triton compiled (not interpreted): fused linear + cross-entropy and the tiled
#    contrastive loss against the PyTorch references, fp32 / fp16 / bf16, loss and every gradient, with the
#    tolerance table of tests/platform/kernels.
# 3. The kernels' memory and time against the naive PyTorch ops (benchmarks/kernels.py on CUDA).
# 4. `vlp fit` of a ViT-B/16 + BERT-base backbone (ALBEF's split: 6 text + 6 fusion layers) on synthetic
#    224 px shapes data, bf16-mixed, $STEPS steps, under ddp (1 device), fsdp and deepspeed_zero2, eager and
#    compiled, and with token merging; then a table: samples/s, model FLOPs utilisation against 989 TFLOP/s
#    (H100/H200 bf16 dense), peak GPU memory.
# Everything lands in $OUT (default gpu-check-out/): logs, JSON per run, table.md.
# Knobs: SECTIONS (default "install kernels bench fit"), ONLY="ddp eager none" (one fit run), STEPS, BATCH,
# ACCELERATOR (gpu; "cpu" with tiny STEPS/BATCH smoke-tests the fit commands without a GPU), PYTHON, WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
WHEELS=${WHEELS:-.gpu-wheels}
STEPS=${STEPS:-50}
BATCH=${BATCH:-64}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
SECTIONS=${SECTIONS:-install kernels bench fit}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false

if want install; then
echo "== 1. install ($(date +%T))"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
need=()
for pkg in jsonargparse:jsonargparse docstring_parser:docstring-parser typeshed_client:typeshed-client \
  deepspeed:deepspeed hjson:hjson cpuinfo:py-cpuinfo msgpack:msgpack ninja:ninja einops:einops psutil:psutil \
  pydantic:pydantic pydantic_core:pydantic-core annotated_types:annotated-types typing_inspection:typing-inspection; do
  "$PY" -c "import ${pkg%%:*}" 2>/dev/null || need+=("${pkg##*:}")
done
if ((${#need[@]})); then
  echo "installing from $WHEELS: ${need[*]}"
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "${need[@]}"
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the console script, or the same entry point when the editable install could not make one
if command -v vlp >/dev/null; then VLP=(vlp); else VLP=("$PY" -c 'import sys; from vlp.cli import main; main(sys.argv[1:])'); fi
"$PY" -c "import vlp, lightning, timm, transformers, triton, jsonargparse, deepspeed; print('vlp', vlp.__file__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__, '| deepspeed', deepspeed.__version__)"

if want kernels; then
echo "== 2. kernels on CUDA, Triton compiled ($(date +%T))"
"$PY" - <<'EOF' | tee "$OUT/kernels-cuda.txt"
import torch

from vlp.platform.kernels import (
    contrastive_loss,
    contrastive_loss_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# loss atol, gradient rtol, gradient atol (relative to the largest reference gradient): tests/platform/kernels
TOLERANCES = {torch.float32: (1e-5, 1e-4, 1e-6), torch.float16: (1e-4, 4e-3, 1e-3), torch.bfloat16: (1e-3, 2e-2, 1e-2)}
failures = 0


def check(name, dtype, run, reference, inputs):
    global failures
    params = [t.detach().clone().to(dtype).requires_grad_() for t in inputs]
    ref_params = [t.detach().clone().float().requires_grad_() for t in params]
    loss, expected = run(*params), reference(*ref_params)
    (1.5 * loss).backward()
    (1.5 * expected).backward()
    loss_atol, rtol, atol = TOLERANCES[dtype]
    ok = abs(loss.item() - expected.item()) <= loss_atol * max(1.0, abs(expected.item()))
    for p, ref in zip(params, ref_params):
        scale = ref.grad.abs().max().item()
        ok &= bool(((p.grad.float() - ref.grad).abs() <= rtol * ref.grad.abs() + atol * scale + 1e-7).all())
    failures += not ok
    print(f"{name:28s} {str(dtype):15s} loss {loss.item():.6f} ref {expected.item():.6f}  {'ok' if ok else 'MISMATCH'}")


gen = torch.Generator(device="cuda").manual_seed(0)
for n, v, h in [(4096, 30522, 768), (1000, 5003, 256)]:
    hidden = torch.randn(n, h, device="cuda", generator=gen)
    weight = torch.randn(v, h, device="cuda", generator=gen) * h**-0.5
    bias = torch.randn(v, device="cuda", generator=gen) * 0.1
    target = torch.randint(0, v, (n,), device="cuda", generator=gen)
    target[::7] = -100
    for dtype in TOLERANCES:
        check(
            f"linear_cross_entropy {n}x{v}x{h}",
            dtype,
            lambda x, w, b: linear_cross_entropy(x, w, target, b, backend="triton"),
            lambda x, w, b: linear_cross_entropy_reference(x, w, target, b),
            [hidden, weight, bias],
        )
for b, d in [(4096, 256), (1000, 64)]:
    image = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=gen), dim=-1)
    for dtype in TOLERANCES:
        check(
            f"contrastive_loss {b}x{d}",
            dtype,
            lambda i, t: contrastive_loss(i, t, torch.tensor(14.3, device="cuda"), chunk_size=512, backend="triton"),
            lambda i, t: contrastive_loss_reference(i, t, torch.tensor(14.3, device="cuda")),
            [image, text],
        )
print(f"kernel checks: {failures} mismatches")
raise SystemExit(1 if failures else 0)
EOF
fi

if want bench; then
echo "== 3. kernels' memory and time vs naive ops ($(date +%T))"
"$PY" benchmarks/kernels.py | tee "$OUT/kernels-bench.txt"
cp benchmarks/results/kernels.json "$OUT/" 2>/dev/null || true
fi

want fit || exit 0
echo "== 4. vlp fit, ViT-B/16 + BERT-base, 224 px, bf16-mixed, $STEPS steps ($(date +%T))"
cat >"$OUT/vitb_bert.yaml" <<EOF
seed_everything: 0
trainer:
  accelerator: ${ACCELERATOR:-gpu}
  devices: 1
  precision: bf16-mixed
  max_steps: $STEPS
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 10
  enable_progress_bar: false
  enable_model_summary: false
  logger: {class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: $OUT/runs, name: gpu-check}}
model:
  class_path: vlp.tasks.multitask.MultiTaskModule
  init_args:
    backbone:
      class_path: vlp.platform.model.backbone.FusionBackbone
      init_args:
        vision: {image_size: 224, patch_size: 16, width: 768, depth: 12, heads: 12}
        text: {width: 768, depth: 6, heads: 12, max_len: 64}
        fusion: {depth: 6, heads: 12}
        embed_dim: 256
    objectives:
      itc: {class_path: vlp.tasks.itc.ITCObjective}
      itm: {class_path: vlp.tasks.itm.ITMObjective}
      mlm: {class_path: vlp.tasks.mlm.MLMObjective}
    mode: joint
data:
  sources:
    shapes:
      class_path: vlp.datamodules.shapes.ShapesSource
      init_args: {image_size: 224, num_train: 20000, batch_size: $BATCH, num_workers: 8}
EOF
cat >"$OUT/gpu_check_probe.py" <<'EOF'
"""Writes the run's last samples/s, GFLOPs per sample and peak GPU memory to a JSON file."""
import json

import torch
from lightning.pytorch import Callback


class Probe(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
        metrics["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        with open(self.out, "w") as f:
            json.dump(metrics, f)
EOF
export PYTHONPATH=$OUT${PYTHONPATH:+:$PYTHONPATH}
runs=(
  "ddp eager none" "ddp compile none" "ddp eager merge" "ddp compile merge"
  "fsdp eager none" "fsdp compile none" "deepspeed_zero2 eager none" "deepspeed_zero2 compile none"
)
for spec in "${runs[@]}"; do
  if [ -n "${ONLY:-}" ] && [ "$spec" != "$ONLY" ]; then continue; fi
  read -r strategy mode merging <<<"$spec"
  name="$strategy-$mode-$merging"
  args=(--config "$OUT/vitb_bert.yaml" --config "configs/strategy/$strategy.yaml" --trainer.devices=1
    --trainer.precision=bf16-mixed --checkpoint.save_last=false --checkpoint.save_top_k=0
    "--trainer.callbacks+={\"class_path\": \"gpu_check_probe.Probe\", \"init_args\": {\"out\": \"$OUT/$name.json\"}}")
  [ "$mode" = compile ] && args+=(--trainer.strategy.init_args.compile=true)
  # joint mode reads every parameter each step: spare DDP its unused-parameter search
  [ "$strategy" = ddp ] && args+=(--trainer.strategy.init_args.find_unused_parameters=false)
  [ "$merging" = merge ] && args+=("--model.init_args.backbone.init_args.merging={vision_r: 8}")
  echo "-- $name ($(date +%T))"
  if ! timeout "${RUN_TIMEOUT:-300}" "${VLP[@]}" fit "${args[@]}" >"$OUT/$name.log" 2>&1; then
    echo "   FAILED (see $OUT/$name.log)"; tail -5 "$OUT/$name.log"
  fi
done

echo "== table ($(date +%T))"
"$PY" - "$OUT" "$PEAK_TFLOPS" <<'EOF' | tee "$OUT/table.md"
import json
import sys
from pathlib import Path

out, peak = Path(sys.argv[1]), float(sys.argv[2])
# Model FLOPs do not depend on the strategy, and the replay count is only right under DDP eager
# (FlopCounterMode sees nothing inside compiled graphs, FSDP's replay counts too little, DeepSpeed none):
# every run uses the GFLOPs/sample of the ddp eager run with the same merging setting.
print("| strategy | compile | merging | samples/s | GFLOPs/sample | MFU | peak GiB |")
print("|---|---|---|---|---|---|---|")
results = {}
for log in sorted(out.glob("*.log")):
    result = out / f"{log.stem}.json"
    results[log.stem] = json.loads(result.read_text()) if result.is_file() else None
for name, m in results.items():
    strategy, mode, merging = name.rsplit("-", 2)
    if m is None:
        print(f"| {strategy} | {mode} | {merging} | failed | | | |")
        continue
    reference = results.get(f"ddp-eager-{merging}") or m
    rate, gflops = m.get("perf/samples_per_s", 0.0), reference.get("perf/gflops_per_sample", 0.0)
    mfu = rate * gflops / (peak * 1e3)
    print(f"| {strategy} | {mode} | {merging} | {rate:.1f} | {gflops:.1f} | {mfu:.1%} | {m['peak_gib']:.1f} |")
EOF
echo "done ($(date +%T)); results in $OUT"
