"""The reliability catalogue (docs/failures.md): bad inputs and faults, each met with a clear error and no lost work.

Every case runs a real entry point (a stage script's ``run_stage``, the driver, or ``find_key_obj``) against a
complete, good smoke run and checks three things: the exit status is non-zero, stderr holds exactly one ``error:``
line that names the cause and the fix (and no traceback), and no file of the good run was modified, deleted or added
(``logs/`` and the lock file aside). Faults (``kill -9``, SIGINT/SIGTERM, a full disk, a NaN loss) run stage 1 in a
forked child process or with a patched writer and check that the last good checkpoint survives and ``--resume`` ends
with the same weights as an uninterrupted run. ``NEURONS_FAILURES_DUMP=<file>`` collects every checked message.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.smoke_env import REPO, SmokeEnv, smoke_env
from utils.io import atomic_save_safetensors, atomic_torch_save, atomic_write_text

SCRIPTS = {"1": "train_neurons", "2": "train_decoupler", "3": "recon_decoupled", "5": "recon_video"}
LOG = ("--set", "train.log_every=1")  # smoke stage 1: batch 8, 2 epochs of 5 steps
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
CHILD_TIMEOUT_S = 300
DUMP_ENV = "NEURONS_FAILURES_DUMP"  # a file: every checked error line is appended to it (JSON lines)


# ---- fixtures and helpers ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(smoke_world: Path, tmp_path_factory) -> SmokeEnv:
    """The smoke env with a profile whose runs live in a folder of this module."""
    base = smoke_env(smoke_world, tmp_path_factory.getbasetemp() / "stage_env")
    scratch = tmp_path_factory.mktemp("failures")
    profile = scratch / "failures.yaml"
    profile.write_text(f"extends: {base.profile}\npaths:\n  exp_root: {scratch / 'EXP'}\n")
    return SmokeEnv(base.world, base.weights, scratch / "EXP", profile)


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """``run_stage`` reconfigures the root logger; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def run_cli(env: SmokeEnv, stage: str, *args: str, exp: str = "good", profile: Path | None = None) -> int:
    """``python <stage script> --profile P --exp EXP *args``, in this process; returns the exit status."""
    from utils.cli import run_stage
    from utils.stage_configs import STAGE_CONFIGS

    module = importlib.import_module(SCRIPTS[stage])
    argv = ["--profile", str(profile or env.profile), "--exp", exp, *args]
    with kept_logging():
        try:
            return run_stage(STAGE_CONFIGS[stage], module.main, module.__doc__, argv)
        except SystemExit as exit_:  # argparse
            return int(exit_.code or 0)


def run_root(env: SmokeEnv, exp: str, subj: int = 1) -> Path:
    return env.exp_root / f"exp_{exp}" / f"subj_{subj}"


