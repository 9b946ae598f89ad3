"""Annotation files (JSONL or CSV) and caption fusion.

One row per clip::

    {"video": "clips/abc.mp4", "caption": "a man plays guitar", "asr": "so today we...",
     "audio_caption": "guitar music", "label": 3, "start": 12.0, "end": 18.5,
     "qa": [["what is he playing?", "a guitar"]]}

Only ``video`` (a path relative to the dataset root, or absolute) is required. ``caption`` may be a
string or a list of strings (one is drawn per epoch in training, the first is used in evaluation).
``label`` is a class index, or a class name when the reader is given the class names
(``label_names``): ``"label": "dog"`` then means the index of ``"dog"`` in them.

How the InternVideo2 / UMT annotation files map onto this: their JSON lists of
``{"video": ..., "caption": ...}`` rows (MSR-VTT, DiDeMo, WebVid style) load as they are; their
``"avs_captions"`` / ``"fused_caption"`` style rows map to ``caption`` (or set ``caption_key``);
``"asr"`` / ``"speech"`` map to ``asr``; the Kinetics-style ``{"video": ..., "label": ...}``
classification lists map to ``label``. A top-level JSON list (``.json``) is read like JSONL.

:class:`CaptionFusion` builds the fused caption that InternVideo2 stage 2 trains on from the visual
caption, the audio caption and the ASR transcript (the paper fuses them with an LLM; the built-in
fusion is a template, and any callable can replace it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KNOWN_KEYS = ("video", "caption", "asr", "audio_caption", "label", "start", "end", "qa")
#: labels become an int64 tensor in the collate (negative = unlabelled)
LABEL_RANGE = (-(2**63), 2**63 - 1)
ALIASES = {"speech": "asr", "avs_caption": "caption", "fused_caption": "caption", "text": "caption"}


class AnnotationError(ValueError):
    """A row of an annotation file is unusable; the message names the file, the line and why."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


@dataclass
class AnnotationRow:
    video: str
    caption: list[str] = field(default_factory=list)
    asr: str | None = None
    audio_caption: str | None = None
    label: int | None = None
    start: float | None = None
    end: float | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)
    line: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _text(value: Any, key: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{key} is not valid UTF-8 ({err.reason} at byte {err.start})") from err
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string; got {type(value).__name__}")
    try:
        value.encode("utf-8")  # a lone surrogate ("\\ud800" in JSON) would fail later, in the tokenizer
    except UnicodeEncodeError as err:
        raise ValueError(f"{key} is not valid Unicode ({err.reason} at character {err.start})") from err
    return value


def _label(value: Any, label_names: Sequence[str] | None) -> int | None:
    """A row's class index: an integer (negative = unlabelled), or one of ``label_names`` by name."""
    if value in (None, ""):
        return None
    if label_names is not None and isinstance(value, str) and value in label_names:
        return list(label_names).index(value)
    if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
        if label_names is not None:
            raise ValueError(
                f"label {value!r} is neither an integer nor one of label_names {list(label_names)}"
            )
        raise ValueError(f"label must be an integer; got {value!r}")
    label = int(value)
    if not LABEL_RANGE[0] <= label <= LABEL_RANGE[1]:
        raise ValueError(f"label {label} does not fit in a 64-bit integer")
    if label_names is not None and label >= len(label_names):
        raise ValueError(f"label {label} is past the {len(label_names)} label_names {list(label_names)}")
    return label


def parse_row(
    raw: dict[str, Any], path: str | Path, line: int, label_names: Sequence[str] | None = None
) -> AnnotationRow:
    """Validate one raw row; raises :class:`AnnotationError` naming the file, line and field.
    ``label_names``: the class names, so that a row may name its label (see :func:`_label`)."""
    try:
        row = {ALIASES.get(k, k): v for k, v in raw.items()}
        if not row.get("video"):
            raise ValueError("row has no 'video' field")
        captions = row.get("caption")
        if captions is None or captions == "":
            captions = []
        elif isinstance(captions, (str, bytes)):
            captions = [_text(captions, "caption")]
        elif isinstance(captions, list):
            captions = [_text(c, "caption") for c in captions]
        else:
            raise ValueError(f"caption must be a string or a list of strings; got {type(captions).__name__}")
        label = _label(row.get("label"), label_names)
        span = []
        for key in ("start", "end"):
            value = row.get(key)
            if value in (None, ""):
                span.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"{key} must be a number of seconds; got {type(value).__name__}")
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"{key} must be a finite number of seconds >= 0; got {value!r}")
            span.append(seconds)
        if span[0] is not None and span[1] is not None and span[1] <= span[0]:
            raise ValueError(f"end {span[1]} is not after start {span[0]}")
        qa_raw = row.get("qa") or []
        if isinstance(qa_raw, str):
            qa_raw = json.loads(qa_raw)
        if not isinstance(qa_raw, list | tuple):
            raise ValueError(f"qa must be a list of [question, answer] pairs; got {type(qa_raw).__name__}")
        qa = []
        for pair in qa_raw:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ValueError(f"qa must be a list of [question, answer] pairs; got {pair!r}")
            qa.append((_text(pair[0], "qa question"), _text(pair[1], "qa answer")))
        asr = row.get("asr")
        audio_caption = row.get("audio_caption")
        return AnnotationRow(
            video=_text(row["video"], "video"),
            caption=captions,
            asr=_text(asr, "asr") if asr not in (None, "") else None,
            audio_caption=_text(audio_caption, "audio_caption") if audio_caption not in (None, "") else None,
            label=label,
            start=span[0],
            end=span[1],
            qa=qa,
            line=line,
            extra={k: v for k, v in row.items() if k not in KNOWN_KEYS},
        )
    except (ValueError, TypeError, RecursionError) as err:
        raise AnnotationError(path, line, str(err) or type(err).__name__) from err


