r"""One command: a pre-trained file -> a refined, evaluated, exported encoder and a report.

  mim-refiner-refine --pretrained weights/mae_large16.pth --train tfds:imagenet2012:train \
      --workdir workdirs/mae_l16
  python -m mim_refiner_jax.refine --pretrained mae.safetensors --workdir workdirs/mine \
      --train image_folder:/data/train --eval-test image_folder:/data/val \
      --config configs/demo.py --config.batch_size=64 --stage3.num_epochs=10

Phases, each resumable (DIR/refine.json records what each finished with; the same command after a
stop, a crash or Ctrl-C reuses every finished phase whose inputs are unchanged and says so):
  setup     read the file (sha256; family, size and patch size from its weights) and choose the
            config: --config FILE[:args] (stage=2 / stage=3 added), else the paper config of that
            family and size (configs/), else one derived from the family's ViT-L config (said so)
  plan      compile stage 3's train step for the devices present (or --device KIND --devices N)
            and apply the memory planner's first change that fits (memory.candidate_changes:
            FSDP, remat, smaller batches), or stop with the planner's table
  stage2    ID heads on the frozen encoder           DIR/stage2
  stage3    encoder and heads from stage 2            DIR/stage3
  evaluate  the evaluation suite (--eval-preset) on the input and the refined EMA encoder:
            DIR/evaluation (results.json, per_block.png)
  export    DIR/export: Flax, the official refined .th, safetensors and, where the layout allows
            (EXPORTS), timm; each with its sha256
  report    DIR/report.html (self-contained), DIR/report.md and the PNGs beside them

--config.x=V changes a field of both stages, --stage2.x=V / --stage3.x=V one stage's.
"""

import argparse
import ast
import hashlib
import json
import os
import shutil
import sys
import time

from mim_refiner_jax import errors
from mim_refiner_jax import paths
from mim_refiner_jax import progress as progress_lib

# The repository checkout (configs/ lives there, not in the installed package).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
# (family, size, patch) -> the paper's config file (refiner_facts.md section 8), and the configs
# of the other backbones configs/ has (DINOv2 with 4 registers, I-JEPA).
PAPER_CONFIGS = {("mae", "large", 16): "mae_l16", ("mae", "huge", 14): "mae_h14",
                 ("mae", "twob", 14): "mae_2b14", ("d2v2", "large", 16): "d2v2_l16",
                 ("d2v2", "huge", 14): "d2v2_h14", ("dinov2_reg4", "large", 14): "dinov2_l14_reg4",
                 ("ijepa", "huge", 14): "ijepa_h14"}
# Exports of the refined EMA encoder: (name, file under DIR/export, save_torch layout or "flax").
# A layout that cannot hold the encoder (convert/mapping.py layout_refusal: registers in the
# official .th, a post-norm ViT in timm's) is listed in the report as not possible, with the reason.
EXPORTS = (("Flax", "encoder_flax", "flax"),
           ("official refined .th", "encoder_refined.th", "refined"),
           ("safetensors", "encoder.safetensors", "safetensors"),
           ("timm", "encoder_timm.pth", "timm"))
# Nominal seconds per phase (the demo on 2 idle cores), per step for the stages.
NOMINAL = dict(setup=5, plan=10, evaluate=15, export=3, report=5)
NOMINAL_PER_STEP = {2: 0.35, 3: 1.0}
RECORD = "refine.json"
VERSION = 1  # bump when a phase's output changes meaning: finished phases are then redone


class Stopped(Exception):
  """A stage stopped early with a checkpoint (Ctrl-C, SIGTERM): the command ends, a rerun resumes."""


