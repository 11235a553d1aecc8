"""Training plumbing shared by stages 1 and 2: devices, deterministic batching, the LR schedule and metric logs.

The global batch, the LR schedule and the per-epoch data coverage do not depend on the process count: every process
draws the same seeded permutation of the training clips, each step takes the next ``global_batch`` clips, and process
``r`` of ``N`` trains on its contiguous share of them. (Upstream divided the step count by the device count but not
the data, so multi-GPU runs trained on a different schedule.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from utils.config import to_dict
from utils.errors import ConfigError
from utils.io import atomic_path
from utils.stage_configs import OptimConfig, SharedConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def clip_seed(base_seed: int, index: int) -> int:
    """Per-clip seed: independent of batch size and process count (design: conventions)."""
    return (base_seed * 1_000_003 + index * 7_919) % 2**63


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(cfg: SharedConfig) -> Accelerator:
    """An ``accelerate.Accelerator`` for ``cfg.run.device`` / ``cfg.run.mixed_precision``.

    fp16 autocast does not exist on the CPU; there it falls back to full precision (bf16 stays bf16).
    Under a DeepSpeed launch (ZeRO stage 1 or 2, see :func:`prepare_deepspeed`) the parameters stay fp32 (DeepSpeed's
    own bf16/fp16 mode would keep only half-precision weights in the module) and :func:`autocast` gives the
    mixed-precision compute instead.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if cfg.run.device == "cuda" and not cuda:
        raise ConfigError(
            "run.device=cuda but CUDA is not available on this machine", "use GPU 'cpu' or --set run.device=cpu"
        )
    precision = cfg.run.mixed_precision
    cpu = cfg.run.device == "cpu" or not cuda
    if cpu and precision == "fp16":
        log.info("fp16 is not available on the CPU; training in full precision")
        precision = "no"
    if deepspeed_launch():
        check_deepspeed_installed()
        from accelerate.utils import InitProcessGroupKwargs

        # cpu=True would drop the DeepSpeed plugin; without CUDA, naming gloo makes accelerate start DeepSpeed's
        # process group on the CPU (DeepSpeed's CPU accelerator) instead of running every process as rank 0 of 1
        handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(mixed_precision="no", kwargs_handlers=handlers)
        check_zero_stage(int(accelerator.state.deepspeed_plugin.zero_stage))
        return accelerator
    return Accelerator(cpu=cpu, mixed_precision=precision)


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def check_deepspeed_installed() -> None:
    if not deepspeed_available():
        raise ConfigError(
            "this launch uses a DeepSpeed config but the optional package deepspeed is not installed",
            "pip install deepspeed==0.19.8, or launch with configs/accelerate/multi_gpu.yaml",
        )


def check_zero_stage(stage: int) -> None:
    """ZeRO stages 0, 1 and 2 work with the stages' several model calls per step; stage 3 does not."""
    if stage > 2:
        raise ConfigError(
            f"DeepSpeed ZeRO stage {stage} partitions the parameters themselves, which needs every call to go through "
            "the engine's forward(); the stages call several model methods per step",
            "use zero_stage 2 (configs/accelerate/deepspeed_zero2.yaml)",
        )


def uses_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def autocast(accelerator: Any, cfg: SharedConfig) -> contextlib.AbstractContextManager[Any]:
    """The mixed-precision context of a step: accelerate's, or under DeepSpeed ``torch.autocast`` in the
    ``run.mixed_precision`` dtype (the DeepSpeed accelerator itself is built in full precision)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision)
    if not uses_deepspeed(accelerator):
        return accelerator.autocast()
    if dtype is None or (dtype == torch.float16 and accelerator.device.type == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(accelerator.device.type, dtype=dtype)


def prepare_deepspeed(accelerator: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                      global_batch: int, train_cfg: OptimConfig) -> tuple[Any, Any, Any]:  # fmt: skip
    """(engine, optimizer, scheduler) of ``model`` under the launch's DeepSpeed ZeRO config: the micro batch is this
    process's share of ``global_batch`` (no gradient accumulation), clipping is ``train.grad_clip``. The engine then
    averages (ZeRO-2: reduce-scatters) the gradients and steps inside ``accelerator.backward``; the returned optimizer
    wrapper's ``step`` does nothing, and the loop steps the (unwrapped) scheduler once per step."""
    n = accelerator.num_processes
    if global_batch % n:
        raise ConfigError(f"DeepSpeed needs the global batch {global_batch} to split evenly over {n} processes",
                          f"set train.batch_size to a multiple of {n}")  # fmt: skip
    if train_cfg.adamw_impl == "8bit":
        raise ConfigError("train.adamw_impl=8bit is not supported under DeepSpeed (ZeRO partitions the AdamW state)",
                          "choose train.adamw_impl=fused or auto")  # fmt: skip
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = global_batch // n
    ds["train_batch_size"] = global_batch
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = float(train_cfg.grad_clip or 0.0)
    engine, opt = accelerator.prepare(model, opt)
    return engine, opt, sched  # the scheduler stays ours: accelerate's wrapper would step it once per process


