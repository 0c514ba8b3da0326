"""Multi-crop ops against torchvision.transforms.functional (PIL backend) given the same parameters.

Tolerances: every PIL-image op must match torchvision EXACTLY (max abs diff 0 uint8 levels), since
both call the same PIL primitives; normalisation matches ToTensor + Normalize to 1e-6. The blur has
no torchvision twin in the reference (KappaData applies PIL's ImageFilter.GaussianBlur), so it is
compared with PIL's filter directly and, for its sigma semantics, with scipy's exact Gaussian.
"""
import numpy as np
import pytest
from PIL import Image, ImageFilter
import scipy.ndimage
import skimage.data
import torch
from torchvision.transforms import functional as F
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from mim_refiner_jax.data import multicrop as mc


def _arr(img):
  return np.asarray(img).astype(np.int16)


def _max_diff(a, b):
  return int(np.abs(_arr(a) - _arr(b)).max())


@pytest.fixture(scope="module")
def photo():
  return Image.fromarray(skimage.data.chelsea()[:150, :220])  # 150x220 RGB: keeps the test fast


def test_crop_and_flip_match_torchvision(photo):
  for top, left, h, w, size in [(0, 0, 150, 220, 64), (10, 37, 80, 61, 96), (100, 3, 50, 40, 16)]:
    ref = F.resized_crop(photo, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    assert _max_diff(mc.resized_crop(photo, top, left, h, w, size), ref) == 0
  assert _max_diff(mc.hflip(photo), F.hflip(photo)) == 0


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_brightness_contrast_saturation_match_torchvision(photo, factor):
  assert _max_diff(mc.adjust_brightness(photo, factor), F.adjust_brightness(photo, factor)) == 0
  assert _max_diff(mc.adjust_contrast(photo, factor), F.adjust_contrast(photo, factor)) == 0
  assert _max_diff(mc.adjust_saturation(photo, factor), F.adjust_saturation(photo, factor)) == 0


@pytest.mark.parametrize("factor", [-0.1, -0.0371, 0.0, 0.004, 0.0623, 0.1, 0.5])
def test_hue_matches_torchvision(photo, factor):
  assert _max_diff(mc.adjust_hue(photo, factor), F.adjust_hue(photo, factor)) == 0


def test_jitter_order_matches_torchvision_sequence(photo):
  fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
  factors = (1.3, 0.7, 1.15, -0.08)
  for order in [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2)]:
    ref = photo
    for i in order:
      ref = fns[i](ref, factors[i])
    assert _max_diff(mc.color_jitter(photo, order, factors), ref) == 0
  # The order matters, so the comparison above can tell orders apart.
  assert _max_diff(mc.color_jitter(photo, (0, 1, 2, 3), factors),
                   mc.color_jitter(photo, (3, 2, 1, 0), factors)) > 0


def test_grayscale_and_solarize_match_torchvision(photo):
  assert _max_diff(mc.grayscale(photo), F.rgb_to_grayscale(photo, num_output_channels=3)) == 0
  assert _max_diff(mc.solarize(photo, 128), F.solarize(photo, 128)) == 0


def test_blur_is_pil_gaussian_with_sigma_as_std(photo):
  for sigma in (0.5, 1.0, 2.0):
    ours = mc.gaussian_blur(photo, sigma)
    assert _max_diff(ours, photo.filter(ImageFilter.GaussianBlur(radius=sigma))) == 0
    # PIL approximates the Gaussian by box blurs; "radius" is its standard deviation. Against
    # scipy's exact Gaussian: mean diff < 0.7 levels, interior max < 3.5 levels (measured
    # 0.36-0.56 and 1.6-2.8); a 30 % larger sigma is clearly further away.
    img = np.asarray(photo, np.float64)
    exact = scipy.ndimage.gaussian_filter(img, (sigma, sigma, 0), mode="nearest")
    wider = scipy.ndimage.gaussian_filter(img, (1.3 * sigma, 1.3 * sigma, 0), mode="nearest")
    diff = np.abs(np.asarray(ours, np.float64) - exact)
    assert diff.mean() < 0.7 and diff[6:-6, 6:-6].max() < 3.5
    assert np.abs(np.asarray(ours, np.float64) - wider).mean() > 1.5 * diff.mean()


def test_normalize_matches_to_tensor_normalize(photo):
  ref = F.normalize(F.to_tensor(photo), mc.IMAGENET_MEAN, mc.IMAGENET_STD).permute(1, 2, 0)
  ours = mc.normalize(np.asarray(photo), mc.IMAGENET_MEAN, mc.IMAGENET_STD)
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,resize,crop", [((300, 451), 256, 224), ((451, 300), 256, 224),
                                               ((120, 120), 256, 224), ((28, 40), 36, 32)])
