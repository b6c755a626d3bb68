"""``metafed import`` and ``metafed check-site``: bringing one's own data, on the command line.

    metafed import SRC... --out DIR [--sites-from folder|subfolders] [--image-size H W | --keep-size]
                   [--channels 1|3] [--sample-rate HZ] [--n-fft N] [--hop N] [--frames T]
                   [--clip-seconds S] [--image-name NAME] [--audio-name NAME] [--overwrite]
    metafed import --array NAME=FILE... --labels FILE --out DIR [--kind NAME=KIND] [--mask NAME=FILE]
                   [--sites FILE] [--site-id NAME] [--vocab-size NAME=N] [--overwrite]
    metafed check-site DIR... [--config FILE] [--set section.key=value ...] [--write-schema FILE]

The work is done by :mod:`common.data.importers` and :mod:`common.data.site_report`;
this module parses the arguments, draws the progress bar and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common.config import ConfigError

__all__ = ["add_parsers", "run_import", "run_check_site"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the ``import`` and ``check-site`` subcommands to the ``metafed`` parser."""
    imp = sub.add_parser(
        "import",
        help="write site directories from class folders (PNG/JPEG, WAV) or .npy arrays",
        description="Class folders: SRC/<class>/<file> is one site (or SRC/<site>/<class>/<file> with "
        "--sites-from subfolders); PNG/JPEG files are images, WAV files audio, files sharing a stem one "
        "record. Arrays: one .npy per modality with --array, a labels .npy, optionally a sites .npy (one "
        "site per value). Sites are written to DIR/<site>.",
    )
    imp.add_argument("sources", nargs="*", metavar="SRC", help="folders of class folders")
    imp.add_argument("--out", required=True, metavar="DIR", help="folder the sites are written into (e.g. data/mine/train)")
    imp.add_argument("--sites-from", choices=("folder", "subfolders"), default="folder",
                     help="folder: each SRC is one site (default); subfolders: each sub-folder of SRC is one")
    imp.add_argument("--image-size", nargs=2, type=int, default=(28, 28), metavar=("H", "W"),
                     help="resize images to H x W (Lanczos; default 28 28)")
    imp.add_argument("--keep-size", action="store_true", help="keep the images' own size (all must share it)")
    imp.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1: grayscale (default), 3: RGB")
    imp.add_argument("--sample-rate", type=int, default=8000, help="audio resampled to this rate (default 8000 Hz)")
    imp.add_argument("--n-fft", type=int, default=64, help="STFT window; n_fft // 2 + 1 frequency bins (default 64: 33)")
    imp.add_argument("--hop", type=int, default=32, help="STFT hop in samples (default 32)")
    imp.add_argument("--frames", type=int, default=32, help="time bins of the spectrogram (default 32)")
    imp.add_argument("--clip-seconds", type=float, default=0.0,
                     help="keep the first S seconds of each clip, zero-padded (default 0: the whole clip)")
    imp.add_argument("--image-name", default="image", help="modality name of the images (default image)")
    imp.add_argument("--audio-name", default="audio", help="modality name of the audio (default audio)")
    imp.add_argument("--array", dest="arrays", action="append", default=[], metavar="NAME=FILE",
                     help="a modality's [n, *shape] .npy (repeatable)")
    imp.add_argument("--labels", metavar="FILE", help="[n] .npy of integer or string labels (with --array)")
    imp.add_argument("--kind", dest="kinds", action="append", default=[], metavar="NAME=KIND",
                     help="a modality's kind: image, spectrogram, series or tokens (default: from its shape)")
    imp.add_argument("--mask", dest="masks", action="append", default=[], metavar="NAME=FILE",
                     help="bool [n] .npy: False where a record lacks the modality")
    imp.add_argument("--sites", metavar="FILE", help="[n] .npy of site ids: one site per value")
    imp.add_argument("--site-id", default="", help="the site's name without --sites (default: the labels file's folder)")
    imp.add_argument("--vocab-size", dest="vocab_sizes", action="append", default=[], metavar="NAME=N",
                     help="vocabulary size of a tokens modality (default: largest id + 1)")
    imp.add_argument("--overwrite", action="store_true", help="replace sites already in DIR")

    chk = sub.add_parser(
        "check-site",
        help="validate site directories without training: a table per site, exit 2 on any problem",
        description="DIR is a site (it holds manifest.yaml), a folder of sites, or a data root with "
        "train/ and test/. With --config or --set, the sites are also checked against the experiment's "
        "episodes (episodes.ways, shots + query_shots) and data.schema_file.",
    )
    chk.add_argument("dirs", nargs="+", metavar="DIR")
    chk.add_argument("--config", help="YAML experiment file whose episodes and schema the sites must serve")
    chk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    chk.add_argument("--write-schema", metavar="FILE",
                     help="write the schema inferred from the sites' manifests (a data.schema_file)")


# --------------------------------------------------------------------------- import