# ----------------------------------------------------------------------------- files
def sha256(path: str) -> str:
  """Of a file, or of a directory's relative names and contents (local or gs://)."""
  digest = hashlib.sha256()
  path = paths.resolve(path)
  if paths.as_path(path).is_dir():
    for full in sorted(os.path.join(base, name) for base, _, files in paths.walk(path)
                       for name in files):
      digest.update(os.path.relpath(full, path).encode() + b"\0")
      digest.update(sha256(full).encode())
    return digest.hexdigest()
  with paths.as_path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(path + ".tmp", path)  # an interrupted run never leaves half a file


def _key(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- config
def detect(path: str) -> dict:
  """Family, size, patch size and architecture of a pre-trained file (convert/checkpoints.py)."""
  from mim_refiner_jax import train  # pylint: disable=g-import-not-at-top
  pretrained = train.load_pretrained(path, setting="--pretrained")
  info = pretrained.info
  return dict(path=paths.resolve(path), sha256=sha256(path), format=info["format"],
              family=family_of(info["format"], pretrained.vit_kwargs),
              size=info["size"], patch_size=pretrained.vit_kwargs["patch_size"],
              vit_kwargs=pretrained.vit_kwargs, num_params=pretrained.num_params)


def family_of(file_format: str, vit_kwargs: dict) -> str:
  """mae / d2v2 (the paper's pre- and post-norm ViTs), dinov2_reg4, ijepa, or timm (a pre-norm ViT
  with timm options: registers, no CLS token, LayerScale, ...)."""
  from mim_refiner_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  options = mapping.options(vit_kwargs)
  if file_format == "dinov2" and options["reg_tokens"] == 4:
    return "dinov2_reg4"
  if file_format == "ijepa":
    return "ijepa"
  if not vit_kwargs["prenorm"]:
    return "d2v2"
  plain = all(options[k] == mapping.OPTION_DEFAULTS[k] for k in mapping.OPTION_DEFAULTS)
  return "mae" if plain else "timm"


def _load(spec: str, stage: int):
  from mim_refiner_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if "stage=" in arg:
    raise errors.UserError(f"--config {spec}: leave the stage out, the command runs both")
  return config_lib.load_config_file(f"{path}:{','.join(a for a in (arg, f'stage={stage}') if a)}")


def _scaled_heads(names: str, depth: int, paper_depth: int) -> str:
  """Head blocks counted from the end, scaled from `paper_depth` to `depth` blocks."""
  from mim_refiner_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  out = []
  for name in names.split(","):
    spec = config_lib.head_spec(name)
    if spec.block == "main":
      new = name
    else:
      offset = max(1, round((paper_depth - 1 - spec.block) * depth / paper_depth))
      new = name[:len(name) - len(str(spec.block))] + str(max(depth - 1 - offset, 0))
    if new not in out:
      out.append(new)
  return ",".join(out)


def choose_configs(config_spec: str, detected: dict) -> tuple[dict, dict | None, str]:
  """`({2: config, 3: config}, {2, 3: the paper config compared with} or None, what was chosen)`."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  family, size, patch = detected["family"], detected["size"], detected["patch_size"]
  paper_name = PAPER_CONFIGS.get((family, size, patch))
  if not paper_name and family not in ("mae", "d2v2"):  # registers, no CLS, LayerScale, ...
    if config_spec:
      return {s: _load(config_spec, s) for s in (2, 3)}, None, f"{config_spec} (given)"
    return timm_configs(detected)
  nearest = paper_name or PAPER_CONFIGS[(family, "large", 16)]
  paper_file = os.path.join(CONFIG_DIR, f"{nearest}.py")
  paper = ({s: _load(paper_file, s) for s in (2, 3)} if os.path.exists(paper_file) else None)
  if config_spec:
    configs = {s: _load(config_spec, s) for s in (2, 3)}
    return configs, paper, f"{config_spec} (given)"
  if paper is None:
    raise errors.UserError(f"no --config given and the paper configs ({CONFIG_DIR}) are not "
                           "here (an installed package): pass --config FILE")
  if paper_name:
    return paper, paper, f"configs/{paper_name}.py, the paper's {family} {size}/{patch}"
  kw = detected["vit_kwargs"]
  configs = {}
  for stage, base in paper.items():
    paper_depth = memory.vit_lib.SIZES[base.model.size]["depth"]
    configs[stage] = memory.with_changes(
        base, **{"model.size": size if size in memory.vit_lib.SIZES else "",
                 "model.num_heads": kw["num_heads"], "model.patch_size": kw["patch_size"],
                 "model.image_size": kw["pos_grid"] * kw["patch_size"],
                 "data.global_size": kw["pos_grid"] * kw["patch_size"],
                 "heads.names": _scaled_heads(base.heads.names, kw["depth"], paper_depth)})
  return configs, paper, (
      f"derived from configs/{nearest}.py (no paper config for {family} {size}/{patch}): the "
      f"file's size and patch, {kw['pos_grid'] * kw['patch_size']} px, head blocks scaled from "
      f"{paper_depth} to {kw['depth']} blocks ({configs[3].heads.names})")


def timm_configs(detected: dict) -> tuple[dict, None, str]:
  """configs/timm_vit.py at the file's size and patch: heads on the mean patch token of encoders
  without a CLS token, else on the CLS token; the file's options (registers, LayerScale, ...) come
  with its weights."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  kw, size = detected["vit_kwargs"], detected["size"]
  if size not in memory.vit_lib.SIZES:
    raise errors.UserError(f"{detected['path']}: a {detected['family']} ViT of no known size "
                           f"({kw['depth']} blocks of width {kw['width']}): pass --config FILE")
  pooling = "cls" if kw.get("class_token", True) else "mean_patch"
  spec = (f"{os.path.join(CONFIG_DIR, 'timm_vit.py')}:size={size},patch={kw['patch_size']},"
          f"pooling={pooling}")
  if not os.path.exists(spec.partition(":")[0]):
    raise errors.UserError(f"no --config given and configs/timm_vit.py ({CONFIG_DIR}) is not "
                           "here (an installed package): pass --config FILE")
  return ({s: _load(spec, s) for s in (2, 3)}, None,
          f"configs/timm_vit.py:size={size},patch={kw['patch_size']},pooling={pooling} (a "
          f"{detected['format']} ViT with timm options; no paper config to compare with)")


def parse_overrides(extra: list[str]) -> dict:
  """`--config.x=V`, `--stage2.x=V`, `--stage3.x=V` -> {2: {x: V}, 3: {x: V}}."""
  out = {2: {}, 3: {}}
  for item in extra:
    name, sep, value = item.partition("=")
    prefix, _, field = name.lstrip("-").partition(".")
    if not sep or not field or prefix not in ("config", "stage2", "stage3"):
      raise errors.UserError(f"unexpected argument {item!r}: changes are --config.FIELD=VALUE "
                             "(both stages), --stage2.FIELD=VALUE or --stage3.FIELD=VALUE")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    for stage in (2, 3):
      if prefix in ("config", f"stage{stage}"):
        out[stage][field] = value
  return out


def apply(config, changes: dict, where: str, new_fields: tuple = ()):
  """memory.with_changes, but a field the config lacks is an error (a typo is not a new field)."""
  import difflib  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  fields = flat(config.to_dict())
  for name in changes:
    if name not in fields and name not in new_fields:
      close = difflib.get_close_matches(name, fields, n=1)
      raise errors.UserError(f"{where}: the config has no field {name}"
                             + (f"; did you mean {close[0]}?" if close else ""))
  return memory.with_changes(config, **changes)


def flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(config, paper) -> list:
  """[(field, paper value, value used)] of the fields that differ."""
  if paper is None:
    return []
  a, b = flat(paper.to_dict()), flat(config.to_dict())
  return [(k, a.get(k, "-"), b.get(k, "-")) for k in sorted(set(a) | set(b))
          if a.get(k, "-") != b.get(k, "-")]


def eval_options(preset: str, train: str, test: str, knn):
  """The evaluation suite's options of --eval-preset (evaluation/presets.py) at the k-NN monitor's
  view. "default": the k-NN and per-block k-NN protocols at the monitor's k and tau (seconds on
  the demo); "paper": every protocol at the paper's settings."""
  from mim_refiner_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  common = dict(train=train, test=test, per_block_k=knn.k, image_size=knn.crop_size,
                resize=knn.resize_size, batch_size=knn.batch_size, cache_dir="", progress=False)
  if preset == "default":
    common.update(protocols=("knn", "per_block"), k=(knn.k,), tau=knn.tau)
  try:
    return suite.Options.from_preset(preset, **common)
  except ValueError as e:
    raise errors.UserError(f"--eval-preset {preset!r}: {e}") from None


# ----------------------------------------------------------------------------- devices, memory
def device_target(kind: str, count: int, memory_gib: float):
  """`(devices, description, GiB per device)` of the devices present or a named kind."""
  import jax  # pylint: disable=g-import-not-at-top
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  if kind:
    if kind not in memory.DEVICE_MEMORY_GIB and not memory_gib:
      raise errors.UserError(f"--device {kind}: unknown kind; choose from "
                             f"{sorted(memory.DEVICE_MEMORY_GIB)} or give --device-memory-gib")
    try:
      devices, how = memory.target_devices(kind, count or jax.device_count())
    except ValueError as e:
      raise errors.UserError(f"--device {kind} --devices {count}: {e}") from None
    return devices, f"{len(devices)} x {kind} ({how})", memory_gib or memory.DEVICE_MEMORY_GIB[kind]
  devices = jax.devices()[:count] if count else jax.devices()
  stats = devices[0].memory_stats() or {}
  if memory_gib:
    gib = memory_gib
  elif "bytes_limit" in stats:
    gib = stats["bytes_limit"] / memory.GIB
  else:  # CPU devices share the host's memory
    import psutil  # pylint: disable=g-import-not-at-top
    gib = psutil.virtual_memory().total / memory.GIB / len(devices)
  return devices, f"{len(devices)} x {devices[0].device_kind} (present)", gib


def plan_memory(configs: dict, vit_kwargs: dict, devices, gib: float, log=print) -> dict:
  """Plans stage 3 (the binding stage); returns {"changes", "table", "fits"} or raises with the
  planner's table printed when nothing fits."""
  from mim_refiner_jax import memory  # pylint: disable=g-import-not-at-top
  try:
    first, fix = memory.find_fit(configs[3], gib, devices, vit_kwargs=vit_kwargs, log=log)
  except ValueError as e:
    raise errors.UserError(f"memory plan: {e}") from None
  table = memory.report(first, "as configured", round(gib, 2))
  if fix is None:
    return dict(changes={}, table=table, said="fits as configured")
  if not fix:
    log(table)
    raise errors.UserError(
        f"stage 3 needs {memory.gib(first.total)} GiB per device and no change the planner knows "
        f"(FSDP, remat, smaller batches) fits {gib:.2f} GiB: use more or larger devices, a "
        "smaller model, or --config.batch_size")
  changes, fixed = fix
  table += "\n\nwith " + memory.describe(changes) + ":\n" + memory.report(fixed, "changed",
                                                                         round(gib, 2))
  return dict(changes=changes, table=table,
              said=f"does not fit as configured ({memory.gib(first.total)} GiB per device); "
                   f"applied {memory.describe(changes)} ({memory.gib(fixed.total)} GiB)")


# ----------------------------------------------------------------------------- phases
class Run:
  """The phases of one refinement in DIR, each recorded in DIR/refine.json when it finishes."""

  def __init__(self, args, progress: progress_lib.Progress, prefix: str = ""):
    self.args, self.progress, self.prefix = args, progress, prefix
    if paths.is_remote(args.workdir):
      raise errors.UserError(
          f"--workdir {args.workdir}: the refine command keeps its workdir (records, report, "
          "exports) on a local or mounted filesystem; give a local --workdir (gs:// --pretrained "
          "and data are fine), or run the stages with python -m mim_refiner_jax.train, whose "
          "workdirs may be gs://")
    self.workdir = os.path.abspath(args.workdir)
    self.record_path = os.path.join(self.workdir, RECORD)
    record = read_json(self.record_path) or {}
    self.record = record if record.get("version") == VERSION else {"version": VERSION,
                                                                    "phases": {}}
    self.phases = self.record["phases"]
    self.reused_now = set()  # phases this run reused

  def name(self, phase: str) -> str:
    return f"{self.prefix}{phase}"

  def say(self, message: str):
    self.progress.say(f"{self.prefix}{message}")

  def reused(self, phase: str, key: str):
    """The record of a finished phase with these inputs, or None (then the phase runs)."""
    rec = self.phases.get(phase)
    if rec and rec.get("key") == key and "seconds" in rec:
      self.progress.skip(self.name(phase))
      self.reused_now.add(phase)
      self.say(f"reusing {phase} (done in {rec['seconds']:.0f}s on {rec['finished']}; its "
               "inputs are unchanged)")
      return rec
    return None

  def save(self):
    write_json(self.record_path, self.record)

  def finish(self, phase: str, key: str, seconds: float, warnings_from: int, **result):
    self.phases[phase] = dict(key=key, seconds=seconds,
                              finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                              warnings=self.progress.warnings[warnings_from:], **result)
    self.save()
    return self.phases[phase]

  def timed(self, phase: str, what: str, key: str, fn):
    """Runs fn() as `phase` unless a finished record with `key` exists; returns the record."""
    rec = self.reused(phase, key)
    if rec:
      return rec
    first_warning = len(self.progress.warnings)
    with self.progress.phase(self.name(phase), f"{self.prefix}{what}"):
      start = time.time()
      result = fn()
      seconds = time.time() - start
    return self.finish(phase, key, seconds, first_warning, **(result or {}))

  # --------------------------------------------------------------------------- setup
  def setup(self) -> dict:
    """Reads the file and the data, chooses the configs; writes nothing before all succeeded."""
    from mim_refiner_jax.data import sources  # pylint: disable=g-import-not-at-top
    args = self.args
    with self.progress.phase(self.name("setup"), f"{self.prefix}reading {args.pretrained}"):
      pretrained_path = paths.resolve(args.pretrained)
      if not paths.as_path(pretrained_path).exists():
        raise errors.UserError(f"--pretrained {args.pretrained} does not exist")
      file_sha = sha256(args.pretrained)
      rec = self.phases.get("setup")
      same = rec and rec.get("key") == _key([file_sha, pretrained_path])
      detected = rec["detected"] if same else detect(args.pretrained)
      source = sources.make_source(args.train, where="--train")
      if len(source) == 0:
        raise errors.UserError(f"--train {args.train} holds no images: point it at a dataset")
      bank, test = sources.default_eval_sources(args.train)
      eval_train = args.eval_train or sources.describe_source(bank)
      if not args.eval_test and test is None:
        raise errors.UserError(f"no test set can be derived from --train {args.train}: give "
                               "--eval-test SPEC (and --eval-train SPEC)")
      eval_test = args.eval_test or sources.describe_source(test)
      for flag, spec in (("--eval-train", eval_train), ("--eval-test", eval_test)):
        if len(sources.make_source(spec, where=flag)) == 0:
          raise errors.UserError(f"{flag} {spec} holds no images")
      configs, paper, chosen = choose_configs(args.config, detected)
      overrides = parse_overrides(args.overrides)
      for stage in (2, 3):
        configs[stage] = apply(configs[stage], {
            "data.train": args.train, "evals.knn.train": eval_train,
            "evals.knn.test": eval_test, "evals.knn.ema_too": True,
            "init.pretrained": pretrained_path if stage == 2 else "",
            "init.stage2_workdir": os.path.join(self.workdir, "stage2") if stage == 3 else ""},
            "--train", new_fields=("evals.knn.ema_too",))
        configs[stage] = apply(configs[stage], overrides[stage],
                               f"--config/--stage{stage} changes")
      num_train = len(source)
    self.say(f"{detected['path']}: {detected['format']}, {detected['family']} "
             f"{detected['size']}, patch {detected['patch_size']}, sha256 "
             f"{detected['sha256'][:12]}...; config: {chosen}")
    self.say(f"training on {args.train} ({num_train:,} images); evaluation: train "
             f"{eval_train}, test {eval_test}")
    os.makedirs(self.workdir, exist_ok=True)
    key = _key([file_sha, pretrained_path])
    self.phases["setup"] = dict(key=key, detected=detected, seconds=0.0, finished=time.strftime(
        "%Y-%m-%d %H:%M:%S"), chosen=chosen, warnings=[])
    self.save()
    return dict(detected=detected, configs=configs, paper=paper, chosen=chosen,
                eval_train=eval_train, eval_test=eval_test, num_train=num_train)

  # --------------------------------------------------------------------------- plan
  def plan(self, setup: dict) -> dict:
    args = self.args
    devices, described, gib = device_target(args.device, args.devices, args.device_memory_gib)
    key = _key([setup["configs"][3].to_dict(), described, round(gib, 3),
                setup["detected"]["vit_kwargs"]])
    rec = self.timed("plan", f"planning memory on {described}, {gib:.1f} GiB each", key,
                     lambda: plan_memory(setup["configs"], setup["detected"]["vit_kwargs"],
                                         devices, gib, log=self.say))
    self.say(f"memory plan: {rec['said']}")
    rec = dict(rec, devices=described, gib=gib)
    self.phases["plan"].update(devices=described, gib=gib)
    self.save()
    return rec

  # --------------------------------------------------------------------------- stages
  def stage(self, stage: int, config, after: str = "") -> dict:
    """Trains one stage in DIR/stageN unless it finished with this config (resumes a stopped one)."""
    from mim_refiner_jax import train  # pylint: disable=g-import-not-at-top
    phase, out = f"stage{stage}", os.path.join(self.workdir, f"stage{stage}")
    key = _key([config.to_dict(), after])
    rec = self.phases.get(phase)
    if rec and rec.get("key") == key and "seconds" in rec and os.path.exists(
        os.path.join(out, "export", "encoder_flax")):
      return self.reused(phase, key)
    resume = bool(rec) and rec.get("key") == key and "seconds" not in rec
    if not resume:
      shutil.rmtree(out, ignore_errors=True)  # another config or of unknown origin: start over
      self.phases[phase] = dict(key=key, started=time.strftime("%Y-%m-%d %H:%M:%S"))
      self.save()
    first_warning = len(self.progress.warnings)
    with self.progress.phase(self.name(phase), f"{self.prefix}{'resuming ' if resume else ''}"
                             f"stage {stage} into {out}"):
      start = time.time()
      train.train(config, out, stop_after=self.args.stop_after_steps, data_train_given=True)
      seconds = time.time() - start + self.phases[phase].get("partial_seconds", 0.0)
    if not os.path.exists(os.path.join(out, "export", "encoder_flax")):
      self.phases[phase]["partial_seconds"] = seconds
      self.save()
      raise Stopped(f"{self.prefix}stage {stage} stopped at a checkpoint in {out}; rerun the "
                    "same command to resume it")
    return self.finish(phase, key, seconds, first_warning)

  # --------------------------------------------------------------------------- evaluate
  def evaluate(self, setup: dict, stage3: dict) -> dict:
    from mim_refiner_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
    import dataclasses  # pylint: disable=g-import-not-at-top
    opts = eval_options(self.args.eval_preset, setup["eval_train"], setup["eval_test"],
                        setup["configs"][3].evals.knn)
    out = os.path.join(self.workdir, "evaluation")
    key = _key([dataclasses.asdict(opts), setup["detected"]["sha256"], stage3["finished"]])

    def evaluate():
      shutil.rmtree(out, ignore_errors=True)  # a stopped evaluation's files are not trusted
      results = suite.run([setup["detected"]["path"], os.path.join(self.workdir, "stage3")],
                          opts, names=["before", "refined"], out_dir=out, log=self.say)
      return dict(scalars={name: suite.scalars(r) for name, r in results.items()},
                  num_test=results["refined"]["num_test"], protocols=list(opts.protocols),
                  test=opts.test, train=opts.train)
    return self.timed("evaluate", f"evaluating the input and the refined encoder "
                      f"({', '.join(opts.protocols)})", key, evaluate)

  # --------------------------------------------------------------------------- export
  def export(self, stage3: dict) -> dict:
    from mim_refiner_jax.convert import checkpoints  # pylint: disable=g-import-not-at-top
    from mim_refiner_jax.convert import mapping  # pylint: disable=g-import-not-at-top
    out = os.path.join(self.workdir, "export")
    key = _key(["export", stage3["finished"], [e[:3] for e in EXPORTS]])

    def export():
      source = os.path.join(self.workdir, "stage3", "export", "encoder_flax")
      encoder = checkpoints.load_flax(source)
      partial = out + ".partial"  # renamed into place when complete
      shutil.rmtree(partial, ignore_errors=True)
      os.makedirs(partial)
      files = []
      for name, filename, layout in EXPORTS:
        path = os.path.join(partial, filename)
        refusal = (None if layout in ("flax", "safetensors")
                   else mapping.layout_refusal(layout, encoder.vit_kwargs))
        if refusal:
          files.append(dict(name=name, path=None, note=f"not possible: {refusal}"))
          continue
        if layout == "flax":
          shutil.copytree(source, path)
        else:
          checkpoints.save_torch(path, encoder.variables, encoder.vit_kwargs, layout=layout)
        files.append(dict(name=name, path=os.path.join(out, filename), sha256=sha256(path)))
      shutil.rmtree(out, ignore_errors=True)
      os.replace(partial, out)
      return dict(files=files)
    return self.timed("export", f"exporting the refined EMA encoder to {out}", key, export)

  # --------------------------------------------------------------------------- report
  def report(self, summary: dict) -> dict:
    from mim_refiner_jax import report as report_lib  # pylint: disable=g-import-not-at-top
    key = _key([summary["keys"], report_lib.VERSION])
    return self.timed("report", "writing the report", key,
                      lambda: dict(files=report_lib.write(self.workdir, summary)))


def run(args, progress: progress_lib.Progress | None = None, prefix: str = "") -> dict:
  """All phases; returns the summary the report shows (plus the path of each part)."""
  own = progress is None
  if own:
    progress = progress_lib.Progress(
        [(name, NOMINAL.get(name, 60)) for name in
         ("setup", "plan", "stage2", "stage3", "evaluate", "export", "report")])
    progress.__enter__()
  try:
    return _run(Run(args, progress, prefix))
  finally:
    if own:
      progress.__exit__(None, None, None)


def _run(r: Run) -> dict:
  from mim_refiner_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  setup = r.setup()
  plan = r.plan(setup)
  configs = {s: apply(c, plan["changes"], "memory plan") for s, c in setup["configs"].items()}
  steps = {s: configs[s].num_epochs * config_lib.steps_per_epoch(
      configs[s].data.num_train_examples or setup["num_train"], configs[s].batch_size)
           for s in (2, 3)}
  r.progress.extend([(r.name(f"stage{s}"), NOMINAL_PER_STEP[s] * steps[s]) for s in (2, 3)])
  stage2 = r.stage(2, configs[2])
  stage3 = r.stage(3, configs[3], after=stage2["finished"])
  evaluation = r.evaluate(setup, stage3)
  exports = r.export(stage3)
  phases = {name: dict(seconds=rec.get("seconds", 0.0), finished=rec.get("finished"),
                      reused=name in r.reused_now) for name, rec in r.phases.items()}
  summary = dict(
      workdir=r.workdir, command=r.args.command, detected=setup["detected"],
      chosen=setup["chosen"], train=r.args.train, eval_train=setup["eval_train"],
      eval_test=setup["eval_test"], num_train=setup["num_train"],
      diff={s: config_diff(configs[s], setup["paper"] and setup["paper"][s]) for s in (2, 3)},
      devices=plan["devices"], gib=plan["gib"], plan=dict(said=plan["said"], table=plan["table"],
                                                          changes=plan["changes"]),
      phases=phases, evaluation=evaluation, exports=exports["files"],
      warnings=[w for rec in r.phases.values() for w in rec.get("warnings", [])],
      keys=[r.phases[p]["key"] for p in ("setup", "plan", "stage2", "stage3", "evaluate",
                                         "export")])
  rec = r.report(summary)
  summary["report"] = rec["files"]
  summary["phases"]["report"] = dict(seconds=rec["seconds"], finished=rec["finished"],
                                     reused="report" in r.reused_now)
  r.say(f"report: {rec['files']['html']} (and {os.path.basename(rec['files']['md'])}); "
        f"exports in {os.path.join(r.workdir, 'export')}")
  return summary


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--pretrained", required=True,
                      help="the pre-trained encoder: any file or directory the converter reads")
  parser.add_argument("--train", required=True, help="training data, a source spec "
                      "(mim_refiner_jax/data/sources.py), e.g. image_folder:/data/train")
  parser.add_argument("--eval-train", default="", help="k-NN bank / probe train set (default: "
                      "derived from --train, as the trainer's 'auto')")
  parser.add_argument("--eval-test", default="", help="evaluation test set (default: derived "
                      "from --train: MNIST val, an image folder's sibling val/, ...)")
  parser.add_argument("--workdir", required=True, help="everything goes here")
  parser.add_argument("--config", default="", help="FILE[:args] with get_config(arg); stage=2 "
                      "and stage=3 are added (default: the paper config of the file's family "
                      "and size)")
  parser.add_argument("--device", default="", help="plan memory for this device kind "
                      "(memory.DEVICE_MEMORY_GIB) instead of the devices present")
  parser.add_argument("--devices", type=int, default=0, help="device count (default: all)")
  parser.add_argument("--device-memory-gib", type=float, default=0.0,
                      help="GiB per device (default: what the devices or the kind report)")
  parser.add_argument("--eval-preset", default="default", choices=("default", "paper"),
                      help="evaluation suite preset (evaluation/presets.py): default = k-NN and "
                           "per-block k-NN at the k-NN monitor's k and tau; paper = every "
                           "protocol at the paper's settings")
  parser.add_argument("--stop-after-steps", type=int, default=None,
                      help="stop each stage (with a checkpoint) after this many steps of this "
                           "run, as if preempted; for tests and job-time limits")
  parser.add_argument("--verbose", action="store_true", help="tracebacks of user errors")
  args, extra = parser.parse_known_args(argv)
  args.overrides = extra
  args.command = "mim-refiner-refine " + " ".join(sys.argv[1:] if argv is None else argv)
  if args.devices < 0 or args.device_memory_gib < 0:
    parser.error("--devices and --device-memory-gib must be positive")
  return args


def main(argv=None):
  args = parse_args(argv)
  try:
    return errors.run_main(lambda: run(args), verbose=args.verbose)
  except Stopped as e:
    print(f"stopped: {e}", flush=True)
    return 0  # as the trainer after Ctrl-C: nothing lost, nothing failed


def script():
  """The console script mim-refiner-refine: exit status 0 when the command returns a summary."""
  result = main()
  sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
  script()