def error_line(stderr: str, *patterns: str) -> str:
    """The single ``error:`` line of a failed run; it matches every pattern and names a fix."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert re.search(r"; (fix: |see )", line), line
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
    if os.environ.get(DUMP_ENV):  # collect the messages for docs/failures.md
        with open(os.environ[DUMP_ENV], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"), "line": line}) + "\n")
    return line


def lit(path: Path) -> str:
    """``path`` as a regular expression that matches it literally."""
    return re.escape(str(path))


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """size, mtime and sha256 of every file under ``root`` except ``logs/`` and the run lock."""
    from utils.io import sha256_file

    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and path.name != ".lock" and not rel.startswith("logs/"):
            stat = path.stat()
            out[rel] = (stat.st_size, stat.st_mtime_ns, sha256_file(path))
    return out


def assert_untouched(root: Path, before: dict[str, tuple[int, int, str]]) -> None:
    after = snapshot(root)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed and not added, f"modified or deleted: {changed}; added: {added}"


def refused(
    env: SmokeEnv,
    capsys,
    stage: str,
    args: tuple[str, ...],
    patterns: tuple[str, ...],
    code: int | None = None,
    exp: str = "good",
    profile: Path | None = None,
    subj: int = 1,
) -> str:
    """Run a stage that must refuse: non-zero (or ``code``) exit, one error line, the run folder untouched."""
    root = run_root(env, exp, subj)
    before = snapshot(root)
    capsys.readouterr()
    status = run_cli(env, stage, *args, exp=exp, profile=profile)
    assert status == code if code is not None else status != 0
    line = error_line(capsys.readouterr().err, *patterns)
    assert_untouched(root, before)
    return line


def shadow(src: Path, dst: Path, edits: dict[str, Callable[[Path, Path], None] | None]) -> Path:
    """A copy of folder ``src`` made of symlinks, except the files in ``edits`` (relative path -> ``write(orig,
    new)``, or None to leave the file out). Folders that hold an edited file are real folders."""
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        inner = {k.split("/", 1)[1]: v for k, v in edits.items() if "/" in k and k.split("/", 1)[0] == entry.name}
        if entry.name in edits:
            if edits[entry.name] is not None:
                edits[entry.name](entry, dst / entry.name)
        elif inner:
            shadow(entry, dst / entry.name, inner)
        else:
            (dst / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return dst


def tensor_edit(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path, Path], None]:
    return lambda orig, new: torch.save(fn(torch.load(orig, weights_only=True)), new)


def text_edit(fn: Callable[[str], str]) -> Callable[[Path, Path], None]:
    return lambda orig, new: new.write_text(fn(orig.read_text()))


def set_values(x: torch.Tensor, where: list[tuple[int, int, int]], value: float) -> torch.Tensor:
    x = x.clone()
    for i, r, v in where:
        x[i, r, v] = value
    return x


def save_strings(n: int) -> Callable[[Path, Path], None]:
    from utils.data import save_tensor_file

    return lambda orig, new: save_tensor_file(new, np.array([f"caption {i}" for i in range(n)]))


def truncate(orig: Path, new: Path) -> None:
    data = orig.read_bytes()
    new.write_bytes(data[: len(data) // 2])


def garble_header(orig: Path, new: Path) -> None:
    """Same size, an unreadable safetensors header (bit rot)."""
    data = bytearray(orig.read_bytes())
    data[8:40] = b"\xff" * 32
    new.write_bytes(bytes(data))


def final_weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from utils.checkpoint import read_weights

    return read_weights(stage_dir / "checkpoints" / "last")[0]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def good(env: SmokeEnv) -> Path:
    """A complete stage-1 run (``exp_good``), made through the stage's entry point: the run no case may touch."""
    assert run_cli(env, "1", *LOG) == 0
    return run_root(env, "good")


