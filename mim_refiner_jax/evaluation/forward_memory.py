"""Will a ViT forward fit? A lower bound on its memory, checked before anything runs.

The attention logits and their softmax (float32, batch x heads x tokens^2 each) are alive at the
same time in every block, so they bound a forward's peak from below. A request far beyond the
device (e.g. 224 px through a patch-4 model trained at 32 px: 3,137 tokens) is refused with the
sizes involved instead of an XLA RESOURCE_EXHAUSTED error minutes later; requests under the bound
may still run out, which `is_out_of_memory` recognises so that callers can say the same.
"""

import os

import jax

from mim_refiner_jax.errors import UserError

GIB = 2**30


def native_image_size(vit_kwargs: dict) -> int:
  """The image size a checkpoint was trained at: patch size x position-table grid."""
  return vit_kwargs["patch_size"] * vit_kwargs["pos_grid"]


def forward_bytes_lower_bound(vit_kwargs: dict, batch_per_device: int, image_size: int) -> int:
  tokens = (image_size // vit_kwargs["patch_size"]) ** 2 + 1  # + CLS
  return 2 * batch_per_device * vit_kwargs["num_heads"] * tokens**2 * 4


def device_memory_bytes() -> tuple[int, str]:
  """(bytes one local device may use, a description): the accelerator's limit, or for CPU
  devices the host's RAM shared among them."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"one {device.device_kind} device has"
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  n = jax.local_device_count()
  return total // n, f"the host's RAM shared by {n} CPU device{'s' if n > 1 else ''} gives"


def describe_request(vit_kwargs: dict, global_batch: int, image_size: int) -> str:
  tokens = (image_size // vit_kwargs["patch_size"]) ** 2 + 1
  return (f"batch {global_batch} ({global_batch // jax.device_count()} per device) of "
          f"{image_size}x{image_size} px = {tokens} tokens at patch {vit_kwargs['patch_size']}, "
          f"{vit_kwargs['num_heads']} heads")


def check_forward_fits(vit_kwargs: dict, global_batch: int, image_size: int, fix: str):
  """UserError (with the sizes and `fix`) if the forward surely does not fit one device."""
  per_device = max(1, global_batch // jax.device_count())
  need = forward_bytes_lower_bound(vit_kwargs, per_device, image_size)
  have, where = device_memory_bytes()
  if need > have:
    raise UserError(
        f"{describe_request(vit_kwargs, global_batch, image_size)} needs at least "
        f"{need / GIB:.1f} GiB per device for the attention alone, but {where} "
        f"{have / GIB:.1f} GiB: {fix}")


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
