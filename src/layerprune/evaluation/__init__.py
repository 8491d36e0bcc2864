"""Evaluation: lm-eval zero-shot suite (online/offline), perplexity with protocol cards, teacher agreement.

lm-eval is imported only when a function that needs it runs, so importing this package stays cheap.
"""

from __future__ import annotations

from .agreement import compare, token_agreement
from .harness import evaluate, markdown_table, predictions, summarize
from .perplexity import PRESETS, Protocol, check_not_calibration, perplexity, resolve_protocol
from .tasks import SUITE, TaskSource, parse_tasks, write_offline_configs

__all__ = ["PRESETS", "SUITE", "Protocol", "TaskSource", "check_not_calibration", "compare", "evaluate",
           "markdown_table", "parse_tasks", "perplexity", "predictions", "resolve_protocol", "summarize",
           "token_agreement", "write_offline_configs"]