# ---- data ----------------------------------------------------------------------------------------------------------
NAN = [(3, 0, 5), (17, 1, 9)]  # (clip, repeat, voxel)
DATA_CASES = {
    "missing_file": (
        "1",
        {"GT_test_3fps.pt": None},
        (
            r"DataError: missing \S+/GT_test_3fps\.pt",
            r"fix: build the toy world with `python download_dataset.py --toy",
        ),
    ),
    "fmri_rank": (
        "1",
        {"subj01_train_fmri.pt": tensor_edit(lambda x: x[:, 0])},
        (r"subj01_train_fmri\.pt holds \(48, 300\), expected a tensor \(clips, repeats, voxels\)",),
    ),
    "fmri_no_repeats": (
        "1",
        {"subj01_train_fmri.pt": tensor_edit(lambda x: x[:, :0])},
        (r"holds \(48, 0, 300\): no repeats or no voxels",),
    ),
    "voxel_mismatch": (
        "1",
        {"subj01_test_fmri.pt": tensor_edit(lambda x: x[..., :290])},
        (r"subject 1: train fMRI has 300 voxels, test 290", "use matching files for subject 1"),
    ),
    "nan_voxels": (
        "1",
        {"subj01_train_fmri.pt": tensor_edit(lambda x: set_values(x, NAN, float("nan")))},
        (r"subj01_train_fmri\.pt has NaN/Inf in 2 voxels across 2 clips \(first clips \[3, 17\]\)",),
    ),
    "inf_voxels": (
        "1",
        {"subj01_test_fmri.pt": tensor_edit(lambda x: set_values(x, [(2, 4, 7)], float("inf")))},
        (r"subj01_test_fmri\.pt has NaN/Inf in 1 voxels across 1 clips \(first clips \[2\]\)",),
    ),
    "uint8_frames": (
        "1",
        {"GT_train_3fps.pt": tensor_edit(lambda x: (x * 255).to(torch.uint8))},
        (r"GT_train_3fps\.pt holds torch\.uint8 frames, expected float32 in \[0,1\]", r"frames\.float\(\) / 255"),
    ),
    "frames_out_of_range": (
        "1",
        {"GT_test_3fps.pt": tensor_edit(lambda x: x * 255)},
        (r"GT_test_3fps\.pt has values outside \[0,1\]", "divide by 255"),
    ),
    "frame_count": (
        "1",
        {"GT_test_3fps.pt": tensor_edit(lambda x: x[:20])},
        (r"GT_test_3fps\.pt has 20 clips but subj01_test_fmri\.pt has 24",),
    ),
    "caption_emb_count": (
        "1",
        {"GT_train_caption_emb.pt": tensor_edit(lambda x: x[:40])},
        (r"GT_train_caption_emb\.pt has 40 clips but subj01_train_fmri\.pt has 48",),
    ),
    "caption_count": (
        "2",
        {"GT_train_caption.pt": save_strings(30)},
        (r"GT_train_caption\.pt has 30 clips but subj01_train_fmri\.pt has 48",),
    ),
    "mask_count": (
        "2",
        {"masks/key_objects_masks_test.pt": tensor_edit(lambda x: x[:10])},
        (r"key_objects_masks_test\.pt has 10 clips but subj01_test_fmri\.pt has 24",),
    ),
    "annotation_count": (
        "2",
        {
            "qwen_annotation/qwen_test_caption_tag_category_id.json": text_edit(
                lambda t: json.dumps(json.loads(t)[:10])
            )
        },
        (r"qwen_test_caption_tag_category_id\.json has 10 clips",),
    ),
    "annotation_json": (
        "2",
        {"qwen_annotation/qwen_train_caption_tag_category_id.json": text_edit(lambda t: t[:50])},
        (r"malformed JSON in \S+/qwen_train_caption_tag_category_id\.json",),
    ),
    "key_object_json": (
        "2",
        {"masks/key_objects_info_train.json": text_edit(lambda t: "{'0': " + t)},
        (r"malformed JSON in \S+/key_objects_info_train\.json", "tasks_construction.find_key_obj"),
    ),
    "empty_test_set": (
        "1",
        {"subj01_test_fmri.pt": tensor_edit(lambda x: x[:0])},
        (r"subj01_test_fmri\.pt has no clips \(empty test set\)",),
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_is_refused(env: SmokeEnv, good: Path, tmp_path: Path, capsys, case: str) -> None:
    stage, edits, patterns = DATA_CASES[case]
    root = shadow(env.world, tmp_path / "toy_cortex_smoke", edits)
    refused(env, capsys, stage, ("--set", f"paths.data_root={root}"), ("DataError: ", *patterns), code=1)


def test_missing_data_root(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "toy_cortex_smoke"
    refused(
        env,
        capsys,
        "1",
        ("--set", f"paths.data_root={missing}"),
        (rf"DataError: data root {lit(missing)} does not exist", rf"--toy --out {lit(missing)}"),
        code=1,
    )


def test_malformed_mask_json_keeps_the_key_object_files(env: SmokeEnv, tmp_path: Path, capsys) -> None:
    from tasks_construction import find_key_obj

    name = "masks/mask_cls_dict_train_qwen_video.json"
    root = shadow(env.world, tmp_path / "toy_cortex_smoke", {name: text_edit(lambda t: t[: len(t) // 2])})
    names = [f"key_objects_{k}_{s}" for k in ("info", "masks") for s in ("train", "test")]
    outputs = [root / "masks" / (n + (".json" if "info" in n else ".pt")) for n in names]  # a good run's outputs
    before = {p: p.readlink() for p in outputs}
    capsys.readouterr()
    with kept_logging():
        assert find_key_obj.main(["--data-root", str(root)]) == 1
    error_line(capsys.readouterr().err, r"DataError: malformed JSON in \S+/mask_cls_dict_train_qwen_video\.json")
    assert {p: p.readlink() for p in outputs} == before  # still the links to the good files: nothing was rewritten


# ---- config --------------------------------------------------------------------------------------------------------
def test_unknown_profile(env: SmokeEnv, good: Path, capsys) -> None:
    refused(
        env,
        capsys,
        "1",
        (),
        ("ConfigError: unknown profile 'smokey'", "use one of paper, paper_upstream, toy, smoke, smoke_upstream"),
        code=2,
        profile=Path("smokey"),
    )


def test_bad_yaml(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(env.profile.read_text() + "run:\n  seed: [1, 2\n")
    refused(
        env,
        capsys,
        "1",
        (),
        (r"ConfigError: bad YAML in \S+bad\.yaml at line \d+", "fix the YAML syntax"),
        code=2,
        profile=bad,
    )


def test_unknown_key(env: SmokeEnv, good: Path, capsys) -> None:
    refused(
        env,
        capsys,
        "1",
        ("--set", "train.batchsize=4"),
        ("ConfigError: unknown config key 'train.batchsize'", "did you mean 'train.batch_size'"),
        code=2,
    )


def test_type_error_in_set(env: SmokeEnv, good: Path, capsys) -> None:
    refused(
        env, capsys, "1", ("--set", "train.max_lr=fast"), ("ConfigError: ", "train.max_lr", "expected float"), code=2
    )


def test_batch_larger_than_the_data(env: SmokeEnv, good: Path, capsys) -> None:
    refused(
        env,
        capsys,
        "1",
        ("--set", "train.batch_size=1000"),
        (r"batch size 1000 is larger than the \d+ training clips", r"set train.batch_size to at most \d+"),
        code=2,
    )


@pytest.mark.parametrize("args", [("--subj", "4"), ("--set", "run.subj=0")], ids=["flag", "set"])
def test_subject_outside_1_to_3(env: SmokeEnv, good: Path, capsys, args: tuple[str, str]) -> None:
    want = r"('4': give 1, 2 or 3, or a set such as 1,2,3|expected 1 \| 2 \| 3, or a list of 1 \| 2 \| 3)"
    refused(env, capsys, "1", args, (want,), code=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_index_without_cuda(env: SmokeEnv, good: Path) -> None:
    before = snapshot(good)
    done = subprocess.run(
        ["bash", str(REPO / "train_neurons.sh"), "0", "good", "1", "enhance", "1", str(env.profile)],
        cwd=REPO,
        env={**SUBPROCESS_ENV, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    error_line(
        done.stdout,
        r"ConfigError: GPU requested \(CUDA_VISIBLE_DEVICES=0\) but CUDA is not available",
        "use GPU 'cpu'",
    )
    error_line(done.stderr, r"stage 1 \(brain model\) failed with exit status 2", r"see \S+/logs/stage1_")
    assert_untouched(good, before)


# ---- weights and checkpoints ---------------------------------------------------------------------------------------
def test_missing_toy_weights_are_all_listed(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    weights = shadow(env.weights, tmp_path / "weights", {"vae": None, "gpt2/model.safetensors": None})
    refused(
        env,
        capsys,
        "2",
        ("--set", f"paths.weights_root={weights}"),
        (
            rf"WeightsError: missing toy weights under {lit(weights)}: vae/, gpt2/model\.safetensors",
            "python download_dataset.py --toy-weights",
        ),
        code=1,
    )


def test_missing_paper_weights_are_all_listed(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    line = refused(
        env,
        capsys,
        "2",
        ("--set", f"paths.weights_root={tmp_path}", "--set", "model.size=paper"),
        (r"WeightsError: missing 4 weight file\(s\)", "python download_dataset.py --weights"),
        code=1,
    )
    for name in ("bigG", "vae/diffusion_pytorch_model.safetensors", "gpt2/config.json", "gpt2/model.safetensors"):
        assert name in line


@pytest.mark.parametrize(
    ("edit", "why"),
    [(truncate, r"\d+ bytes, its manifest records \d+"), (garble_header, "unreadable header")],
    ids=["truncated", "corrupt"],
)
def test_broken_toy_weights(env: SmokeEnv, good: Path, tmp_path: Path, capsys, edit, why: str) -> None:
    weights = shadow(env.weights, tmp_path / "weights", {"clip/open_clip_model.safetensors": edit})
    refused(
        env,
        capsys,
        "1",
        ("--set", f"paths.weights_root={weights}"),
        (
            rf"WeightsError: toy weight file\(s\) corrupt or truncated: \S+open_clip_model\.safetensors \({why}",
            "rebuild them with",
        ),
        code=1,
    )


def copy_stage1(good: Path, env: SmokeEnv, exp: str, subj: int = 1) -> Path:
    """Another run holding the good run's stage 1 (copytree keeps the mtimes, so its manifest stays fresh)."""
    root = run_root(env, exp, subj)
    shutil.copytree(good / "stage1", root / "stage1")
    return root


def test_stage1_checkpoint_changed_on_disk(env: SmokeEnv, good: Path, capsys) -> None:
    root = copy_stage1(good, env, "truncated")
    truncate(root / "stage1/checkpoints/best/model.safetensors", root / "stage1/checkpoints/best/model.safetensors")
    refused(
        env,
        capsys,
        "2",
        (),
        (
            r"StageOrderError: stage 1 outputs in \S+ are stale: output \S+best/model"
            r"\.safetensors was modified after the stage wrote it",
            "rerun stage 1",
        ),
        code=1,
        exp="truncated",
    )


def test_stage1_checkpoint_bit_rot(env: SmokeEnv, good: Path, capsys) -> None:
    """Same size and mtime (the manifest cannot see it), unreadable content: the loader names the file."""
    root = copy_stage1(good, env, "bitrot")
    path = root / "stage1/checkpoints/best/model.safetensors"
    stat = path.stat()
    garble_header(path, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    refused(
        env,
        capsys,
        "2",
        (),
        (
            r"WeightsError: checkpoint weights \S+best/model\.safetensors are corrupt or "
            "truncated",
            "delete that checkpoint folder and rerun",
        ),
        code=1,
        exp="bitrot",
    )


def test_checkpoint_of_other_shapes_names_keys_and_shapes(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    """The stage-1 model was built for 300 voxels; a data root with 280 gives a model of other shapes."""
    fewer = tensor_edit(lambda x: x[..., :280])
    root = shadow(
        env.world, tmp_path / "toy_cortex_smoke", {"subj01_train_fmri.pt": fewer, "subj01_test_fmri.pt": fewer}
    )
    refused(
        env,
        capsys,
        "2",
        ("--set", f"paths.data_root={root}"),
        (
            r"WeightsError: stage-1 checkpoint \S+ \(ridge\) does not fit the model: shape mismatch: "
            r"linears\.0\.weight \(\d+, 300\) vs \(\d+, 280\)",
            "check that the profile and model size match",
        ),
        code=1,
    )


def test_checkpoint_of_another_subject(env: SmokeEnv, good: Path, capsys) -> None:
    copy_stage1(good, env, "swap", subj=2)
    refused(
        env,
        capsys,
        "2",
        ("--subj", "2"),
        (r"checkpoint \S+ was made for another run: subj='1' \(run has '2'\)",),
        code=1,
        exp="swap",
        subj=2,
    )


def test_checkpoint_of_another_profile(env: SmokeEnv, good: Path, tmp_path: Path, capsys) -> None:
    """A profile of another model size reading this run (same exp_root and exp)."""
    other = tmp_path / "bigger.yaml"
    other.write_text(f"extends: {env.profile}\nmodel:\n  size: toy\n")
    refused(
        env,
        capsys,
        "2",
        (),
        (r"made for another run: model_size='smoke' \(run has 'toy'\)", "load a checkpoint of this profile"),
        code=1,
        profile=other,
    )


# ---- stage order ---------------------------------------------------------------------------------------------------
def test_stage3_without_stage2(env: SmokeEnv, good: Path, capsys) -> None:
    refused(
        env,
        capsys,
        "3",
        ("--mode", "enhance"),
        (r"StageOrderError: stage 2 outputs not found in \S+/stage2", r"rerun stage 2: bash train_neurons.sh"),
        code=1,
    )


def test_stage5_refuses_stage3_outputs_older_than_stage2(env: SmokeEnv, good: Path, capsys) -> None:
    """Stage 3 ran on one stage-2 checkpoint; stage 2 was rerun since. (Stages 2 and 3 are recorded as they write
    their manifests, with tiny outputs: only the hand-off is under test.)"""
    from utils.checkpoint import MODEL_FILE, save_checkpoint
    from utils.config import load_config
    from utils.manifest import StageRecorder
    from utils.stage_configs import Stage2Config

    root = copy_stage1(good, env, "stale")
    cfg = load_config(Stage2Config, str(env.profile), [], {"exp": "stale"})
    checkpoint = root / "stage2" / "checkpoints" / "best"

    def run_stage2(width: int) -> None:
        recorder = StageRecorder("2", root / "stage2", "fake", depends_on=("1",)).begin()
        save_checkpoint(checkpoint, {"w": torch.zeros(width)}, cfg, {"step": 1})
        recorder.add_output(checkpoint / MODEL_FILE)
        recorder.finish()

    run_stage2(3)
    recorder = StageRecorder("3", root / "stage3_enhance", "fake", depends_on=("2",)).begin()
    recorder.add_input(checkpoint / MODEL_FILE)
    keyframes = torch.rand(2, 3, 32, 32)
    recorder.add_output(
        atomic_save_safetensors(root / "stage3_enhance" / "keyframes.safetensors", {"keyframes": keyframes})
    )
    recorder.finish()
    run_stage2(4)  # the newer stage-2 run
    refused(
        env,
        capsys,
        "5",
        ("--mode", "enhance"),
        (
            r"StageOrderError: stage 3 outputs in \S+stage3_enhance are stale: input \S+stage2/checkpoints/best/"
            r"model\.safetensors changed after the stage ran",
            "rerun stage 3",
        ),
        code=1,
        exp="stale",
    )


def test_two_runs_in_one_folder(env: SmokeEnv, good: Path, capsys) -> None:
    code = (
        "import sys, time; from pathlib import Path; from utils.runs import run_lock\n"
        "with run_lock(Path(sys.argv[1]), '1'):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(good)], cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(
            env,
            capsys,
            "2",
            (),
            (
                rf"RunLockedError: run folder {lit(good)} is in use by pid {holder.pid} \(stage 1\)",
                "wait for it to finish or use another --exp",
            ),
            code=1,
        )
    finally:
        holder.kill()
        holder.wait()


# ---- faults --------------------------------------------------------------------------------------------------------
def install_fault(mode: str, at: int) -> None:
    """Patch stage 1 (in the forked child) so that fault ``mode`` strikes at its ``at``-th occasion."""
    from pipeline import stage1
    from utils import checkpoint

    calls = [0]

    def nth() -> bool:
        calls[0] += 1
        return calls[0] == at

    if mode in ("kill", "sigint", "sigterm"):  # the signal arrives during training step `at`
        real_step, sig = stage1.step_loss, {"kill": signal.SIGKILL, "sigint": signal.SIGINT}.get(mode, signal.SIGTERM)

        def step_loss(*args, **kwargs):
            if nth():
                os.kill(os.getpid(), sig)
            return real_step(*args, **kwargs)

        stage1.step_loss = step_loss
    elif mode == "write":  # killed half-way through writing the weights of save number `at` of `last`
        real_save = checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if "/.last." in path and nth():
                os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save_file = save_file
    elif mode == "swap":  # killed between the two renames of save number `at` of `last`
        real_swap = checkpoint._swap_in

        def swap_in(tmp, folder):
            if folder.name == "last" and nth():
                os.replace(folder, folder.with_name("last.old"))
                os.kill(os.getpid(), signal.SIGKILL)
            real_swap(tmp, folder)

        checkpoint._swap_in = swap_in


def forked(fn: Callable[[], int], log_path: Path) -> tuple[int, str]:
    """Run ``fn`` in a forked child process (a real process, with this one's imports done) whose stdout and stderr
    go to ``log_path``; returns its exit status (``-signal`` when killed) and that output."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 70
        try:
            from tqdm.std import TqdmDefaultWriteLock, tqdm

            tqdm.set_lock(TqdmDefaultWriteLock())  # not the parent's, which its monitor thread may have held
            out = open(log_path, "w")  # noqa: SIM115 - the child exits below
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.stdout = sys.stderr = out
            status = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child process hung for {CHILD_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(done[1]), log_path.read_text()


def faulty_run(env: SmokeEnv, exp: str, mode: str, at: int) -> tuple[int, str]:
    """Stage 1 of run ``exp`` in a child process hit by fault ``mode``; its exit status and stderr."""
    from utils.cli import run_stage
    from utils.stage_configs import Stage1Config

    module = importlib.import_module(SCRIPTS["1"])

    def child() -> int:
        # a shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: restore the default
        # handler (KeyboardInterrupt), as in a terminal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        install_fault(mode, at)
        argv = ["--profile", str(env.profile), "--exp", exp, *LOG]
        return run_stage(Stage1Config, module.main, module.__doc__, argv)

    return forked(child, env.exp_root.parent / f"{exp}.stderr")


def resume_matches_good(env: SmokeEnv, good: Path, exp: str) -> None:
    assert run_cli(env, "1", *LOG, "--resume", exp=exp) == 0
    stage_dir = run_root(env, exp) / "stage1"
    assert same_weights(final_weights(stage_dir), final_weights(good / "stage1"))
    assert not [p for p in (stage_dir / "checkpoints").iterdir() if p.name.startswith(".") or p.suffix == ".old"]


def last_step(stage_dir: Path) -> int:
    from utils.checkpoint import resolve_checkpoint

    return int(
        torch.load(resolve_checkpoint(stage_dir / "checkpoints" / "last") / "state.pt", weights_only=True)["step"]
    )


def test_kill_9_during_training_then_resume(env: SmokeEnv, good: Path) -> None:
    status, _ = faulty_run(env, "kill", "kill", 7)  # step 7 = epoch 1, batch 1
    assert status == -signal.SIGKILL
    assert last_step(run_root(env, "kill") / "stage1") == 5  # the end of epoch 0
    resume_matches_good(env, good, "kill")


@pytest.mark.parametrize("mode", ["write", "swap"])
def test_kill_9_during_a_checkpoint_write(env: SmokeEnv, good: Path, mode: str) -> None:
    from utils.checkpoint import read_weights, resolve_checkpoint

    exp = f"kill_{mode}"
    status, _ = faulty_run(env, exp, mode, 2)  # the second save of `last` (end of epoch 1)
    assert status == -signal.SIGKILL
    checkpoints = run_root(env, exp) / "stage1" / "checkpoints"
    assert [p.name for p in checkpoints.glob(".last.*")], "the killed save left its temporary folder"
    found = resolve_checkpoint(checkpoints / "last")
    assert found.name == {"write": "last", "swap": "last.old"}[mode]  # the previous `last`, whole
    assert read_weights(found)[0] and last_step(checkpoints.parent) == 5
    resume_matches_good(env, good, exp)  # loads it, finishes, and the next save clears the leftovers


@pytest.mark.parametrize(
    ("mode", "status", "what"),
    [("sigint", 130, "interrupted"), ("sigterm", 143, r"terminated \(SIGTERM\)")],
    ids=["sigint", "sigterm"],
)
def test_signal_saves_last_and_exits_cleanly(env: SmokeEnv, good: Path, mode: str, status: int, what: str) -> None:
    code, stderr = faulty_run(env, mode, mode, 7)
    assert code == status, stderr[-2000:]
    error_line(stderr, rf"^error: {what}; fix: rerun the stage with --resume")
    assert last_step(run_root(env, mode) / "stage1") == 6  # saved at the signal: the 6 steps done so far
    resume_matches_good(env, good, mode)


def test_full_disk_during_a_checkpoint_write(env: SmokeEnv, good: Path, capsys, monkeypatch) -> None:
    from safetensors import SafetensorError

    from utils import checkpoint

    checkpoints, real, seen = run_root(env, "full") / "stage1" / "checkpoints", checkpoint.save_file, {}

    def full_disk(tensors, path, metadata=None):
        if "/.last." in path:
            seen["last"] = seen.get("last", 0) + 1
            if seen["last"] == 2:
                seen["before"] = snapshot(checkpoints)
                Path(path).write_bytes(b"\0" * 4096)  # what fitted on the disk
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    capsys.readouterr()
    assert run_cli(env, "1", *LOG, exp="full") == 1
    error_line(
        capsys.readouterr().err,
        rf"StorageError: cannot write {lit(checkpoints)}/last: no space left on device",
        "nothing partial was left",
        "fix: free space under",
    )
    assert_untouched(checkpoints, seen["before"])  # the earlier checkpoints intact, no temporary left
    monkeypatch.setattr(checkpoint, "save_file", real)
    resume_matches_good(env, good, "full")  # the suggested fix


def test_full_disk_during_a_json_write(env: SmokeEnv, good: Path, capsys, monkeypatch) -> None:
    stage_dir, real = run_root(env, "full_json") / "stage1", Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name.startswith(".identification.json."):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    capsys.readouterr()
    assert run_cli(env, "1", *LOG, exp="full_json") == 1
    error_line(capsys.readouterr().err, rf"StorageError: cannot write {lit(stage_dir)}/identification\.json: no space")
    assert not [p.name for p in stage_dir.rglob(".*")]  # no temporary file
    assert not (stage_dir / "identification.json").exists() and not (stage_dir / "manifest.json").exists()
    assert last_step(stage_dir) == last_step(good / "stage1")  # the checkpoints of the finished training are whole


WRITERS = {
    "safetensors": lambda path: atomic_save_safetensors(path, {"x": torch.zeros(4096)}),
    "torch": lambda path: atomic_torch_save(path, {"x": torch.zeros(4096)}),
    "text": lambda path: atomic_write_text(path, "x" * 16384),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_real_write_failure_leaves_no_partial_file(tmp_path: Path, writer: str) -> None:
    """The OS refuses the write (a file-size limit, EFBIG: the same path through the writers as ENOSPC): each
    writer raises StorageError naming the file, the previous version stays, and no temporary file is left."""
    import resource

    from utils.errors import StorageError

    target = tmp_path / "out" / "result.bin"
    WRITERS[writer](target)  # the previous good version
    before = snapshot(target.parent)

    def child() -> int:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            WRITERS[writer](target)
        except StorageError as err:
            print(f"error: StorageError: {err.one_line()}", file=sys.stderr)
            return 1
        return 0

    status, stderr = forked(child, tmp_path / "child.log")
    assert status == 1, stderr
    error_line(stderr, rf"StorageError: cannot write {lit(target)}: ", "nothing partial was left", "fix: free space")
    assert_untouched(target.parent, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(env: SmokeEnv, capsys, monkeypatch, bad: float) -> None:
    from pipeline import stage1

    exp = f"loss_{bad}"
    checkpoints, real, seen = run_root(env, exp) / "stage1" / "checkpoints", stage1.step_loss, {"n": 0}

    def diverging(*args, **kwargs):
        losses = dict(real(*args, **kwargs))
        seen["n"] += 1
        if seen["n"] == 8:  # epoch 1, batch 2
            seen["before"] = snapshot(checkpoints)
            losses["image"] = losses["image"] * bad
            losses["loss"] = losses["image"] + losses["text"]
        return losses

    monkeypatch.setattr(stage1, "step_loss", diverging)
    capsys.readouterr()
    assert run_cli(env, "1", *LOG, exp=exp) == 1
    term = "nan" if bad != bad else "inf"
    error_line(
        capsys.readouterr().err,
        rf"TrainingError: non-finite loss at step 8 \(epoch 1, batch 2\): image {term}, text [\d.]+, loss {term}",
        rf"the last good checkpoint {lit(checkpoints)}/last is kept",
        "lower train.max_lr",
    )
    assert_untouched(checkpoints, seen["before"])
    assert last_step(checkpoints.parent) == 5
    assert all(torch.isfinite(w).all() for w in final_weights(checkpoints.parent).values())


# ---- reporting -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_adds_the_traceback(env: SmokeEnv, tmp_path: Path, capsys, monkeypatch, how: str) -> None:
    if how == "env":
        monkeypatch.setenv("NEURONS_DEBUG", "1")
    args = ("--set", f"paths.data_root={tmp_path / 'nowhere'}", *(["--debug"] if how == "flag" else []))
    assert run_cli(env, "1", *args, exp="debug") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "utils/data.py" in err
    assert err.strip().splitlines()[-1].startswith("error: DataError: data root")
