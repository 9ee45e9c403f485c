"""Edit requests: what fact to write, and the prompts that judge the edit.

`load_requests` reads a JSON file (a list of records, or one record) or a JSON Lines file (one record per
line) and recognises its layout from the first record's fields:

========================  ====================================================================================
layout                    key fields
========================  ====================================================================================
``kedit``                 ``case_id, prompt, subject, target_new[, target_true, paraphrase_prompts,
                          neighborhood, consistency, generation_prompts, chain_id, attribute_prompts]``
``rome-counterfact``      ``requested_rewrite{prompt, subject, target_new{str}, target_true{str}}``,
                          ``paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts``
``knowedit-counterfact``  ``prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
                          locality_ground_truth``
``knowedit-zsre``         ``prompt, subject, target_new, ground_truth (a list), rephrase_prompt,
                          locality{kind: [{prompt, ground_truth}]}, portability{kind: [{prompt, ground_truth}]}``
``mend-zsre``             ``src, subject, alt, answers, rephrase, loc, loc_ans``
``mquake``                ``requested_rewrite`` (a list: a chain), ``questions, new_answer, new_answer_alias``
========================  ====================================================================================

The ``kedit`` layout is this project's own schema, written by `save_requests`: one object per request whose
keys are the `EditRequest` fields; ``neighborhood`` and ``consistency`` are lists of ``{"prompt", "answer"}``
objects (optionally with ``"aliases"``), ``target_true`` may be ``null`` and every list may be left out.
``prompt`` holds ``{}`` once where the subject goes; a prompt with the subject written out is accepted too.

Conversion rules (see ``docs/requests.md``): a prompt with the subject written out gets ``{}`` in place of
the subject's first occurrence; when the subject occurs only with other capitalisation, the prompt's
spelling becomes the subject. zsRE answers are not counterfactual, so ``target_true`` is the first gold
answer that differs from the new target (``None`` when there is none). Neighbour prompts keep the answer
that must not change; portability questions and MQuAKE multi-hop questions become consistency prompts (the
answer expected after the edit). Case ids become strings; records without one are numbered from 0.

Example:
    >>> request = EditRequest(case_id="0", prompt="{} plays the", subject="Toko Yasuda",
    ...                       target_new="piano", target_true="guitar")
    >>> request.prompt_text
    'Toko Yasuda plays the'
    >>> [r.case_id for r in bundled_requests()][:2]
    ['8798', '3212']
"""

from lightning_kedit.requests.edit_request import EditRequest, PromptAnswer
from lightning_kedit.requests.loading import (
    bundled_corpus_path,
    bundled_requests,
    load_requests,
    parse_request_records,
    save_requests,
)

__all__ = [
    "EditRequest",
    "PromptAnswer",
    "bundled_corpus_path",
    "bundled_requests",
    "load_requests",
    "parse_request_records",
    "save_requests",
]