def test_eval_view_matches_torchvision(shape, resize, crop):
  img = Image.fromarray(skimage.data.chelsea()).resize(shape[::-1], Image.BILINEAR)
  ref = F.center_crop(F.resize(img, resize, InterpolationMode.BICUBIC, antialias=True), crop)
  ours = mc.EvalTransform({"resize_size": resize, "crop_size": crop}).view_uint8(np.asarray(img))
  assert ours.shape == (crop, crop, 3)
  assert _max_diff(ours, ref) == 0


def test_whole_view_matches_torchvision_composition(photo):
  params = mc.ViewParams(size=48, crop=(5, 20, 100, 120), flip=True,
                         jitter=((2, 0, 3, 1), (1.2, 0.7, 0.9, 0.05)), blur_sigma=0.8,
                         grayscale=False, solarize=True)
  ref = F.hflip(F.resized_crop(photo, 5, 20, 100, 120, [48, 48], InterpolationMode.BICUBIC))
  ref = F.adjust_saturation(ref, 0.9)
  ref = F.adjust_brightness(ref, 1.2)
  ref = F.adjust_hue(ref, 0.05)
  ref = F.adjust_contrast(ref, 0.7)
  ref = F.solarize(ref.filter(ImageFilter.GaussianBlur(0.8)), 128)
  assert _max_diff(mc.apply_view(photo, params), ref) == 0


def test_crop_params_follow_torchvision_get_params():
  n, height, width = 2000, 300, 451
  scale, ratio = (0.25, 1.0), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  ours = np.array([mc.sample_crop_params(rng, height, width, scale, ratio) for _ in range(n)])
  torch.manual_seed(0)
  image = torch.zeros(3, height, width)
  ref = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio))
                  for _ in range(n)])
  for crops in (ours, ref):
    top, left, h, w = crops.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
  stats = lambda c: (np.mean(c[:, 2] * c[:, 3]) / (height * width),  # area fraction
                     np.mean(np.log(c[:, 3] / c[:, 2])),              # log aspect ratio
                     np.mean(c[:, 0] / (height - c[:, 2] + 1)))       # relative top offset
  # Sample-mean differences within ~4 standard errors (area std ~0.2, log ratio ~0.17, top ~0.29).
  assert (np.abs(np.subtract(stats(ours), stats(ref))) < [0.02, 0.016, 0.028]).all()
  # Area and aspect ratio stay in the (rounded) ranges when a try succeeds.
  area = ours[:, 2] * ours[:, 3] / (height * width)
  assert area.min() > 0.24 and area.max() <= 1.0
  aspect = ours[:, 3] / ours[:, 2]
  assert aspect.min() > 0.74 and aspect.max() < 1.345


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10), (3, 4)])
def test_crop_fallback_is_torchvision_centre_crop(height, width):
  # Scales this large cannot fit a 3/4..4/3 crop into a strip, so all 10 tries fail.
  scale, ratio = (0.95, 1.0), (3 / 4, 4 / 3)
  ref = RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
  ours = mc.sample_crop_params(np.random.default_rng(1), height, width, scale, ratio)
  if (height, width) != (3, 4):
    assert ours == tuple(ref)
  else:  # a 3x4 image fits; both must return a valid crop
    assert 0 < ours[2] <= height and 0 < ours[3] <= width


def test_view_probabilities_follow_section_9():
  crop = mc.MultiCrop()
  rng = np.random.default_rng(0)
  views = [crop.sample_params(rng, 300, 400) for _ in range(1500)]
  assert all(len(v) == 12 for v in views)
  assert [v.size for v in views[0]] == [224, 224] + [96] * 10
  freq = lambda view_ids, attr: np.mean([getattr(v[i], attr) not in (None, False)
                                         for v in views for i in view_ids])
  locals_ = range(2, 12)
  assert freq([0], "blur_sigma") == 1.0
  assert abs(freq([1], "blur_sigma") - 0.1) < 0.03
  assert abs(freq(locals_, "blur_sigma") - 0.5) < 0.02
  assert freq([0], "solarize") == 0.0 and freq(locals_, "solarize") == 0.0
  assert abs(freq([1], "solarize") - 0.2) < 0.035
  assert abs(freq(range(12), "jitter") - 0.8) < 0.01
  assert abs(freq(range(12), "grayscale") - 0.2) < 0.01
  assert abs(freq(range(12), "flip") - 0.5) < 0.01
  factors = np.array([p.jitter[1] for v in views for p in v if p.jitter is not None])
  lo, hi = factors.min(0), factors.max(0)
  assert (lo >= [0.6, 0.6, 0.8, -0.1]).all() and (hi <= [1.4, 1.4, 1.2, 0.1]).all()
  assert (lo < [0.61, 0.61, 0.81, -0.099]).all() and (hi > [1.39, 1.39, 1.19, 0.099]).all()
  sigmas = np.array([p.blur_sigma for v in views for p in v if p.blur_sigma is not None])
  assert 0.1 <= sigmas.min() < 0.11 and 1.99 < sigmas.max() <= 2.0
  orders = {p.jitter[0] for v in views for p in v if p.jitter is not None}
  assert len(orders) == 24  # all permutations of the 4 jitter ops occur


