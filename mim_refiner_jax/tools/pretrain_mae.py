"""Pre-trains a small MAE on the bundled MNIST digits and writes its encoder as a Flax checkpoint.

The CPU demo refines this model (configs/demo.py); nothing can be downloaded here, so the
masked-image model to refine is made on the spot. Defaults (ViT width 128, depth 6, 4 heads,
patch 4, 32 px, decoder 64 wide and 2 deep, 20 epochs of the 4,000-digit train split, batch 128,
620 steps) take about 4 minutes on 2 idle CPU cores.

  python tools/pretrain_mae.py --out workdirs/demo/mae
  # The MAE shipped for tools/demo.py (byte-for-byte the same file on a rerun):
  python tools/pretrain_mae.py --out mim_refiner_jax/data/demo_mae/mae_mnist.safetensors \
      --width 96 --depth 4 --heads 3 --epochs 30 --seed 0
  python tools/pretrain_mae.py --out /tmp/mae --size tiny --epochs 100 --torch-out /tmp/mae.pth

Recipe (facebookresearch/mae, `main_pretrain.py`, `models_mae.py`): 75% random masking per sample,
normalised-pixel loss on masked patches, AdamW (b1 0.9, b2 0.95, weight decay 0.05 on matrices
and tokens, none on biases and norms), linear warmup then half-cosine to 0 per step. Departures:
- Augmentation: a random shift of up to `--max-shift` px (zero fill) instead of MAE's random
  resized crop (scale 0.2-1) and horizontal flip. Flips turn digits into non-digits (or another
  digit), and crops down to 20% of the area cut most of a 28 px digit away.
- Peak learning rate: `--lr` is absolute. MAE's rule (1.5e-4 * batch / 256) is tuned for 800-1600
  epochs of ImageNet; 620 steps on 4,000 digits need a larger one: 3e-3 (1.5e-3 gave 4 points
  less k-NN accuracy, batch 256 with half the steps 20 points less).
Inputs: MNIST padded 28 -> 32 px (`data.mnist.to_rgb`), grey repeated to 3 channels, scaled to
[0, 1] and normalised with the ImageNet mean/std, as every MIM model here (the refinement
pipeline must normalise the same way).

Output `--out FILE.safetensors`: the encoder in the refined naming with its vit_kwargs (header keys
sorted, so the bytes depend only on the weights) and `FILE.json` (the summary below plus the
command, the file's sha256 and a k-NN accuracy on a fixed 1,000 -> 500 digit subset that a test
reproduces). Output `--out DIR`: the encoder (`{"params", "buffers": {"pos_embed"}}` of
`ViT(**vit_kwargs)`) written by `convert.checkpoints.save_flax`, plus `DIR/pretrain_mae.json`
(arguments, loss curve, k-NN accuracies). At the end the tool prints a k-NN sanity check (k=10,
tau=0.07, the standardise + cosine + exp(s/tau) vote of refiner_facts.md section 10.1; features
fit on the train split, evaluated on val): the CLS token of every block (raw residual stream) and
the mean patch token of the last block, and the same for the encoder at initialisation with
`--knn-at-init`.
"""

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_refiner_jax.data import mnist
from mim_refiner_jax.data import multicrop
from mim_refiner_jax.evaluation import knn
from mim_refiner_jax.models import mae as mae_lib
from mim_refiner_jax.models import vit