def _raw_rows(path: Path):
    """Yield (line number, raw dict or an exception) without letting one bad line stop the file."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = data.decode("utf-8", errors="surrogateescape")
        reader = csv.DictReader(io.StringIO(text))
        i = 1
        while True:
            i += 1
            before = reader.line_num
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a field over csv.field_size_limit()
                yield i, ValueError(f"not a valid CSV record ({err})")
                if reader.line_num == before:  # the reader cannot move past it
                    return
                continue
            fixed = {}
            for k, v in rec.items():
                if isinstance(v, str):
                    try:
                        v.encode("utf-8")
                    except UnicodeEncodeError:
                        v = v.encode("utf-8", errors="surrogateescape")  # _text() reports it
                fixed[k] = v
            yield i, fixed
        return
    if suffix == ".json":
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise AnnotationError(path, 0, f"not a JSON list of rows ({err})") from err
        if not isinstance(rows, list):
            raise AnnotationError(
                path, 0, f"a .json annotation file must hold a list of rows; got {type(rows).__name__}"
            )
        for i, rec in enumerate(rows, start=1):
            yield i, rec if isinstance(rec, dict) else ValueError(f"row is not an object: {rec!r}")
        return
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield i, ValueError(f"line is not valid UTF-8 ({err.reason} at byte {err.start})")
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            yield i, ValueError(f"not valid JSON ({err.msg})")
            continue
        except RecursionError:
            yield i, ValueError("not valid JSON (nested too deeply)")
            continue
        yield i, rec if isinstance(rec, dict) else ValueError(f"row is not a JSON object: {rec!r}")


def load_annotations(
    path: str | Path, on_error: str = "raise", label_names: Sequence[str] | None = None
) -> tuple[list[AnnotationRow], list[AnnotationError]]:
    """Read a JSONL / JSON / CSV annotation file.

    Returns the valid rows and the errors of the invalid ones. With ``on_error="raise"`` the first
    invalid row raises :class:`AnnotationError`; with ``"skip"`` invalid rows are left out.
    ``label_names``: the class names in label order; rows may then give their label by name, and an
    integer label past the names is an invalid row.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    rows, errors = [], []
    for line, raw in _raw_rows(path):
        try:
            if isinstance(raw, Exception):
                raise AnnotationError(path, line, str(raw))
            rows.append(parse_row(raw, path, line, label_names))
        except AnnotationError as err:
            if on_error == "raise":
                raise
            errors.append(err)
    return rows, errors


def write_annotations(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSONL (the format ``iv2 synth`` and ``iv2 segment`` produce)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


class CaptionFusion:
    """Merge the visual caption, the audio caption and the ASR transcript into one caption.

    The default template keeps each part recognisable ("a dog runs; sound: barking; speech: come
    here"); parts that are missing are left out. ``fn(caption, audio_caption, asr) -> str``
    replaces the template entirely (e.g. a call into a local LLM, as the paper's fused captions).
    """

    def __init__(
        self,
        template: str = "{caption}; sound: {audio_caption}; speech: {asr}",
        fn: Callable[[str, str | None, str | None], str] | None = None,
    ) -> None:
        self.template = template
        self.fn = fn

    def __call__(self, caption: str, audio_caption: str | None = None, asr: str | None = None) -> str:
        if self.fn is not None:
            return self.fn(caption, audio_caption, asr)
        parts = [p.strip() for p in self.template.split(";")]
        values = {"caption": caption, "audio_caption": audio_caption, "asr": asr}
        kept = []
        for part in parts:
            names = [n for n in values if "{" + n + "}" in part]
            if all(values[n] for n in names):
                kept.append(part.format(**values))
        return "; ".join(kept)
