"""`python -m trainer_core ...`: make-tiny-model, prep, train, generate, import-adapter, runs,
evaluate, export-checkpoint.

Progress goes to stderr (drawn here from the engine's events); `train` ends stdout with one JSON
line. Bad arguments or input exit non-zero with one line, never a traceback. Ctrl-C during
training asks the engine to stop: it saves a checkpoint and a usable adapter, then exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .config import EVAL_MODELS, SUBJECT_TYPES

EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(Exception):
    pass


def _train_fields() -> list[dataclasses.Field]:
    from .config import TrainConfig

    return list(dataclasses.fields(TrainConfig))


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, help text from the field; unset flags are not sent."""
    p.add_argument("--config", metavar="FILE.json", help="Start from this config file; flags override it.")
    for f in _train_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=f.name.upper() if kind is str else None,
        )


def _config_from_args(args: argparse.Namespace):
    from .config import TrainConfig

    values: dict[str, Any] = {}
    if args.config:
        try:
            values = TrainConfig.load(args.config).to_dict()
        except OSError as e:
            raise ValueError(f"config: cannot read {args.config} ({e.strerror})") from None
    given = {f.name: getattr(args, f.name) for f in _train_fields() if hasattr(args, f.name)}
    # A class prompt on the command line turns prior preservation on unless told otherwise.
    if given.get("class_prompt") and "with_prior_preservation" not in given:
        given["with_prior_preservation"] = True
    values.update(given)
    for required in ("instance_dir", "instance_prompt", "output_dir"):
        if not values.get(required):
            raise ValueError(f"{required}: --{required.replace('_', '-')} is required")
    return TrainConfig.from_dict(values)


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _ProgressPrinter:
    """Draws the engine's events on stderr: a tqdm bar per stage with a total, lines otherwise."""

    def __init__(self) -> None:
        self.bar = None
        self.stage = ""

    def __call__(self, event) -> None:
        from tqdm import tqdm

        from . import events as ev

        if isinstance(event, ev.StageStarted):
            self._close()
            self.stage = event.stage
            if event.total:
                self.bar = tqdm(total=event.total, desc=event.stage, file=sys.stderr, dynamic_ncols=True)
            else:
                print(f"[{event.stage}] {event.message}", file=sys.stderr)
        elif isinstance(event, ev.Progress) and self.bar is not None:
            self.bar.n = event.current
            self.bar.refresh()
        elif isinstance(event, ev.StepMetrics):
            if self.stage != "train":  # back from a checkpoint or validation round: a training bar again
                self._close()
                self.bar = tqdm(total=event.total_steps, desc="train", file=sys.stderr, dynamic_ncols=True)
                self.stage = "train"
            if self.bar is not None:
                self.bar.n = event.step
                post = {"loss": f"{event.loss:.4f}", "inst": f"{event.instance_loss:.4f}"}
                if event.prior_loss is not None:
                    post["prior"] = f"{event.prior_loss:.4f}"
                self.bar.set_postfix(post, refresh=True)
        elif isinstance(event, ev.CheckpointSaved | ev.SamplesSaved):
            if self.bar is not None:
                self.bar.write(f"step {event.step}: {type(event).__name__}", file=sys.stderr)
        elif isinstance(event, ev.Finished | ev.Failed):
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_make_tiny_model(args) -> int:
    from .components import make_tiny_model

    _quiet_libraries()
    out = make_tiny_model(args.out_dir, arch=args.arch, seed=args.seed)
    print(json.dumps({"model_dir": str(out), "arch": args.arch}))
    return 0


