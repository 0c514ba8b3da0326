"""Makes `import torchvision` / `import timm` work with the CPU torch wheel.

torchvision 0.28.0 on PyPI is a CUDA build whose compiled ops cannot load next to the CPU torch
2.13.0 wheel: importing it fails with `operator torchvision::nms does not exist`. Its meta
registrations only need the op *schemas*, so we declare them (../shared/ENGINEERING.md, section 2).
Only torchvision's compiled ops (nms, roi_align, image decoding) stay unavailable; the transforms
and models we use are pure Python. Call `ensure_torchvision_importable()` before the first import
of torchvision or timm.
"""

_LIBRARY = None  # must stay referenced, or torch drops the definitions


def ensure_torchvision_importable() -> None:
  global _LIBRARY
  import torch  # pylint: disable=g-import-not-at-top

  try:
    torch.ops.torchvision.nms  # pylint: disable=pointless-statement
    return  # a working torchvision build (or an earlier call) already defined the ops
  except (AttributeError, RuntimeError):
    pass
  if _LIBRARY is None:
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
