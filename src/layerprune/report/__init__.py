"""The run report (markdown + self-contained HTML with plots), the model card and the mergekit / llama.cpp
exports, one module per concern:

* :mod:`.document` — the block model (headings, tables, images, ...) rendered to markdown and HTML;
* :mod:`.format`   — constants and value formatting;
* :mod:`.tables`   — what the manifest says, as descriptions and tables;
* :mod:`.plots`    — every plot;
* :mod:`.sections` — the report's sections and :func:`write_report`;
* :mod:`.card`     — the model card;
* :mod:`.exports`  — mergekit / llama.cpp exports.

Everything reads the run manifest. Every section is optional: a key that is missing or malformed drops its
section, never the report, because the report is written at the end of a long job and must not fail it.
"""

from __future__ import annotations

from ..plots import plot_accuracy, plot_layer_scores, plot_loss, plot_similarity
from .card import model_card
from .document import render_html, render_markdown
from .exports import contiguous_runs, llama_cpp_prune_list, mergekit_yaml, write_exports
from .sections import build_report, write_report
from .tables import compensation_table, summary_table

__all__ = ["build_report", "compensation_table", "contiguous_runs", "llama_cpp_prune_list", "mergekit_yaml",
           "model_card", "plot_accuracy", "plot_layer_scores", "plot_loss", "plot_similarity", "render_html",
           "render_markdown", "summary_table", "write_exports", "write_report"]