@contextlib.contextmanager
def _first_ctrl_c_stops(message: str):
    """Within the block, the first Ctrl-C asks the engine to stop (the yielded `should_stop` turns
    true, `message` is printed) and a second one aborts at once (KeyboardInterrupt)."""
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print(f"{message} (Ctrl-C again to abort)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: stop["requested"]
    finally:
        signal.signal(signal.SIGINT, previous)


def _prep_fields() -> list[dataclasses.Field]:
    from .prep import PrepOptions

    return list(dataclasses.fields(PrepOptions))


def cmd_prep(args) -> int:
    from .events import StopRequested
    from .prep import PrepOptions, prepare_photos

    given = {f.name: getattr(args, f.name) for f in _prep_fields() if hasattr(args, f.name)}
    options = PrepOptions(**given)
    if options.caption == "blip":
        _quiet_libraries()
    try:
        with _first_ctrl_c_stops("stopping; the output folder is left as it was") as should_stop:
            report = prepare_photos(
                args.input, args.output, options, emit=_ProgressPrinter(), should_stop=should_stop
            )
    except StopRequested:
        print("error: stopped; nothing was written.", file=sys.stderr)
        return EXIT_STOPPED
    for r in report.rejected:
        print(f"rejected {r.source}: {r.reason}", file=sys.stderr)
    for a in report.accepted:
        for w in a.warnings:
            print(f"warning {a.source}: {w}", file=sys.stderr)
    summary = {
        "output_dir": str(args.output),
        "report": str(Path(args.output) / "report.json"),
        "accepted": len(report.accepted),
        "rejected": len(report.rejected),
    }
    print(json.dumps(summary, sort_keys=True), flush=True)
    if not report.accepted:
        reasons = "; ".join(f"{Path(r.source).name}: {r.reason}" for r in report.rejected[:3])
        more = f" (and {len(report.rejected) - 3} more)" if len(report.rejected) > 3 else ""
        print(f"error: no photo was accepted ({reasons}{more}).", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_edit_photo(args) -> int:
    """One photo of a prepared set: removed, cropped again, or captioned; prints the photo's entry."""
    from . import prep

    chosen = [
        a for a in ("remove", "crop", "box", "focus", "caption") if getattr(args, a) not in (None, False)
    ]
    if len(chosen) != 1:
        raise _UsageError("give exactly one of --remove, --crop, --box, --focus or --caption")
    folder, photo = args.set_dir, args.photo
    if args.remove:
        report = prep.remove_photo(folder, photo)
    elif args.crop:
        report = prep.recrop_auto(folder, photo, args.crop)
    elif args.box:
        report = prep.recrop(folder, photo, _numbers(args.box, 4, "--box"))
    elif args.focus:
        report = prep.recrop_around(folder, photo, _numbers(args.focus, 2, "--focus"), args.side)
    else:
        report = prep.set_caption(folder, photo, args.caption)
    entry = next((a for a in report.accepted if a.output == photo), None)
    summary = {"set": str(folder), "photos": len(report.accepted), "photo": photo, "removed": entry is None}
    if entry is not None:
        summary.update(caption=entry.caption, crop_box=list(entry.crop_box) if entry.crop_box else None)
        summary["warnings"] = list(entry.warnings)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


def _numbers(text: str, count: int, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise _UsageError(f"{flag} takes {count} numbers separated by commas, got {text!r}")
    return values


def cmd_train(args) -> int:
    from .loop import train

    config = _config_from_args(args)
    _quiet_libraries()
    with _first_ctrl_c_stops("stopping after this step") as should_stop:
        result = train(config, emit=_ProgressPrinter(), should_stop=should_stop)
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0:
        print(json.dumps(result.summary, sort_keys=True), flush=True)
    return EXIT_STOPPED if result.status == "stopped" else 0


def cmd_generate(args) -> int:
    from .inference import GenerateRequest, Generator

    adapters = args.adapter or []
    weights = [1.0] * len(adapters)
    if args.adapter_weights:
        try:
            weights = [float(w) for w in args.adapter_weights.split(",")]
        except ValueError:
            raise ValueError(
                f"adapter_weights: expected numbers like 1.0,0.5, got {args.adapter_weights!r}"
            ) from None
        if len(weights) != len(adapters):
            raise ValueError(f"adapter_weights: {len(weights)} weights for {len(adapters)} --adapter folders")
    if not str(args.out).lower().endswith(".png"):
        raise ValueError(f"out: the output file must end in .png, got {args.out}")
    request = GenerateRequest(
        base_model=args.base_model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt or "",
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        seed=args.seed,
        num_images=args.num_images,
        scheduler=args.scheduler,
        adapters=tuple(zip(adapters, weights, strict=True)),
        single_file_config=args.single_file_config,
    )
    _quiet_libraries()
    generator = Generator(max_loaded_adapters=max(8, len(adapters)))
    images = generator.generate(request)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    summary = {"out": str(out), "adapters": generator.loaded_adapters(), "seed": args.seed}
    if len(paths) > 1:
        summary["images"] = [str(p) for p in paths]
    print(json.dumps(summary))
    return 0


def cmd_import_adapter(args) -> int:
    from .adapters import import_adapter, read_adapter

    _quiet_libraries()
    folder = import_adapter(
        args.file,
        args.base_model,
        args.adapters_dir,
        name=args.name,
        single_file_config=args.single_file_config,
    )
    info = read_adapter(folder)
    print(
        json.dumps({"adapter_dir": str(folder), "name": info["name"], "architecture": info["architecture"]})
    )
    return 0


def cmd_runs(args) -> int:
    from . import runs

    if args.action == "list":
        if not Path(args.runs_dir).is_dir():
            raise ValueError(f"runs_dir: {args.runs_dir} is not a folder; give the folder holding the runs")
        print(json.dumps(runs.runs_table(runs.list_runs(args.runs_dir)), sort_keys=True))
        return 0
    if not args.run_dir:
        raise ValueError(f"run_dir: 'runs {args.action}' needs a RUN_DIR")
    if args.action == "show":
        info = runs.read_run(args.run_dir).to_dict()
        info["metrics"] = runs.read_metrics(args.run_dir)
        info["scores"] = runs.read_scores(args.run_dir)
        info["best_checkpoint"] = _best_checkpoint(args.run_dir)
        print(json.dumps(info, sort_keys=True))
        return 0
    runs.delete_run(args.run_dir, args.runs_dir)
    print(json.dumps({"deleted": str(args.run_dir)}))
    return 0


def _best_checkpoint(run_dir):
    from .evaluate import best_checkpoint_for_run

    return best_checkpoint_for_run(run_dir)


def cmd_evaluate(args) -> int:
    from .evaluate import score_checkpoints

    _quiet_libraries()
    rows = score_checkpoints(args.run_dir, args.eval_models, emit=_ProgressPrinter())
    summary = {
        "run_dir": str(args.run_dir),
        "scores": str(Path(args.run_dir) / "scores.jsonl"),
        "scored_steps": [r["step"] for r in rows],
        "best_checkpoint": _best_checkpoint(args.run_dir),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_export_checkpoint(args) -> int:
    from .evaluate import export_checkpoint

    _quiet_libraries()
    folder = export_checkpoint(args.run_dir, args.step, args.out)
    print(json.dumps({"adapter_dir": str(folder), "step": args.step}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m trainer_core", description="DreamBooth LoRA training and generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "make-tiny-model", help="Save a tiny random model (offline; produces noise) for tests."
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument(
        "--arch",
        choices=["sd15", "sdxl"],
        default="sd15",
        help="Architecture: sd15 or sdxl (two text encoders).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser(
        "prep",
        help="Check, crop and caption photos into a training folder (with report.json).",
        description="Check photos by content, crop them to squares around the face (or the busiest "
        "region), caption them, and write them with a .txt caption each and report.json to --output. "
        "Exits 0 when at least one photo was accepted.",
    )
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="Photos or folders (searched recursively; hidden files skipped). Repeatable.",
    )
    p.add_argument(
        "--output", required=True, metavar="DIR", help="New or empty folder (or an earlier prep's)."
    )
    for f in _prep_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {'on' if f.default else 'off'})",
            )
            continue
        choices = {
            "crop": ["auto", "face", "center", "none"],
            "caption": ["blip", "template", "none"],
            "subject_type": list(SUBJECT_TYPES),
        }.get(f.name)
        p.add_argument(
            flag,
            dest=f.name,
            type=int if f.name == "resolution" else str,
            choices=choices,
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser(
        "edit-photo",
        help="Remove, crop again or caption one photo of a prepared set (prep's output folder).",
        description="Edit one photo of a prepared set, as the app's photo editor does: --remove takes "
        "it out (its square, caption, masks and kept original), --crop/--box/--focus crop it again from "
        "its kept original, --caption replaces its caption. Prints the photo's entry as JSON.",
    )
    p.add_argument("set_dir", metavar="SET_DIR", help="A folder written by prep (with report.json).")
    p.add_argument("photo", metavar="PHOTO", help="The prepared photo's file name, e.g. 003-dog.png.")
    p.add_argument("--remove", action="store_true", help="Take the photo out of the set (no undo).")
    p.add_argument("--crop", choices=["auto", "face", "center", "none"], help="Crop again by this mode.")
    p.add_argument("--box", metavar="L,T,R,B", help="Crop again to this square, in the original's pixels.")
    p.add_argument(
        "--focus", metavar="X,Y", help="Crop again as a square centred here, in the original's pixels."
    )
    p.add_argument("--side", type=int, default=None, help="With --focus: the square's side in pixels.")
    p.add_argument("--caption", help="The photo's new caption (empty: none, the instance prompt is used).")
    p.set_defaults(func=cmd_edit_photo)

    p = sub.add_parser(
        "train",
        help="Train a DreamBooth LoRA adapter; prints a JSON summary last.",
        description="Train a DreamBooth LoRA. A --class-prompt turns on prior preservation.",
    )
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="Generate an image with the base model and optional adapters.")
    p.add_argument(
        "--base-model", required=True, help="Hub id, local folder, .safetensors file or tiny-sd15."
    )
    p.add_argument(
        "--single-file-config",
        default=None,
        metavar="ID_OR_PATH",
        help="For a single-file base model: a diffusers folder or Hub id with its configs.",
    )
    p.add_argument(
        "--adapter",
        action="append",
        metavar="DIR",
        help="Adapter folder or training checkpoint folder (repeatable: several are blended).",
    )
    p.add_argument(
        "--adapter-weights",
        metavar="W,W",
        help="Comma-separated weights, one per --adapter (default 1.0 each; 0 turns one off).",
    )
    p.add_argument("--prompt", required=True, help="What to draw; use the adapter's trigger word.")
    p.add_argument("--negative-prompt", default=None, help="What to avoid.")
    p.add_argument("--seed", type=int, default=0, help="Seed; the same seed repeats the image.")
    p.add_argument("--steps", type=int, default=25, help="Sampler steps.")
    p.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale.")
    p.add_argument("--width", type=int, default=None, help="Width in pixels (default: the model's).")
    p.add_argument("--height", type=int, default=None, help="Height in pixels (default: the model's).")
    p.add_argument(
        "--scheduler",
        choices=["dpm++", "euler_a", "ddim"],
        default="dpm++",
        help="Sampler: DPM-Solver++ 2M (default), Euler ancestral or DDIM.",
    )
    p.add_argument(
        "--num-images", type=int, default=1, help="Images to make; the 2nd and later go to FILE-1.png, ..."
    )
    p.add_argument("--out", required=True, metavar="FILE.png", help="Where to write the image.")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "import-adapter",
        help="Add a LoRA .safetensors file (diffusers/peft or kohya keys) to the adapter store.",
        description="Check a LoRA file (safetensors content, no NaN/inf, LoRA keys, fits the base model) "
        "and add it as an adapter folder with diffusers and kohya weights. Pickle files are refused.",
    )
    p.add_argument("file", metavar="FILE", help="The LoRA file (.safetensors).")
    p.add_argument(
        "--base-model",
        required=True,
        help="The model it is for: Hub id, local folder, .safetensors file or tiny model.",
    )
    p.add_argument("--name", default=None, help="Adapter name (default: the file name).")
    p.add_argument(
        "--adapters-dir",
        default="data/adapters",
        metavar="DIR",
        help="The adapter store (default: data/adapters).",
    )
    p.add_argument(
        "--single-file-config",
        default=None,
        metavar="ID_OR_PATH",
        help="For a single-file base model: a diffusers folder or Hub id with its configs.",
    )
    p.set_defaults(func=cmd_import_adapter)

    p = sub.add_parser(
        "runs",
        help="List, show or delete training runs (JSON on stdout).",
        description="Run history: 'list' the runs in --runs-dir (newest first), 'show' one run's config, "
        "status, summary and metrics, 'delete' one run folder (only inside --runs-dir).",
    )
    p.add_argument("action", choices=["list", "show", "delete"], help="What to do.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="The run folder (show, delete).")
    p.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="Folder holding the runs (default: runs)."
    )
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "evaluate",
        help="Score every saved checkpoint of a run (DINO, CLIP-I, CLIP-T, PRES) into scores.jsonl.",
        description="Load each checkpoint's LoRA on the run's base model, render the fixed scene and class "
        "prompts with fixed seeds, and score them against the run's photos: subject fidelity (dino, "
        "clip_i), prompt fidelity (clip_t) and prior preservation (pres, lower is better). Rows go to "
        "RUN_DIR/scores.jsonl; the JSON summary names the best checkpoint by the run's rule.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder.")
    p.add_argument(
        "--eval-models",
        choices=list(EVAL_MODELS),
        default=None,
        help="auto: the real CLIP and DINO models (cached or downloaded); tiny: tiny random models "
        "(offline, for trying the flow); none: off (default: the run's setting).",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "export-checkpoint",
        help="Make a complete adapter folder from one checkpoint of a run.",
        description="Write the LoRA of RUN_DIR's checkpoint at --step as an adapter folder (diffusers and "
        "kohya weights, adapter.json with that step's scores, config, metrics up to the step, samples).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder.")
    p.add_argument("--step", type=int, required=True, metavar="K", help="The checkpoint's step.")
    p.add_argument("--out", required=True, metavar="DIR", help="A new folder for the adapter.")
    p.set_defaults(func=cmd_export_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .events import TrainingError

    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingError, ValueError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: aborted; the last checkpoint and your photos are kept.", file=sys.stderr)
        return EXIT_STOPPED


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