def test_multicrop_output_and_determinism():
  image = skimage.data.astronaut()[::4, ::4]  # 128x128
  record = {"image": image, "label": 3, "index": 17}
  crop = mc.MultiCrop({"global_size": 32, "local_size": 16, "num_local": 3})
  out = crop(record, np.random.default_rng(5))
  assert out["global"].shape == (2, 32, 32, 3) and out["global"].dtype == np.uint8
  assert out["local"].shape == (3, 16, 16, 3) and out["local"].dtype == np.uint8
  assert (out["label"], out["index"], out["num_skipped"]) == (3, 17, 0)
  again = crop(record, np.random.default_rng(5))
  np.testing.assert_array_equal(out["global"], again["global"])
  np.testing.assert_array_equal(out["local"], again["local"])
  other = crop(record, np.random.default_rng(6))
  assert not np.array_equal(out["global"], other["global"])
  # uint8 views are the un-normalised views_uint8 of the same draws (normalised on the device)
  np.testing.assert_array_equal(out["global"], np.stack(
      crop.views_uint8(image, np.random.default_rng(5))[:2]))
  no_locals = mc.MultiCrop({"global_size": 32, "local_size": 16, "num_local": 0})
  assert no_locals(record, np.random.default_rng(5))["local"].shape == (0, 16, 16, 3)


def test_no_color_augs_is_crop_and_flip_only():
  image = skimage.data.coffee()[::4, ::4]
  crop = mc.MultiCrop({"global_size": 40, "local_size": 20, "num_local": 2, "color_augs": False})
  params = crop.sample_params(np.random.default_rng(0), *image.shape[:2])
  assert all(p.jitter is None and p.blur_sigma is None and not p.grayscale and not p.solarize
             for p in params)
  views = crop.views_uint8(image, np.random.default_rng(0))
  img = Image.fromarray(image)
  for p, view in zip(params, views):
    ref = F.resized_crop(img, *p.crop, [p.size, p.size], InterpolationMode.BICUBIC)
    ref = F.hflip(ref) if p.flip else ref
    assert _max_diff(view, ref) == 0


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="unknown MultiCropConfig keys.*'global_sise'"):
    mc.MultiCropConfig.from_config({"global_sise": 32})
  with pytest.raises(ValueError, match="crop_size <= resize_size"):
    mc.EvalConfig(resize_size=32, crop_size=36)
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = mc.MultiCropConfig.from_config(ml_collections.ConfigDict(
      {"global_size": 32, "local_scale": [0.1, 0.3]}))
  assert cfg.global_size == 32 and cfg.local_scale == (0.1, 0.3)
  assert mc.local_size_for_patch(14) == 98 and mc.local_size_for_patch(16) == 96


def test_probe_minimal_augmentation_is_random_resized_crop_and_flip(photo):
  """EvalConfig.augment_seed (evaluate.py --probe-augment): RandomResizedCrop(scale 0.08-1,
  bicubic) + flip (section 9, train_minaug), torchvision's ops given the drawn parameters; the
  same (seed, index) gives the same view, another seed or index another one."""
  pixels = np.asarray(photo)
  view = lambda seed, index: mc.EvalTransform(dict(
      resize_size=64, crop_size=56, augment_seed=seed)).view_uint8(pixels, index)
  a = view(0, 7)
  assert a.shape == (56, 56, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, view(0, 7))
  assert not np.array_equal(a, view(1, 7)) and not np.array_equal(a, view(0, 8))
  rng = np.random.default_rng([0, 7])  # the transform's parameter draws, replayed
  top, left, h, w = mc.sample_crop_params(rng, photo.height, photo.width, (0.08, 1.0),
                                          (3 / 4, 4 / 3))
  expected = F.resized_crop(photo, top, left, h, w, [56, 56],
                            InterpolationMode.BICUBIC)
  if rng.random() < 0.5:
    expected = F.hflip(expected)
  np.testing.assert_array_equal(a, np.asarray(expected))
  eval_view = mc.EvalTransform(dict(resize_size=64, crop_size=56)).view_uint8(pixels, 7)
  assert not np.array_equal(a, eval_view)  # augment_seed -1 (default): the plain eval view
