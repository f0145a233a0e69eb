"""M-JEPA pre-training loop (``fm-engine train mjepa``), docs/MODELS.md 1.5.

One optimiser step: ``MJEPA.update_ema()`` (before the forward), then ``grad_accum`` micro-batches of
(GPU augmentation -> stem inputs -> forward under autocast -> backward), gradient-norm clipping,
torch's AdamW (``fused=True`` on CUDA), ``OneCycleLR``. Several processes (``torchrun``) use DDP, or FSDP2
(``fully_shard``, per transformer layer) with ``strategy="fsdp"``; the EMA update is deterministic, so the
target encoder stays identical on every rank. Autocast (bf16) covers the forward; the stem stays fp32.

Output folder ``out``:

* ``metrics.jsonl`` and ``metrics.csv``: one row per ``log_every`` steps (loss, JEPA / contrastive /
  probe losses, probe accuracy, lr, grad norm, images/s, memory, skipped examples); TensorBoard optional;
* ``checkpoints/step_XXXXXXX/``: ``model.safetensors`` (the whole objective: encoder, EMA encoder, predictor,
  probe), ``encoder.safetensors`` (the online encoder, loadable by :func:`fm_engine.checkpoint.load_checkpoint`
  and by ``fm-engine convert-avit``) and ``state.pt`` (optimizer, scheduler, step, data position, every
  rank's RNG states, config); each checkpoint is written to a temporary folder and renamed into place, then
  ``checkpoints/latest`` is replaced atomically, so a killed run loses at most the steps since its last
  checkpoint;
* ``config.yaml``: the resolved configuration.

``resume=True`` continues from ``checkpoints/latest`` bit-for-bit: same weights, optimizer and schedule,
same data order (the sampler restarts at the saved position of the saved epoch), same RNG streams (torch
CPU / CUDA and the augmentation generator, per rank).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import resource
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from fm_engine.checkpoint import follow_umask
from fm_engine.train.config import TrainConfig, dump_config

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

STATE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but no CUDA GPU is available")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast dtype, or None for fp32."""
    if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def enable_activation_checkpointing(layers: Any) -> int:
    """Recompute each of ``layers`` (transformer layers) in the backward pass (torch.utils.checkpoint,
    non-reentrant, RNG state preserved so dropout matches). The layer's ``forward`` is replaced on the
    instance, so parameter names do not change. Apply it after any ``copy.deepcopy`` of the model (the
    M-JEPA EMA copy): a deep copy would share the wrapper, which calls the original layer. Returns the
    number of wrapped layers."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for layer in layers:
        fwd = layer.forward

        @functools.wraps(fwd)
        def wrapped(*args: Any, _fwd: Any = fwd, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        layer.forward = wrapped
        n += 1
    return n


def _memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: CUDA memory allocated by torch on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Rows to metrics.jsonl and metrics.csv (columns fixed by the first row), TensorBoard optional."""

    def __init__(self, out: Path, tensorboard: bool, append: bool, keep_until: int = 0) -> None:
        if append:
            self._truncate(out, keep_until)
        self.jsonl = open(out / "metrics.jsonl", "a" if append else "w")
        self.csv_path = out / "metrics.csv"
        self.csv_file = open(self.csv_path, "a" if append else "w", newline="")
        self.fields: list[str] | None = None
        if append and self.csv_path.stat().st_size > 0:
            with open(self.csv_path) as f:
                self.fields = next(csv.reader(f), None)
        self.writer: csv.DictWriter | None = None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard: the tensorboard package is not installed") from e
            self.tb = SummaryWriter(str(out / "tensorboard"))

    @staticmethod
    def _truncate(out: Path, step: int) -> None:
        """Drop rows after ``step`` (written by a run killed after its last checkpoint)."""
        p = out / "metrics.jsonl"
        if p.is_file():
            rows = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            _atomic_write_text(p, "".join(r + "\n" for r in rows))
        p = out / "metrics.csv"
        if p.is_file():
            with open(p, newline="") as f:
                table = list(csv.reader(f))
            keep = table[:1] + [r for r in table[1:] if r and int(r[0]) <= step]
            with open(p, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    def write(self, row: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.fields is None:
            self.fields = list(row)
            self.writer = csv.DictWriter(self.csv_file, self.fields, extrasaction="ignore")
            self.writer.writeheader()
        elif self.writer is None:
            self.writer = csv.DictWriter(self.csv_file, self.fields, extrasaction="ignore")
        self.writer.writerow(row)
        self.csv_file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()


def _rng_state(device: torch.device, aug_gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict[str, torch.Tensor], device: torch.device, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    aug_gen.set_state(s["augment"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def latest_checkpoint(out: str | os.PathLike[str]) -> Path | None:
    """The folder named by ``out/checkpoints/latest``, or None."""
    p = Path(out) / "checkpoints" / "latest"
    if not p.is_file():
        return None
    folder = p.parent / p.read_text().strip()
    return folder if folder.is_dir() else None


# what a run writes into its output folder; a folder holding any of them holds a run
RUN_FILES = ("config.yaml", "metrics.csv", "metrics.jsonl", "checkpoints", "curves.png", "skipped.csv", "tensorboard")


def run_files(out: str | os.PathLike[str]) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out`` (empty: no run there)."""
    out = Path(out)
    return [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse to mix two runs in one folder: without ``resume`` or ``overwrite`` a folder that holds a run is an
    error; ``resume`` needs a checkpoint to continue from. Reads only (the move aside is :func:`move_run_aside`)."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume: --resume continues the run in --out and --overwrite moves it aside; pass one")
    found = run_files(cfg.out)
    if cfg.resume:
        latest = Path(cfg.out) / "checkpoints" / "latest"
        if not latest.is_file():
            raise ValueError(
                f"resume: {cfg.out} holds no checkpoint to resume from ({latest} does not exist); "
                "run without --resume to start a new run"
                + (" (add --overwrite to move the files already there aside)" if found else "")
            )
        if latest_checkpoint(cfg.out) is None:
            raise ValueError(f"resume: {latest} names {latest.read_text().strip()!r}, which is not a checkpoint folder")
    elif found and not cfg.overwrite:
        ckpts = sorted(p.name for p in (Path(cfg.out) / "checkpoints").glob("step_*"))
        raise ValueError(
            f"out: {cfg.out} already holds a run ({', '.join(found)}"
            + (f"; checkpoints {ckpts[0]} .. {ckpts[-1]}" if ckpts else "")
            + "); pass --resume to continue it, --overwrite to move it aside and start a new run, "
            "or another --out"
        )


def move_run_aside(out: str | os.PathLike[str]) -> Path | None:
    """Rename ``out`` (when it holds a run) to ``OUT.replaced-YYYYmmdd-HHMMSS[-N]`` next to it and recreate it
    empty; returns the new name of the old run (None when there was nothing to move). Never deletes."""
    out = Path(out)
    if not run_files(out):
        return None
    if out.resolve() == Path.cwd().resolve():
        raise ValueError(f"overwrite: cannot move the current directory {out} aside; pass another --out")
    base = out.parent / f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = base, 1
    while aside.exists():
        aside, n = Path(f"{base}-{n}"), n + 1
    os.rename(out, aside)
    out.mkdir(parents=True, exist_ok=True)
    log.warning("overwrite: the run that was in %s is now in %s", out, aside)
    return aside


def _checkpoint_steps(ckpt_dir: Path, run_id: str) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of run ``run_id`` under ``ckpt_dir``, by step."""
    found = []
    for p in ckpt_dir.glob("step_*"):
        tag = p / "run_id"
        if p.is_dir() and tag.is_file() and tag.read_text().strip() == run_id:
            with contextlib.suppress(ValueError):
                found.append((int(p.name[len("step_") :]), p))
    return sorted(found)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    follow_umask(tmp)
    os.replace(tmp, path)


def check_size(cfg: TrainConfig) -> tuple[int, int]:
    """The model input size (H, W) of ``cfg`` (``size``, else the model's registered size), checked against
    the size rule before any data is read or written: each side a multiple of the patch, and the grid the
    masks live on (the ViT's token grid, the AViT's pooled target grid) divisible by both coarsening factors.
    ValueError naming ``--size`` (or the model arguments) otherwise. Builds the encoder on the meta device."""
    import math

    from fm_engine.data.transforms import parse_size
    from fm_engine.models.registry import create_model, get_spec

    spec = get_spec(cfg.model)
    size = parse_size(cfg.size if cfg.size else spec.input_size)
    try:
        with torch.device("meta"):
            enc: Any = create_model(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model_overrides (--override): {cfg.model} rejects {cfg.model_overrides}: {e}") from e
    patch = int(enc.config["patch"])
    coarsen = math.lcm(cfg.context_coarsen, cfg.target_coarsen)
    grid = tuple(int(g) for g in enc.mask_grid(size))
    tokens = tuple(s // patch for s in size)
    if any(s % patch for s in size) or any(g % coarsen for g in grid):
        step = patch * coarsen if grid == tokens else patch
        fix = "x".join(str(-(-s // step) * step) for s in size)
        rule = (
            f"a multiple of patch x coarsening = {patch} x {coarsen} = {step}"
            if grid == tokens
            else f"a multiple of the patch {patch} (the pooled grid {grid} must divide by {coarsen})"
        )
        raise ValueError(
            f"size (--size): {size[0]}x{size[1]} does not fit {cfg.model} with context_coarsen "
            f"{cfg.context_coarsen} and target_coarsen {cfg.target_coarsen}: each side must be {rule}; "
            f"e.g. --size {fix}"
        )
    return size


class ReportingDataset(torch.utils.data.Dataset):
    """The training dataset as the DataLoader sees it: a bad file never raises inside a worker process (where
    the DataLoader would wrap it in a long traceback). With ``on_error="raise"`` the example becomes an
    ``error`` record (path, reason) that :meth:`Trainer._next_batch` raises as the same one-line
    :class:`~fm_engine.data.dicom.DicomReadError` whatever the number of workers; with ``"skip"`` the example
    carries ``skipped_files``: (path, reason) of every file passed over to reach it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from fm_engine.data.dicom import DicomReadError

        try:
            out = self.dataset[index]
        except DicomReadError as e:
            return {"error": (e.path, e.reason)}
        n = int(out.get("skipped", 0))
        if n:  # name the files passed over (rare: read them again for the reason)
            out["skipped_files"] = [self._reason((index + k) % len(self)) for k in range(n)]
        return out

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch in one call where the dataset reads batches (a prepared dataset: one reused shared buffer per
        batch, see :meth:`~fm_engine.data.prepared.PreparedDataset.__getitems__`), else example by example."""
        many = getattr(self.dataset, "__getitems__", None)
        return many(indices) if many is not None else [self[i] for i in indices]

    def _reason(self, index: int) -> tuple[str, str]:
        from fm_engine.data.dicom import DicomReadError

        fi = self.dataset.frames[index][0]
        path = self.dataset.files[fi]
        try:
            self.dataset._load(index)
        except DicomReadError as e:
            return (e.path, e.reason)
        except Exception as e:  # not a DicomReadError: still name it
            return (path, f"{type(e).__name__}: {e}")
        return (path, "unreadable when first read")


def collate_reported(
    batch: list[dict[str, Any]], collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
) -> dict[str, Any]:
    """``collate`` (the data source's: stored DICOM values or prepared examples) of :class:`ReportingDataset`
    examples: the first ``error`` record, if any, instead of a batch; ``skipped_files`` as one list."""
    errors = [b["error"] for b in batch if "error" in b]
    if errors:
        return {"error": errors[0]}
    files = [f for b in batch for f in b.get("skipped_files", [])]
    out: dict[str, Any] = collate([{k: v for k, v in b.items() if k != "skipped_files"} for b in batch])
    out["skipped_files"] = files
    return out


def declared_units(model: torch.nn.Module, attr: str) -> tuple[type[torch.nn.Module], ...]:
    """The module classes ``model`` declares in ``attr`` (``fsdp_units`` or ``checkpoint_units``): the layers a
    trainer shards as FSDP units or recomputes in the backward pass. The trainer reads them from the model
    (:class:`fm_engine.ssl.mjepa.MJEPA` passes on its encoder's) and names no model class itself."""
    units = getattr(model, attr, None)
    if not isinstance(units, tuple) or not all(isinstance(u, type) and issubclass(u, torch.nn.Module) for u in units):
        raise ValueError(f"{attr}: {type(model).__name__} declares no tuple of module classes, got {units!r}")
    return units


def unit_modules(roots: Iterable[torch.nn.Module], units: tuple[type[torch.nn.Module], ...]) -> list[torch.nn.Module]:
    """Every module under ``roots`` (each root included, in ``modules()`` order) that is an instance of ``units``."""
    return [m for root in roots for m in root.modules() if isinstance(m, units)]


def shard_fsdp(objective: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): each transformer layer (online, EMA and predictor; the
    classes the objective declares in ``fsdp_units``) is its own unit, the rest (stems, norms, query token,
    probe) the root unit. Works on CPU (gloo) and CUDA."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for m in unit_modules([objective], declared_units(objective, "fsdp_units")):
        fully_shard(m, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    return objective


class Trainer:
    """Builds data, model, optimizer and schedule from a :class:`TrainConfig` and runs the loop."""

    _it: Iterator[dict[str, torch.Tensor]] | None

    def __init__(self, cfg: TrainConfig) -> None:
        from fm_engine.data import AugmentConfig, DicomFrameDataset
        from fm_engine.data.train_data import open_training_data
        from fm_engine.models.registry import create_model, get_spec
        from fm_engine.ssl.mjepa import MJEPA

        self.cfg = cfg.validate()
        if not cfg.data:
            raise ValueError("data: a folder of DICOM files is required (or use --demo)")
        if int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes the folder (the others could see its files)
            check_run_folder(cfg)  # before any slow step: a clash with another run fails at once
        self.run_id = uuid.uuid4().hex  # a resume takes the saved run's id; pruning touches only this id
        self.dist = setup_distributed("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg, self.dist)
        self.amp = amp_dtype(cfg, self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("medium")
        spec = get_spec(cfg.model)
        self.size = check_size(cfg)  # a 2-D (H, W) that fits the model and the masks, or a clear error
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"

        data_kw: dict[str, Any] = dict(
            voi=cfg.voi_choice(),
            window_index=cfg.window_index,
            precision=cfg.precision,
            modalities=cfg.modalities,
            on_error=cfg.on_error,
        )
        try:
            # a DICOM folder (workers read, the device transforms) or a prepared dataset (fm-engine prepare)
            self.data = open_training_data(
                cfg.data, self.size, label_tag=cfg.label_tag, progress=cfg.progress and self.dist.main, **data_kw
            )
        except ValueError as e:
            if not cfg.label_tag or not str(e).startswith("data: no readable DICOM image"):
                raise
            try:  # readable without the label tag? then the label tag is the problem
                n = len(DicomFrameDataset(cfg.data, self.size, progress=False, **data_kw).files)
            except ValueError:
                raise e from None
            raise ValueError(
                f"label_tag (--label-tag): none of the {n} readable DICOM files under {cfg.data} has a "
                f"{cfg.label_tag} value; name a header keyword the files carry (e.g. ViewPosition) or leave "
                "--label-tag out"
            ) from None
        self.dataset = self.data.dataset
        if cfg.label_tag and len(self.dataset.classes) < 2 and self.dist.main:
            log.warning(
                "label_tag: every file has %s = %s; the linear probe needs two classes or more, so it is off",
                cfg.label_tag,
                self.dataset.classes,
            )
        self.probe_set: Any = None
        if cfg.probe_data:
            if not cfg.label_tag:
                raise ValueError("probe_data (--probe-data): a held-out probe needs --label-tag")
            self.probe_set = DicomFrameDataset(
                cfg.probe_data, self.size, label_tag=cfg.label_tag, progress=False, **data_kw
            )
            # the held-out folder's class indices -> the training set's (-1: a class training never saw)
            self.probe_label_map = torch.tensor(
                [self.dataset.classes.index(c) if c in self.dataset.classes else -1 for c in self.probe_set.classes]
            )
        # files left out: (path, reason), those found while indexing first; written to out/skipped.csv
        self.skipped_files: dict[str, str] = dict(self.dataset.skipped_files)
        if len(self.dataset) < cfg.batch_size * self.dist.world:
            raise ValueError(
                f"batch_size: {cfg.batch_size} x {self.dist.world} processes is more than the "
                f"{len(self.dataset)} examples under {cfg.data}"
            )
        channels = self.data.channels
        if channels != spec.in_channels:
            raise ValueError(
                f"data: images under {cfg.data} have {channels} channels, model {cfg.model} takes {spec.in_channels}"
            )
        self.sampler = self.data.sampler(seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world)
        self.batches_per_epoch = len(self.sampler) // cfg.batch_size
        self.augment = AugmentConfig(cfg.hflip, cfg.vflip, cfg.brightness, cfg.contrast)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        try:
            encoder = create_model(cfg.model, **cfg.model_overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model_overrides (--override): {cfg.model} rejects {cfg.model_overrides}: {e}") from e
        if cfg.init:
            from fm_engine.checkpoint import load_checkpoint

            res = load_checkpoint(cfg.init, encoder)
            if res.missing or res.mismatched:
                raise ValueError(
                    f"init: {cfg.init} does not fit {cfg.model}: missing {res.missing}, mismatched {res.mismatched}"
                )
        probe = len(self.dataset.classes) if cfg.label_tag and len(self.dataset.classes) > 1 else None
        self.objective = MJEPA(
            encoder,
            predictor_depth=cfg.predictor_depth,
            context_ratio=cfg.context_ratio,
            context_coarsen=cfg.context_coarsen,
            target_ratio=cfg.target_ratio,
            target_coarsen=cfg.target_coarsen,
            ema_momentum=cfg.ema_momentum,
            margin=cfg.margin,
            probe_classes=probe,
        ).to(self.device)
        if cfg.activation_checkpointing:  # the online encoder and the predictor (the EMA pass has no grad)
            units = declared_units(self.objective, "checkpoint_units")
            enable_activation_checkpointing(unit_modules([self.objective.encoder, self.objective.predictor], units))
        self.model: torch.nn.Module = self.objective
        self.fsdp = cfg.strategy == "fsdp" and self.dist.world > 1
        if self.dist.world > 1:
            if cfg.strategy == "fsdp":
                self.model = shard_fsdp(self.objective, self.device, self.dist.world)
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                self.model = DDP(self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        params = self.objective.param_groups(cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, fused=self.device.type == "cuda")
        pct = cfg.pct_start
        if float(pct * cfg.steps) - 1 == 0:  # OneCycleLR divides by zero when warm-up ends at step 0 (10 x 0.1)
            pct = 2.0 / cfg.steps
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=pct
        )
        self.aug_gen = torch.Generator(device=self.device)
        self.aug_gen.manual_seed(cfg.seed * 7919 + self.dist.rank)
        torch.manual_seed(cfg.seed * 1000 + self.dist.rank + 1)  # masks and dropout differ per rank
        if self.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed * 1000 + self.dist.rank + 1)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        # tune before training (fm_engine.tune.tune_step): prints what auto runs; the tables' hash goes into
        # every checkpoint
        from fm_engine.tune import tune_step

        self.tune_report = tune_step(
            self._tuning_step, mode=cfg.tune, budget_s=cfg.tune_budget, backend=cfg.backend, device=self.device,
            progress=cfg.progress,
        )  # fmt: skip
        self.tuning = self.tune_report.tables
        if cfg.resume:
            self.load_state()

    def _tuning_step(self) -> None:
        """One micro-step (forward + backward) on the first examples, for the op recorder of tune_step: no
        optimizer step, gradients cleared, and the RNG streams and data order left as they were."""
        from fm_engine.ops._dispatch import use_backend

        batch = self.data.collate([self.dataset[i] for i in range(self.cfg.batch_size)])
        aug_state = self.aug_gen.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            with use_backend(self.cfg.backend):
                # sync: gradients land where zero_grad clears them (FSDP keeps unsynced ones in a buffer of its own)
                self._micro_step(batch, sync=True)
        self.aug_gen.set_state(aug_state)
        self.optimizer.zero_grad(set_to_none=True)

    # -- data -----------------------------------------------------------------------------------------
    def _loader(self) -> Any:
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.cfg.batch_size)
        return iter(
            torch.utils.data.DataLoader(
                ReportingDataset(self.dataset),
                batch_size=self.cfg.batch_size,
                sampler=self.sampler,
                drop_last=True,
                num_workers=self.cfg.workers,
                collate_fn=functools.partial(collate_reported, collate=self.data.collate),
                pin_memory=self.device.type == "cuda",
                persistent_workers=False,
                # its own generator: creating the iterator must not draw from the global RNG (masks, dropout),
                # or a resumed run would diverge from an uninterrupted one
                generator=torch.Generator().manual_seed(self.cfg.seed * 104729 + self.epoch),
            )
        )

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= self.batches_per_epoch or self._it is None:
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._it = self._loader()
        batch = next(self._it)
        if "error" in batch:  # on_error="raise": the one-line error of the file, whatever the workers
            from fm_engine.data.dicom import DicomReadError

            raise DicomReadError(*batch["error"])
        for path, reason in batch.pop("skipped_files", []):
            self.skipped_files.setdefault(path, reason)
        self.batch_in_epoch += 1
        return batch

    def write_skipped(self) -> Path:
        """``out/skipped.csv``: one row (file, reason) per file left out so far."""
        path = self.out / "skipped.csv"
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".skipped.csv.")
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "reason"])
            w.writerows(sorted(self.skipped_files.items()))
        follow_umask(tmp)
        os.replace(tmp, path)
        return path

    @torch.no_grad()
    def heldout_probe_accuracy(self) -> float | None:
        """Accuracy of the linear probe (on the EMA encoder's mean-pooled tokens, as in training) over every
        example of ``probe_data`` whose class training knows; no augmentation. None without a probe set.
        Every rank runs it (FSDP needs all ranks in the forward)."""
        if self.probe_set is None or self.objective.probe is None:
            return None
        from fm_engine.data import collate_frames, stem_inputs

        correct = total = 0
        bs = self.cfg.batch_size
        for start in range(0, len(self.probe_set), bs):
            batch = collate_frames([self.probe_set[i] for i in range(start, min(start + bs, len(self.probe_set)))])
            labels = self.probe_label_map[batch["label"]].to(self.device)
            x, s, o = stem_inputs(batch["image"].to(self.device), batch["scale"], batch["offset"])
            with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                feats = self.objective.ema_encoder(x, s, o)
                pred = self.objective.probe(feats.mean(dim=1)).argmax(-1)
            keep = labels >= 0
            correct += int((pred[keep] == labels[keep]).sum())
            total += int(keep.sum())
        return correct / total if total else None

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_state(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank's RNG state is gathered)."""
        from fm_engine.checkpoint import save_checkpoint

        rng = _rng_state(self.device, self.aug_gen)
        if self.dist.world > 1:
            all_rng: list[Any] = [None] * self.dist.world
            dist.all_gather_object(all_rng, {k: v.cpu() for k, v in rng.items()})
        else:
            all_rng = [rng]
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            # gathered on every rank (collectives), kept on CPU; rank 0 writes them
            model_state, optim_state = get_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            model_state, optim_state = None, self.optimizer.state_dict()
        path = None
        if self.dist.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            name = f"step_{self.step:07d}"
            tmp = Path(tempfile.mkdtemp(dir=self.ckpt_dir, prefix=f".{name}."))
            follow_umask(tmp)
            (tmp / "run_id").write_text(self.run_id + "\n")
            if model_state is None:
                save_checkpoint(
                    tmp / "model.safetensors",
                    self.objective,
                    config={},
                    extra={"step": self.step, "model": self.cfg.model, "tuning_sha256": self.tuning["sha256"]},
                )
                save_checkpoint(
                    tmp / "encoder.safetensors", self.objective.encoder, name=self.cfg.model, extra={"step": self.step}
                )
            else:
                from safetensors.torch import save_file

                # full_state_dict=True: every value is a plain tensor
                tensors = cast(dict[str, torch.Tensor], model_state)
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
                follow_umask(tmp / "model.safetensors")
                enc = {k[len("encoder.") :]: v.contiguous() for k, v in tensors.items() if k.startswith("encoder.")}
                meta = {
                    "format_version": 1,
                    "name": self.cfg.model,
                    "class": type(self.objective.encoder).__name__,
                    "config": self.objective.encoder.config,
                    "extra": {"step": self.step},
                }
                save_file(enc, str(tmp / "encoder.safetensors"), metadata={"fm_engine": json.dumps(meta)})
                follow_umask(tmp / "encoder.safetensors")
            torch.save(
                {
                    "version": STATE_VERSION,
                    "step": self.step,
                    "epoch": self.epoch,
                    "batch_in_epoch": self.batch_in_epoch,
                    "skipped": self.skipped,
                    "skipped_files": sorted(self.skipped_files.items()),
                    "world_size": self.dist.world,
                    "optimizer": optim_state,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": all_rng,
                    "config": self.cfg.to_dict(),
                    "run_id": self.run_id,
                    "tuning": self.tuning,
                },
                tmp / "state.pt",
            )
            final = self.ckpt_dir / name
            if final.exists():  # this run's own checkpoint of this step (a resume repeats it)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.ckpt_dir / "latest", name + "\n")
            self.write_skipped()
            # keep the newest keep_checkpoints of this run (by step number); `latest` names the newest
            done = _checkpoint_steps(self.ckpt_dir, self.run_id)
            for _, old in done[: -self.cfg.keep_checkpoints]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            path = final
        if self.dist.world > 1:
            dist.barrier()
        return path

    def load_state(self) -> None:
        """Restore the latest checkpoint under ``out`` (ValueError when there is none)."""
        from safetensors.torch import load_file

        folder = latest_checkpoint(self.out)
        if folder is None:
            raise ValueError(f"resume: {self.out} holds no checkpoint to resume from")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.dist.world:
            raise ValueError(
                f"resume: {folder} was written by {state['world_size']} processes, this run has "
                f"{self.dist.world} (the data order would differ)"
            )
        saved_cfg = state.get("config", {})
        changed = self._check_resume_config(saved_cfg, folder)
        weights = load_file(str(folder / "model.safetensors"))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=cast(dict[str, Any], weights),
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True, strict=True),
            )
        else:
            missing, unexpected = self.objective.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"resume: {folder}/model.safetensors does not fit this model (missing {missing}, "
                    f"unexpected {unexpected})"
                )
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved = state.get("tuning", {}).get("sha256", "")
        if saved != self.tuning["sha256"] and self.cfg.backend == "auto":
            import warnings

            warnings.warn(
                f"resume: the tuning tables differ from the run's so far ({saved[:12] or 'none'} -> "
                f"{self.tuning['sha256'][:12] or 'none'}): automatic dispatch may pick other kernels, so the "
                "resumed run is not bit-exact with an uninterrupted one (pass --backend to pin the kernels)",
                stacklevel=2,
            )
        self.step, self.epoch = state["step"], state["epoch"]
        if "lr" in changed:  # every one-cycle value is proportional to the peak: rescale the saved schedule
            ratio = self.cfg.lr / float(saved_cfg["lr"])
            for g in self.optimizer.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                    if key in g:
                        g[key] *= ratio
            self.scheduler.base_lrs = [b * ratio for b in self.scheduler.base_lrs]
            self.scheduler._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]  # type: ignore[attr-defined]
        if "weight_decay" in changed:
            for g in self.optimizer.param_groups:
                if g.get("weight_decay", 0.0) > 0:
                    g["weight_decay"] = self.cfg.weight_decay
        if "batch_size" in changed:  # the data position is kept in examples: batches of the new size from there
            state["batch_in_epoch"] = state["batch_in_epoch"] * int(saved_cfg["batch_size"]) // self.cfg.batch_size
        # checkpoints written before run ids existed have none: the resumed run adopts the folder's name
        self.run_id = state.get("run_id") or f"legacy-{folder.name}"
        self.batch_in_epoch, self.skipped = state["batch_in_epoch"], state["skipped"]
        for path, reason in state.get("skipped_files", []):
            self.skipped_files.setdefault(path, reason)
        _set_rng_state(state["rng"][self.dist.rank], self.device, self.aug_gen)

    # options that may differ on resume without a word (output and progress), and those that cannot change
    _RESUME_FREE: tuple[str, ...] = ("resume", "overwrite", "stop_after", "progress", "workers", "tensorboard")
    _RESUME_FREE += ("log_every", "out", "checkpoint_every", "keep_checkpoints")

    def _check_resume_config(self, saved: dict[str, Any], folder: Path) -> dict[str, tuple[Any, Any]]:
        """Compare this run's options with the saved run's: ``steps`` / ``pct_start`` cannot change (the
        one-cycle schedule is fixed at the start: ValueError saying how to train on); any other difference
        overrides the saved value and is warned about. Returns {option: (saved, now)}."""
        now = self.cfg.to_dict()
        changed = {
            k: (saved[k], now[k])
            for k in now
            if k in saved and k not in self._RESUME_FREE and k != "data" and saved[k] != now[k]
        }
        if saved.get("data") is not None and os.path.abspath(str(saved["data"])) != os.path.abspath(str(now["data"])):
            changed["data"] = (saved["data"], now["data"])
        for k in ("steps", "pct_start"):
            if k in changed:
                raise ValueError(
                    f"{k} (--{k.replace('_', '-')}): the run in {self.out} was planned with {k} {changed[k][0]} "
                    f"and its one-cycle schedule is fixed at the start, so --resume cannot change it to "
                    f"{changed[k][1]}. To train on, start a new run from its weights: --init "
                    f"{folder / 'encoder.safetensors'} --out NEW_FOLDER --{k.replace('_', '-')} {changed[k][1]} "
                    "(a fresh one-cycle schedule)"
                )
        if changed and self.dist.main:
            import warnings

            text = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
            warnings.warn(
                f"resume: these options override the saved run's values: {text} (the resumed run is no longer "
                "the one an uninterrupted run would have been)",
                stacklevel=3,
            )
        return changed

    # -- loop -----------------------------------------------------------------------------------------
    def _update_ema(self) -> None:
        # FSDP2 shards every parameter along dim 0 the same way, so the online and EMA shards of one rank
        # line up and the update runs on the local shards
        self.objective.update_ema()

    def _micro_step(self, batch: dict[str, torch.Tensor], sync: bool) -> dict[str, float]:
        from fm_engine.data import augment_batch, stem_inputs

        batch = self.data.to_device(batch, self.device)  # DICOM: intensity table, resize, padding here
        images, scale, offset = augment_batch(
            batch["image"], batch["scale"], batch["offset"], self.augment, self.aug_gen
        )
        x, s, o = stem_inputs(images, scale, offset)
        labels = batch["label"].to(self.device) if self.objective.probe is not None else None
        if self.fsdp:
            cast("FSDPModule", self.model).set_requires_gradient_sync(sync)
            ctx: Any = contextlib.nullcontext()
        else:
            ctx = (
                cast("DistributedDataParallel", self.model).no_sync()
                if (not sync and self.dist.world > 1)
                else contextlib.nullcontext()
            )
        with ctx:
            with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                out = self.model(x, labels, intensity_scale=s, intensity_offset=o)
            (out["loss"] / self.cfg.grad_accum).backward()
        row = {k: float(out[k].detach()) for k in ("loss", "jepa_loss", "contrastive_loss", "probe_loss") if k in out}
        if labels is not None and "probe_logits" in out:
            row["probe_acc"] = float((out["probe_logits"].argmax(-1) == labels).float().mean())
        return row

    def _optimizer_step(self, params: list[torch.nn.Parameter]) -> dict[str, Any]:
        """EMA update, ``grad_accum`` micro-batches, clipping, AdamW and schedule step -> metrics row."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._update_ema()  # once per optimiser step, before the forward
        rows, n_img = [], 0
        for k in range(cfg.grad_accum):
            batch = self._next_batch()
            self.skipped += int(batch["skipped"].sum())
            n_img += batch["index"].shape[0]
            rows.append(self._micro_step(batch, sync=k == cfg.grad_accum - 1))
            if hasattr(self.dataset, "release"):  # its buffer is read no more: the loader may refill it
                self.dataset.release(batch)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)  # FSDP: DTensor grads, norm over all shards
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        lr = float(self.optimizer.param_groups[0]["lr"])  # the lr this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        row: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        for key in rows[0]:
            row[key] = sum(r[key] for r in rows) / len(rows)
        row.update(
            lr=lr,
            grad_norm=float(gnorm),
            images_per_s=n_img * self.dist.world / dt,
            memory_gib=_memory_gib(self.device),
            skipped=self.skipped + len(self.dataset.skipped_files),
        )
        return row

    def train(self) -> dict[str, Any]:
        """Run until ``steps`` (or ``stop_after`` steps of this run). Returns the last metrics row."""
        from tqdm.auto import tqdm

        from fm_engine.ops._dispatch import use_backend

        cfg = self.cfg
        if self.dist.main:
            if cfg.overwrite and not cfg.resume:
                move_run_aside(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.out / "config.yaml", dump_config(cfg))
            self.write_skipped()
        writer = (
            MetricsWriter(self.out, cfg.tensorboard, append=self.step > 0, keep_until=self.step)
            if self.dist.main
            else None
        )
        self._it = None
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="mjepa",
            unit="step",
            disable=not (cfg.progress and self.dist.main),
            dynamic_ncols=True,
        )
        last: dict[str, Any] = {}
        run_steps = 0
        params = [p for p in self.objective.parameters() if p.requires_grad]

        try:
            with use_backend(cfg.backend):
                while self.step < cfg.steps and (cfg.stop_after is None or run_steps < cfg.stop_after):
                    last = self._optimizer_step(params)
                    run_steps += 1
                    at_checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                    if self.probe_set is not None:  # a column of every row, measured at checkpoints
                        last["probe_acc_heldout"] = self.heldout_probe_accuracy() if at_checkpoint else None
                    if writer is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        writer.write(last)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{last['loss']:.4f}",
                        img_s=f"{last['images_per_s']:.1f}",
                        mem=f"{last['memory_gib']:.2f}GiB",
                    )
                    if at_checkpoint:
                        self.save_state()
                        if writer is not None:
                            self.write_curves()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
                self.write_skipped()
                self.write_curves()
        return last

    def write_curves(self) -> Path | None:
        """``out/curves.png`` from ``out/metrics.csv`` (None, with one warning, without matplotlib)."""
        from fm_engine.train.curves import plot_curves

        if not (self.out / "metrics.csv").is_file():
            return None
        try:
            return plot_curves(self.out / "metrics.csv", self.out / "curves.png")
        except ImportError:
            if not getattr(self, "_warned_curves", False):
                log.warning("curves.png needs matplotlib: pip install 'fm_engine[train]'")
                self._warned_curves = True
            return None


def train_mjepa(cfg: TrainConfig) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it; returns the last metrics row (with ``checkpoint``: the latest
    checkpoint folder, and ``skipped_files``: the number of files left out, listed in ``out/skipped.csv``)."""
    trainer = Trainer(cfg)
    last = trainer.train()
    ckpt = latest_checkpoint(cfg.out)
    last["checkpoint"] = str(ckpt) if ckpt else None
    last["skipped_files"] = len(trainer.skipped_files)
    last["trainer"] = trainer
    return last