IMAGENET_MEAN = np.array(multicrop.IMAGENET_MEAN, np.float32)  # the refinement pipeline's
IMAGENET_STD = np.array(multicrop.IMAGENET_STD, np.float32)
DEFAULT_SIZE = dict(width=128, depth=6, num_heads=4)


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True,
                      help="directory for the encoder checkpoint (Flax); a path ending in "
                           ".safetensors writes that one file plus NAME.json instead (byte-"
                           "reproducible: the shipped demo MAE)")
  parser.add_argument("--torch-out", default="",
                      help="also write a PyTorch MAE-layout .pth ({'model': timm state dict})")
  parser.add_argument("--size", default="", choices=[""] + sorted(vit.SIZES),
                      help="named ViT size (models/vit.py SIZES); default width 128, depth 6, "
                           "4 heads; --width/--depth/--heads override it")
  parser.add_argument("--width", type=int, default=0)
  parser.add_argument("--depth", type=int, default=0)
  parser.add_argument("--heads", type=int, default=0)
  parser.add_argument("--patch-size", type=int, default=4)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--decoder-width", type=int, default=64)
  parser.add_argument("--decoder-depth", type=int, default=2)
  parser.add_argument("--decoder-heads", type=int, default=2)
  parser.add_argument("--mask-ratio", type=float, default=0.75)
  parser.add_argument("--split", default="train", choices=mnist.SPLITS,
                      help="MNIST split to pre-train on (val stays unseen for k-NN)")
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--steps", type=int, default=0,
                      help="stop after this many steps (0: all epochs); for smoke tests")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="peak learning rate (MAE: 1.5e-4 * batch / 256 for long runs)")
  parser.add_argument("--warmup-epochs", type=float, default=3)
  parser.add_argument("--weight-decay", type=float, default=0.05)
  parser.add_argument("--max-shift", type=int, default=2,
                      help="random translation in px (0: no augmentation)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
  parser.add_argument("--knn", default="end", choices=["end", "none"],
                      help="k-NN sanity check after training")
  parser.add_argument("--knn-at-init", action="store_true",
                      help="also run the k-NN check on the randomly initialised encoder")
  args = parser.parse_args(argv)

  size = dict(vit.SIZES[args.size]) if args.size else dict(DEFAULT_SIZE)
  for key, value in (("width", args.width), ("depth", args.depth), ("num_heads", args.heads)):
    size[key] = value or size[key]
  if size["width"] % size["num_heads"] or size["width"] % 4:
    parser.error(f"width {size['width']} must divide by --heads {size['num_heads']} and by 4 "
                 "(sin-cos position table)")
  if args.decoder_width % args.decoder_heads or args.decoder_width % 4:
    parser.error(f"--decoder-width {args.decoder_width} must divide by --decoder-heads "
                 f"{args.decoder_heads} and by 4")
  if args.image_size % args.patch_size:
    parser.error(f"--image-size {args.image_size} is not divisible by --patch-size "
                 f"{args.patch_size}")
  if args.batch_size % jax.device_count():
    parser.error(f"--batch-size {args.batch_size} must divide by the {jax.device_count()} devices")
  args.vit_kwargs = dict(size, patch_size=args.patch_size, mlp_ratio=4.0, prenorm=True,
                         pos_grid=args.image_size // args.patch_size)
  return args


# ----------------------------------------------------------------------------- input
def normalize(images_uint8: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> float32 normalised with the ImageNet mean/std (inside jit)."""
  return (images_uint8.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
  """Translates each `[H, W, C]` image by up to `max_shift` px in x and y, filling with zeros."""
  if max_shift <= 0:
    return images
  b, h, w, _ = images.shape
  s = max_shift
  padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  dy, dx = rng.integers(0, 2 * s + 1, size=(2, b))
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.arange(w)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


# ----------------------------------------------------------------------------- k-NN check
def encoder_features(encoder: vit.ViT, variables, images: np.ndarray, batch_size: int = 500):
  """Per-block CLS and last-block mean-patch features of uint8 images, as numpy arrays."""
  blocks = tuple(range(encoder.depth))

  @jax.jit
  def forward(images_uint8):
    _, aux = encoder.apply(variables, normalize(images_uint8), blocks=blocks)
    feats = {f"block{i}_cls": aux["block_cls"][i] for i in blocks}
    feats[f"block{blocks[-1]}_patch_mean"] = aux["block_patch_mean"][blocks[-1]]
    feats["main_cls"] = aux["cls"]  # after the final LayerNorm
    return feats

  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)  # one shape, one compile
    feats = forward(np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]))
    out.append(jax.tree.map(lambda a, n=len(chunk): np.asarray(a)[:n], feats))
  return {name: np.concatenate([o[name] for o in out]) for name in out[0]}


def knn_report(encoder, variables, image_size: int, title: str) -> dict:
  train_images, train_labels = mnist.load_mnist("train")
  val_images, val_labels = mnist.load_mnist("val")
  train_feats = encoder_features(encoder, variables, mnist.to_rgb(train_images, image_size))
  val_feats = encoder_features(encoder, variables, mnist.to_rgb(val_images, image_size))
  results = {name: knn.knn_accuracy(train_feats[name], train_labels, val_feats[name],
                                    val_labels)["accuracy"] for name in train_feats}
  print(f"k-NN accuracy ({title}; k=10, tau=0.07, MNIST train 4000 -> val 1000, chance 10%):")
  for name, acc in results.items():
    print(f"  {name:<20s} {100 * acc:5.1f}%")
  return results


# ----------------------------------------------------------------------------- checkpoint
def save_encoder(directory: str, variables, vit_kwargs: dict, torch_out: str = "") -> None:
  """Writes the encoder with the converter's `save_flax`; `torch_out`: also a MAE-layout .pth.

  The .pth is what facebookresearch/mae releases: {"model": timm `VisionTransformer` state dict}
  (refiner_facts.md section 3.1); `convert.checkpoints.load_pretrained` reads it as format "mae"
  (pass num_heads=... there for widths it does not know).
  """
  from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
  variables = jax.tree.map(np.asarray, variables)
  checkpoints.save_flax(directory, variables, vit_kwargs)
  if torch_out:  # written without torch (convert/torch_writer.py)
    checkpoints.save_torch(torch_out, variables, vit_kwargs, layout="mae")


# ----------------------------------------------------------------------------- training
def train(args) -> tuple[dict, dict, list]:
  """Pre-trains the MAE; returns the encoder variables, vit_kwargs and the logged losses."""
  kw = args.vit_kwargs
  model = mae_lib.MAE(patch_size=kw["patch_size"], width=kw["width"], depth=kw["depth"],
                      num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"],
                      pos_grid=kw["pos_grid"], decoder_width=args.decoder_width,
                      decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
                      mask_ratio=args.mask_ratio)
  images, _ = mnist.load_mnist(args.split)
  images = mnist.to_rgb(images, args.image_size)
  steps_per_epoch = len(images) // args.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(images)} images of "
                     f"split {args.split!r}")
  total_steps = args.epochs * steps_per_epoch
  if args.steps:
    total_steps = min(total_steps, args.steps) if total_steps else args.steps
  if total_steps <= 0:
    raise ValueError("nothing to train: set --epochs or --steps to a positive number")

  # Data parallel over all local devices (one on a plain CPU); parameters replicated.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  init_rng, mask_rng = jax.random.split(jax.random.key(args.seed))
  dummy = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
  variables = jax.jit(model.init, out_shardings=replicated)(
      {"params": init_rng, "mask": init_rng}, dummy)
  params, buffers = variables["params"], variables["buffers"]

  warmup_steps = min(int(round(args.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps, total_steps, 0.0)
  # MAE decays matrices, kernels, cls_token and mask_token; not biases or norm parameters.
  decay_mask = jax.tree.map(lambda x: x.ndim > 1, params)
  tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask)
  state = {"params": params, "opt": jax.jit(tx.init, out_shardings=replicated)(params),
           "step": jax.device_put(jnp.zeros((), jnp.int32), replicated)}

  def train_step(state, buffers, images_uint8):
    rng = jax.random.fold_in(mask_rng, state["step"])

    def loss_fn(params):
      x = normalize(images_uint8)
      pred, mask = model.apply({"params": params, "buffers": buffers}, x, rngs={"mask": rng})
      return mae_lib.mae_loss(pred, x, mask, model.patch_size)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                 "step": state["step"] + 1}
    return new_state, {"loss": loss, "lr": schedule(state["step"])}

  step_fn = jax.jit(train_step, donate_argnums=(0,), out_shardings=replicated)

  encoder = vit.ViT(**kw)
  encoder_vars = lambda s: {"params": s["params"]["encoder"], "buffers": buffers["encoder"]}
  if args.knn_at_init and args.knn != "none":
    knn_report(encoder, encoder_vars(state), args.image_size, "random init")

  n_params = sum(x.size for x in jax.tree.leaves(params["encoder"]))
  print(f"MAE pre-training on MNIST {args.split} ({len(images)} images): encoder {kw} "
        f"({n_params / 1e6:.2f}M params), decoder {args.decoder_width}x{args.decoder_depth}, "
        f"{total_steps} steps of {args.batch_size} ({steps_per_epoch} per epoch), "
        f"{jax.device_count()} device(s)", flush=True)
  data_rng = np.random.default_rng(args.seed)
  history, start, cpu_start, timed_from = [], time.time(), time.process_time(), None
  step, order = 0, None
  while step < total_steps:
    if step % steps_per_epoch == 0:
      order = data_rng.permutation(len(images))
    rows = order[(step % steps_per_epoch) * args.batch_size:][:args.batch_size]
    batch = jax.device_put(random_shift(images[rows], args.max_shift, data_rng), batch_sharding)
    state, metrics = step_fn(state, buffers, batch)
    step += 1
    if step == 1:
      jax.block_until_ready(metrics)
      timed_from = (time.time(), step)  # throughput without the compile step
    if step % args.log_every == 0 or step == total_steps:
      loss, lr = (float(v) for v in jax.device_get((metrics["loss"], metrics["lr"])))
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; try a lower --lr")
      history.append({"step": step, "epoch": step / steps_per_epoch, "loss": loss})
      now = time.time()
      rate = (step - timed_from[1]) * args.batch_size / max(now - timed_from[0], 1e-9)
      eta = f"{(total_steps - step) * args.batch_size / rate:5.0f}s" if rate > 0 else "    ?"
      print(f"epoch {step / steps_per_epoch:6.2f}  step {step:5d}/{total_steps}  loss {loss:.4f}"
            f"  lr {lr:.2e}  {rate:6.1f} img/s  elapsed {now - start:5.0f}s  ETA {eta}",
            flush=True)
  # CPU seconds of all threads: wall time on an idle machine is about this over the core count.
  print(f"pre-training took {time.time() - start:.0f}s ({time.process_time() - cpu_start:.0f} "
        f"CPU-s)", flush=True)
  return encoder_vars(state), kw, history


def knn_subset(encoder, variables, image_size: int) -> float:
  """k-NN accuracy of the last block's CLS on a fixed small subset: the first 100 train digits of
  each class -> the first 50 val digits of each class (recorded with a shipped checkpoint so a
  test can check, in seconds, that the file loads into the same features)."""
  (train_x, train_y), (val_x, val_y) = mnist.load_mnist("train"), mnist.load_mnist("val")
  pick = lambda y, n: np.concatenate([np.flatnonzero(y == c)[:n] for c in range(10)])
  tr, va = pick(train_y, 100), pick(val_y, 50)
  name = f"block{encoder.depth - 1}_cls"
  train_feats = encoder_features(encoder, variables, mnist.to_rgb(train_x[tr], image_size))[name]
  val_feats = encoder_features(encoder, variables, mnist.to_rgb(val_x[va], image_size))[name]
  return knn.knn_accuracy(train_feats, train_y[tr], val_feats, val_y[va])["accuracy"]


def canonicalize_safetensors(path: str) -> None:
  """Rewrites the header of a safetensors file with sorted keys, so equal tensors give equal bytes.

  The safetensors writer keeps the metadata in a hash map, so its key order (and the file's
  sha256) changes from run to run; the tensors and their offsets are untouched here.
  """
  import struct  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    blob = f.read()
  (length,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + length])
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + blob[8 + length:])


def sha256(path: str) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> dict:
  args = parse_args(argv)
  single_file = args.out.endswith(".safetensors")
  if single_file and args.torch_out:
    raise SystemExit("--torch-out goes with a Flax --out directory, not a .safetensors file")
  start = time.time()
  variables, vit_kwargs, history = train(args)
  train_seconds = time.time() - start
  variables = jax.tree.map(np.asarray, variables)
  encoder = vit.ViT(**vit_kwargs)
  knn = {}
  if args.knn != "none":
    knn = knn_report(encoder, variables, args.image_size, "pre-trained MAE")
  summary = {"args": {k: v for k, v in vars(args).items() if k != "vit_kwargs"},
             "command": "python tools/pretrain_mae.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
             "vit_kwargs": vit_kwargs, "train_seconds": train_seconds, "history": history,
             "knn": knn, "knn_subset_block_last_cls": knn_subset(encoder, variables,
                                                                  args.image_size),
             "knn_subset": "k=10, tau=0.07; train digits 0-99 of each class -> val digits 0-49 "
                           "of each class; CLS of the last block (no norm)",
             "input_normalization": "imagenet mean/std on [0, 1] pixels",
             "mnist_to_rgb": "pad 28 -> image_size, grey repeated to 3 channels"}
  if single_file:
    from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.save_torch(args.out, variables, vit_kwargs, layout="safetensors")
    canonicalize_safetensors(args.out)
    summary["sha256"] = sha256(args.out)
    summary_path = args.out[:-len(".safetensors")] + ".json"
  else:
    save_encoder(args.out, variables, vit_kwargs, args.torch_out)
    summary_path = os.path.join(args.out, "pretrain_mae.json")
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote the encoder to {args.out}" + (f" and {args.torch_out}" if args.torch_out else "")
        + (f" (sha256 {summary['sha256']})" if single_file else ""))
  return summary


if __name__ == "__main__":
  main()