class ProgressBar:
    """A one-line progress bar on stderr, redrawn in place on a terminal and silent elsewhere."""

    def __init__(self, *, stream=None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.live or total <= 0:
            return
        filled = int(self.width * done / total)
        self.stream.write(f"\r{what[:24]:<24} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option} expects NAME=VALUE, got {item!r}")
        if name in out:
            raise ConfigError(f"{option} gives {name!r} twice")
        out[name] = value
    return out


def run_import(args: argparse.Namespace) -> int:
    from common.data.importers import ImageSettings, SpectrogramSettings, import_arrays, import_class_folders
    from common.data.site import read_manifest

    progress = ProgressBar()
    out = Path(args.out)
    if args.arrays:
        if args.sources:
            raise ConfigError("give either folders (SRC...) or arrays (--array NAME=FILE), not both")
        arrays = _pairs(args.arrays, "--array")
        if not args.labels:
            raise ConfigError("--array needs --labels FILE: the [n] labels of the records")
        try:
            vocab = {k: int(v) for k, v in _pairs(args.vocab_sizes, "--vocab-size").items()}
        except ValueError:
            raise ConfigError("--vocab-size expects NAME=N with N a whole number") from None
        written = import_arrays(
            arrays, args.labels, out, kinds=_pairs(args.kinds, "--kind"),
            masks=_pairs(args.masks, "--mask"), sites=args.sites, site_id=args.site_id, vocab_sizes=vocab,
            overwrite=args.overwrite, progress=progress,
        )
    else:
        if not args.sources:
            raise ConfigError("nothing to import: give folders of class folders (SRC...) or --array NAME=FILE")
        if args.labels or args.sites or args.kinds or args.masks or args.vocab_sizes:
            raise ConfigError("--labels, --sites, --kind, --mask and --vocab-size go with --array, not with folders")
        try:
            image = ImageSettings(size=None if args.keep_size else tuple(args.image_size), channels=args.channels)
            spectrogram = SpectrogramSettings(sample_rate=args.sample_rate, n_fft=args.n_fft, hop=args.hop,
                                              frames=args.frames, clip_seconds=args.clip_seconds)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        written = []
        for src in args.sources:
            written += import_class_folders(
                src, out, sites_from=args.sites_from, image=image, spectrogram=spectrogram,
                image_name=args.image_name, audio_name=args.audio_name, overwrite=args.overwrite,
                progress=progress,
            )
    for site in written:
        manifest = read_manifest(site)
        mods = ", ".join(f"{m} {list(s.shape)}" for m, s in manifest["specs"].items())
        print(f"{site}: {manifest['num_records']} records, {len(manifest['class_names'])} classes, {mods}")
    print(f"{len(written)} site(s) written; check them with: metafed check-site {out}")
    return 0


# --------------------------------------------------------------------------- check-site


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def site_folders(dirs: list[str]) -> tuple[list[Path], list[str]]:
    """The site folders that ``dirs`` name, and a problem for each that names none."""
    from common.data.site import MANIFEST

    sites: list[Path] = []
    problems: list[str] = []
    for d in map(Path, dirs):
        if (d / MANIFEST).is_file():
            sites.append(d)
        elif not d.is_dir():
            problems.append(f"{d}: no such folder. Fix: point at a site folder, a folder of sites, or a data root")
        elif (d / "train").is_dir() or (d / "test").is_dir():
            sites += [p for split in ("train", "test") if (d / split).is_dir() for p in _visible_dirs(d / split)]
        elif any((p / MANIFEST).is_file() for p in _visible_dirs(d)):
            sites += _visible_dirs(d)
        else:
            problems.append(
                f"{d}: holds no manifest.yaml and no site folders. Fix: point at a site folder (write one with "
                "`metafed import`), a folder of sites, or a data root with train/ and test/"
            )
    return sites, problems


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_report(report) -> str:
    """The table for one site (a :class:`common.data.site_report.SiteReport`)."""
    head = f"{report.path}" + (f"  (site_id {report.site_id})" if report.site_id else "")
    lines = [f"{head}  {'ok' if report.ok else 'PROBLEM'}"]
    if report.num_records:
        counts = report.records_per_class
        lines.append(
            f"  records {report.num_records}, classes {len(report.class_names)}, records per class "
            f"min {min(counts)} / median {statistics.median(counts):g} / max {max(counts)}"
        )
        rows = [("modality", "kind", "shape", "dtype", "missing")] + [
            (m.name, m.kind, str(list(m.shape)), m.dtype, _percent(m.missing_rate)) for m in report.modalities
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        sizes = ", ".join(f"<= {r} -> {w}-way" for r, w in report.episode_sizes) or "none"
        lines.append(f"  episodes (shots + query_shots per class -> most ways): {sizes}")
    lines += [f"  problem: {p}" for p in report.problems]
    return "\n".join(lines)


def run_check_site(args: argparse.Namespace) -> int:
    from common.config import load
    from common.data.schema_inference import infer_schema, read_schema_file, write_schema_file
    from common.data.site import SiteDataError
    from common.data.site_report import check_site

    use_config = bool(args.config or args.overrides)
    config = load(args.config, overrides=args.overrides) if use_config else None
    sites, problems = site_folders(args.dirs)
    schema, source = None, ""
    if config is not None and config.data.schema_file:
        schema = read_schema_file(config.data.schema_file)
        source = f"data.schema_file {config.data.schema_file}"
    elif sites:
        try:
            schema = infer_schema(sites, skip_unreadable=True)
            source = f"inferred from the manifests of {len(sites)} site(s)"
        except SiteDataError as err:
            problems.append(str(err))
    episodes = {}
    if config is not None:
        e = config.episodes
        episodes = {"ways": e.ways, "records_per_episode_class": max(e.effective_train_shots, e.shots) + e.query_shots}
    bad = len(problems)
    for site in sites:
        report = check_site(site, schema=schema, allow_external_links=bool(config and config.data.allow_external_links),
                            **episodes)
        print(format_report(report))
        bad += not report.ok
    if schema:
        described = "; ".join(f"{m} {s.kind} {list(s.shape)} {s.dtype}" for m, s in schema.items())
        print(f"schema ({source}): {described}")
        if args.write_schema and not problems:
            print(f"schema written to {write_schema_file(args.write_schema, schema)} (use it as data.schema_file)")
    for p in problems:
        print(f"problem: {p}")
    ok = len(sites) - (bad - len(problems))
    print(f"{len(sites)} site(s) checked: {ok} ok, {len(sites) - ok} with problems"
          + (f"; {len(problems)} problem(s) beyond single sites (above)" if problems else ""))
    return 2 if bad else 0