@dataclass(frozen=True)
class BatchPlan:
    """Which clips every process sees at every step of an epoch.

    ``n_items`` training clips, ``global_batch`` clips per optimiser step over all ``num_processes`` processes.
    """

    n_items: int
    global_batch: int
    num_processes: int = 1
    seed: int = 0
    drop_last: bool = True  # a last partial batch (a handful of clips) gives contrastive losses no negatives

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ConfigError("the training split is empty", "check data_root and data.val_fraction")
        if self.global_batch > self.n_items:
            raise ConfigError(
                f"batch size {self.global_batch} is larger than the {self.n_items} training clips",
                f"set train.batch_size to at most {self.n_items}",
            )
        if self.global_batch % self.num_processes:
            raise ConfigError(
                f"batch size {self.global_batch} does not split evenly over {self.num_processes} processes",
                f"set train.batch_size to a multiple of {self.num_processes}",
            )

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.n_items // self.global_batch
        return math.ceil(self.n_items / self.global_batch)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def batch_at(self, epoch: int, step: int) -> np.ndarray:
        """The clip indices of step ``step`` of ``epoch`` over all processes."""
        return self.permutation(epoch)[step * self.global_batch : (step + 1) * self.global_batch]

    def share(self, rank: int) -> slice:
        """Rows of a global batch that process ``rank`` trains on."""
        per = self.global_batch // self.num_processes
        return slice(rank * per, (rank + 1) * per)

    def batches(self, epoch: int, rank: int = 0) -> Iterator[np.ndarray]:
        """Yield, per step, the clip indices of process ``rank`` (a contiguous share of the global batch)."""
        order = self.permutation(epoch)
        for step in range(self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield np.array_split(batch, self.num_processes)[rank]

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ridge slots, clip indices) of the items ``ids`` of a batch: one subject, so slot 0 and the ids."""
        return np.zeros(len(ids), dtype=np.int64), np.asarray(ids)


@dataclass(frozen=True)
class SubjectBatchPlan:
    """:class:`BatchPlan` for a subject set: every global batch holds ``per_subject`` clips of each subject (ridge slot
    k: ``n_items[k]`` training clips), slot by slot, each subject's from its own seeded permutation of its clips.

    An item id is ``slot * stride + clip`` (:meth:`decode`); processes take contiguous shares of the global batch, as
    with one subject. An epoch has as many steps as the subject with the fewest clips allows.
    """

    n_items: tuple[int, ...]
    per_subject: int
    num_processes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for n in self.n_items:
            BatchPlan(n, self.per_subject)  # the same checks per subject
        if self.global_batch % self.num_processes:
            raise ConfigError(
                f"batch size {self.global_batch} does not split evenly over {self.num_processes} processes",
                f"set train.batch_size to a multiple of {self.num_processes * len(self.n_items)}",
            )

    @classmethod
    def equal_shares(cls, n_items: Sequence[int], batch_size: int, num_processes: int = 1, seed: int = 0
                     ) -> SubjectBatchPlan:  # fmt: skip
        """Every subject the same share of ``batch_size`` (MindEye2's multi-subject batches)."""
        k = len(n_items)
        if batch_size % k:
            raise ConfigError(f"batch size {batch_size} does not split evenly over {k} subjects",
                              f"set train.batch_size to a multiple of {k}")  # fmt: skip
        return cls(tuple(int(n) for n in n_items), batch_size // k, num_processes, seed)

    @property
    def global_batch(self) -> int:
        return self.per_subject * len(self.n_items)

    @property
    def stride(self) -> int:
        return max(self.n_items)

    @property
    def steps_per_epoch(self) -> int:
        return min(n // self.per_subject for n in self.n_items)

    @property
    def proportions(self) -> dict[int, float]:
        """Ridge slot → its share of every global batch."""
        return {k: self.per_subject / self.global_batch for k in range(len(self.n_items))}

    def batch_at(self, epoch: int, step: int) -> np.ndarray:
        b = self.per_subject
        perms = (np.random.default_rng([self.seed, epoch, k]).permutation(n) for k, n in enumerate(self.n_items))
        return np.concatenate([k * self.stride + p[step * b : (step + 1) * b] for k, p in enumerate(perms)])

    def decode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids)
        return ids // self.stride, ids % self.stride

    def share(self, rank: int) -> slice:
        per = self.global_batch // self.num_processes
        return slice(rank * per, (rank + 1) * per)

    def batches(self, epoch: int, rank: int = 0) -> Iterator[np.ndarray]:
        for step in range(self.steps_per_epoch):
            yield self.batch_at(epoch, step)[self.share(rank)]


AnyPlan = BatchPlan | SubjectBatchPlan  # what the training loop steps through


class _GatherCat(torch.autograd.Function):
    """All-gather along dim 0 with a gradient: every process's copy of the loss sends its share back (summed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # SUM works on every backend (gloo has no reduce_scatter)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_cat(accelerator: Any, x: torch.Tensor) -> torch.Tensor:
    """``(b, ...)`` per process → ``(N·b, ...)`` in rank order, differentiable; identity for one process.

    With every process computing the same loss on the gathered global batch, and gradients then averaged by
    :func:`average_gradients`, the update equals the one-process update on the global batch.
    """
    if accelerator.num_processes == 1:
        return x
    return _GatherCat.apply(x)


def average_gradients(accelerator: Any, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Mean all-reduce of the gradients (the models are not DDP-wrapped: stages call several of their methods).

    A parameter may have a gradient on some processes only (a subject set's ridge whose subject has no rows in this
    process's share): it counts as zero where missing. One that has none on any process keeps none, as with one
    process (AdamW then skips it).
    """
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=accelerator.device)
    dist.all_reduce(present)
    grads: list[torch.Tensor] = []
    for p, anywhere in zip(params, present.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def start_wandb(cfg: SharedConfig, stage: str, out_dir: Path) -> Any:
    """A wandb run when ``run.use_wandb`` is set (offline unless WANDB_MODE says otherwise), else None."""
    if not cfg.run.use_wandb:
        return None
    import wandb  # optional: only runs with run.use_wandb need it

    os.environ.setdefault("WANDB_MODE", "offline")  # sync later with `wandb sync`; nothing needs a network here
    name = f"stage{stage}--exp_{cfg.run.exp}--subj{cfg.run.subj_text}"
    return wandb.init(project="neurons", name=name, dir=str(out_dir), config=to_dict(cfg), reinit=True)


ADAMW_FLAGS: dict[str, dict[str, Any]] = {
    "auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}
}


def build_optimizer(params: list[torch.nn.Parameter], train_cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` in the implementation ``train.adamw_impl`` names (all give the same update).

    ``foreach`` batches the update over tensors but allocates parameter-sized temporaries; ``fused`` runs one kernel
    per parameter group without them; ``8bit`` is bitsandbytes' block-wise quantised AdamW8bit (2 bytes of optimizer
    state per parameter instead of 8), an optional package.
    """
    kwargs: dict[str, Any] = {"lr": train_cfg.max_lr, "weight_decay": train_cfg.weight_decay}
    if train_cfg.adamw_impl == "8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise ConfigError(
                "train.adamw_impl=8bit needs the optional package bitsandbytes",
                "pip install bitsandbytes==0.50.2, or choose train.adamw_impl=fused",
            ) from err
        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs, **ADAMW_FLAGS[train_cfg.adamw_impl])


def one_cycle(
    optimizer: torch.optim.Optimizer, train_cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The upstream schedule: OneCycleLR with warm-up ``pct_start`` (default 2/epochs), cosine annealing."""
    if train_cfg.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if train_cfg.lr_scheduler == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(total_steps, 1))
    pct = train_cfg.pct_start if train_cfg.pct_start is not None else 2 / train_cfg.num_epochs
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=train_cfg.max_lr,
        total_steps=total_steps,
        pct_start=min(max(pct, 1 / total_steps), 0.99),
        final_div_factor=train_cfg.final_div_factor,
        cycle_momentum=train_cfg.cycle_momentum,
    )


class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per record) with a loss-curve plot, mirrored to wandb when
    ``wandb_run`` is given."""

    def __init__(self, path: Path, wandb_run: Any = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb_run = wandb_run

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(dict(record), sort_keys=True) + "\n")
        if self.wandb_run is not None:
            split = record.get("split", "train")
            values = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
            self.wandb_run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them)."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    def plot(self, out: Path, keys: tuple[str, ...] | None = None) -> Path:
        """Plot every numeric series (by ``step``) into ``out`` (PNG), one panel per split."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.read()
        splits = sorted({r.get("split", "train") for r in records})
        fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(6 * max(len(splits), 1), 4), squeeze=False)
        for ax, split in zip(axes[0], splits):
            rows = [r for r in records if r.get("split", "train") == split]
            names = keys or sorted(
                {k for r in rows for k, v in r.items() if isinstance(v, int | float)} - {"step", "epoch"}
            )
            for name in names:
                pts = [(r["step"], r[name]) for r in rows if name in r]
                if pts:
                    ax.plot(*zip(*pts), label=name)
            ax.set_title(split)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        return Path(out)
