"""Weight conversion: safe torch-file reader, Flax <-> torch round trips, detection, errors, CLI.

Third-party truth here is torch itself: files are written with `torch.save` (zip and legacy
formats) and safetensors, and read back with our torch-free reader. Forward-pass parity with timm
and kappamodules lives in test_parity_timm.py / test_parity_kappamodules.py.
"""

import argparse
import collections
import os
import pickle
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_refiner_jax.convert import checkpoints
from mim_refiner_jax.convert import mapping
from mim_refiner_jax.convert import torch_files
from mim_refiner_jax.models import vit as vit_lib
from mim_refiner_jax.models.vit import ViT

PRE = dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_ratio=4.0, prenorm=True, pos_grid=4)
POST = dict(PRE, width=48, depth=3, num_heads=3, prenorm=False, pos_grid=3)


def random_variables(vit_kwargs, seed=0):
  """Random float32 variables with the exact tree of ViT(**vit_kwargs) (shapes via eval_shape)."""
  side = vit_kwargs["pos_grid"] * vit_kwargs["patch_size"]
  shapes = jax.eval_shape(ViT(**vit_kwargs).init, jax.random.key(0),
                          jnp.zeros((1, side, side, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def assert_trees_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.float32 and np.asarray(y).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


# ----------------------------------------------------------------------- the reader vs torch.save
def _reader_cases():
  torch.manual_seed(0)
  base = torch.randn(6, 5)
  return {
      "f32": torch.randn(3, 4), "f16": torch.randn(2, 3).half(),
      "bf16": torch.randn(4, 2).bfloat16(),
      "f64": torch.randn(3).double(), "i64": torch.arange(7), "bool": torch.tensor([True, False]),
      "transposed": base.t(), "row_view": base[2:4], "strided": base[:, 1],
      "param": torch.nn.Parameter(torch.randn(2)), "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 3), "shared": base,
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_matches_torch_load(tmp_path, zip_format):
  tensors = _reader_cases()
  obj = {"weights": collections.OrderedDict(tensors), "cfg": {"lr": 0.1, "tags": {"a", "b"},
         "raw": b"\x00\xff", "nested": [1, (2, 3)]}, "args": argparse.Namespace(arch="vit"),
         "device": torch.device("cpu")}
  path = tmp_path / "ckpt.pth"
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  assert torch_files.sniff(str(path)) == ("torch-zip" if zip_format else "torch-legacy")
  out = torch_files.load(path)
  for name, tensor in tensors.items():
    ref = out["weights"][name]
    assert isinstance(ref, torch_files.TensorRef) and ref.shape == tuple(tensor.shape)
    got = np.asarray(ref)
    want = tensor.detach()
    if want.dtype == torch.bfloat16:  # numpy has no bf16: compare the exact fp32 widening
      got, want = got.astype(np.float32), want.float()
    np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
    assert got.dtype == want.numpy().dtype, name
  assert out["cfg"] == {"lr": 0.1, "tags": {"a", "b"}, "raw": b"\x00\xff", "nested": [1, (2, 3)]}
  assert isinstance(out["args"], torch_files.ConfigStub)  # recorded, never constructed
  assert out["args"].global_name == "argparse.Namespace" and out["args"].state == {"arch": "vit"}
  assert isinstance(out["device"], torch_files.ConfigStub) and out["device"].args == ("cpu",)


def test_safetensors_reader_handles_bf16(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.randn(2, 2).half()}
  save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"k": "v"})
  refs, meta = torch_files.load_safetensors(str(tmp_path / "w.safetensors"))
  assert meta == {"k": "v"}
  for name, t in tensors.items():
    np.testing.assert_array_equal(np.asarray(refs[name]).astype(np.float32), t.float().numpy())


class _Evil:
  def __init__(self, target, module="os"):
    self.target, self.module = target, module

  def __reduce__(self):
    if self.module == "os":
      return os.system, (f"touch {self.target}",)
    return eval, (f"open({self.target!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "plain_pickle", "eval_in_cfg"])
def test_malicious_pickles_are_refused_without_running(tmp_path, how):
  sentinel = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  if how == "torch_zip":
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Evil(sentinel)}, path)
  elif how == "torch_legacy":
    torch.save({"x": _Evil(sentinel)}, path, _use_new_zipfile_serialization=False)
  elif how == "plain_pickle":
    with open(path, "wb") as f:
      pickle.dump(_Evil(sentinel), f, protocol=2)
  else:
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": {"x": _Evil(sentinel, "builtins")}}, path)
  if how == "plain_pickle":  # control: the payload is live when unpickled the normal way
    with open(path, "rb") as f:
      pickle.load(f)  # noqa: S301
    assert sentinel.exists()
    sentinel.unlink()
  with pytest.raises(torch_files.UnsafePickleError, match=r"refusing to unpickle global "
                     r"(posix\.system|os\.system|builtins\.eval) from .*not a weights-only"):
    torch_files.load(path)
  with pytest.raises(torch_files.UnsafePickleError):
    checkpoints.load_pretrained(path)
  assert not sentinel.exists()


def test_stubbed_config_globals_never_execute(tmp_path, monkeypatch):
  # A global under a stubbed namespace (fairseq.*) loads as an inert record: nothing is imported
  # or called, even though the pickle asks to call it with arguments.
  sentinel = tmp_path / "pwned"
  for name in ("fairseq", "fairseq.tasks"):  # only so that torch.save can pickle the reference
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  run = lambda *a: None  # pylint: disable=unnecessary-lambda-assignment
  run.__module__, run.__qualname__, run.__name__ = "fairseq.tasks", "run", "run"
  monkeypatch.setattr(sys.modules["fairseq.tasks"], "run", run, raising=False)

  class FakeFairseq:
    def __reduce__(self):
      return run, (f"touch {sentinel}",)

  torch.save({"model": {"w": torch.zeros(1)}, "cfg": FakeFairseq()}, tmp_path / "c.pt")
  monkeypatch.undo()  # the reader must not need (or find) the module
  out = torch_files.load(tmp_path / "c.pt")
  assert isinstance(out["cfg"], torch_files.ConfigStub)
  assert out["cfg"].global_name == "fairseq.tasks.run"
  assert out["cfg"].args == (f"touch {sentinel}",)
  assert not sentinel.exists()


def test_codecs_encode_only_latin1(tmp_path):
  # protocol-2 bytes pickle as _codecs.encode(text, "latin1"); other codecs are refused.
  data = (b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x04\x00\x00\x00zlibq\x02"
          b"\x86q\x03Rq\x04.")
  (tmp_path / "c.pth").write_bytes(data)
  with pytest.raises(torch_files.UnsafePickleError, match="zlib"):
    torch_files.load(tmp_path / "c.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script / save
def test_unknown_file_formats_give_clear_errors(tmp_path):
  (tmp_path / "junk.pth").write_bytes(b"hello world, not a checkpoint")
  with pytest.raises(torch_files.CheckpointFormatError, match="unknown file format"):
    torch_files.load(tmp_path / "junk.pth")
  with pytest.raises(FileNotFoundError):
    checkpoints.load_pretrained(tmp_path / "missing.pth")
  scripted = torch.jit.script(torch.nn.Linear(2, 2))
  torch.jit.save(scripted, str(tmp_path / "script.pt"))
  with pytest.raises(torch_files.CheckpointFormatError, match="TorchScript"):
    torch_files.load(tmp_path / "script.pt")


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("vit_kwargs,layout", [(PRE, "refined"), (PRE, "timm"),
                                               (PRE, "safetensors"), (POST, "refined"),
                                               (POST, "safetensors")],
                         ids=["pre-refined", "pre-timm", "pre-safetensors", "post-refined",
                              "post-safetensors"])
def test_flax_torch_flax_is_bitwise(tmp_path, vit_kwargs, layout):
  variables = random_variables(vit_kwargs)
  path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.th")
  checkpoints.save_torch(path, variables, vit_kwargs, layout=layout)
  back = checkpoints.load_pretrained(path)
  assert back.vit_kwargs == vit_kwargs
  assert_trees_bitwise_equal(back.variables, variables)
  expected_format = {"refined": "refined", "timm": "timm", "safetensors": "safetensors"}[layout]
  assert back.info["format"] == expected_format
  if layout != "safetensors":  # torch itself reads what we wrote, with the documented names
    loaded = torch.load(path, weights_only=True)
    sd = loaded["state_dict"] if layout == "refined" else loaded
    want = mapping.to_torch_state_dict(variables, vit_kwargs, layout)
    assert sorted(sd) == sorted(want)
    for k, v in want.items():
      np.testing.assert_array_equal(sd[k].numpy(), v)
    if layout == "refined":
      assert loaded["ctor_kwargs"]["num_heads"] == vit_kwargs["num_heads"]


def test_flax_checkpoint_round_trip(tmp_path):
  variables = random_variables(POST, seed=1)
  checkpoints.save_flax(tmp_path / "ckpt", variables, dict(POST, dtype="ignored"))
  loaded = checkpoints.load_flax(tmp_path / "ckpt")
  assert loaded.vit_kwargs == POST and loaded.info["format"] == "flax"
  assert_trees_bitwise_equal(loaded.variables, variables)
  via_generic = checkpoints.load_pretrained(tmp_path / "ckpt", family="postnorm", num_heads=3)
  assert_trees_bitwise_equal(via_generic.variables, variables)
  with pytest.raises(ValueError, match="prenorm: override True vs checkpoint False"):
    checkpoints.load_pretrained(tmp_path / "ckpt", family="mae")
  with pytest.raises(FileExistsError):
    checkpoints.save_flax(tmp_path / "ckpt", variables, POST)
  with pytest.raises(FileNotFoundError, match="not a Flax ViT checkpoint"):
    checkpoints.load_pretrained(tmp_path)


def test_reading_needs_no_torch(tmp_path):
  # TPU hosts may have no torch: the whole load path must work with torch imports blocked.
  kw = vit_lib.vit_kwargs("mu", 4, image_size=16)  # the ViT helper's kwargs (no mlp_ratio)
  variables = random_variables(dict(kw, mlp_ratio=4.0))
  checkpoints.save_torch(tmp_path / "w.th", variables, kw, layout="refined")
  code = ("import sys; sys.modules['torch'] = None\n"
          "from mim_refiner_jax.convert import checkpoints\n"
          f"pre = checkpoints.load_pretrained({str(tmp_path / 'w.th')!r})\n"
          "assert pre.info['format'] == 'refined', pre.info\n"
          f"checkpoints.save_torch({str(tmp_path / 'w.safetensors')!r}, pre.variables, "
          "pre.vit_kwargs, layout='safetensors')\nprint('ok')")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        check=False)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
  assert_trees_bitwise_equal(checkpoints.load_pretrained(tmp_path / "w.safetensors").variables,
                             variables)


def test_postnorm_cannot_be_written_as_timm(tmp_path):
  with pytest.raises(ValueError, match="embed_norm.*post-norm blocks.*no final norm"):
    checkpoints.save_torch(tmp_path / "x.pth", random_variables(POST), POST, layout="timm")


# ----------------------------------------------------------------------------- detection and errors
def _mae_file(tmp_path, vit_kwargs=PRE, **extra):
  sd = {k: torch.from_numpy(v)
        for k, v in mapping.to_torch_state_dict(random_variables(vit_kwargs), vit_kwargs,
                                                "timm").items()}
  sd.update(extra)
  path = tmp_path / "mae.pth"
  torch.save({"model": sd}, path)
  return path


def test_mae_layout_detection_and_dropped_keys(tmp_path):
  path = _mae_file(tmp_path, mask_token=torch.zeros(1, 1, 32),
                   **{"decoder_embed.weight": torch.zeros(16, 32)})
  pre = checkpoints.load_pretrained(path)
  assert pre.info["format"] == "mae" and pre.info["family"] == "prenorm"
  assert pre.info["size"] == "mu" and pre.info["patch_size"] == 4
  assert sorted(pre.info["dropped_keys"]) == ["decoder_embed.weight", "mask_token"]
  assert pre.num_params == sum(v.size for v in jax.tree.leaves(pre.variables["params"]))


def test_family_override_mismatch_lists_keys(tmp_path):
  path = _mae_file(tmp_path)
  with pytest.raises(ValueError) as e:
    checkpoints.load_pretrained(path, family="postnorm")
  msg = str(e.value)
  assert "post-norm (data2vec 2.0) ViT as overridden" in msg
  assert "missing (2): embed_norm.bias, embed_norm.weight" in msg
  assert "unexpected (2): norm.bias, norm.weight" in msg
  with pytest.raises(ValueError, match="patch_size=8 but the file's patch embedding has patch"):
    checkpoints.load_pretrained(path, patch_size=8)
  with pytest.raises(ValueError, match="size='base'"):
    checkpoints.load_pretrained(path, size="base")


def test_wrong_shapes_and_missing_blocks_are_listed(tmp_path):
  sd = mapping.to_torch_state_dict(random_variables(PRE), PRE, "refined")
  sd["blocks.1.mlp.fc1.weight"] = np.zeros((100, 32), np.float32)
  del sd["blocks.0.attn.proj.bias"]
  sd["head.weight"] = np.zeros((10, 32), np.float32)
  with pytest.raises(ValueError) as e:
    mapping.from_torch_state_dict(sd)
  msg = str(e.value)
  assert "missing (1): blocks.0.attn.proj.bias" in msg
  assert "unexpected (1): head.weight" in msg
  assert "blocks.1.mlp.fc1.weight: file (100, 32) vs expected (128, 32)" in msg


def test_heads_need_an_override_for_unknown_widths():
  kw = dict(PRE, width=40, num_heads=5)
  sd = mapping.to_torch_state_dict(random_variables(kw), kw, "refined")
  with pytest.raises(ValueError, match="cannot tell the number of attention heads.*--num-heads N.*model.num_heads=N"):
    mapping.from_torch_state_dict(sd)
  _, vit_kwargs, info = mapping.from_torch_state_dict(sd, num_heads=5)
  assert vit_kwargs == kw and info["size"].startswith("generic(width=40")


def test_fairseq_layout_and_bf16_weights(tmp_path):
  variables = random_variables(POST, seed=2)
  refined = mapping.to_torch_state_dict(variables, POST, "refined")
  d, g = POST["width"], POST["pos_grid"]
  fs = "modality_encoders.IMAGE."
  renames = {"patch_embed.proj.weight": fs + "local_encoder.proj.weight",
             "patch_embed.proj.bias": fs + "local_encoder.proj.bias",
             "cls_tokens.tokens": fs + "extra_tokens",
             "embed_norm.weight": fs + "context_encoder.norm.weight",
             "embed_norm.bias": fs + "context_encoder.norm.bias"}
  sd = {renames.get(k, k): torch.from_numpy(v).bfloat16() for k, v in refined.items()
        if k != "pos_embed.embed"}
  sd[fs + "fixed_positional_encoder.positions"] = torch.from_numpy(
      refined["pos_embed.embed"].reshape(1, g * g, d)).bfloat16()  # flat, no CLS row
  sd[fs + "decoder.proj.weight"] = torch.zeros(3, d)
  sd["_ema"] = {"blocks.0.norm1.weight": torch.zeros(d)}
  torch.save({"model": sd, "cfg": {"model": {"num_heads": 3, "embed_dim": d}}}, tmp_path / "d.pt")
  pre = checkpoints.load_pretrained(tmp_path / "d.pt")
  assert pre.info["format"] == "data2vec2" and pre.info["family"] == "postnorm"
  assert pre.info["num_heads_from"] == "file" and pre.vit_kwargs == POST
  assert sorted(pre.info["dropped_keys"]) == ["_ema", fs + "decoder.proj.weight"]
  bf16 = jax.tree.map(lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)),
                      variables)
  assert_trees_bitwise_equal(pre.variables, bf16)  # bf16 -> fp32 widening is exact


# ----------------------------------------------------------------------------- the CLI
def test_convert_weights_cli(tmp_path, capsys):
  from mim_refiner_jax.tools import convert_weights  # pylint: disable=g-import-not-at-top
  src = _mae_file(tmp_path)
  assert convert_weights.main(["--input", str(src), "--output", str(tmp_path / "flax"),
                               "--to", "flax"]) == 0
  printed = capsys.readouterr().out
  assert "format:      mae" in printed and "family:      prenorm" in printed
  assert "size:        mu" in printed and "patch size:  4" in printed
  assert convert_weights.main(["--input", str(tmp_path / "flax"), "--output",
                               str(tmp_path / "back.th"), "--to", "refined"]) == 0
  assert_trees_bitwise_equal(checkpoints.load_pretrained(tmp_path / "back.th").variables,
                             checkpoints.load_pretrained(src).variables)
  assert convert_weights.main(["--input", str(src), "--output", str(tmp_path / "x.th"),
                               "--to", "refined", "--family", "d2v2"]) == 2
  assert "missing (2): embed_norm.bias, embed_norm.weight" in capsys.readouterr().err
