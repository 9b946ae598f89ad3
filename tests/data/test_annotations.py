"""Annotation files: JSONL / JSON / CSV rows, validation errors that name file:line, caption fusion."""

import json

import pytest

from iv2_lightning.data.annotations import AnnotationError, CaptionFusion, load_annotations, write_annotations


def test_jsonl_rows_with_every_field(tmp_path):
    path = write_annotations(
        tmp_path / "a.jsonl",
        [
            {
                "video": "a.mp4",
                "caption": ["one", "two"],
                "asr": "hi",
                "audio_caption": "music",
                "label": 3,
                "start": 1.5,
                "end": 4,
                "qa": [["q?", "a"]],
                "source": "web",
            },
            {"video": "b.mp4", "speech": "aliased asr", "text": "aliased caption"},
        ],
    )
    rows, errors = load_annotations(path)
    assert errors == []
    a, b = rows
    assert (a.video, a.caption, a.asr, a.audio_caption, a.label, a.start, a.end) == (
        "a.mp4",
        ["one", "two"],
        "hi",
        "music",
        3,
        1.5,
        4.0,
    )
    assert a.qa == [("q?", "a")] and a.extra == {"source": "web"} and a.line == 1
    assert (b.asr, b.caption, b.label) == ("aliased asr", ["aliased caption"], None)


def test_csv_and_json_list(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text(
        'video,caption,label,start,end,qa\nx.mp4,a cat,2,,,"[[""q"", ""a""]]"\n', encoding="utf-8"
    )
    rows, _ = load_annotations(csv_path)
    assert (rows[0].video, rows[0].caption, rows[0].label, rows[0].start, rows[0].qa) == (
        "x.mp4",
        ["a cat"],
        2,
        None,
        [("q", "a")],
    )
    assert rows[0].line == 2
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps([{"video": "y.mp4", "caption": "c"}]))
    assert load_annotations(json_path)[0][0].video == "y.mp4"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"caption": "no video here"}', "row has no 'video' field"),
        (b'{"video": "a.mp4", "caption": "\xff\xfe broken"}', "line is not valid UTF-8"),
        (b'{"video": "a.mp4", "label": "three"}', "label must be an integer; got 'three'"),
        (b'{"video": "a.mp4", "start": 5, "end": 2}', "end 2.0 is not after start 5.0"),
        (b'{"video": "a.mp4", "qa": [["only a question"]]}', "qa must be a list of"),
        (b'{"video": "a.mp4", "caption": 7}', "caption must be a string or a list of strings; got int"),
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "row is not a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"video": "ok.mp4"}\n' + line + b"\n")
    with pytest.raises(AnnotationError, match=rf"bad.jsonl:2: .*{reason[:20]}") as info:
        load_annotations(path, on_error="raise")
    assert info.value.line == 2 and reason in info.value.reason
    rows, errors = load_annotations(path, on_error="skip")
    assert [r.video for r in rows] == ["ok.mp4"] and len(errors) == 1 and errors[0].line == 2


def test_csv_caption_with_invalid_utf8(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"video,caption\nok.mp4,fine\nx.mp4,\xff\xfebad\n")
    rows, errors = load_annotations(path, on_error="skip")
    assert [r.video for r in rows] == ["ok.mp4"]
    assert "caption is not valid UTF-8" in errors[0].reason and errors[0].line == 3


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_annotations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'; got 'ignore'"):
        load_annotations(tmp_path / "nope.jsonl", on_error="ignore")


def test_caption_fusion_template_and_custom_function():
    fuse = CaptionFusion()
    assert fuse("a dog runs", "barking", "come here") == "a dog runs; sound: barking; speech: come here"
    assert fuse("a dog runs", None, "come here") == "a dog runs; speech: come here"
    assert fuse("a dog runs") == "a dog runs"
    custom = CaptionFusion(fn=lambda c, a, s: f"{c.upper()} ({a})")
    assert custom("x", "y", None) == "X (y)"


def test_labels_by_class_name(tmp_path):
    names = ["dog", "cat", "3"]
    path = tmp_path / "named.csv"
    path.write_text("video,label\na.mp4,cat\nb.mp4,0\nc.mp4,\nd.mp4,-1\ne.mp4,3\nf.mp4,bird\ng.mp4,5\n")
    rows, errors = load_annotations(path, on_error="skip", label_names=names)
    # a name counts before a number: the class called "3" is index 2
    assert [(r.video, r.label) for r in rows] == [
        ("a.mp4", 1),
        ("b.mp4", 0),
        ("c.mp4", None),
        ("d.mp4", -1),
        ("e.mp4", 2),
    ]
    assert [(e.line, e.reason) for e in errors] == [
        (7, "label 'bird' is neither an integer nor one of label_names ['dog', 'cat', '3']"),
        (8, "label 5 is past the 3 label_names ['dog', 'cat', '3']"),
    ]
    # without the names, a name is an error as before
    assert "label must be an integer; got 'cat'" in load_annotations(path, on_error="skip")[1][0].reason
