"""Text files to token windows: headings, blank lines, WikiText punctuation, packing, BOS, bad files."""

from __future__ import annotations

import pytest
import torch

from lightning_kedit.evaluation.text_windows import (
    TextSourceError,
    detokenize_wikitext,
    read_paragraphs,
    text_windows,
    window_batches,
)

# WikiText-2's layout: lines start and end with a space, blank lines hold one space, headings use "=".
WIKITEXT = "\n".join(
    [
        " ",
        " = Homarus gammarus = ",
        " ",
        " Homarus gammarus is a species of lobster , up to 60 cm ( 24 in ) long and 6 @.@ 5 kg . ",
        " ",
        " = = Description = = ",
        " ",
        " It isn 't red ; it 's blue @-@ black , with 1 @,@ 000 eggs . ",
        "",
    ]
)


@pytest.fixture
def wikitext(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKITEXT, encoding="utf-8")
    return path


def test_headings_and_blank_lines_are_dropped(wikitext):
    assert list(read_paragraphs(wikitext)) == [
        "Homarus gammarus is a species of lobster, up to 60 cm (24 in) long and 6.5 kg.",
        "It isn't red; it's blue-black, with 1,000 eggs.",
    ]


def test_plain_text_is_unchanged():
    line = "The Eiffel Tower (in Paris) is 330 m tall, isn't it? Yes: it's 1,083 ft."
    assert detokenize_wikitext(line) == line


def test_windows_are_packed_to_full_length(tokenizer, wikitext):
    stream: list[int] = []
    for paragraph in read_paragraphs(wikitext):
        stream += tokenizer(paragraph + "\n", add_special_tokens=False).input_ids
    windows = list(text_windows(tokenizer, wikitext, 16))
    assert [token for window in windows for token in window] == stream
    assert all(len(window) == 16 for window in windows[:-1])
    assert 0 < len(windows[-1]) <= 16


def test_max_tokens_cuts_exactly(tokenizer, wikitext):
    windows = list(text_windows(tokenizer, [wikitext, wikitext], 16, max_tokens=37))
    assert [len(w) for w in windows] == [16, 16, 5]


def test_bos_starts_every_window(tokenizer, wikitext):
    class WithBos:
        bos_token_id = 999

        def __call__(self, text, add_special_tokens=True):
            out = tokenizer(text, add_special_tokens=False)
            if add_special_tokens:
                out["input_ids"] = [999, *out["input_ids"]]
            return out

    windows = list(text_windows(WithBos(), wikitext, 8))
    assert all(window[0] == 999 and 999 not in window[1:] for window in windows)
    assert all(len(window) == 8 for window in windows[:-1])


def test_window_batches_pad_on_the_right():
    batches = list(window_batches([[1, 2, 3], [4, 5, 6], [7]], batch_size=2, pad_id=0))
    assert len(batches) == 2
    ids, mask = batches[1]
    assert ids.tolist() == [[7]] and mask.tolist() == [[1]]
    assert torch.equal(batches[0][1], torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "hold no text"),
        ("\n \n = Only a heading = \n\n", "hold no text"),
        (b"\xff\xfe\x00binary", "not UTF-8"),
    ],
)
def test_unusable_files_are_refused(tokenizer, tmp_path, content, match):
    path = tmp_path / "bad.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(TextSourceError, match=match) as info:
        list(text_windows(tokenizer, path, 16))
    assert "bad.txt" in str(info.value)


def test_missing_file_and_folder_are_refused(tokenizer, tmp_path):
    with pytest.raises(TextSourceError, match="does not exist"):
        list(text_windows(tokenizer, tmp_path / "absent.txt", 16))
    with pytest.raises(TextSourceError, match="is a folder"):
        list(text_windows(tokenizer, tmp_path, 16))
    with pytest.raises(TextSourceError, match="no text files"):
        list(text_windows(tokenizer, [], 16))


@pytest.mark.parametrize("window", [0, 1, 2.5, True])
def test_bad_window_is_refused(tokenizer, wikitext, window):
    with pytest.raises(ValueError, match="window"):
        list(text_windows(tokenizer, wikitext, window))


def test_collect_from_text_counts_every_token(tokenizer, wikitext):
    from tiny_models import tiny_model

    from lightning_kedit.statistics import collect_key_statistics

    total = sum(len(w) for w in text_windows(tokenizer, wikitext, 16))
    stats = collect_key_statistics(tiny_model("gpt2"), tokenizer, [0, 1], wikitext, window=16, batch_size=3)
    assert stats.count(0) == stats.count(1) == total
    assert stats.source == "text:wiki.txt"
    capped = collect_key_statistics(tiny_model("gpt2"), tokenizer, [1], wikitext, window=16, max_tokens=20)
    assert capped.count(1) == 20


def test_bundled_corpus_is_the_default_source(tokenizer):
    from tiny_models import tiny_model

    from lightning_kedit.requests import bundled_corpus_path
    from lightning_kedit.statistics import collect_key_statistics

    stats = collect_key_statistics(tiny_model("gpt2"), tokenizer, [1], max_tokens=100, window=32)
    assert stats.count(1) == 100
    assert stats.source == f"text:{bundled_corpus_path().name}"


def test_progress_bar_shows_tokens_and_rate(tokenizer, wikitext, capsys):
    from tiny_models import tiny_model

    from lightning_kedit.statistics import collect_key_statistics

    collect_key_statistics(tiny_model("gpt2"), tokenizer, [0], wikitext, window=16, max_tokens=40, progress=True)
    err = capsys.readouterr().err
    assert "key statistics" in err and "40.0/40.0" in err and "tok/s" in err and "<00:00" in err
