"""Which captions drive video generation (stage 5): stage 4's BLIP-2 captions of the keyframes when they are current,
else stage 3's brain-decoded GPT-2 captions (spec §5).

"Current" means: stage 4's manifest is fresh (its outputs unmodified and its inputs unchanged, recursively through
stage 3 and below), it was made from the keyframes file stage 3 holds now, and it captions as many clips as stage 3
decoded. A rerun of stage 3 rewrites the keyframes, so stage 4's manifest no longer matches them and the GPT-2
captions are used until stage 4 is rerun.

``video.caption_source`` of a stage-5 config picks: ``auto`` (the rule above), ``blip2`` (stage 4 required: refuse
when it is not current) or ``gpt2`` (always stage 3). Configs without it behave as ``auto``. Under ``auto`` the
fallback to GPT-2 happens only with ``video.caption_fallback`` true (with a warning); false (the paper profiles)
refuses, naming the fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from utils.errors import ConfigError, StageOrderError
from utils.manifest import require_stage
from utils.runs import RunPaths, rerun_hint
from utils.stage_configs import SharedConfig

log = logging.getLogger(__name__)

Source = Literal["blip2", "gpt2"]
KEYFRAMES_FILE = "keyframes.safetensors"  # stage 3's keyframes, the input that stage 4's freshness is tied to
CAPTIONS_FILE = "captions.json"  # the name in both stage folders (stage 3: {"captions": [...]}, stage 4: [...])
SOURCES = ("auto", "blip2", "gpt2")


def _read_list(path: Path, key: str | None, hint: str, stage: str) -> list[str]:
    try:
        obj = json.loads(path.read_text())
        caps = obj[key] if key is not None else obj
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StageOrderError(f"stage-{stage} captions {path} are unreadable ({type(err).__name__})",
                              hint.format(stage=stage)) from None  # fmt: skip
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise StageOrderError(f"stage-{stage} captions {path} are not a list of strings", hint.format(stage=stage))
    return caps


def gpt2_captions(cfg: SharedConfig) -> list[str]:
    """Stage 3's GPT-2 captions (stage 3 must be fresh)."""
    paths, hint = RunPaths.from_config(cfg), rerun_hint(cfg)
    require_stage("3", paths.stage_dir("3"), paths.stage_dirs(), hint)
    return _read_list(paths.stage_dir("3") / CAPTIONS_FILE, "captions", hint, "3")


def blip2_captions(cfg: SharedConfig) -> list[str]:
    """Stage 4's BLIP-2 captions; raises :class:`StageOrderError` unless they are current for stage 3's keyframes."""
    paths, hint = RunPaths.from_config(cfg), rerun_hint(cfg)
    stage3, stage4 = paths.stage_dir("3"), paths.stage_dir("4")
    manifest = require_stage("4", stage4, paths.stage_dirs(), hint)  # also requires stages 3, 2, 1 to be fresh
    keyframes = (stage3 / KEYFRAMES_FILE).resolve()
    if str(keyframes) not in manifest.get("inputs", {}):
        raise StageOrderError(f"stage 4 in {stage4} was not made from the current stage-3 keyframes {keyframes}",
                              hint.format(stage=4))  # fmt: skip
    caps = _read_list(stage4 / CAPTIONS_FILE, None, hint, "4")
    n3 = len(_read_list(stage3 / CAPTIONS_FILE, "captions", hint, "3"))
    if len(caps) != n3:
        raise StageOrderError(f"stage 4 has {len(caps)} captions but stage 3 decoded {n3} clips",
                              hint.format(stage=4))  # fmt: skip
    return caps


def select_captions(cfg: SharedConfig) -> tuple[list[str], Source]:
    """The captions for video generation and their source, ``"blip2"`` (stage 4) or ``"gpt2"`` (stage 3).

    Stage 3 must be fresh whatever the source. See the module docstring for the rule and ``video.caption_source``.
    """
    video = getattr(cfg, "video", None)
    wanted = getattr(video, "caption_source", "auto")
    if wanted not in SOURCES:
        raise ConfigError(f"video.caption_source={wanted!r} is not one of {SOURCES}",
                          "--set video.caption_source=auto")  # fmt: skip
    gpt2 = gpt2_captions(cfg)  # checks stage 3 first: nothing is usable without it
    if wanted == "gpt2":
        log.info("captions: stage 3's GPT-2 captions (video.caption_source=gpt2)")
        return gpt2, "gpt2"
    try:
        caps = blip2_captions(cfg)
    except StageOrderError as err:
        if wanted == "blip2":
            raise
        if not getattr(video, "caption_fallback", False):
            raise StageOrderError(
                f"stage 4's BLIP-2 captions are not current ({err.cause}) and video.caption_fallback is false",
                f"{err.fix or rerun_hint(cfg).format(stage=4)}; or caption with stage 3's GPT-2 captions: "
                "--set video.caption_fallback=true",
            ) from None
        log.warning("captions: stage 3's GPT-2 captions, since stage 4's BLIP-2 captions are not current (%s)",
                    err.cause)  # fmt: skip
        return gpt2, "gpt2"
    log.info("captions: stage 4's BLIP-2 captions of the stage-3 keyframes")
    return caps, "blip2"
