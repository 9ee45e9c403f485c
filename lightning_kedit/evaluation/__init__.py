"""Evaluation: how an edited model is judged.

- :mod:`.scoring`: log-probabilities of answers after prompts, batched (``answer_log_probs``, ``answer_nll``).
- :mod:`.metrics`: the edit metrics (efficacy, generalization, specificity, ...) as torchmetrics classes, each
  with its functional twin (``EditEfficacy`` and ``edit_efficacy``, ...).
- :mod:`.request_evaluation`: ``score_requests`` / ``evaluate_requests``, which run the model over requests.
- :mod:`.field_metrics`: zsRE as the lifelong-editing literature measures it (token accuracy; locality as
  agreement with the unedited model's tokens).
- :mod:`.perplexity`: perplexity of a text (function and torchmetrics class).
- :mod:`.text_windows`: token windows of a text for perplexity and statistics.
"""
