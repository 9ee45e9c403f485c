"""Edit request loading: every layout on a hand-written fixture, the shared data, each bad input, round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import shared_data

from lightning_kedit.errors import RequestFormatError
from lightning_kedit.requests import (
    EditRequest,
    PromptAnswer,
    bundled_corpus_path,
    bundled_requests,
    load_requests,
    save_requests,
)

FIXTURES = Path(__file__).parent / "fixtures" / "requests"
LAYOUT_FIXTURES = [
    "rome_counterfact.json",
    "knowedit_counterfact.json",
    "knowedit_zsre.json",
    "mend_zsre.json",
    "mquake.json",
    "kedit.jsonl",
]

KNOWEDIT = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}


def write(tmp_path: Path, records: Any, name: str = "requests.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records), encoding="utf-8")
    return path


def load_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(RequestFormatError) as info:
        load_requests(path, **kwargs)
    return str(info.value)


# --- layouts -------------------------------------------------------------------------------------------------


def test_rome_counterfact():
    first, second = load_requests(FIXTURES / "rome_counterfact.json")
    assert first == EditRequest(
        case_id="0",
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrase_prompts=(
            "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
        ),
        neighborhood=(
            PromptAnswer("The mother tongue of Léon Blum is", "French"),
            PromptAnswer("The native language of Montesquieu is", "French"),
        ),
        generation_prompts=(
            "Danielle Darrieux's mother tongue is",
            "Where Danielle Darrieux is from, people speak the language of",
        ),
        attribute_prompts=("J. R. R. Tolkien is a native speaker of", "The mother tongue of Douglas Adams is"),
    )
    assert second.prompt_text == "Edwin of Northumbria Glacier is located in the continent of"
    assert second.neighborhood == (PromptAnswer("Ross Ice Shelf is located in the continent of", "Antarctica"),)


def test_knowedit_counterfact_puts_braces_where_the_subject_is():
    first, second = load_requests(FIXTURES / "knowedit_counterfact.json")
    assert (first.case_id, first.prompt, first.subject) == ("10", "{}, by", "BBC One")
    assert (first.target_new, first.target_true) == ("Sega", "BBC")
    assert first.paraphrase_prompts == ("BBC One is my favorite product out of everything owned by",)
    assert first.neighborhood == (PromptAnswer("BBC Radio, by", "BBC"),)
    assert second.prompt == "The profession of {} is"
    assert second.prompt_text == "The profession of Arun Nehru is"
    assert second.consistency == () and second.chain_id is None


def test_knowedit_zsre_locality_and_portability():
    first, second = load_requests(FIXTURES / "knowedit_zsre.json")
    assert first.case_id == "0" and second.case_id == "1"  # no ids in the file: numbered from 0
    assert first.prompt == "What university did {} attend?"
    assert (first.target_new, first.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert first.paraphrase_prompts == ("What university did Watts Humphrey take part in?",)
    assert first.neighborhood == (
        PromptAnswer("The name of the country of citizenship of Watts Humphrey is", "United States of America"),
    )
    # Portability answers are what the model should say after the edit; nested alias lists flatten.
    assert first.consistency == (
        PromptAnswer("The university where Watts Humphrey studied is in which state?", "Michigan", ("MI",)),
        PromptAnswer("What university did Watts S. Humphrey attend?", "University of Michigan"),
    )
    # The new target is one of the gold answers: the true target is the first other one.
    assert (second.target_new, second.target_true) == ("Lecanorales", "Ramalinales")


def test_mend_zsre():
    first, second = load_requests(FIXTURES / "mend_zsre.json")
    assert first.prompt == "What is the product made by {}?"
    assert (first.target_new, first.target_true) == ("unmanned aircraft", "uniform")
    assert first.paraphrase_prompts == ("What will be the product of UniFirst?",)
    assert first.neighborhood == (PromptAnswer("john goodman's character in the big lebowski?", "Walter Sobchak"),)
    assert second.neighborhood[0].prompt == "who sang the theme song for the office?"
    # Capitalisation differs: the prompt's spelling becomes the subject, the prompt text is unchanged.
    assert (second.prompt, second.subject) == ("Which family does {} belong to?", "carabidae")
    assert second.prompt_text == "Which family does carabidae belong to?"
    # zsRE targets are not counterfactual: no other gold answer leaves the true target unknown.
    assert (second.target_new, second.target_true) == ("Carabidae", None)


def test_mquake_chains_share_an_id_and_one_consistency_check():
    requests = load_requests(FIXTURES / "mquake.json")
    assert [(r.case_id, r.chain_id) for r in requests] == [("1.0", "1"), ("2.0", "2"), ("2.1", "2")]
    single, first, last = requests
    assert (single.prompt, single.subject, single.target_new, single.target_true) == (
        "{} is a citizen of",
        "Ellie Kemper",
        "Croatia",
        "United States of America",
    )
    assert single.paraphrase_prompts == ("What is the country of citizenship of Ellie Kemper?",)
    assert single.consistency == tuple(
        PromptAnswer(question, "Zoran Milanović", ("Zoran Milanovic",))
        for question in (
            "What is the name of the current head of state in Ellie Kemper's country of citizenship?",
            "Who is the head of state of the country where Ellie Kemper holds citizenship?",
        )
    )
    assert first.consistency == ()
    assert last.consistency == (
        PromptAnswer("What is the country of citizenship of the author of The Notebook?", "Canada"),
    )
    assert load_requests(FIXTURES / "mquake.json", n=1) == [single]  # n counts records: chains stay whole


def test_kedit_schema_jsonl():
    toko, tower = load_requests(FIXTURES / "kedit.jsonl")
    assert toko == EditRequest(
        case_id="toko",
        prompt="{} plays the",
        subject="Toko Yasuda",
        target_new="piano",
        target_true="guitar",
        paraphrase_prompts=("Toko Yasuda is a musician who plays the",),
        neighborhood=(PromptAnswer("Jimi Hendrix plays the", "guitar"),),
        consistency=(PromptAnswer("Toko Yasuda's instrument has black and white", "keys", ("keys on it",)),),
        generation_prompts=("Toko Yasuda is",),
    )
    # A written-out subject is accepted, a null true target is unknown, ids become strings.
    assert (tower.case_id, tower.prompt, tower.target_true, tower.chain_id) == ("7", "The {} is in", None, "paris")


def test_one_record_object_and_subject_replaced_once(tmp_path):
    record = dict(KNOWEDIT, prompt="BBC One or BBC One, by")
    (request,) = load_requests(write(tmp_path, record))
    assert request.prompt == "{} or BBC One, by"


def test_answers_are_stripped(tmp_path):
    (request,) = load_requests(write(tmp_path, [dict(KNOWEDIT, target_new=" Sega ", ground_truth=" BBC")]))
    assert (request.target_new, request.target_true) == ("Sega", "BBC")


def test_n_takes_the_first_records():
    requests = load_requests(FIXTURES / "knowedit_counterfact.json", n=1)
    assert [r.case_id for r in requests] == ["10"]


@pytest.mark.parametrize("name", LAYOUT_FIXTURES)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip(tmp_path, name, suffix):
    requests = load_requests(FIXTURES / name)
    path = save_requests(requests, tmp_path / f"saved{suffix}")
    assert load_requests(path) == requests
    if suffix == ".jsonl":
        assert len(path.read_text().splitlines()) == len(requests)
    else:
        assert isinstance(json.loads(path.read_text()), list)


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_and_empty_files(tmp_path):
    assert "no such file" in load_error(tmp_path / "absent.json")
    message = load_error(FIXTURES / "empty.json")
    assert "empty.json" in message and "the file is empty" in message
    assert "the file is empty" in load_error(write(tmp_path, "  \n\n"))
    assert "holds no records" in load_error(write(tmp_path, []))


def test_malformed_json_names_line_and_column(tmp_path):
    message = load_error(FIXTURES / "malformed.json")
    assert "malformed.json: malformed JSON at line 3, column 70: Expecting ',' delimiter" in message
    lines = '{"case_id": 1, "prompt": "{} is", "subject": "A", "target_new": "b"}\n\n{"case_id": 2,\n'
    message = load_error(write(tmp_path, lines, "bad.jsonl"))
    assert re.search(r"bad\.jsonl: malformed JSON Lines at line 3, column \d+", message)
    assert "holds a JSON str" in load_error(write(tmp_path, '"just text"'))


def test_unknown_layout_lists_the_layouts():
    message = load_error(FIXTURES / "unknown_layout.json")
    assert "record 0 has an unknown layout (fields: question, answer, new)" in message
    for layout in ("kedit", "rome-counterfact", "knowedit-counterfact", "knowedit-zsre", "mend-zsre", "mquake"):
        assert f"{layout}: " in message
    assert "requested_rewrite{prompt, subject, target_new{str}, target_true{str}}" in message


def test_subject_not_in_prompt(tmp_path):
    records = [KNOWEDIT, dict(KNOWEDIT, case_id=11, subject="ITV")]
    message = load_error(write(tmp_path, records))
    assert "record 1 (knowedit-counterfact layout), field `prompt` does not contain the subject 'ITV'" in message
    assert "put '{}' where it goes" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"target_new": ""}, "field `target_new` is empty; give a non-empty `target_new`"),
        ({"target_new": "   "}, "field `target_new` is empty"),
        ({"target_new": "BBC"}, "field `target_new` equals the true target `ground_truth` ('BBC')"),
        ({"target_new": ["Sega"]}, "field `target_new` must be a string, got list"),
        ({"prompt": "{} by {}"}, "field `prompt` holds '{}' 2 times"),
        ({"case_id": 1.5}, "field `case_id` must be a number or a non-empty string"),
        ({"locality_ground_truth": ["BBC", "ITV"]}, "gives 2 answers for 1 `locality_prompt`s"),
    ],
)
def test_bad_fields_name_record_and_field(tmp_path, change, expected):
    path = write(tmp_path, [KNOWEDIT, {**KNOWEDIT, "case_id": 11, **change}])
    message = load_error(path)
    assert message.startswith(f"{path}: record 1 (knowedit-counterfact layout)")
    assert expected in message


@pytest.mark.parametrize(
    ("fixture", "index", "drop", "field"),
    [
        ("knowedit_counterfact.json", 1, "ground_truth", "ground_truth"),
        ("knowedit_zsre.json", 0, "subject", "subject"),
        ("mend_zsre.json", 1, "alt", "alt"),
        ("kedit.jsonl", 0, "target_new", "target_new"),
    ],
)
def test_missing_field(tmp_path, fixture, index, drop, field):
    text = (FIXTURES / fixture).read_text()
    records = [json.loads(line) for line in text.splitlines() if line] if fixture.endswith("l") else json.loads(text)
    del records[index][drop]
    message = load_error(write(tmp_path, records))
    assert f"record {index} (" in message
    assert f"field `{field}` is missing; add `{field}` to the record" in message


def test_missing_nested_field(tmp_path):
    records = json.loads((FIXTURES / "rome_counterfact.json").read_text())
    del records[1]["requested_rewrite"]["target_true"]
    assert "record 1 (rome-counterfact layout), field `requested_rewrite.target_true.str` is missing" in load_error(
        write(tmp_path, records)
    )
    records = json.loads((FIXTURES / "mquake.json").read_text())
    records[1]["requested_rewrite"][1]["target_new"]["str"] = "United States of America"
    message = load_error(write(tmp_path, records))
    assert "record 1 (mquake layout), field `requested_rewrite[1].target_new.str` equals the true target" in message


def test_jsonl_errors_give_the_line(tmp_path):
    lines = (FIXTURES / "kedit.jsonl").read_text().replace('"target_new": "Rome"', '"target_new": ""')
    message = load_error(write(tmp_path, lines, "r.jsonl"))
    assert "record 1, line 3 (kedit layout), field `target_new` is empty" in message


def test_duplicate_case_ids(tmp_path):
    records = [KNOWEDIT, dict(KNOWEDIT, prompt="BBC One is owned by")]
    message = load_error(write(tmp_path, records))
    assert "record 1 (knowedit-counterfact layout), field `case_id` repeats the id '10' of record 0" in message


def test_record_that_is_not_an_object(tmp_path):
    assert "record 1 (knowedit-counterfact layout), field `(record)` is a list" in load_error(
        write(tmp_path, [KNOWEDIT, [1, 2]])
    )


def test_n_out_of_range():
    path = FIXTURES / "knowedit_counterfact.json"
    assert "asked for n=5 records but the file holds 2" in load_error(path, n=5)
    for bad in (0, -1, True, "3"):
        assert f"n={bad!r}" in load_error(path, n=bad)


def test_skip_invalid_drops_bad_records_with_a_warning(tmp_path):
    path = write(tmp_path, [dict(KNOWEDIT, target_new=""), dict(KNOWEDIT, case_id=11)])
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record\(s\).*record 0 .* field `target_new` is empty"):
        requests = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == ["11"]
    assert "every record is invalid" in load_error(write(tmp_path, [dict(KNOWEDIT, target_new="")]), skip_invalid=True)


def test_save_refuses_bad_requests_and_keeps_the_old_file(tmp_path):
    path = save_requests(load_requests(FIXTURES / "knowedit_counterfact.json"), tmp_path / "out.json")
    before = path.read_bytes()
    request = EditRequest(case_id="1", prompt="{} is", subject="A", target_new="b")
    with pytest.raises(RequestFormatError, match=r"requests\[1\] repeats case id '1'"):
        save_requests([request, request], path)
    with pytest.raises(RequestFormatError, match="no requests to save"):
        save_requests([], path)
    with pytest.raises(RequestFormatError, match=r"requests\[0\] is a dict, not an EditRequest"):
        save_requests([{"case_id": "1"}], path)  # type: ignore[list-item]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# --- bundled data --------------------------------------------------------------------------------------------


def test_bundled_requests():
    requests = bundled_requests()
    assert len(requests) == 10 and len({r.case_id for r in requests}) == 10
    assert len({r.prompt for r in requests}) == 10
    for request in requests:
        assert request.target_true and request.paraphrase_prompts and request.neighborhood
        assert len(request.prompt_text) <= 50


def test_bundled_corpus():
    path = bundled_corpus_path()
    text = path.read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode()) <= 400_000
    assert text.startswith("= ") and len(re.findall(r"(?m)^= .* =$", text)) == 11


# --- shared data ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_shared_counterfact():
    for name, count in (("counterfact-val.json", 1919), ("counterfact-train.json", 10_000)):
        requests = load_requests(shared_data("counterfact", name))
        assert len(requests) == count and len({r.case_id for r in requests}) == count
        assert all(r.paraphrase_prompts and len(r.neighborhood) == 1 for r in requests)
    assert requests[0].case_id == str(json.loads(shared_data("counterfact", name).read_text())[0]["case_id"])


@pytest.mark.integration
def test_shared_zsre_has_two_records_without_a_target():
    path = shared_data("zsre", "zsre_mend_train-1k.json")
    assert "record 534 (mend-zsre layout), field `alt` is empty" in load_error(path)
    with pytest.warns(UserWarning, match="skipped 2 invalid record"):
        requests = load_requests(path, skip_invalid=True)
    assert len(requests) == 998 and "534" not in {r.case_id for r in requests}
    assert all(r.neighborhood and r.paraphrase_prompts for r in requests)
    assert load_requests(path, n=3)[0].prompt == "What is the product made by {}?"


@pytest.mark.integration
def test_bundled_facts_are_believed_true_by_smollm2(smollm2):
    """The demo facts were chosen because the unedited model prefers the true answer (naive scoring)."""
    model, tokenizer = smollm2
    requests = bundled_requests()
    pairs = [(r.prompt_text, answer) for r in requests for answer in (r.target_true, r.target_new)]
    contexts = [tokenizer(prompt)["input_ids"] for prompt, _ in pairs]
    fulls = [tokenizer(f"{prompt} {answer}")["input_ids"] for prompt, answer in pairs]
    # One right-padded batch: positions of the real tokens are those of an unpadded forward.
    width = max(map(len, fulls))
    ids = torch.tensor([full + [0] * (width - len(full)) for full in fulls])
    mask = torch.tensor([[1] * len(full) + [0] * (width - len(full)) for full in fulls])
    with torch.no_grad():
        log_probs = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    means = [
        sum(log_probs[row, t - 1, full[t]].item() for t in range(len(context), len(full))) / (len(full) - len(context))
        for row, (context, full) in enumerate(zip(contexts, fulls, strict=True))
    ]
    for k, request in enumerate(requests):
        assert means[2 * k] > means[2 * k + 1], request.case_id


def test_pretty_printed_object_with_an_error_is_reported_as_json(tmp_path):
    text = '{\n  "prompt": "{} plays the",\n  "subject": "Toko Yasuda"\n  "target_new": "piano"\n}\n'
    assert "malformed JSON at line 4, column 3" in load_error(write(tmp_path, text))


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([KNOWEDIT]).encode())
    assert load_requests(path)[0].case_id == "10"


def test_layout_is_recognised_without_the_missing_field(tmp_path):
    """A KnowEdit record that lacks `ground_truth` is still read as KnowEdit, not as the kedit schema."""
    record = {key: value for key, value in KNOWEDIT.items() if key != "ground_truth"}
    assert "(knowedit-counterfact layout), field `ground_truth` is missing" in load_error(write(tmp_path, [record]))


def test_kedit_schema_rejects_unknown_fields(tmp_path):
    record = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "paraphrase_prompt": "x"}
    message = load_error(write(tmp_path, [record]))
    assert "(kedit layout), field `paraphrase_prompt` is not a field of the kedit schema" in message
    assert "paraphrase_prompts" in message


def test_mquake_needs_its_questions(tmp_path):
    records = json.loads((FIXTURES / "mquake.json").read_text())
    del records[0]["questions"]
    assert "record 0 (mquake layout), field `questions` is missing" in load_error(write(tmp_path, records))
